"""2-D toy distributions for the playground: swiss roll, two moons, eight Gaussians.

Points are drawn once (seeded), then standardised with the training set's statistics (mean 0,
mean square 1 over both coordinates), so the same schedules and learning rates work for every
set. Toy data are continuous and unbounded: samplers must not clip x̂₀ (``clip_denoised: false``
in their configs).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.data.datamodule import DataModule
from ddpm.data.datasets import TensorImages, check_labels
from ddpm.utils.checks import check_positive_int

Points = tuple[np.ndarray, "np.ndarray | None"]  # (N, 2) points and their (N,) classes or None


def swiss_roll(n: int, rng: np.random.Generator, noise: float) -> Points:
    """Sohl-Dickstein et al. (2015)'s figure: scikit-learn's ``make_swiss_roll`` (x, z) plane.
    No classes."""
    t = 1.5 * math.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1)
    return x + noise * rng.standard_normal((n, 2)), None


def two_moons(n: int, rng: np.random.Generator, noise: float) -> Points:
    """scikit-learn's ``make_moons``: two interleaved half circles (class 0 the upper)."""
    n_out = n // 2
    a = math.pi * rng.random(n_out)
    b = math.pi * rng.random(n - n_out)
    outer = np.stack([np.cos(a), np.sin(a)], 1)
    inner = np.stack([1 - np.cos(b), 1 - np.sin(b) - 0.5], 1)
    perm = rng.permutation(n)
    x = np.concatenate([outer, inner])[perm]
    labels = (np.arange(n) >= n_out).astype(np.int64)[perm]
    return x + noise * rng.standard_normal((n, 2)), labels


def eight_gaussians(n: int, rng: np.random.Generator, noise: float) -> Points:
    """Eight Gaussians (std ``noise``) on a circle of radius 2; class k at angle k·45°."""
    k = rng.integers(0, 8, n)
    angles = 2 * math.pi * k / 8
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return centers + noise * rng.standard_normal((n, 2)), k.astype(np.int64)


# name -> (generator, default noise, class names or None)
TOY_DATASETS = {
    "swiss_roll": (swiss_roll, 0.5, None),
    "two_moons": (two_moons, 0.05, ("upper", "lower")),
    "eight_gaussians": (eight_gaussians, 0.1, tuple(f"{45 * k}deg" for k in range(8))),
}


class _Points(TensorImages):
    """float32 points (N, 2) in memory (same batched fetch as in-memory images)."""


def _stack(batch: Tensor | list[Tensor]) -> Tensor:
    return batch if isinstance(batch, Tensor) else torch.stack(batch)


class ToyDataModule(DataModule):
    """A 2-D point cloud: ``n_train`` training and ``n_val`` held-out points (seed ``seed`` and
    ``seed + 1``), standardised with the training set's statistics. ``conditional=True`` yields
    ``(points, labels)`` (eight_gaussians: 8 classes, two_moons: 2; :class:`ClassLabels`);
    ``pairs``: train on coupled (x₀, z) pairs (:mod:`ddpm.data.pairs`)."""

    normalization = None  # not images: no [-1, 1] scaling, no bits/dim
    in_memory = True

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
        conditional: bool = False,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        pairs: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self._init_classes(conditional, num_classes, class_names)
        self._init_pairs(pairs)
        if name not in TOY_DATASETS:
            raise ValueError(f"toy data name must be one of {sorted(TOY_DATASETS)}, got {name!r}")
        for value, what in ((n_train, "n_train"), (n_val, "n_val"), (batch_size, "batch_size")):
            check_positive_int(what, value)
        self.name, self.n_train, self.n_val = name, n_train, n_val
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.per_device_val_batch_size = self.val_batch_size  # on every device, as given
        self.noise = TOY_DATASETS[name][1] if noise is None else float(noise)
        self.seed, self.clip_denoised = int(seed), bool(clip_denoised)
        self.per_device_batch_size = batch_size
        self._splits: dict[str, _Points] | None = None
        self._labels: dict[str, Tensor] = {}

    @property
    def sample_shape(self) -> tuple[int]:
        return (2,)

    def data_key_for(self, split: str) -> str:
        n = self.n_train if split == "train" else self.n_val
        return f"{self.name}-{split}-n{n}-seed{self.seed}"

    def _class_names(self) -> list[str] | None:
        names = TOY_DATASETS[self.name][2]
        return None if names is None else list(names)

    def _load(self) -> dict[str, _Points]:
        if self._splits is None:
            k = self.num_classes if self.conditional else None  # unlabelled data: an error
            make = TOY_DATASETS[self.name][0]
            train, y_train = make(self.n_train, np.random.default_rng(self.seed), self.noise)
            val, y_val = make(self.n_val, np.random.default_rng(self.seed + 1), self.noise)
            if k is not None:
                what = f"data {self.name!r}"
                y = [check_labels(torch.from_numpy(a), k, what) for a in (y_train, y_val)]
                self._labels = {"train": y[0], "val": y[1], "test": y[1]}
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

    def _collate(self, train: bool) -> Callable[[Any], Tensor]:
        return _stack
