"""Coupled training pairs (x₀, z): each example with the noise it is trained with, instead of noise
drawn afresh every step. Rectified flow's reflow (Liu et al. 2023, Alg. 1) trains on the pairs
(x = ODE(z), z) of a teacher flow, written by ``python src/reflow.py`` into its run directory; a
data module with ``pairs=PATH`` yields :class:`CoupledBatch` training batches from that file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.errors import DataError

PAIR_KEYS = ("x0", "noise")


class CoupledBatch(NamedTuple):
    """A training batch with its noise: ``batch[0]`` is x₀ as in any batch."""

    x0: Tensor
    noise: Tensor


class CoupledPairs(Dataset):
    """(x₀, z) pairs held in memory (float32, the model's space); ``__getitems__`` fetches a
    batch in one index."""

    def __init__(self, x0: Tensor, noise: Tensor) -> None:
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ")
        self.x0, self.noise = x0.float(), noise.float()

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __getitem__(self, index: int) -> CoupledBatch:
        return CoupledBatch(self.x0[index], self.noise[index])

    def __getitems__(self, indices: Sequence[int]) -> CoupledBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return CoupledBatch(self.x0[idx], self.noise[idx])


def collate_pairs(batch: Any) -> CoupledBatch:
    """collate_fn of :class:`CoupledPairs` (a fetched batch, or a list of pairs)."""
    if isinstance(batch, CoupledBatch):
        return batch
    return CoupledBatch(torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]))


def save_pairs(path: str | os.PathLike, x0: Tensor, noise: Tensor, **meta: Any) -> None:
    """Write pairs (and plain ``meta``) atomically, loadable with ``weights_only=True``."""
    tmp = f"{os.fspath(path)}.partial"
    torch.save({"x0": x0.float().cpu(), "noise": noise.float().cpu(), **meta}, tmp)
    os.replace(tmp, path)


def load_pairs(path: str | os.PathLike, sample_shape: Sequence[int]) -> CoupledPairs:
    """The pairs in ``path`` (``data.pairs``), checked against the data's sample shape."""
    if not os.path.isfile(path):
        raise DataError(
            f"data.pairs={os.fspath(path)}: no such file (reflow writes it: python src/reflow.py "
            "teacher=CKPT)"
        )
    stored = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stored, dict) or any(k not in stored for k in PAIR_KEYS):
        raise DataError(f"data.pairs={os.fspath(path)}: not a pairs file (keys {PAIR_KEYS})")
    pairs = CoupledPairs(stored["x0"], stored["noise"])
    if tuple(pairs.x0.shape[1:]) != tuple(sample_shape):
        raise DataError(
            f"data.pairs={os.fspath(path)} holds samples of shape {tuple(pairs.x0.shape[1:])}, "
            f"but the data's are {tuple(sample_shape)}"
        )
    return pairs
