"""Never train on, save or recommend non-finite weights.

* :class:`NonFiniteGuard` skips optimizer steps with non-finite gradients (stopping after K in a
  row, naming the newest checkpoint from before the weights the streak started from, or saying
  that none predates the divergence) and stops the run when the weights themselves became
  non-finite (an update that overflowed), naming the newest checkpoint whose weights are finite.
* :func:`refuse_nonfinite_weights` is called by the checkpoint writer before every save: a
  checkpoint with non-finite weights (network or EMA) is never written, ``last.ckpt`` included.

Cost: the gradient and weight checks share one fused reduction (max |x| over all tensors, so
finite values never overflow) and one host sync per optimizer step, which the skip decision
needs anyway; the save-time check adds one sync per checkpoint.
"""

from __future__ import annotations

import glob
import os

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor
from torch.nn.utils import get_total_norm
from torch.optim import Optimizer

from ddpm.checkpoint import EMA_KEY, open_checkpoint
from ddpm.contracts import find_ema
from ddpm.run import resume_command
from ddpm.run.checkpoint_files import newest_first, source_run_dir

_INF = float("inf")


class NonFiniteStepError(RuntimeError):
    """Too many consecutive non-finite steps."""


class NonFiniteWeightsError(RuntimeError):
    """The weights are non-finite: the run stops and nothing is saved from them."""


def _max_abs(tensors: list[Tensor]) -> Tensor:
    """max |x| over ``tensors`` as a 0-dim tensor on their device (NaN if any is NaN); no sync."""
    return get_total_norm(tensors, norm_type=_INF) if tensors else torch.zeros(())


def _weights(trainer: pl.Trainer) -> list[Tensor]:
    """The floating-point tensors a checkpoint stores as weights: the network and its EMA."""
    module = trainer.lightning_module
    tensors = [p.detach() for p in module.parameters()]
    ema = find_ema(trainer)
    if ema is not None:
        tensors += [p.detach() for p in ema.ema_net.parameters()]
    return [t for t in tensors if t.is_floating_point() and t.numel()]


def _finite_tensors(obj: object) -> bool:
    if isinstance(obj, Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_finite_tensors(v) for v in obj.values())
    return True


def newest_finite_checkpoint(dirpaths: list[str], before_step: int | None = None) -> str | None:
    """The newest checkpoint (:func:`ddpm.run.checkpoint_files.newest_first`) in ``dirpaths``
    whose network and EMA weights are all finite (and, with ``before_step``, whose global step
    is below it), or None."""
    paths = [p for d in dirpaths for p in glob.glob(os.path.join(d, "*.ckpt"))]
    for path in newest_first(paths)[0]:
        ckpt = open_checkpoint(path, mmap=True)
        if before_step is not None and int(ckpt.get("global_step", 0)) >= before_step:
            continue
        if _finite_tensors(ckpt.get("state_dict", {})) and _finite_tensors(ckpt.get(EMA_KEY, {})):
            return path
    return None


def finite_checkpoint_hint(trainer: pl.Trainer, first_bad_step: int | None = None) -> str:
    """A sentence naming the checkpoint to resume from: the newest one with finite weights, or,
    given the first of a streak of non-finite steps (numbered like ``global_step`` after them),
    the newest one from before the weights that step started from (those gave the non-finite
    loss; a checkpoint holding them, or any later one, would diverge again)."""
    dirs = {
        cb.dirpath
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint) and cb.dirpath
    }
    if not trainer.is_global_zero:
        return ""
    before = None if first_bad_step is None else first_bad_step - 1
    path = newest_finite_checkpoint(sorted(dirs), before)
    if path is None and before is not None:
        return (
            f"No checkpoint predates the divergence: the weights after global step {before} "
            f"gave the first non-finite step ({first_bad_step}), and every checkpoint holds those "
            "or later ones. "
        )
    if path is None:
        return "No checkpoint with finite weights was written. "
    resume = resume_command(source_run_dir(path), ckpt_path=path)
    if before is not None:
        return (
            f"The newest checkpoint from before the divergence (before global step {before}, "
            f"whose weights gave the first non-finite step {first_bad_step}) is {path} (resume "
            f"with {resume}). "
        )
    return f"The newest checkpoint with finite weights is {path} (resume with {resume}). "


def refuse_nonfinite_weights(trainer: pl.Trainer, filepath: str | None = None) -> None:
    """Raise :class:`NonFiniteWeightsError` (instead of saving ``filepath``) when the network or
    EMA weights hold NaN/Inf. Collective: every rank calls it (as every rank saves)."""
    tensors = _weights(trainer)
    finite = not tensors or bool(torch.isfinite(_max_abs(tensors)))
    if trainer.strategy.reduce_boolean_decision(finite, all=True):
        return
    raise NonFiniteWeightsError(
        f"the weights at global step {trainer.global_step} are not finite (NaN/Inf)"
        f"{f', so {os.path.basename(filepath)} is not written' if filepath else ''}. "
        f"{finite_checkpoint_hint(trainer)}"
        "Lower the learning rate or try trainer.precision=32-true."
    )


class NonFiniteGuard(pl.Callback):
    """Before each optimizer step, check the gradients and the weights (one fused check).

    A step with non-finite gradients (a NaN/Inf loss gives NaN gradients) is skipped (all
    gradients dropped, so the optimizer leaves every parameter and its moments untouched),
    counted and logged as ``train/nonfinite_steps``. After ``max_consecutive`` such steps in a
    row the run stops with an error naming the steps. Weights that became non-finite (the last
    update overflowed) stop the run at once: training on would only spread NaN, and no
    checkpoint is written from them. The errors name the checkpoint to resume from
    (:func:`finite_checkpoint_hint`). Under DDP gradients are already all-reduced and weights are replicated, so every
    rank takes the same decision.
    """

    def __init__(self, max_consecutive: int = 20) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.consecutive = 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        weights = [p.detach() for p in params if p.is_floating_point()]
        checks = torch.stack([_max_abs(grads), _max_abs(weights).to(grads[0].device)])
        grads_ok, weights_ok = torch.isfinite(checks).tolist()  # the one host sync per step
        if not weights_ok:
            raise NonFiniteWeightsError(
                f"the weights became non-finite (NaN/Inf) after optimizer step "
                f"{trainer.global_step}. Stopping before training on "
                f"them. {finite_checkpoint_hint(trainer)}Lower the learning rate (optimizer.lr) "
                "or try trainer.precision=32-true."
            )
        if grads_ok or getattr(trainer.precision_plugin, "scaler", None) is not None:
            # fp16's GradScaler skips a step with Inf/NaN gradients itself (and lowers the
            # scale); dropping them here would make its step fail ("No inf checks were recorded")
            self.consecutive = 0
        else:
            for p in params:
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive:
                # Steps are numbered like trainer.global_step after them (1 = the first step).
                last = trainer.global_step + 1
                first = last - self.consecutive + 1
                raise NonFiniteStepError(
                    f"{self.consecutive} consecutive optimizer steps with a non-finite loss or "
                    f"gradients (global steps {first}..{last}, all skipped; "
                    f"{self.skipped} skipped in total). Stopping. "
                    f"{finite_checkpoint_hint(trainer, first)}"
                    "Lower the learning rate, check the data for NaN/Inf, or try "
                    "trainer.precision=32-true."
                )
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last step's weights are checked by no later step: check them once here."""
        refuse_nonfinite_weights(trainer)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


__all__ = [
    "NonFiniteGuard",
    "NonFiniteStepError",
    "NonFiniteWeightsError",
    "finite_checkpoint_hint",
    "newest_finite_checkpoint",
    "refuse_nonfinite_weights",
]
