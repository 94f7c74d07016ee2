"""The Lightning internals ddpm relies on, and its workarounds for Lightning, in one place.

Lightning has no public API for these: the checkpoint dump of a fit in progress (for atomic
writes), whether a batch only accumulates gradients, whether an epoch's batches are done, the
``ModelCheckpoint`` methods :class:`~ddpm.callbacks.atomic_checkpoint.AtomicModelCheckpoint`
overrides, and gradient clipping of fused optimizers under mixed precision
(:func:`clip_gradients`).
:func:`check_internals` runs when :mod:`ddpm.callbacks.atomic_checkpoint` is imported (and in
``tests/test_lightning_internals.py``): a Lightning upgrade that renames one or changes its
parameters fails there, naming it, instead of silently skipping an override (a checkpoint written
without the atomic rename) or breaking mid-run.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loops.fit_loop import _FitLoop
from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.trainer.connectors.checkpoint_connector import _CheckpointConnector
from pytorch_lightning.utilities import GradClipAlgorithmType


def dump_checkpoint(trainer: pl.Trainer, weights_only: bool = False) -> dict[str, Any]:
    """The checkpoint dict Lightning would save now (collective: hooks may all_gather)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only)


def accumulating(trainer: pl.Trainer) -> bool:
    """Whether the current batch only accumulates gradients (no optimizer step after it)."""
    return trainer.fit_loop._should_accumulate()


def epoch_batches_done(trainer: pl.Trainer) -> bool:
    """Whether the current batch is the last of the epoch (``limit_train_batches`` counted)."""
    return trainer.fit_loop.epoch_loop._num_ready_batches_reached()


def clip_gradients(
    module: pl.LightningModule,
    optimizer: torch.optim.Optimizer,
    clip_val: float | None = None,
    algorithm: str | None = None,
) -> None:
    """Clip as ``LightningModule.configure_gradient_clipping`` does, also for fused optimizers
    under mixed precision, which Lightning refuses (Lightning issue #21435) although bf16 scales
    no gradients and, under fp16, torch's ``GradScaler.unscale_`` before a fused step is supported
    (the step then does not unscale again)."""
    plugin = module.trainer.precision_plugin
    fused = any(group.get("fused") for group in optimizer.param_groups)
    if not (clip_val and fused and isinstance(plugin, MixedPrecision)):
        pl.LightningModule.configure_gradient_clipping(module, optimizer, clip_val, algorithm)
        return
    if plugin.scaler is not None:
        plugin.scaler.unscale_(optimizer)
    Precision.clip_gradients(
        plugin, optimizer, clip_val, GradClipAlgorithmType(algorithm or "norm")
    )


# (class, method) -> its parameters, as the functions above and AtomicModelCheckpoint use them.
INTERNAL_METHODS: dict[tuple[type, str], tuple[str, ...]] = {
    (_CheckpointConnector, "dump_checkpoint"): ("self", "weights_only"),
    (_FitLoop, "_should_accumulate"): ("self",),
    (_TrainingEpochLoop, "_num_ready_batches_reached"): ("self",),
    (ModelCheckpoint, "_save_topk_checkpoint"): ("self", "trainer", "monitor_candidates"),
    (ModelCheckpoint, "_save_checkpoint"): ("self", "trainer", "filepath"),
    (ModelCheckpoint, "_save_last_checkpoint"): ("self", "trainer", "monitor_candidates"),
    (ModelCheckpoint, "_monitor_candidates"): ("self", "trainer"),
}
# Attributes of a ModelCheckpoint that AtomicModelCheckpoint and PreemptionCheckpoint read or set.
MODEL_CHECKPOINT_ATTRIBUTES = (
    "_defer_save_until_validation",
    "_last_global_step_saved",
    "_last_checkpoint_saved",
)


def internals_problems(
    methods: dict[tuple[type, str], tuple[str, ...]] | None = None,
    checkpoint: Any = None,
) -> list[str]:
    """One message per internal that the installed Lightning lacks or changed (the defaults:
    :data:`INTERNAL_METHODS` and a fresh ``ModelCheckpoint``)."""
    problems = []
    for (cls, name), params in (INTERNAL_METHODS if methods is None else methods).items():
        fn = getattr(cls, name, None)
        if not callable(fn):
            problems.append(f"{cls.__name__}.{name} is gone")
            continue
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            problems.append(f"{cls.__name__}.{name} takes {got}, not {params}")
    checkpoint = ModelCheckpoint() if checkpoint is None else checkpoint
    for attribute in MODEL_CHECKPOINT_ATTRIBUTES:
        if not hasattr(checkpoint, attribute):
            problems.append(f"{type(checkpoint).__name__}.{attribute} is gone")
    return problems


def check_internals() -> None:
    """Raise ImportError naming every Lightning internal that changed (see the module doc)."""
    problems = internals_problems()
    if problems:
        raise ImportError(
            f"pytorch-lightning {pl.__version__} changed internals ddpm relies on "
            "(ddpm/callbacks/_lightning.py):\n  - " + "\n  - ".join(problems) + "\nInstall the "
            "version pinned in pyproject.toml, or adapt ddpm.callbacks._lightning to it."
        )
