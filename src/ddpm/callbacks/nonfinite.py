"""Skip optimizer steps with non-finite gradients; stop after K in a row (PITFALLS 6)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.optim import Optimizer


class NonFiniteStepError(RuntimeError):
    """Too many consecutive non-finite steps."""


def _last_checkpoint_hint(trainer: pl.Trainer) -> str:
    """Where the last checkpoint written before the failure is (weights of the last good step)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "last_model_path", "") if isinstance(cb, ModelCheckpoint) else ""
        if path:
            return f"The last checkpoint, {path}, is kept (resume with ckpt_path={path}). "
    return ""


class NonFiniteGuard(pl.Callback):
    """Before each optimizer step, check the gradients (a NaN/Inf loss gives NaN gradients).

    A non-finite step is skipped (all gradients dropped, so the optimizer leaves every parameter
    and its moments untouched), counted and logged as ``train/nonfinite_steps``. After
    ``max_consecutive`` non-finite steps in a row the run stops with an error naming the step;
    checkpoints already written stay. Under DDP gradients are already all-reduced, so every rank
    takes the same decision.
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
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        finite = bool(torch.isfinite(torch.stack(norms)).all())  # one host sync per step
        if finite:
            self.consecutive = 0
        else:
            for g in optimizer.param_groups:
                for p in g["params"]:
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
                    f"{self.skipped} skipped in total). Stopping. {_last_checkpoint_hint(trainer)}"
                    "Lower the learning rate, check the data for NaN/Inf, or try "
                    "trainer.precision=32-true."
                )
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
