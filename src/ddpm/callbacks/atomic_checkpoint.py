"""Checkpoints that are never half-written: write to a temporary file, fsync, then rename.

:func:`atomic_save_checkpoint` is what every checkpoint of a training run goes through (the
periodic / best ones of :class:`AtomicModelCheckpoint` and the preemption one of
:class:`~ddpm.callbacks.preemption.PreemptionCheckpoint`). A kill at any moment leaves either the
previous complete file or the new complete file under the final name (plus, at worst, a stale
``*.partial``, removed when the run resumes: :func:`ddpm.run.checkpoint_files.remove_partial_files`).
A failed write (disk full, read-only directory) raises :class:`CheckpointWriteError` on every rank
-- never a hang in a collective -- and leaves the earlier checkpoints untouched.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any
from weakref import proxy

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ddpm.callbacks._lightning import check_internals, dump_checkpoint
from ddpm.callbacks.nonfinite import refuse_nonfinite_weights
from ddpm.run import resume_command
from ddpm.run.checkpoint_files import PARTIAL_SUFFIX, source_run_dir

check_internals()  # the ModelCheckpoint methods overridden below still exist, unchanged


class CheckpointWriteError(RuntimeError):
    """Saving a checkpoint failed (disk full, not writable); earlier checkpoints are intact."""


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_save_checkpoint(trainer: pl.Trainer, filepath: str, weights_only: bool = False) -> None:
    """Save the trainer's checkpoint to ``filepath`` atomically. Collective: call it on every rank.

    The checkpoint is written to ``filepath + '.partial'``, flushed to disk (fsync) and renamed over
    ``filepath`` (``os.replace`` is atomic on POSIX), then the directory entry is fsynced. An
    ``OSError`` on any rank (ENOSPC, EACCES, EROFS, ...) becomes a :class:`CheckpointWriteError`
    raised on all ranks after the temporary file was removed.
    """
    filepath = os.fspath(filepath)
    tmp = filepath + PARTIAL_SUFFIX
    error: BaseException | None = None
    refuse_nonfinite_weights(trainer, filepath)  # never write NaN/Inf weights (collective)
    # The state dump is collective (hooks may all_gather), so every rank does it first.
    checkpoint = dump_checkpoint(trainer, weights_only)
    try:
        # Writes on rank 0 only for the usual strategies (single device, DDP).
        trainer.strategy.save_checkpoint(checkpoint, tmp)
        if trainer.is_global_zero:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, filepath)
            _fsync_dir(os.path.dirname(os.path.abspath(filepath)))
    except OSError as e:
        error = e
    del checkpoint
    failed = trainer.strategy.reduce_boolean_decision(error is not None, all=False)
    if not failed:
        return
    if trainer.is_global_zero:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    reason = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
    raise CheckpointWriteError(
        f"could not write checkpoint {filepath} ({reason}). Earlier checkpoints in "
        f"{os.path.dirname(filepath) or '.'} are intact; free disk space or fix the permissions, "
        f"then resume with {resume_command(source_run_dir(filepath))}."
    ) from error


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (last K, best by a metric, ``last.ckpt``) with atomic writes.

    Lightning writes the new file before it deletes the one it replaces, so with atomic writes a
    crash never leaves fewer complete checkpoints than before.
    """

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        # A best-by-metric checkpoint whose metric is never logged (val/loss_ema without EMA,
        # validation disabled) warns once instead of ending the run with an exception.
        if (
            self.save_top_k != 0
            and self.monitor is not None
            and (self.monitor not in monitor_candidates)
        ):
            if not getattr(self, "_warned_missing_monitor", False):
                self._warned_missing_monitor = True
                rank_zero_warn(
                    f"{type(self).__name__}(monitor={self.monitor!r}): the metric is not logged "
                    f"(available: {sorted(monitor_candidates)}); no checkpoint by this metric."
                )
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """As Lightning, except that a checkpoint due at the last batch of an epoch is written
        there when the monitor is ``step`` / ``epoch``: Lightning defers it to the validation it
        expects after that batch (for a fresh metric), which with ``check_val_every_n_epoch=null``
        may not run then, so the checkpoint came late under the wrong step, or never."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._defer_save_until_validation and self.monitor in ("step", "epoch"):
            self._defer_save_until_validation = False
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Never save here. Lightning writes ``last.ckpt`` at train end when this fit saved nothing
        yet, but after the loops finished: that checkpoint records the epoch one too high, and a
        run resumed from it shuffles its data with the wrong epoch's order. The final step is
        saved inside the loop instead (:class:`~ddpm.callbacks.preemption.PreemptionCheckpoint`
        with ``save_on_train_end``)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As Lightning, but what the callback remembers of its files (the top-k, the best, the
        last) is taken by file name in *this* callback's directory, keeping the files present
        there: a run directory copied or moved (``cp -a run run2``) rotates its own step files
        and rewrites its own ``last.ckpt``. (Lightning keeps nothing when the directory's path
        changed, so the files it finds are never rotated away and ``last.ckpt`` is written as
        ``last-v1.ckpt`` beside them.) With ``save_last``, the ``last.ckpt`` there is this
        callback's own even when another writer saved it (a stop signal before the first periodic
        save: :class:`~ddpm.callbacks.preemption.PreemptionCheckpoint`)."""
        if self.dirpath is None:
            super().load_state_dict(state_dict)
            return

        def here(path: str | None) -> str:
            mine = os.path.join(self.dirpath, os.path.basename(path)) if path else ""
            return mine if mine and os.path.isfile(mine) else ""

        best_k = {here(p): score for p, score in state_dict.get("best_k_models", {}).items()}
        best_k.pop("", None)
        last = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        own_last = last if self.save_last and os.path.isfile(last) else ""
        super().load_state_dict(
            {
                **state_dict,
                "dirpath": self.dirpath,
                "best_k_models": best_k,
                "best_model_path": here(state_dict.get("best_model_path")),
                "kth_best_model_path": here(state_dict.get("kth_best_model_path")),
                "last_model_path": here(state_dict.get("last_model_path")) or own_last,
            }
        )

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        atomic_save_checkpoint(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
