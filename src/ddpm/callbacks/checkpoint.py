"""Checkpoints that are never half-written: write to a temporary file, fsync, then rename."""

from __future__ import annotations

import contextlib
import os
from weakref import proxy

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

PARTIAL_SUFFIX = ".partial"


class CheckpointWriteError(RuntimeError):
    """Saving a checkpoint failed (disk full, not writable); earlier checkpoints are intact."""


def atomic_save_checkpoint(trainer: pl.Trainer, filepath: str, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` to ``filepath + '.partial'``, then an atomic rename.

    A crash or kill mid-write leaves at most a ``.partial`` file: ``filepath`` is either the old
    complete checkpoint or the new complete one. Collective: call it on every rank.
    """
    tmp = filepath + PARTIAL_SUFFIX
    error: BaseException | None = None
    try:
        trainer.save_checkpoint(tmp, weights_only)
    except OSError as e:  # ENOSPC, EACCES, EROFS, ...
        error = e
    if trainer.is_global_zero:
        if error is None:
            try:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, filepath)
                with contextlib.suppress(OSError):
                    dfd = os.open(os.path.dirname(os.path.abspath(filepath)), os.O_RDONLY)
                    os.fsync(dfd)
                    os.close(dfd)
            except OSError as e:
                error = e
        if error is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise CheckpointWriteError(
                f"could not write checkpoint {filepath}: {error}. Earlier checkpoints in "
                f"{os.path.dirname(filepath) or '.'} are intact; free space or fix permissions "
                "and resume with ckpt_path=<one of them>."
            ) from error


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (last K, best by a metric, ``last.ckpt``) with atomic writes."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        atomic_save_checkpoint(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
