"""Image helpers: model-space tensors -> uint8 grids and PNG files; 2-D point clouds -> scatter PNGs;
the denoising strip (x_t and the predicted x̂₀ along one reverse trajectory).

Images are float tensors (B, C, H, W) in [-1, 1] unless a ``denormalize`` function (model space ->
[0, 1], e.g. ``ImageDataModule.denormalize``) is given. Grids reuse ``torchvision.utils.make_grid``
and are rounded exactly like ``torchvision.utils.save_image`` (x * 255 + 0.5, clamped). Saved grids
of small images are enlarged by an integer factor (nearest neighbour: every pixel stays a sharp
square) to at least ``MIN_WIDTH`` pixels, so a 16x16-digit grid is not 146 pixels wide on screen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

Denormalize = Callable[[Tensor], Tensor]
MIN_WIDTH = 512  # pixels: saved grids narrower than this are enlarged (nearest neighbour)


def to_unit_range(x: Tensor, denormalize: Denormalize | None = None) -> Tensor:
    """Model space -> float32 in [0, 1]: ``denormalize(x)`` if given, else (x + 1) / 2, clamped."""
    x = x.detach().float()
    x = denormalize(x) if denormalize is not None else (x + 1.0) / 2.0
    return x.clamp(0.0, 1.0)


def to_uint8(x: Tensor, denormalize: Denormalize | None = None) -> Tensor:
    """Model-space images -> uint8 in [0, 255] (same rounding as ``torchvision.save_image``)."""
    return to_unit_range(x, denormalize).mul(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)


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
    from torchvision.utils import make_grid

    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    x01 = to_unit_range(images, denormalize).cpu()
    grid = make_grid(
        x01, nrow=nrow or default_nrow(images.shape[0]), padding=padding, pad_value=pad_value
    )
    return grid.mul(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)


def upscale_nearest(image: Tensor, min_width: int = MIN_WIDTH) -> Tensor:
    """A (C, H, W) image enlarged by the smallest integer factor that makes it at least
    ``min_width`` wide (each pixel becomes a k x k block); unchanged when already that wide."""
    k = max(1, math.ceil(min_width / image.shape[-1]))
    if k == 1:
        return image
    return image.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def save_uint8_png(image: Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 (C, H, W) tensor as PNG (atomically: temporary file, then rename)."""
    from PIL import Image

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
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return arr


# ------------------------------------------------------------------------------- 2-D points
def _figure(ncols: int, size: float = 4.0, nrows: int = 1) -> tuple[Any, Any]:
    # A bare Figure (no pyplot): Agg canvas, never needs a display, no global state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size * ncols, size * nrows), dpi=100)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    return fig, axes


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _scatter(ax: Any, pts: np.ndarray, title: str, lim: float | None) -> None:
    ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.6, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)


def save_scatter(points: Tensor, path: str | os.PathLike, title: str = "") -> Path:
    """Scatter plot PNG of 2-D points (N, 2) (matplotlib, Agg backend)."""
    pts = points.detach().float().cpu().numpy()
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got shape {tuple(pts.shape)}")
    fig, (ax,) = _figure(1, 5.0)
    _scatter(ax, pts, title, None)
    return _save_figure(fig, path)


def save_scatter_strip(
    rows: dict[str, Tensor], timesteps: Sequence[int], path: str | os.PathLike
) -> Path:
    """Scatter panels: one row per entry of ``rows`` (name -> (K, N, 2)), one column per frame at
    model ``timesteps`` (K,)."""
    rows = {name: f.detach().float().cpu() for name, f in rows.items()}
    k = len(timesteps)
    fig, axes = _figure(k, 2.5, nrows=len(rows))
    for r, (name, frames) in enumerate(rows.items()):
        finite = frames[torch.isfinite(frames)]
        lim = min(float(finite.abs().max()) * 1.05, 50.0) if finite.numel() else None
        for c in range(k):
            _scatter(axes[r * k + c], frames[c].numpy(), f"{name}, t={int(timesteps[c])}", lim)
    fig.tight_layout()
    return _save_figure(fig, path)


# ------------------------------------------------------------------------------- denoising strip
def strip_timesteps(num_timesteps: int, num_frames: int = 8) -> list[int]:
    """``num_frames`` model timesteps evenly spaced from T-1 down to 0."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return sorted(
        {int(round(t)) for t in np.linspace(num_timesteps - 1, 0, num_frames)}, reverse=True
    )


@torch.inference_mode()
def denoising_trajectory(
    sampler: Callable[..., Any],
    model: Callable[[Tensor, Tensor], Tensor],
    diffusion: Any,
    sample_shape: Sequence[int],
    seeds: Sequence[int],
    num_frames: int = 8,
    device: torch.device | str | None = None,
    timesteps: Sequence[int] | None = None,
    class_labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """Run ``sampler`` once for ``seeds`` (one per-sample seed each; ``class_labels`` one per
    seed for a class-conditional network) and record ~``num_frames`` steps. Returns ``timesteps`` (K,), ``x_t`` and ``pred_xstart`` (K, len(seeds), *sample_shape)
    on the CPU, and the final ``samples``.

    The recorded steps are those of the sampler's own grid nearest to ``strip_timesteps(T, K)``,
    or to the given model ``timesteps`` (then ``num_frames`` is unused).
    """
    from ddpm.utils.seeding import PerSampleGenerator

    if timesteps is not None:
        wanted = sorted({int(t) for t in timesteps}, reverse=True)
        if not wanted or wanted[-1] < 0 or wanted[0] >= diffusion.num_timesteps:
            raise ValueError(
                f"timesteps must be a non-empty list in [0, {diffusion.num_timesteps - 1}], "
                f"got {list(timesteps)}"
            )
    else:
        wanted = strip_timesteps(diffusion.num_timesteps, num_frames)
    gen = PerSampleGenerator(list(seeds), device=device or "cpu")
    extra = {} if class_labels is None else {"class_labels": class_labels}
    out = sampler(
        model,
        diffusion,
        (len(seeds), *sample_shape),
        generator=gen,
        return_intermediates=wanted,
        device=device,
        **extra,
    )
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise ValueError(
            "the sampler did not return (samples, intermediates) for "
            "return_intermediates: it does not support the denoising strip"
        )
    samples, inter = out
    return {
        "timesteps": inter["timesteps"],
        "x_t": inter["x_t"],
        "pred_xstart": inter["pred_xstart"],
        "samples": samples.detach().cpu(),
    }


def strip_grid(
    traj: dict[str, Tensor], denormalize: Denormalize | None = None, padding: int = 2
) -> Tensor:
    """uint8 grid of a :func:`denoising_trajectory`: for each seed one row of x_t and one row of
    x̂₀, columns from the noisiest recorded step (left) to the last one (right)."""
    x_t, x0 = traj["x_t"], traj["pred_xstart"]  # (K, S, C, H, W)
    k, s = x_t.shape[:2]
    rows = []
    for i in range(s):
        rows.append(x_t[:, i])
        rows.append(x0[:, i])
    images = torch.cat(rows, dim=0)  # (2*S*K, C, H, W), row-major
    # x_t can exceed [-1, 1] (it is noise at large t): clamp like any image.
    return make_grid_uint8(images, nrow=k, denormalize=denormalize, padding=padding)


def save_denoising_strip(
    traj: dict[str, Tensor],
    path: str | os.PathLike,
    denormalize: Denormalize | None = None,
    seeds: Sequence[int] | None = None,
    title: str = "",
) -> Path:
    """Save a :func:`denoising_trajectory` as a labelled PNG: for images, rows "seed s: x_t" and
    "seed s: x̂₀" per seed and one column per recorded t (``ddpm.viz.reverse.reverse_figure``,
    the picture of ``visualize.py what=reverse``); for 2-D points, scatter panels."""
    if traj["x_t"].ndim == 3:  # (K, N, D) points
        return save_scatter_strip(
            {"x_t": traj["x_t"], "x̂₀": traj["pred_xstart"]}, traj["timesteps"].tolist(), path
        )
    from ddpm.viz.plots import save_figure
    from ddpm.viz.reverse import reverse_figure

    seeds = list(range(traj["x_t"].shape[1])) if seeds is None else list(seeds)
    return save_figure(reverse_figure(traj, seeds, title or "Denoising", denormalize), path)
