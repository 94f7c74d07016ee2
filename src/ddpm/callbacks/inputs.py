"""What the evaluation callbacks work from when their config does not say: the default sampler,
and from the trainer's datamodule (read through :mod:`ddpm.contracts`, so a user's own
datamodule serves) one sample's shape, ``denormalize`` and the first validation samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ddpm.contracts import Denormalizes, HasValidationData, KnowsSampleShape, optional
from ddpm.diffusion.samplers import DDIMSampler


def default_sampler() -> Callable[..., Any]:
    """DDIM with 50 steps (η = 0), used when no sampler is configured."""
    return DDIMSampler(steps=50)


def sample_shape_of(
    trainer: pl.Trainer, explicit: Sequence[int] | None, seen: tuple[int, ...] | None
) -> tuple[int, ...]:
    """Shape of one sample: ``explicit``, else the datamodule's (:class:`KnowsSampleShape`), else
    ``seen`` (the first training batch's)."""
    if explicit is not None:
        return tuple(int(s) for s in explicit)
    dm = optional(getattr(trainer, "datamodule", None), KnowsSampleShape)
    if dm is not None and dm.sample_shape is not None:
        return tuple(int(s) for s in dm.sample_shape)
    if seen is not None:
        return seen
    raise ValueError(
        "cannot tell the sample shape: give sample_shape=[C, H, W] (or [D]) or use "
        "a datamodule with a `sample_shape` property (ddpm.contracts.KnowsSampleShape)"
    )


def denormalizer(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
    """``datamodule.denormalize`` (model space -> [0, 1]; :class:`Denormalizes`) when there is
    one."""
    dm = optional(getattr(trainer, "datamodule", None), Denormalizes)
    return None if dm is None else dm.denormalize


def first_labelled_samples(loader: Any, n: int) -> tuple[Tensor | None, Tensor | None]:
    """The first ``n`` samples of ``loader`` (float32, CPU; fewer if it runs out), reading only
    the batches needed, and their class labels (None unless the batches are ``(x, labels)``, as
    with ``data.conditional=true``); (None, None) for an empty loader."""
    got: list[Tensor] = []
    labels: list[Tensor] = []
    have = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        got.append(x.detach().float().cpu())
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            labels.append(torch.as_tensor(batch[1]).detach().cpu())
        have += x.shape[0]
        if have >= n:
            break
    if not got:
        return None, None
    y = torch.cat(labels)[:n] if len(labels) == len(got) else None
    return torch.cat(got)[:n], y


def validation_samples(trainer: pl.Trainer, n: int) -> Tensor | None:
    """The first ``n`` validation samples of the trainer's datamodule (without labels:
    :func:`first_labelled_samples`); None without a datamodule that has validation data."""
    dm = optional(getattr(trainer, "datamodule", None), HasValidationData)
    return None if dm is None else first_labelled_samples(dm.val_dataloader(), n)[0]
