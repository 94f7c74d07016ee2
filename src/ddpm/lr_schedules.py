"""Learning-rate schedules, stepped once per optimizer step (config group ``lr_scheduler``).

All start with a linear warm-up from 0, DDPM's ``lr · min(step / warmup_steps, 1)`` (Ho et al.
2020, App. B; the first update uses lr 0), then keep the LR (``constant``, DDPM and improved
DDPM) or decay it to ``min_lr_ratio`` times the peak over the remaining steps (``cosine``:
Loshchilov & Hutter 2017's annealing without restarts; ``linear``). Built from torch's
schedulers (``LambdaLR``, ``CosineAnnealingLR``, ``LinearLR`` chained by ``SequentialLR``), so
their state is plain data in checkpoints and a resumed run continues the schedule exactly.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

__all__ = ["LinearWarmup", "linear_warmup", "warmup_cosine", "warmup_linear"]


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


class ConstantFactor:
    """LR multiplier ``factor`` at every step (the floor after a decay has ended)."""

    def __init__(self, factor: float) -> None:
        self.factor = float(factor)

    def __call__(self, step: int) -> float:
        return self.factor


def linear_warmup(optimizer: Optimizer, warmup_steps: int = 5000) -> LambdaLR:
    """Warm-up from 0 over ``warmup_steps`` optimizer steps, then constant (DDPM: 5000)."""
    return LambdaLR(optimizer, LinearWarmup(warmup_steps))


def _decay_steps(warmup_steps: int, total_steps: int | None) -> int:
    _check_int("warmup_steps", warmup_steps, 0)
    if total_steps is None or isinstance(total_steps, bool) or not isinstance(total_steps, int):
        raise ValueError(
            f"lr_scheduler.total_steps must be an integer (the decay's length in optimizer steps, "
            f"by default trainer.max_steps), got {total_steps!r}; with trainer.max_steps=-1 set "
            "lr_scheduler.total_steps explicitly or use lr_scheduler=constant"
        )
    if total_steps <= warmup_steps:
        raise ValueError(
            f"lr_scheduler.total_steps={total_steps} must exceed lr_scheduler.warmup_steps="
            f"{warmup_steps} (the decay runs from the end of the warm-up to total_steps)"
        )
    return total_steps - warmup_steps


def _check_ratio(min_lr_ratio: float) -> float:
    if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)):
        raise ValueError(
            f"lr_scheduler.min_lr_ratio must be a number in [0, 1], got {min_lr_ratio!r}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    return float(min_lr_ratio)


def _warmup_decay_floor(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, decay: LRScheduler, floor: float
) -> LRScheduler:
    """[warm-up,] ``decay`` until ``total_steps``, then ``floor`` times the peak LR for good."""
    phases = [decay, LambdaLR(optimizer, ConstantFactor(floor))]
    milestones = [total_steps]
    if warmup_steps > 0:
        phases.insert(0, LambdaLR(optimizer, LinearWarmup(warmup_steps)))
        milestones.insert(0, warmup_steps)
    return SequentialLR(optimizer, phases, milestones=milestones)


def warmup_cosine(
    optimizer: Optimizer,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """Warm-up from 0, then ``lr_min + (lr - lr_min)(1 + cos(π s / S)) / 2`` for the s-th of the
    S = ``total_steps - warmup_steps`` remaining steps, ``lr_min = min_lr_ratio · lr`` (the
    optimizer's first param group's LR), and ``lr_min`` after ``total_steps``."""
    ratio = _check_ratio(min_lr_ratio)
    steps = _decay_steps(warmup_steps, total_steps)
    eta_min = ratio * float(optimizer.param_groups[0]["lr"])
    decay = CosineAnnealingLR(optimizer, T_max=steps, eta_min=eta_min)
    return _warmup_decay_floor(optimizer, warmup_steps, total_steps, decay, ratio)


def warmup_linear(
    optimizer: Optimizer,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """Warm-up from 0, then linear from the peak LR to ``min_lr_ratio`` times it over the
    ``total_steps - warmup_steps`` remaining steps, and that after ``total_steps``."""
    ratio = _check_ratio(min_lr_ratio)
    steps = _decay_steps(warmup_steps, total_steps)
    decay = LinearLR(optimizer, start_factor=1.0, end_factor=ratio, total_iters=steps)
    return _warmup_decay_floor(optimizer, warmup_steps, total_steps, decay, ratio)
