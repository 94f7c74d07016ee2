"""The entry points (``src/train.py``, ``sample.py``, ...) as a user runs them, in a subprocess,
and waiting on what such a process does (a file written, a step reached) instead of on a guess of
how long it takes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hydra_utils import SRC_DIR, TESTS_DIR

TRAIN = str(SRC_DIR / "train.py")


def cli_env(cwd: Path, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, W&B offline, full Hydra errors, the test helpers importable (for
    ``+callbacks.x._target_=run_utils.X``) and ``outputs/``, ``data/``, ``.cache/`` under ``cwd``
    (``DDPM_ROOT``; a checkout's default root is the repository); ``extra_env`` last."""
    return {
        **os.environ,
        "DDPM_ROOT": str(cwd),
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(TESTS_DIR),
        "HYDRA_FULL_ERROR": "1",
        **(extra_env or {}),
    }


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: float = 300,
    script: str = TRAIN,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``script`` (default ``src/train.py``) with Hydra overrides ``args`` to completion."""
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=cwd,
        env=cli_env(cwd, extra_env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(args: list[str], cwd: Path, script: str = TRAIN) -> subprocess.Popen:
    """Start ``script`` in its own session (so a test can signal or kill its process group) and
    return at once; stdout and stderr are piped."""
    return subprocess.Popen(
        [sys.executable, script, *args],
        cwd=cwd,
        env=cli_env(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(
    condition: Callable[[], bool],
    what: str,
    proc: subprocess.Popen | None = None,
    timeout: float = 240.0,
    poll: float = 0.1,
) -> None:
    """Return as soon as ``condition()`` holds (checked every ``poll`` s). Fails naming ``what``
    with the output of ``proc`` if that process ends first, or after ``timeout`` s (then ``proc``
    and its process group are killed)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"waiting for {what}: the process ended first (exit {proc.returncode}):\n"
                f"{(err or out or '')[-3000:]}"
            )
        if time.monotonic() > deadline:
            output = ""
            if proc is not None:
                if os.getpgid(proc.pid) == proc.pid:  # its own session (start_cli)
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
                out, err = proc.communicate()
                output = f":\n{(err or out or '')[-3000:]}"
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{output}")
        time.sleep(poll)  # the poll interval of this wait, not a guess of a duration
