"""Batched uint8 -> model-space transforms, run once per batch as the DataLoader's collate_fn."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NORMALIZATIONS = ("minus_one_one", "standardize")


class Normalization:
    """uint8 images -> float32 model space, and back.

    ``minus_one_one``: x = 2u - 1 with u = pixel / 255 (DDPM's scaling, which the discretised
    decoder and the bits/dim bound assume). ``standardize``: x = (u - mean) / std per channel,
    with ``mean``/``std`` measured on the training split (in [0, 1] units).
    """

    def __init__(
        self,
        mode: str = "minus_one_one",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
        if mode == "standardize" and (mean is None or std is None):
            raise ValueError("normalization='standardize' needs the training set's mean and std")
        self.mode = mode
        if mode == "minus_one_one":
            mean, std = [0.5], [0.5]
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        u = x.to(torch.float32) / 255.0
        if self.mode == "minus_one_one":
            return u * 2.0 - 1.0
        return (u - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        """Model space -> [0, 1] (clamped)."""
        x = x.float()
        if self.mode == "minus_one_one":
            u = (x + 1.0) / 2.0
        else:
            u = x * self.std.to(x.device) + self.mean.to(x.device)
        return u.clamp(0.0, 1.0)


class BatchTransform:
    """collate_fn: stack uint8 samples (or take a uint8 batch), normalise, and flip each image
    left-right with probability 1/2 when ``random_flip`` (training only)."""

    def __init__(self, normalization: Normalization, random_flip: bool = False) -> None:
        self.normalization = normalization
        self.random_flip = bool(random_flip)

    def __call__(self, batch: Tensor | Sequence[Tensor]) -> Tensor:
        x = batch if isinstance(batch, Tensor) else torch.stack(list(batch))
        x = self.normalization(x)
        if self.random_flip:
            flip = torch.rand(x.shape[0]) < 0.5
            if flip.any():
                x[flip] = x[flip].flip(-1)
        return x
