"""Save ``last.ckpt`` and stop cleanly on a stop signal: SIGTERM (preemption, ``scancel``), SIGINT
(Ctrl+C), SIGUSR1 (Lightning's SLURM auto-requeue signal), SIGUSR2 (submitit's time-limit and
preemption signal, hydra-submitit-launcher's default).

A signal handler must not save a checkpoint itself: it runs between two bytecodes of whatever the
main thread was doing (say, between the optimizer step and the LR-scheduler step), and under DDP
the other ranks would not join the collective save. So the handler only records the signal; at the
next optimizer-step boundary (``on_train_batch_end``) the ranks agree on it (one all-reduce), write
``last.ckpt`` atomically together, and raise :class:`TrainingInterrupted` (a ``SystemExit`` with
code 128 + signal number), which ends ``trainer.fit`` without running end-of-training work
(sample grids, FID); the message names the command that continues the run
(:func:`ddpm.run.resume_command`).

* Requeue: the handler that was in charge of the signal before training (submitit's, Lightning's
  SLURM requeue) is carried in :attr:`TrainingInterrupted.previous_handler`;
  :func:`ddpm.run.requeue.hand_over` lets exactly that mechanism requeue once the run is saved.
* Lightning's own SIGTERM / SIGUSR1 handlers (which stop or save at different points on different
  ranks, from inside the signal handler) are replaced while training runs.
* After the final training step (``last.ckpt`` written), a signal during end-of-training work
  (the final validation, sample grids, FID) stops at once: nothing is left to save.
* A second Ctrl+C aborts at once (``KeyboardInterrupt``, no checkpoint).
* With ``save_on_train_end`` the final step of a run (``max_steps``, ``max_epochs``, a
  ``trainer.max_time`` or early stop) is written to ``last.ckpt`` inside the training loop (never
  after it: Lightning cannot restart its loops exactly from a state saved after they finished), so
  a finished run can be continued with a larger ``trainer.max_steps``.
* Long work inside a step (FID, sample grids) can poll :func:`preemption_requested` and cut short.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ddpm.callbacks._lightning import accumulating, epoch_batches_done
from ddpm.callbacks.atomic_checkpoint import atomic_save_checkpoint
from ddpm.run import resume_command
from ddpm.run.checkpoint_files import source_run_dir

log = logging.getLogger(__name__)

LAST_NAME = "last"
_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")
DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after ``last.ckpt`` was written; exit code 128 + signal."""

    def __init__(
        self,
        signum: int,
        global_step: int,
        ckpt_path: str | None,
        previous_handler: Any = None,
    ) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.global_step = int(global_step)
        self.ckpt_path = ckpt_path
        self.previous_handler = previous_handler  # the signal's handler before training started

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return str(self.signum)

    def __str__(self) -> str:
        saved = f"checkpoint {self.ckpt_path}" if self.ckpt_path else "no checkpoint written"
        return (
            f"training interrupted by {self.signal_name} at global step {self.global_step} "
            f"({saved})"
        )


def preemption_requested(trainer: pl.Trainer | None) -> bool:
    """True once a stop signal was received in this process (for long-running callbacks)."""
    if trainer is None:
        return False
    return any(
        isinstance(cb, PreemptionCheckpoint) and cb.signum is not None for cb in trainer.callbacks
    )


class PreemptionCheckpoint(Checkpoint):
    """On a stop signal: finish the current optimizer step, save ``last.ckpt``, stop.

    A :class:`~pytorch_lightning.callbacks.Checkpoint`, so Lightning runs its hooks after all other
    callbacks (the EMA of the step is in the checkpoint).

    Args:
        signals: names of the signals to handle (SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP).
        dirpath: where ``last.ckpt`` goes; default: the first ``ModelCheckpoint``'s directory,
            else ``<default_root_dir>/checkpoints``.
        check_every_n_steps: how often the ranks agree on a pending signal under DDP (one tiny
            all-reduce each time); a single process checks a Python flag every step.
        save_on_train_end: write ``last.ckpt`` at the final training step when the periodic
            checkpoint did not already cover it.
    """

    def __init__(
        self,
        signals: list[str] | tuple[str, ...] = DEFAULT_SIGNALS,
        dirpath: str | os.PathLike | None = None,
        check_every_n_steps: int = 1,
        save_on_train_end: bool = True,
    ) -> None:
        signals = tuple(str(s).upper() for s in signals)
        bad = [s for s in signals if s not in _SIGNALS or not hasattr(signal, s)]
        if bad:
            raise ValueError(f"signals must be among {list(_SIGNALS)}, got {bad}")
        if (
            isinstance(check_every_n_steps, bool)
            or not isinstance(check_every_n_steps, int)
            or (check_every_n_steps < 1)
        ):
            raise ValueError(
                f"check_every_n_steps must be an integer >= 1, got {check_every_n_steps!r}"
            )
        self.signals = signals
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.check_every_n_steps = check_every_n_steps
        self.save_on_train_end = bool(save_on_train_end)
        self.signum: int | None = None  # first stop signal received
        self.received_at: float | None = None
        self.last_saved_step: int | None = None
        self.finished = False  # the final step is saved: a signal now stops at once
        self._previous: dict[int, Any] = {}
        self._handed_over: dict[int, Any] = {}  # previous handlers, kept for the hand-over
        self._trainer: pl.Trainer | None = None

    # ------------------------------------------------------------------ signals
    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a checkpoint-and-stop at the next step boundary (what the handler does)."""
        if self.signum is None:
            self.signum = int(signum)
            self.received_at = time.monotonic()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            # Second Ctrl+C: the user wants out now.
            self._restore_handlers()
            raise KeyboardInterrupt
        self.request(signum)
        if self.finished:  # end-of-training work: last.ckpt holds the final step already
            raise self._interrupted(self._trainer)

    def _interrupted(self, trainer: pl.Trainer | None) -> TrainingInterrupted:
        signum = self.signum if self.signum is not None else int(signal.SIGTERM)
        self._restore_handlers()
        step = trainer.global_step if trainer is not None else 0
        path = None if trainer is None or self.last_saved_step is None else self.last_path(trainer)
        return TrainingInterrupted(signum, step, path, self._handed_over.get(signum))

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for name in self.signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        self._handed_over = dict(self._previous)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._previous.items():
            current = signal.getsignal(sig)
            if getattr(current, "__self__", None) is self:  # ours: put the previous one back
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ paths
    def last_path(self, trainer: pl.Trainer) -> str:
        dirpath = self.dirpath
        if dirpath is None:
            mc = next(
                (
                    cb
                    for cb in trainer.checkpoint_callbacks
                    if isinstance(cb, ModelCheckpoint) and cb.dirpath
                ),
                None,
            )
            dirpath = (
                mc.dirpath
                if mc is not None
                else os.path.join(trainer.default_root_dir, "checkpoints")
            )
        return os.path.join(os.fspath(dirpath), LAST_NAME + ModelCheckpoint.FILE_EXTENSION)

    def _already_saved(self, trainer: pl.Trainer, path: str) -> bool:
        """Did a ModelCheckpoint write ``path`` at this very step (after this step's updates)?"""
        if self.last_saved_step == trainer.global_step:
            return True
        for cb in trainer.checkpoint_callbacks:
            if (
                isinstance(cb, ModelCheckpoint)
                and cb.last_model_path
                and os.path.abspath(cb.last_model_path) == os.path.abspath(path)
                and cb._last_global_step_saved == trainer.global_step
            ):
                return True
        return False

    def _save_last(self, trainer: pl.Trainer) -> str | None:
        if trainer.fast_dev_run:  # no checkpoints in fast_dev_run (Lightning's own rule)
            return None
        path = self.last_path(trainer)
        if not self._already_saved(trainer, path):
            atomic_save_checkpoint(trainer, path)
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.save_last:
                    cb.last_model_path = path
        self.last_saved_step = trainer.global_step
        return path

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its SIGTERM handler just before; a SIGTERM it already caught counts.
        self._trainer = trainer
        self.finished, self.signum, self.received_at = False, None, None  # a new fit
        if trainer.received_sigterm:
            self.request(signal.SIGTERM)
        self._install_handlers()

    def _pending(self, trainer: pl.Trainer) -> bool:
        """Whether any rank received a stop signal (agreed on by all ranks)."""
        if trainer.world_size == 1:
            return self.signum is not None
        if trainer.global_step % self.check_every_n_steps != 0:
            return False
        return trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if accumulating(trainer):  # only at optimizer-step boundaries
            return
        if not self._pending(trainer):
            if self._is_final_step(trainer):
                self._save_final(trainer)
            return
        t0 = time.monotonic()
        path = self._save_last(trainer)
        waited = t0 - self.received_at if self.received_at is not None else 0.0
        interrupted = self._interrupted(trainer)
        if path is not None:
            rank_zero_info(
                f"{interrupted.signal_name} received: saved {path} at global step "
                f"{trainer.global_step} ({waited:.1f} s after the signal, write "
                f"{time.monotonic() - t0:.1f} s). Resume with: "
                f"{resume_command(source_run_dir(path))}"
            )
        raise interrupted

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """An early stop decided at validation (``EarlyStopping``) ends the fit after it."""
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and trainer.should_stop and not self.finished:
            self._save_final(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``trainer.max_time`` is also checked at epoch ends (``Timer``, which runs before)."""
        if trainer.should_stop and not self.finished:
            self._save_final(trainer)

    def _save_final(self, trainer: pl.Trainer) -> None:
        if self.save_on_train_end:
            self._save_last(trainer)
        self.finished = True

    @staticmethod
    def _is_final_step(trainer: pl.Trainer) -> bool:
        """Will the fit stop after this batch (``max_steps``, the last batch of ``max_epochs``, or
        a stop requested by another callback, e.g. ``trainer.max_time``'s ``Timer``)?"""
        if trainer.should_stop:
            return True
        if trainer.max_steps is not None and trainer.max_steps > 0:
            if trainer.global_step >= trainer.max_steps:
                return True
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs:
            return epoch_batches_done(trainer)
        return False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the other callbacks' end-of-training work: a signal they polled ends the run
        # with the interruption's exit code.
        if self.signum is not None:
            raise self._interrupted(trainer)
        self._restore_handlers()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def state_dict(self) -> dict[str, Any]:
        return {}
