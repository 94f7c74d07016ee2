"""The Lightning internals ddpm relies on, in one place.

Lightning has no public API for these: the checkpoint dump of a fit in progress (for atomic
writes), whether a batch only accumulates gradients, whether an epoch's batches are done, and the
``ModelCheckpoint`` methods :class:`~ddpm.callbacks.checkpoint.AtomicModelCheckpoint` overrides.
:func:`check_internals` runs when :mod:`ddpm.callbacks.checkpoint` is imported (and in
``tests/test_lightning_internals.py``): a Lightning upgrade that renames one or changes its
parameters fails there, naming it, instead of silently skipping an override (a checkpoint written
without the atomic rename) or breaking mid-run.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loops.fit_loop import _FitLoop
from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop
from pytorch_lightning.trainer.connectors.checkpoint_connector import _CheckpointConnector


def dump_checkpoint(trainer: pl.Trainer, weights_only: bool = False) -> dict[str, Any]:
    """The checkpoint dict Lightning would save now (collective: hooks may all_gather)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only)


def accumulating(trainer: pl.Trainer) -> bool:
    """Whether the current batch only accumulates gradients (no optimizer step after it)."""
    return trainer.fit_loop._should_accumulate()


def epoch_batches_done(trainer: pl.Trainer) -> bool:
    """Whether the current batch is the last of the epoch (``limit_train_batches`` counted)."""
    return trainer.fit_loop.epoch_loop._num_ready_batches_reached()


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
