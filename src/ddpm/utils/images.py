"""Pixels: model-space image tensors -> uint8 tensors, grids and PNG files (and back: ``read_png``).
Figures (labels, scatter plots) are :mod:`ddpm.viz`'s.

Images are float tensors (B, C, H, W) in [-1, 1] unless a ``denormalize`` function (model space ->
[0, 1], e.g. ``ImageDataModule.denormalize``) is given. Grids reuse ``torchvision.utils.make_grid``
and are rounded exactly like ``torchvision.utils.save_image`` (x * 255 + 0.5, clamped). Saved grids
of small images are enlarged by an integer factor (nearest neighbour: every pixel stays a sharp
square) to at least ``MIN_WIDTH`` pixels, so a 16x16-digit grid is not 146 pixels wide on screen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

Denormalize = Callable[[Tensor], Tensor]
MIN_WIDTH = 512  # pixels: saved grids narrower than this are enlarged (nearest neighbour)


def to_unit_range(x: Tensor, denormalize: Denormalize | None = None) -> Tensor:
    """Model space -> float32 in [0, 1]: ``denormalize(x)`` if given, else (x + 1) / 2, clamped."""
    x = x.detach().float()
    x = denormalize(x) if denormalize is not None else (x + 1.0) / 2.0
    return x.clamp(0.0, 1.0)


def _quantize(x01: Tensor) -> Tensor:
    """[0, 1] -> uint8, rounded as ``torchvision.utils.save_image`` does (x * 255 + 0.5)."""
    return x01.mul(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)


def to_uint8(x: Tensor, denormalize: Denormalize | None = None) -> Tensor:
    """Model-space images -> uint8 in [0, 255] (same rounding as ``torchvision.save_image``)."""
    return _quantize(to_unit_range(x, denormalize))


def to_rgb_uint8(x: Tensor, denormalize: Denormalize | None = None) -> Tensor:
    """Model-space images (B, C, H, W) -> uint8 (B, 3, H, W); grayscale is repeated to 3 channels
    (what Inception-based metrics expect)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1|3, H, W), got shape {tuple(x.shape)}")
    u8 = to_uint8(x, denormalize)
    return u8.expand(-1, 3, -1, -1).contiguous() if u8.shape[1] == 1 else u8


def default_nrow(n: int) -> int:
    """Images per grid row: ceil(sqrt(n)) (8 for 64 images)."""
    return max(1, math.ceil(math.sqrt(n)))


def make_grid_uint8(
    images: Tensor,
    nrow: int | None = None,
    denormalize: Denormalize | None = None,
    padding: int = 2,
    pad_value: float = 1.0,
) -> Tensor:
    """uint8 grid (3, H', W') of model-space images (B, C, H, W) with ``nrow`` images per row."""
    from torchvision.utils import make_grid  # a 2-3 s import, only for grids

    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    x01 = to_unit_range(images, denormalize).cpu()
    grid = make_grid(
        x01, nrow=nrow or default_nrow(images.shape[0]), padding=padding, pad_value=pad_value
    )
    return _quantize(grid)


def upscale_nearest(image: Tensor, min_width: int = MIN_WIDTH) -> Tensor:
    """A (C, H, W) image enlarged by the smallest integer factor that makes it at least
    ``min_width`` wide (each pixel becomes a k x k block); unchanged when already that wide."""
    k = max(1, math.ceil(min_width / image.shape[-1]))
    if k == 1:
        return image
    return image.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def save_uint8_png(image: Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 (C, H, W) tensor as PNG (atomically: temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image.detach().cpu().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    tmp = path.with_name(path.name + ".partial")
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_grid(
    images: Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    denormalize: Denormalize | None = None,
    padding: int = 2,
    min_width: int = MIN_WIDTH,
) -> Tensor:
    """Save model-space images (B, C, H, W) as one uint8 grid PNG, enlarged to at least
    ``min_width`` pixels (:func:`upscale_nearest`); returns the saved grid (3, H', W')."""
    grid = make_grid_uint8(images, nrow=nrow, denormalize=denormalize, padding=padding)
    grid = upscale_nearest(grid, min_width)
    save_uint8_png(grid, path)
    return grid


def read_png(path: str | os.PathLike) -> np.ndarray:
    """A PNG file as a uint8 array (H, W, C)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return arr
