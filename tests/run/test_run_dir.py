"""The run directory: one live process per run (the lock, on every OS), a copied directory
that rotates its own checkpoints, and checkpoint discovery while another process rotates them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ddpm.run.checkpoint_files as checkpoint_files
from cli_utils import cli_env, wait_for
from ddpm.callbacks.preemption import TrainingInterrupted
from ddpm.errors import ConfigError
from ddpm.run.checkpoint_files import find_checkpoint
from ddpm.run.lock import EXCLUSIVE_FILE, run_dir_lock
from ddpm.tasks.train import train
from hydra_utils import SRC_DIR, TESTS_DIR, TINY, compose_cfg
from run_utils import load_ckpt

FAST = [
    *TINY,
    "trainer.limit_val_batches=0",
    "callbacks.best_checkpoint=null",
    "callbacks.sample_grid.every_n_steps=1000",
    "callbacks.sample_grid.at_train_end=false",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.save_top_k=2",
]
# Holds the run directory's lock the way a training process does (flock on POSIX), until killed.
HOLDER = (
    "import sys, time; from pathlib import Path; from ddpm.run.lock import run_dir_lock\n"
    "with run_dir_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)\n"
)


def _hold(run: Path) -> subprocess.Popen:
    """Another live process holding ``run``'s lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        env=cli_env({"PYTHONPATH": os.pathsep.join([str(SRC_DIR), str(TESTS_DIR)])}),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line: list[str] = []
    wait_for(lambda: bool(line.append(proc.stdout.readline()) or line[-1]), "the lock", proc)
    assert line[-1].strip() == "held"
    return proc


def test_the_lock_is_held_across_processes_and_released_by_a_kill(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _hold(run)
    try:
        pattern = rf"in use by another training process \(pid {proc.pid} on "
        with pytest.raises(ConfigError, match=pattern):
            with run_dir_lock(run):
                pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9: the OS releases the lock
        proc.wait()
    with run_dir_lock(run):
        pass


def test_without_os_locks_an_exclusive_file_stands_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where neither flock nor msvcrt works: an O_EXCL file naming the owner; one a killed
    process left on this host is taken over, another host's is refused naming the file."""
    monkeypatch.setattr("ddpm.run.lock.fcntl", None)
    monkeypatch.setattr("ddpm.run.lock.msvcrt", None)
    run = tmp_path / "run"
    with run_dir_lock(run):
        assert f"pid {os.getpid()}" in (run / EXCLUSIVE_FILE).read_text()
        with pytest.raises(ConfigError, match="in use by another training process"):
            with run_dir_lock(run):
                pass
    assert not (run / EXCLUSIVE_FILE).exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    (run / EXCLUSIVE_FILE).write_text(f"\npid {gone.stdout.strip()} on {socket.gethostname()}\n")
    with run_dir_lock(run):  # left by a process that is gone
        pass
    (run / EXCLUSIVE_FILE).write_text("\npid 1 on another-host\n")
    with pytest.raises(ConfigError, match=f"pid 1 on another-host.*remove {run / EXCLUSIVE_FILE}"):
        with run_dir_lock(run):
            pass


def test_last_and_auto_are_refused_while_another_process_holds_the_run(tmp_path: Path) -> None:
    """Both take the lock before reading the run's checkpoints, so neither reads files that a
    live run is rotating: refused as in use (not as a run without a loadable checkpoint)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"half a checkpoint")  # mid-save
    proc = _hold(run)
    try:
        for mode in ("last", "auto"):
            cfg = compose_cfg([*FAST, f"ckpt_path={mode}", f"run_dir={run}"], tmp_path)
            with pytest.raises(ConfigError, match="in use by another training process"):
                train(cfg)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _fake_ckpt(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": step, "epoch": 0}, path)


def test_discovery_skips_checkpoints_that_vanish_while_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process rotates checkpoints away between the listing and the reading (and the
    stat): those files are not there, neither an error nor a warning."""
    ck = tmp_path / "checkpoints"
    for step in (2, 4):
        _fake_ckpt(ck / f"step_{step:07d}.ckpt", step)
    _fake_ckpt(ck / "last.ckpt", 3)
    real = checkpoint_files.checkpoint_info

    def rotating(path):  # step 2 goes before it is read, step 4 right after
        if path.endswith("step_0000002.ckpt"):
            os.remove(path)
        info = real(path)
        if path.endswith("step_0000004.ckpt"):
            os.remove(path)
        return info

    monkeypatch.setattr(checkpoint_files, "checkpoint_info", rotating)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint(tmp_path) == str(ck / "last.ckpt")


def test_a_copied_run_directory_rotates_its_own_checkpoints(tmp_path: Path) -> None:
    """``cp -a run run2`` then resuming run2: its step files rotate (save_top_k=2) and it writes
    its own last.ckpt (no last-v1.ckpt); the original is left as it was. (Its weights equal an
    uninterrupted run's: ``bench/soak.py --cases copy``.)"""
    train(compose_cfg([*FAST, "trainer.max_steps=4"], tmp_path / "a"))
    run, copy = tmp_path / "a" / "run", tmp_path / "b" / "run"
    shutil.copytree(run, copy, symlinks=True)  # cp -a
    overrides = ["ckpt_path=last", f"run_dir={copy}", "trainer.max_steps=8"]
    train(compose_cfg(overrides, copy.parent))  # resumed where it lies (Hydra's run dir)
    names = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step_0000006.ckpt", "step_0000008.ckpt"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"
    ]  # fmt: skip
    assert load_ckpt(copy / "checkpoints" / "last.ckpt")["global_step"] == 8


def test_a_run_stopped_before_its_first_periodic_save_keeps_one_last_ckpt(tmp_path: Path) -> None:
    """A stop signal before the first periodic save: ``last.ckpt`` is written by the preemption
    save, not the checkpoint callback. Resumed in place or copied, the run still rewrites that
    ``last.ckpt`` (no ``last-v1.ckpt``) and rotates its step files."""
    stop = [
        *FAST,
        "trainer.max_steps=8",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "+callbacks.sig._target_=run_utils.SignalAt",
        f"+callbacks.sig.signum={int(signal.SIGTERM)}",
    ]
    with pytest.raises(TrainingInterrupted):
        train(compose_cfg([*stop, "+callbacks.sig.step=0"], tmp_path / "a"))
    run, copy = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    shutil.copytree(run, copy, symlinks=True)
    for d in (run, copy):
        train(compose_cfg([*stop, "+callbacks.sig.step=100", "ckpt_path=last", f"run_dir={d}"],
                          d.parent))  # fmt: skip
        names = sorted(p.name for p in (d / "checkpoints").iterdir())
        assert names == ["last.ckpt", "step_0000004.ckpt", "step_0000008.ckpt"], d
        assert load_ckpt(d / "checkpoints" / "last.ckpt")["global_step"] == 8
