"""2-D toy distributions for the playground: swiss roll, two moons, eight Gaussians.

Points are drawn once (seeded), then standardised with the training set's statistics (mean 0,
mean square 1 over both coordinates), so the same schedules and learning rates work for every
set. Toy data are continuous and unbounded: samplers must not clip x̂₀ (``clip_denoised: false``
in their configs).
"""

from __future__ import annotations

import math

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ddpm.data.datamodule import per_device_batch_size, world_size_of
from ddpm.data.datasets import TensorImages, train_loader
from ddpm.utils.checks import check_positive_int


def swiss_roll(n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Sohl-Dickstein et al. (2015)'s figure: scikit-learn's ``make_swiss_roll`` (x, z) plane."""
    t = 1.5 * math.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1)
    return x + noise * rng.standard_normal((n, 2))


def two_moons(n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """scikit-learn's ``make_moons``: two interleaved half circles."""
    n_out = n // 2
    a = math.pi * rng.random(n_out)
    b = math.pi * rng.random(n - n_out)
    outer = np.stack([np.cos(a), np.sin(a)], 1)
    inner = np.stack([1 - np.cos(b), 1 - np.sin(b) - 0.5], 1)
    x = np.concatenate([outer, inner])[rng.permutation(n)]
    return x + noise * rng.standard_normal((n, 2))


def eight_gaussians(n: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Eight Gaussians (std ``noise``) on a circle of radius 2."""
    angles = 2 * math.pi * rng.integers(0, 8, n) / 8
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return centers + noise * rng.standard_normal((n, 2))


TOY_DATASETS = {
    "swiss_roll": (swiss_roll, 0.5),
    "two_moons": (two_moons, 0.05),
    "eight_gaussians": (eight_gaussians, 0.1),
}


class _Points(TensorImages):
    """float32 points (N, 2) in memory (same batched fetch as in-memory images)."""


def _stack(batch: Tensor | list[Tensor]) -> Tensor:
    return batch if isinstance(batch, Tensor) else torch.stack(batch)


class ToyDataModule(pl.LightningDataModule):
    """A 2-D point cloud: ``n_train`` training and ``n_val`` held-out points (seed ``seed`` and
    ``seed + 1``), standardised with the training set's statistics."""

    normalization = None  # not images: no [-1, 1] scaling, no bits/dim
    in_memory = True
    num_workers = 0

    def __init__(
        self,
        name: str = "swiss_roll",
        n_train: int = 100_000,
        n_val: int = 5_000,
        batch_size: int = 1024,
        val_batch_size: int | None = None,
        noise: float | None = None,
        seed: int = 0,
        clip_denoised: bool = False,
    ) -> None:
        super().__init__()
        if name not in TOY_DATASETS:
            raise ValueError(f"toy data name must be one of {sorted(TOY_DATASETS)}, got {name!r}")
        for value, what in ((n_train, "n_train"), (n_val, "n_val"), (batch_size, "batch_size")):
            check_positive_int(what, value)
        self.name, self.n_train, self.n_val = name, n_train, n_val
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.noise = TOY_DATASETS[name][1] if noise is None else float(noise)
        self.seed, self.clip_denoised = int(seed), bool(clip_denoised)
        self.world_size = 1
        self.per_device_batch_size = batch_size
        self._splits: dict[str, _Points] | None = None

    @property
    def sample_shape(self) -> tuple[int]:
        return (2,)

    @property
    def data_key(self) -> str:
        return f"{self.name}-train-n{self.n_train}-seed{self.seed}"

    dataset_id = data_key

    def data_key_for(self, split: str) -> str:
        n = self.n_train if split == "train" else self.n_val
        return f"{self.name}-{split}-n{n}-seed{self.seed}"

    def setup(self, stage: str | None = None) -> None:
        self.world_size = world_size_of(getattr(self, "trainer", None))
        self.per_device_batch_size = per_device_batch_size(self.batch_size, self.world_size)
        self._load()

    def _load(self) -> dict[str, _Points]:
        if self._splits is None:
            make = TOY_DATASETS[self.name][0]
            train = make(self.n_train, np.random.default_rng(self.seed), self.noise)
            val = make(self.n_val, np.random.default_rng(self.seed + 1), self.noise)
            mean = train.mean(0)
            scale = math.sqrt(float(((train - mean) ** 2).mean()))
            train, val = ((torch.from_numpy((a - mean) / scale).float()) for a in (train, val))
            self._splits = {"train": _Points(train), "val": _Points(val), "test": _Points(val)}
        return self._splits

    def dataset(self, split: str) -> _Points:
        return self._load()[split]

    def denormalize(self, x: Tensor) -> Tensor:
        """Points are their own model space."""
        return x

    def _loader(self, ds: _Points, batch_size: int, train: bool = False) -> DataLoader:
        if train:
            trainer = getattr(self, "trainer", None)
            return train_loader(ds, batch_size, self.world_size, trainer, collate_fn=_stack)
        return DataLoader(ds, batch_size=batch_size, collate_fn=_stack)

    def train_dataloader(self) -> DataLoader:
        if self.n_train < self.per_device_batch_size:
            raise ValueError(
                f"n_train={self.n_train} is fewer than batch_size {self.per_device_batch_size}"
            )
        return self._loader(self.dataset("train"), self.per_device_batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.val_batch_size)

    def reference_dataloader(
        self,
        split: str = "train",
        batch_size: int | None = None,
        max_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> DataLoader:
        data = self.dataset(split).data
        n = len(data) if max_samples is None else min(int(max_samples), len(data))
        return self._loader(_Points(data[rank:n:world_size]), batch_size or self.val_batch_size)
