"""Lightning's LearningRateMonitor, silent (instead of raising) when the run has no logger."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor as _LearningRateMonitor


class LearningRateMonitor(_LearningRateMonitor):
    """Logs ``lr-*`` every step; a no-op under ``logger=none`` or ``fast_dev_run`` (which turns
    the loggers off: Lightning's monitor raises a MisconfigurationException without a logger)."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._enabled = bool(trainer.loggers)
        if self._enabled:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_enabled", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_enabled", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)
