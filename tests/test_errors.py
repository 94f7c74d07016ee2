"""Errors a user can act on reach them as a message, not a traceback (``ddpm.errors``): a bad
setting before any work, bad data found inside the fit, unless ``HYDRA_FULL_ERROR=1``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from cli_utils import run_cli
from ddpm.errors import ConfigError, DataError, reports_errors
from hydra_utils import CLI_TINY


def _raising(error: BaseException):
    @reports_errors
    def task(cfg: object) -> None:
        raise error

    return task


def test_a_config_error_is_its_message_and_exit_code_1(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    wrapped = InstantiationException("Error in call to target 'ddpm.data.ImageDataModule'")
    wrapped.__cause__ = DataError("image folder not found: /nowhere (data.root)")
    for error, message in [
        (ConfigError("optimizer.lr must be a finite number > 0, got inf"), "optimizer.lr must"),
        (wrapped, "image folder not found: /nowhere (data.root)"),  # what instantiate raises
    ]:
        caplog.clear()
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as info:
            _raising(error)(None)
        assert info.value.code == 1
        assert caplog.records[-1].getMessage().startswith(message)
    with pytest.raises(ValueError, match="a bug"):  # anything else keeps its traceback
        _raising(ValueError("a bug"))(None)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError):
        _raising(ConfigError("x"))(None)


def test_bad_data_found_inside_the_fit_is_one_message(tmp_path: Path) -> None:
    """An image folder without images fails in the datamodule's set-up, inside Lightning's fit,
    many frames deep: the user sees the message alone."""
    empty = tmp_path / "images"
    empty.mkdir()
    args = [*CLI_TINY, "data=image_folder", f"data.root={empty}", "data.image_size=16",
            "model.attention_resolutions=[]", "trainer.max_steps=2"]  # fmt: skip
    result = run_cli(args, tmp_path, extra_env={"HYDRA_FULL_ERROR": "0"})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert f"no image files found under {empty}" in output
    assert "Traceback" not in output and "HYDRA_FULL_ERROR=1 shows the traceback" in output
