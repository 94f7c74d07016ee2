"""The command-line apps in a checkout: the hardware check that runs before Hydra makes a run
directory, and the root that outputs/, data/ and caches resolve against from any directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cli_utils import run_cli
from ddpm.cli import missing_hardware
from ddpm.project import checkout_root, command, config_path
from hydra_utils import CONF_DIR, REPO_DIR

no_gpu = pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a GPU is here"
)


@no_gpu
def test_missing_gpu_stops_before_any_run_directory(tmp_path: Path) -> None:
    """A GPU recipe on a machine without one: one line naming the override, exit 1, and nothing
    written (no run directory, no W&B run: the recipe logs to W&B)."""
    res = run_cli(["experiment=cifar10_ddpm", "trainer.devices=4"], tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("trainer.accelerator=gpu trainer.devices=4 needs 4 GPU(s)"), last
    assert last.endswith("add trainer.accelerator=cpu trainer.devices=1 to run on the CPU"), last
    assert list(tmp_path.iterdir()) == []  # DDPM_ROOT=tmp_path (cli_utils): outputs/ would be here


@no_gpu
def test_missing_hardware_names_the_override_of_each_task() -> None:
    """Training's keys are trainer.*, sample/evaluate's top-level; cpu and auto always run."""
    assert "add accelerator=cpu devices=1" in missing_hardware("cuda", "auto")
    assert "needs 2 GPU(s)" in missing_hardware("gpu", [0, 1], "trainer.")
    assert missing_hardware("cpu", 4, "trainer.") is None
    assert missing_hardware("auto", 2) is None


def test_outputs_resolve_against_the_checkout_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Launched from another directory, a checkout's outputs/, data/ and .cache/ stay in the
    checkout; DDPM_ROOT moves them all; the configs are the checkout's conf/."""
    assert checkout_root() == REPO_DIR
    assert config_path() == CONF_DIR
    assert command("sample") == "python src/sample.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DDPM_ROOT", raising=False)

    def paths() -> dict[str, str]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", return_hydra_config=True)
        keys = ("data_dir", "log_dir", "cache_dir")
        return {k: cfg.paths[k] for k in keys} | {"run": cfg.hydra.run.dir, "data": cfg.data.root}

    found = paths()
    assert found["log_dir"] == str(REPO_DIR / "outputs")
    assert found["data_dir"] == found["data"] == str(REPO_DIR / "data")
    assert found["cache_dir"] == str(REPO_DIR / ".cache" / "ddpm")
    assert found["run"].startswith(str(REPO_DIR / "outputs" / "train" / "runs") + "/")
    monkeypatch.setenv("DDPM_ROOT", str(tmp_path / "elsewhere"))
    assert paths()["log_dir"] == str(tmp_path / "elsewhere" / "outputs")
