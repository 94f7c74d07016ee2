"""Training progress counted in optimizer steps (runs are set by ``trainer.max_steps``, epochs are
unbounded): a bar of ``step / max_steps`` on a terminal, plain lines in log files.

Lightning's default bar counts batches of the current epoch and describes ``max_epochs=-1`` as
``Epoch 4/-2``; when the output is not a terminal (SLURM logs, ``nohup``, ``make train > log``)
it shows nothing until an epoch ends. :func:`training_progress` picks, once, what fits the output.
Both count speed and ETA as this launch's optimizer steps over its wall time, so a resumed run's
first steps do not count as done in no time, and both show ``max_steps`` from the first step.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

from ddpm.utils.checks import check_positive_int
from ddpm.utils.progress import hms

log = logging.getLogger(__name__)


def _total_steps(trainer: pl.Trainer) -> int | None:
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None


class StepProgressBar(TQDMProgressBar):
    """tqdm bar over optimizer steps (``step/max_steps``) with the logged ``prog_bar`` metrics, the
    speed in steps/s and the ETA (this launch's steps over its wall time: tqdm's own rate would
    count a resumed run's earlier steps, and reset at every epoch), when ``max_steps`` is set;
    Lightning's per-epoch bar otherwise."""

    STEP_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{postfix}]"

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate)
        self._start, self._start_step = 0.0, 0

    def init_train_tqdm(self) -> Tqdm:
        """A bar of ``global_step / max_steps`` from its first display, with no rate or ETA of
        tqdm's own (see :meth:`speed_and_eta`)."""
        trainer = self.trainer
        total = _total_steps(trainer)
        if total is None:
            return super().init_train_tqdm()
        return Tqdm(
            desc=f"Training (epoch {trainer.current_epoch})",
            total=total,
            initial=trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            bar_format=self.STEP_FORMAT,
        )

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._start, self._start_step = time.monotonic(), trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        """Keep counting steps across epochs (Lightning resets the bar to the epoch's batches)."""
        if _total_steps(trainer) is None:
            super().on_train_epoch_start(trainer, *args)
        elif self.train_progress_bar is not None:
            self.train_progress_bar.set_description_str(f"Training (epoch {trainer.current_epoch})")

    def speed_and_eta(self, trainer: pl.Trainer) -> dict[str, str]:
        """This launch's optimizer steps per second of wall time and the time left at that
        speed."""
        done, elapsed = trainer.global_step - self._start_step, time.monotonic() - self._start
        total = _total_steps(trainer)
        if done <= 0 or elapsed <= 0 or total is None:
            return {}
        rate = done / elapsed
        return {"speed": f"{rate:.3g} steps/s", "ETA": hms((total - trainer.global_step) / rate)}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if _total_steps(trainer) is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
            return
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or not (step % self.refresh_rate == 0 or step == bar.total):
            return
        bar.n = step
        bar.set_postfix({**self.get_metrics(trainer, pl_module), **self.speed_and_eta(trainer)})


class ProgressLines(ProgressBar):
    """Every ``every_n_steps`` optimizer steps one plain line on rank 0 through ``logging``::

        step 400/800 (50%) | train/loss 0.0231 | 412 img/s | elapsed 0:01:37 | ETA 0:01:37

    img/s counts images of all devices since the previous line."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        check_positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start = self._last_time = 0.0
        self._start_step = self._last_step = 0
        self._images = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last_time = time.monotonic()
        self._start_step = self._last_step = trainer.global_step
        self._images = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += int(getattr(x, "shape", [0])[0]) * trainer.world_size
        step = trainer.global_step
        total = _total_steps(trainer)
        due = step % self.every_n_steps == 0 or step == total
        if not (self._enabled and trainer.is_global_zero and due and step != self._last_step):
            return
        now = time.monotonic()
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key != "v_num":
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        if now > self._last_time:
            parts.append(f"{self._images / (now - self._last_time):.3g} img/s")
        parts.append(f"elapsed {hms(now - self._start)}")
        done = step - self._start_step
        if total and done > 0:
            parts.append(f"ETA {hms((now - self._start) / done * (total - step))}")
        log.info(" | ".join(parts))
        self._last_time, self._last_step, self._images = now, step, 0


def training_progress(enabled: bool = True, every_n_steps: int = 50) -> pl.Callback:
    """The progress display for this process's output: :class:`StepProgressBar` on a terminal,
    :class:`ProgressLines` otherwise; a no-op callback when ``enabled`` is false (Lightning
    refuses a progress bar with ``trainer.enable_progress_bar=false``)."""
    check_positive_int("every_n_steps", every_n_steps)
    if not enabled:
        return pl.Callback()
    if sys.stdout.isatty():
        return StepProgressBar()
    return ProgressLines(every_n_steps)
