"""Real training runs in tests: callbacks that stop, slow down or break a run at a given step, or
record it (a run gets one as ``+callbacks.<name>._target_=run_utils.<Class>``, in-process or
through the command line), and reading what a run saved."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


def load_ckpt(path: Path) -> dict:
    """A checkpoint as plain data (``weights_only``, on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)


# ====================================================================== stop or slow a run
class SignalAt(pl.Callback):
    """Send ``signum`` to this very process when the batch of global step ``step`` starts."""

    def __init__(self, step: int, signum: int = int(signal.SIGINT)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalingSampler:
    """DDIM (its config's arguments) that sends ``signum`` to this very process during its
    ``call``-th call, once per process: a Ctrl-C in the middle of a sampling job
    (``sampler._target_=run_utils.SignalingSampler +sampler.call=2``)."""

    fired = False  # per process: a continued job in the same process is not stopped again

    def __init__(self, call: int = 2, signum: int = int(signal.SIGINT), **ddim: Any) -> None:
        from ddpm.diffusion.samplers import DDIMSampler

        self.inner = DDIMSampler(**ddim)
        self.guidance_scale = self.inner.guidance_scale
        self.call, self.signum, self.calls = call, signum, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.call and not SignalingSampler.fired:
            SignalingSampler.fired = True
            os.kill(os.getpid(), self.signum)
        return self.inner(*args, **kwargs)


class SleepAtStep(pl.Callback):
    """A slow step: spends ``seconds`` after step ``step``, so that ``trainer.max_time`` runs out
    right after it (the sleep is the slowness under test)."""

    def __init__(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            time.sleep(self.seconds)


class SignalDuringTrainEnd(pl.Callback):
    """Long end-of-training work (like a big sample grid) hit by a Ctrl+C (or ``signum``, e.g.
    submitit's time-limit SIGUSR2): the sleep is that work, which the signal must cut short."""

    def __init__(self, seconds: float, signum: int = int(signal.SIGINT)) -> None:
        self.seconds, self.signum = seconds, signum

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.kill(os.getpid(), self.signum)
        time.sleep(self.seconds)


class SlowLastSave(pl.Callback):
    """From the second write of ``last.ckpt`` on: write half of it, drop ``marker``, then hang
    (the test kills the process with SIGKILL in the middle of the save; the hang is bounded so
    that a test that fails to kill it leaves no process behind for long)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ckpt_io = trainer.strategy.checkpoint_io
        original = ckpt_io.save_checkpoint
        count = {"last": 0}
        marker = Path(self.marker)

        def save(checkpoint, path, storage_options=None):
            if str(path).endswith("last.ckpt.partial"):
                count["last"] += 1
                if count["last"] >= 2:
                    buf = io.BytesIO()
                    torch.save(checkpoint, buf)
                    data = buf.getvalue()
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                        os.fsync(f.fileno())
                    marker.write_text(str(checkpoint["global_step"]))
                    time.sleep(600)
            return original(checkpoint, path, storage_options)

        ckpt_io.save_checkpoint = save


# ====================================================================== numerical and disk faults
class NaNAt(pl.Callback):
    """Replace the batch by NaNs at the given steps (``from_step``: and every step after)."""

    def __init__(self, steps: list[int] | None = None, from_step: int | None = None) -> None:
        self.steps = set(steps or [])
        self.from_step = from_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        s = trainer.global_step
        if s in self.steps or (self.from_step is not None and s >= self.from_step):
            batch.fill_(float("nan"))


class InfWeightAfter(pl.Callback):
    """After optimizer step ``step``, overwrite one weight with Inf (an update that overflowed)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.net.parameters()).view(-1)[0] = float("inf")


# Read by the ``full_disk`` fixture's patched writes (tests/run/test_reliability.py).
DISK = {"full": False, "where": "write"}


class DiskFullFrom(pl.Callback):
    """From ``step`` on, checkpoint writes fail (see the ``full_disk`` fixture)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        DISK["full"] = trainer.global_step >= self.step


# ====================================================================== record a run
def rng_fingerprint() -> str:
    """A hash of the global RNG streams (torch, NumPy, Python)."""
    h = hashlib.sha1(torch.get_rng_state().numpy().tobytes())
    h.update(np.random.get_state()[1].tobytes())  # noqa: NPY002
    h.update(repr(random.getstate()).encode())
    return h.hexdigest()


class RngProbe(pl.Callback):
    """Fingerprints of the global RNG streams (torch, NumPy, Python) after every optimizer step,
    written to ``<run dir>/rng.json`` (merged over the launches of a run)."""

    def __init__(self) -> None:
        self.prints: dict[str, str] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not trainer.fit_loop._should_accumulate():
            self.prints[str(trainer.global_step)] = rng_fingerprint()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        path = Path(trainer.default_root_dir) / "rng.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**old, **self.prints}))
