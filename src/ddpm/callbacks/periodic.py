"""Callbacks that evaluate every n optimizer steps (:class:`PeriodicCallback`: the pictures, FID,
NLL), and what their evaluations share: the network in eval mode, metrics logged at their own
steps rather than Lightning's log cadence."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ddpm.utils.checks import check_positive_int


def is_fast_dev_run(trainer: pl.Trainer) -> bool:
    return bool(getattr(trainer, "fast_dev_run", False))


@contextmanager
def eval_net(pl_module: pl.LightningModule, use_ema: bool) -> Iterator[nn.Module]:
    """The network to evaluate (``pl_module.denoiser``: the EMA one with ``use_ema`` when an EMA
    callback runs) in eval mode for the block; its former mode is restored after."""
    net = pl_module.denoiser(use_ema=use_ema)
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def log_metrics_now(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to every logger at the current step (rank 0) and expose them in
    ``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor=...)`` and the task's metrics
    see them). Unlike ``self.log`` this is not gated by ``log_every_n_steps`` and works in any
    hook (also ``on_train_end``)."""
    tensors = {k: torch.tensor(float(v)) for k, v in metrics.items()}
    trainer.callback_metrics.update(tensors)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)


def _batch_sample_shape(batch: Any) -> tuple[int, ...] | None:
    x = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    return tuple(x.shape[1:]) if isinstance(x, Tensor) and x.ndim >= 2 else None


class StepCadence:
    """Fires once per optimizer step ``s`` with ``s % every_n_steps == 0`` (robust to gradient
    accumulation, where ``on_train_batch_end`` runs several times per step)."""

    def __init__(self, every_n_steps: int | None) -> None:
        self.every_n_steps = every_n_steps
        self.last_step = -1

    def due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step == self.last_step:
            return False
        return step % self.every_n_steps == 0

    def mark(self, trainer: pl.Trainer) -> None:
        self.last_step = trainer.global_step


class PeriodicCallback(pl.Callback):
    """Calls ``self.run(trainer, pl_module)`` every ``every_n_steps`` optimizer steps (None or 0:
    never during training) and, with ``at_train_end``, once more when training ends (unless it
    just ran at that step). Subclasses call ``super().__init__(every_n_steps, at_train_end)``
    and implement ``run``; ``_seen_shape`` is the shape of one training sample, recorded from
    the first batch."""

    def __init__(self, every_n_steps: int | None, at_train_end: bool) -> None:
        super().__init__()
        check_positive_int("every_n_steps", every_n_steps or 1)
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.at_train_end = bool(at_train_end)
        self._cadence = StepCadence(self.every_n_steps)
        self._seen_shape: tuple[int, ...] | None = None

    def _check_initialized(self) -> None:
        if "_cadence" not in vars(self):
            raise TypeError(
                f"{type(self).__name__}.__init__ must call "
                "super().__init__(every_n_steps, at_train_end) (PeriodicCallback)"
            )

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._check_initialized()
        if self._seen_shape is None:
            self._seen_shape = _batch_sample_shape(batch)
        if self._cadence.due(trainer):
            self._cadence.mark(trainer)
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_initialized()
        if self.at_train_end and trainer.global_step != self._cadence.last_step:
            self._cadence.mark(trainer)
            self.run(trainer, pl_module)
