"""``pip install .`` (not editable) into a fresh virtual environment: the wheel holds every config,
the console commands run from any directory, a user's own config directory joins the search path,
and outputs land in the current directory.

The dependencies are not installed again (torch alone is gigabytes): the new environment sees
this interpreter's site-packages through a ``.pth`` file, and the package is built from a copy of
the sources (a build writes ``build/`` and ``*.egg-info`` next to them) without build isolation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from hydra_utils import CONF_DIR, REPO_DIR

COMMANDS = (
    "ddpm-train",
    "ddpm-sample",
    "ddpm-evaluate",
    "ddpm-export",
    "ddpm-visualize",
    "ddpm-reflow",
)

# a user's own experiment, in a config directory of their own (README "Install as a library")
USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: tiny
  - override /logger: none
trainer:
  accelerator: cpu
  max_steps: 3
  val_check_interval: 3
  limit_val_batches: 1
  enable_progress_bar: false
  enable_model_summary: false
schedule:
  num_timesteps: 50
data:
  batch_size: 16
lr_scheduler:
  warmup_steps: 0
callbacks:
  sample_grid:
    num_samples: 4
    batch_size: 4
sampler:
  steps: 2
num_threads: 1
"""


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DDPM_ROOT")}
    env.update(WANDB_MODE="offline", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh environment's bin/, the wheel it was installed from)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "local")
    for name in ("src", "conf"):
        shutil.copytree(REPO_DIR / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(REPO_DIR / name, source / name)
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp
    )
    (Path(site.stdout.strip()) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)],
        tmp,
    )
    (wheel,) = (tmp / "dist").glob("ddpm_lightning-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", str(wheel)], tmp)
    return env_dir / "bin", wheel


@pytest.mark.slow
def test_wheel_ships_every_config_and_the_commands(installed: tuple[Path, Path]) -> None:
    bin_dir, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = Path(CONF_DIR)
    expected = {
        f"ddpm/conf/{p.relative_to(conf).as_posix()}"
        for p in conf.rglob("*.yaml")
        if p.relative_to(conf).parts[0] != "local"
    }
    assert expected and expected <= names, sorted(expected - names)
    assert "ddpm/conf/__init__.py" in names
    assert not any(n.startswith("ddpm/conf/local/") for n in names)
    assert all((bin_dir / c).is_file() for c in COMMANDS)


@pytest.mark.slow
def test_installed_commands_run_from_another_directory(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    """``ddpm-train --config-dir DIR experiment=mine`` from a directory of the user's: the package
    composes from pkg://ddpm.conf plus the user's directory, trains, and writes under ./outputs;
    every other command composes its config from the installed package."""
    bin_dir, _ = installed
    (tmp_path / "my_configs" / "experiment").mkdir(parents=True)
    (tmp_path / "my_configs" / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    others = [
        subprocess.Popen(
            [str(bin_dir / c), "--cfg", "job", "--package", "paths", "--resolve"],
            cwd=tmp_path,
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DDPM_ROOT")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in COMMANDS[1:]
    ]
    res = _run(
        [str(bin_dir / "ddpm-train"), "--config-dir", "my_configs", "experiment=mine"], tmp_path
    )
    (ckpt,) = (tmp_path / "outputs" / "train" / "runs").glob("*/checkpoints/last.ckpt")
    run = ckpt.parents[1]
    assert (run / "train.log").is_file() and (run / "metrics.json").is_file()
    assert str(run) in res.stdout + res.stderr
    for proc in others:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert f"log_dir: {tmp_path}/outputs" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_configs", "outputs"]
