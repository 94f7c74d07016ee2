"""sample.py and evaluate.py as long jobs: inputs checked before any process starts, progress
lines in log files, a Ctrl-C that keeps what was drawn and a continuation that finishes it."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from cli_utils import run_cli
from ddpm.checkpoint import CheckpointError
from ddpm.errors import ConfigError
from ddpm.tasks.evaluate import evaluate
from ddpm.tasks.sample import PARTIAL_FILE, sample
from hydra_utils import SRC_DIR, compose_cfg

SAMPLE = str(SRC_DIR / "sample.py")


def sample_cfg(tmp_path: Path, ckpt: Path, *extra: str):
    return compose_cfg(
        [f"ckpt_path={ckpt}", "accelerator=cpu", "tracker.run=none", *extra],
        tmp_path,
        config_name="sample",
    )


def test_ctrl_c_keeps_what_was_drawn_and_the_continuation_finishes_it_exactly(
    tiny_ckpt: Path, tmp_path: Path, default_sigint: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C during the second of four batches: that batch finishes, samples_partial.npz holds
    samples 0-3 with their indices, the exit code is 130 and the message says how to continue;
    the same command continued in that directory draws only 4-6, and the result equals an
    uninterrupted run's. Progress: a plain line per report (not a terminal)."""
    common = ["sampler=ddim", "sampler.steps=3", "num_samples=7", "batch_size=2", "seed=5"]
    stopping = ["sampler._target_=run_utils.SignalingSampler", "+sampler.call=2"]
    caplog.set_level("INFO")
    with pytest.raises(SystemExit) as stop:
        sample(sample_cfg(tmp_path / "a", tiny_ckpt, *common, *stopping))
    assert stop.value.code == 128 + signal.SIGINT
    run = tmp_path / "a" / "run"
    with np.load(run / PARTIAL_FILE) as partial:
        assert partial["indices"].tolist() == [0, 1, 2, 3] and partial["arr_0"].shape[0] == 4
    assert not (run / "samples.npz").exists() and (run / "config_tree.log").is_file()
    message = next(r.getMessage() for r in caplog.records if "stopped by SIGINT" in r.getMessage())
    assert "after 4 of 7 samples" in message and f"run_dir={run}" in message
    lines = [r.getMessage() for r in caplog.records if r.name == "ddpm.utils.progress"]
    assert lines and lines[0].startswith("sampling: 2/7 images (29%) | "), lines
    assert all(" images/s | elapsed " in ln and " | ETA " in ln for ln in lines), lines

    caplog.clear()
    path = sample(sample_cfg(tmp_path / "a", tiny_ckpt, *common, *stopping))  # continue
    assert path == run / "samples.npz" and not (run / PARTIAL_FILE).exists()
    assert (
        "3/3 images" in [r.getMessage() for r in caplog.records if "sampling" in r.getMessage()][-1]
    )
    whole = sample(sample_cfg(tmp_path / "b", tiny_ckpt, *common, "batch_size=7"))
    np.testing.assert_array_equal(np.load(path)["arr_0"], np.load(whole)["arr_0"])
    # a continuation asking for other samples is refused, naming what differs
    with np.load(path) as done:
        np.savez(run / PARTIAL_FILE, arr_0=done["arr_0"][:2], indices=np.arange(2))
    with pytest.raises(ConfigError, match="seed_first differ"):
        sample(sample_cfg(tmp_path / "a", tiny_ckpt, *common[:-1], "seed=6"))


def test_bad_inputs_fail_before_any_process_with_the_setting_named(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"guidance_scale must be a finite number.*got inf"):
        sample(sample_cfg(tmp_path, tiny_ckpt, "guidance_scale=inf"))
    with pytest.raises(ConfigError, match=r"sampler.guidance_scale must be a finite.*got nan"):
        sample(sample_cfg(tmp_path, tiny_ckpt, "sampler=ddim", "sampler.guidance_scale=nan"))
    with pytest.raises(ConfigError, match=r"class_labels must be whole class indices.*1.5"):
        sample(sample_cfg(tmp_path, tiny_ckpt, "class_labels=[1.5]"))
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((4, 16, 16, 1), np.uint8), arr_1=np.zeros(3, np.int64))
    with pytest.raises(ConfigError, match=rf"samples={npz}: .*arr_1 must hold one integer class"):
        evaluate(
            compose_cfg(
                ["accelerator=cpu", f"samples={npz}", "ref=digits-train"],
                tmp_path,
                config_name="evaluate",
            )
        )
    with pytest.raises(CheckpointError, match="not found"):
        sample(sample_cfg(tmp_path, tmp_path / "nope.ckpt", "devices=8", "strategy=ddp"))


@pytest.mark.slow
def test_eight_devices_and_a_missing_checkpoint_fail_once_before_spawning(tmp_path: Path) -> None:
    res = run_cli(
        ["ckpt_path=missing.ckpt", "accelerator=cpu", "devices=8", "strategy=ddp"],
        tmp_path,
        script=SAMPLE,
        timeout=120,
    )
    assert res.returncode != 0, res.stderr[-3000:]
    assert res.stderr.count("checkpoint not found: missing.ckpt") == 1, res.stderr[-3000:]
