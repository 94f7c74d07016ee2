"""Transforms of uint8 images: to the model's channels and resolution (once per image, where the
images are read), and to model space (once per batch, as the DataLoader's collate_fn)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALIZATIONS = ("minus_one_one", "standardize")


# -- uint8 images to the model's channels and resolution ---------------------------------------


def resize_center_crop(x: Tensor, size: int) -> Tensor:
    """Resize uint8 images (N, C, H, W) so the shorter side is ``size`` (bilinear, antialiased
    when shrinking), then crop the centre ``size`` x ``size``. A no-op at the right size."""
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if min(h, w) != size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        y = F.interpolate(
            x.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1
        )
        x = y.round_().clamp_(0, 255).to(torch.uint8)
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size].contiguous()


def to_channels(x: Tensor, channels: int) -> Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} to ``channels``: RGB->L uses PIL's ITU-R 601 luma."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        w = torch.tensor([19595, 38470, 7471], dtype=torch.int64).view(1, 3, 1, 1)
        return (
            ((x.to(torch.int64) * w).sum(1, keepdim=True) + 32768)
            .div(65536, rounding_mode="floor")
            .to(torch.uint8)
        )
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def prepare(x: Tensor, image_size: int, channels: int) -> Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, image_size, image_size)."""
    return resize_center_crop(to_channels(x, channels), image_size)


# -- uint8 batches to model space ---------------------------------------------------------------


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
    """collate_fn: stack uint8 samples (or take a uint8 batch) and normalise. (Random flips are
    drawn after the batch left the DataLoader's workers: :func:`random_flip`.)"""

    def __init__(self, normalization: Normalization) -> None:
        self.normalization = normalization

    def __call__(self, batch: Tensor | Sequence[Tensor]) -> Tensor:
        x = batch if isinstance(batch, Tensor) else torch.stack(list(batch))
        return self.normalization(x)


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of the batch ``x`` left-right with probability 1/2 (one draw per image
    from ``generator``), in place."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    if flip.any():
        x[flip] = x[flip].flip(-1)
    return x
