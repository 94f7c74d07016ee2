"""Which class each sample is drawn for, for the grids, ``sample.py`` and the metrics.

Sample i of a balanced set is drawn for class ``i % K`` (a function of the global index only, so
it does not depend on the batch size or on the number of devices, like its seed ``seed + i``).
A class-conditional network says K by its ``null_class`` attribute (``ddpm.nn``: label K is the
null class of classifier-free guidance).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor


def num_classes_of(model: object) -> int | None:
    """K of a class-conditional network (its ``null_class``), None when unconditional."""
    null = getattr(model, "null_class", None)
    return None if null is None else int(null)


def balanced_labels(indices: Iterable[int], num_classes: int) -> Tensor:
    """Labels ``i % num_classes`` of the samples with global indices ``indices`` (int64)."""
    return torch.tensor([int(i) % num_classes for i in indices], dtype=torch.long)


def class_rows(num_samples: int, num_classes: int) -> tuple[Tensor, int]:
    """(labels, per_row) of a grid with one row per class: ``max(1, num_samples // K)`` samples
    of each class, row k all class k; with more classes than samples, one of each of the first
    ``num_samples`` classes."""
    if num_classes > num_samples:
        return torch.arange(num_samples), 1
    per_row = num_samples // num_classes
    return torch.arange(num_classes).repeat_interleave(per_row), per_row


def parse_class_labels(labels: Sequence[int], num_classes: int | None) -> Tensor:
    """User-given ``class_labels`` as int64, checked against the network's classes."""
    if num_classes is None:
        raise ValueError(
            "class_labels were given, but the checkpoint's network is unconditional "
            "(train with data.conditional=true to condition on classes)"
        )
    out = torch.tensor([int(v) for v in labels], dtype=torch.long)
    bad = [int(v) for v in out if not 0 <= int(v) < num_classes]
    if bad:
        raise ValueError(
            f"class_labels must lie in [0, {num_classes}) (the network's {num_classes} classes), "
            f"got {bad}"
        )
    return out


def with_labels(
    model: Callable[..., Tensor], labels: Tensor | None, device: torch.device | str | None = None
) -> Callable[..., Tensor]:
    """``model`` as ``model(x_t, t)`` with ``class_labels=labels`` (moved to ``device`` when
    given) bound; ``model`` itself when ``labels`` is None."""
    if labels is None:
        return model
    y = labels if device is None else labels.to(device)
    return lambda x_t, t: model(x_t, t, class_labels=y)
