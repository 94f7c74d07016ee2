"""Learning-rate schedules, stepped once per optimizer step (config group ``lr_scheduler``).

All start with a linear warm-up from 0, DDPM's ``lr · min(step / warmup_steps, 1)`` (Ho et al.
2020, App. B; the first update uses lr 0), then keep the LR (``constant``, DDPM and improved
DDPM) or decay it to ``min_lr_ratio`` times the peak over the remaining steps (``cosine``:
Loshchilov & Hutter 2017's annealing without restarts; ``linear``), and keep that floor after
``total_steps``.

Each is a :class:`StepSchedule`: LR = peak · factor(step), the factor a closed form of the
optimizer step. Its state (in checkpoints) is the step alone, so a resumed run continues the
schedule exactly, and a resume whose schedule differs (a finished run extended with a larger
``trainer.max_steps``: the decay is then over the new length, :mod:`ddpm.run.resume`) continues
the new schedule from the stored step instead of the old one's end (an LR of 0 for good).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LinearWarmup", "StepSchedule", "linear_warmup", "warmup_cosine", "warmup_linear"]

log = logging.getLogger(__name__)


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"lr_scheduler.{name} must be an integer >= {low}, got {value!r}")
    return value


class LinearWarmup:
    """LR multiplier ``min(1, step / warmup_steps)`` after ``step`` optimizer steps (1 when
    ``warmup_steps`` is 0): DDPM's warm-up, which starts at 0."""

    def __init__(self, warmup_steps: int = 5000) -> None:
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, step / self.warmup_steps)


class WarmupDecay(LinearWarmup):
    """:class:`LinearWarmup`, then ``r + (1 - r) · shape(s / S)`` for the s-th of the
    S = ``total_steps - warmup_steps`` remaining steps (``shape`` falls from 1 at 0 to 0 at 1),
    then ``r`` = ``min_lr_ratio`` after ``total_steps``."""

    def __init__(
        self,
        warmup_steps: int,
        total_steps: int | None,
        min_lr_ratio: float,
        shape: Callable[[float], float],
    ) -> None:
        super().__init__(warmup_steps)
        if total_steps is None or isinstance(total_steps, bool) or not isinstance(total_steps, int):
            raise ValueError(
                "lr_scheduler.total_steps must be an integer (the decay's length in optimizer "
                f"steps, by default trainer.max_steps), got {total_steps!r}; with "
                "trainer.max_steps=-1 set lr_scheduler.total_steps explicitly or use "
                "lr_scheduler=constant"
            )
        if total_steps <= warmup_steps:
            raise ValueError(
                f"lr_scheduler.total_steps={total_steps} must exceed lr_scheduler.warmup_steps="
                f"{warmup_steps} (the decay runs from the end of the warm-up to total_steps)"
            )
        if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)):
            raise ValueError(
                f"lr_scheduler.min_lr_ratio must be a number in [0, 1], got {min_lr_ratio!r}"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.total_steps, self.ratio, self.shape = total_steps, float(min_lr_ratio), shape

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return super().__call__(step)
        s = min(step - self.warmup_steps, self.total_steps - self.warmup_steps)
        return self.ratio + (1.0 - self.ratio) * self.shape(
            s / (self.total_steps - self.warmup_steps)
        )


def _cosine(s: float) -> float:
    return (1.0 + math.cos(math.pi * s)) / 2.0


def _linear(s: float) -> float:
    return 1.0 - s


class StepSchedule(LambdaLR):
    """LR = peak · ``factor(step)`` (torch's ``LambdaLR``) whose saved state is the step (and the
    peak LRs) alone, never the factor's settings: restored from a checkpoint it sets the LR the
    factor *it was built with* gives at the stored step, so a resume continues the schedule its
    config describes."""

    def __init__(self, optimizer: Optimizer, factor: Callable[[int], float]) -> None:
        super().__init__(optimizer, factor)

    @property
    def factor(self) -> Callable[[int], float]:
        return self.lr_lambdas[0]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("lr_lambdas", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The stored step; then the LR at that step of this schedule (Lightning restores the
        optimizer, with the LR the run's schedule had there, before its scheduler)."""
        stored = [float(lr) for lr in state_dict.get("_last_lr", [])]
        lambdas = [None] * len(self.lr_lambdas)
        super().load_state_dict({**state_dict, "lr_lambdas": lambdas})
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
        if stored and stored != lrs:
            log.warning(
                "the LR schedule differs from the one the checkpoint was trained with: at "
                "optimizer step %d the LR is %s (it was %s), then follows this schedule",
                self.last_epoch,
                ", ".join(f"{lr:.4g}" for lr in lrs),
                ", ".join(f"{lr:.4g}" for lr in stored),
            )


def linear_warmup(optimizer: Optimizer, warmup_steps: int = 5000) -> StepSchedule:
    """Warm-up from 0 over ``warmup_steps`` optimizer steps, then constant (DDPM: 5000)."""
    return StepSchedule(optimizer, LinearWarmup(warmup_steps))


def warmup_cosine(
    optimizer: Optimizer,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> StepSchedule:
    """Warm-up from 0, then ``lr_min + (lr - lr_min)(1 + cos(π s / S)) / 2`` for the s-th of the
    S = ``total_steps - warmup_steps`` remaining steps, ``lr_min = min_lr_ratio · lr``, and
    ``lr_min`` after ``total_steps``."""
    return StepSchedule(optimizer, WarmupDecay(warmup_steps, total_steps, min_lr_ratio, _cosine))


def warmup_linear(
    optimizer: Optimizer,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> StepSchedule:
    """Warm-up from 0, then linear from the peak LR to ``min_lr_ratio`` times it over the
    ``total_steps - warmup_steps`` remaining steps, and that after ``total_steps``."""
    return StepSchedule(optimizer, WarmupDecay(warmup_steps, total_steps, min_lr_ratio, _linear))
