"""Coupled training pairs (x₀, z): each example with the noise it is trained with, instead of noise
drawn afresh every step. Rectified flow's reflow (Liu et al. 2023, Alg. 1) trains on the pairs
(x = ODE(z), z) of a teacher flow, written by ``python src/reflow.py`` into its run directory; a
data module with ``pairs=PATH`` yields :class:`CoupledBatch` training batches from that file. The
pairs of a class-conditional teacher carry the label y each x was drawn for, x = ODE(z | y)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.data.datasets import check_labels
from ddpm.errors import DataError

PAIR_KEYS = ("x0", "noise")
LABELS_KEY = "labels"  # int64 (N,): a class-conditional teacher's pairs only


class CoupledBatch(NamedTuple):
    """A training batch with its noise, in the form of any batch: ``batch[0]`` is x₀ and
    ``batch[1]`` the class labels (None: unconditional pairs), as in a labelled ``(x, labels)``
    batch."""

    x0: Tensor
    labels: Tensor | None
    noise: Tensor


class CoupledPairs(Dataset):
    """(x₀, z) pairs held in memory (float32, the model's space), with int64 ``labels`` (N,) or
    None; ``__getitems__`` fetches a batch in one index."""

    def __init__(self, x0: Tensor, noise: Tensor, labels: Tensor | None = None) -> None:
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ")
        if labels is not None and tuple(labels.shape) != (x0.shape[0],):
            raise ValueError(f"{x0.shape[0]} pairs but labels of shape {tuple(labels.shape)}")
        self.x0, self.noise = x0.float(), noise.float()
        self.labels = None if labels is None else labels.long()

    def __len__(self) -> int:
        return self.x0.shape[0]

    def _labels(self, index: Any) -> Tensor | None:
        return None if self.labels is None else self.labels[index]

    def __getitem__(self, index: int) -> CoupledBatch:
        return CoupledBatch(self.x0[index], self._labels(index), self.noise[index])

    def __getitems__(self, indices: Sequence[int]) -> CoupledBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return CoupledBatch(self.x0[idx], self._labels(idx), self.noise[idx])


def collate_pairs(batch: Any) -> CoupledBatch:
    """collate_fn of :class:`CoupledPairs` (a fetched batch, or a list of pairs)."""
    if isinstance(batch, CoupledBatch):
        return batch
    labels = None if batch[0].labels is None else torch.stack([b.labels for b in batch])
    return CoupledBatch(
        torch.stack([b.x0 for b in batch]), labels, torch.stack([b.noise for b in batch])
    )


def save_pairs(
    path: str | os.PathLike, x0: Tensor, noise: Tensor, labels: Tensor | None = None, **meta: Any
) -> None:
    """Write pairs (with their ``labels`` when given, and plain ``meta``) atomically, loadable
    with ``weights_only=True``."""
    tmp = f"{os.fspath(path)}.partial"
    stored = {"x0": x0.float().cpu(), "noise": noise.float().cpu()}
    if labels is not None:
        stored[LABELS_KEY] = labels.long().cpu()
    torch.save({**stored, **meta}, tmp)
    os.replace(tmp, path)


def load_pairs(
    path: str | os.PathLike, sample_shape: Sequence[int], num_classes: int | None = None
) -> CoupledPairs:
    """The pairs in ``path`` (``data.pairs``), checked against the data's sample shape and
    classes: labels in [0, ``num_classes``) for class-conditional data, none for unconditional."""
    where = f"data.pairs={os.fspath(path)}"
    if not os.path.isfile(path):
        raise DataError(
            f"{where}: no such file (reflow writes it: python src/reflow.py teacher=CKPT)"
        )
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stored, dict) or any(k not in stored for k in PAIR_KEYS):
        raise DataError(f"{where}: not a pairs file (keys {PAIR_KEYS})")
    labels = stored.get(LABELS_KEY)
    if num_classes is None and labels is not None:
        raise DataError(
            f"{where} holds class labels (a class-conditional teacher's pairs), but the data is "
            "unconditional: train on them with data.conditional=true"
        )
    if num_classes is not None and labels is None:
        raise DataError(
            f"{where} holds no class labels (an unconditional teacher's pairs), but the data is "
            f"class-conditional (data.conditional=true, {num_classes} classes): make the pairs "
            "with a class-conditional teacher, or train with data.conditional=false"
        )
    try:
        if num_classes is not None:
            labels = check_labels(labels, num_classes, where)
        pairs = CoupledPairs(stored["x0"], stored["noise"], labels)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from e
    if tuple(pairs.x0.shape[1:]) != tuple(sample_shape):
        raise DataError(
            f"{where} holds samples of shape {tuple(pairs.x0.shape[1:])}, "
            f"but the data's are {tuple(sample_shape)}"
        )
    return pairs
