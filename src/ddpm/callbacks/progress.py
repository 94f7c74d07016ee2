"""Training progress counted in optimizer steps (runs are set by ``trainer.max_steps``, epochs are
unbounded): a bar of ``step / max_steps`` on a terminal, plain lines in log files.

Lightning's default bar counts batches of the current epoch and describes ``max_epochs=-1`` as
``Epoch 4/-2``; when the output is not a terminal (SLURM logs, ``nohup``, ``make train > log``)
it shows nothing until an epoch ends. :func:`training_progress` picks, once, what fits the output.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

from ddpm.utils.checks import check_positive_int

log = logging.getLogger(__name__)


def _total_steps(trainer: pl.Trainer) -> int | None:
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None


class StepProgressBar(TQDMProgressBar):
    """tqdm bar over optimizer steps (``step/max_steps``, ETA) when ``max_steps`` is set, with the
    logged ``prog_bar`` metrics; Lightning's per-epoch bar otherwise."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = _total_steps(trainer)
        if total is not None and self.train_progress_bar is not None:
            bar = self.train_progress_bar
            bar.total, bar.n = total, trainer.global_step
            bar.set_description(f"Training (epoch {trainer.current_epoch})")
            bar.refresh()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if _total_steps(trainer) is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
            return
        bar = self.train_progress_bar
        step = trainer.global_step
        if (
            bar is not None
            and not bar.disable
            and (step % self.refresh_rate == 0 or step == bar.total)
        ):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


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
        parts.append(f"elapsed {_hms(now - self._start)}")
        done = step - self._start_step
        if total and done > 0:
            parts.append(f"ETA {_hms((now - self._start) / done * (total - step))}")
        log.info(" | ".join(parts))
        self._last_time, self._last_step, self._images = now, step, 0


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


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
