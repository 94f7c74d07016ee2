"""Matplotlib helpers shared by the pictures: bare ``Figure`` objects (Agg canvas, no pyplot, no
global state, never needs a display, nothing to close), labelled image grids, scatter panels,
atomic PNG writes. The pixels of image grids are :mod:`ddpm.utils.images`'s."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.utils.images import make_grid_uint8

FONTSIZE = 8
# a class's colour in 2-D pictures: matplotlib's ten-colour cycle with its grey (C7, the colour
# of paths' starts) replaced by black
CLASS_COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "k", "C8", "C9")


def class_colour(c: int) -> str:
    """The colour of class ``c`` (:data:`CLASS_COLOURS`, repeating after ten classes)."""
    return CLASS_COLOURS[int(c) % len(CLASS_COLOURS)]


def new_figure(width: float, height: float, dpi: int = 100) -> Any:
    """A bare matplotlib ``Figure`` (Agg) of ``width`` x ``height`` inches."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # harmless if pyplot is never imported
    from matplotlib.figure import Figure

    return Figure(figsize=(max(width, 1.0), max(height, 1.0)), dpi=dpi)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG (temporary file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, path)
    return path


def cell_inches(image_size: int) -> float:
    """Display size (inches) of one image of side ``image_size`` in a labelled grid."""
    return float(np.clip(image_size / 28.0, 0.8, 1.4))


def image_grid_panel(
    ax: Any,
    grid: Tensor,
    image_hw: tuple[int, int],
    padding: int,
    col_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str = "",
) -> None:
    """Show a uint8 grid (3, H', W') from ``make_grid_uint8`` with one label per column (top) and
    per row (left), placed at the centres of the grid's cells."""
    h, w = image_hw
    arr = grid.detach().cpu().permute(1, 2, 0).numpy()
    ax.imshow(arr, interpolation="nearest")
    ax.set_xticks([padding + c * (w + padding) + w / 2 for c in range(len(col_labels))])
    ax.set_xticklabels(list(col_labels), fontsize=FONTSIZE)
    ax.xaxis.tick_top()
    ax.set_yticks([padding + r * (h + padding) + h / 2 for r in range(len(row_labels))])
    ax.set_yticklabels(list(row_labels), fontsize=FONTSIZE)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=FONTSIZE + 2, pad=18 if col_labels else 6)


def labelled_image_grid(
    images: Tensor,
    nrow: int,
    col_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str = "",
    denormalize: Any = None,
    dpi: int = 100,
) -> Any:
    """A Figure of model-space images (N, C, H, W) laid out ``nrow`` per row, labelled."""
    padding = 2
    grid = make_grid_uint8(images, nrow=nrow, denormalize=denormalize, padding=padding)
    h, w = images.shape[-2:]
    rows = -(-images.shape[0] // nrow)
    cell = cell_inches(max(h, w))
    fig = new_figure(nrow * cell + 1.2, rows * cell + 0.8, dpi)
    ax = fig.add_subplot(1, 1, 1)
    image_grid_panel(ax, grid, (h, w), padding, col_labels, row_labels, title)
    return fig


def scatter(
    ax: Any,
    points: Tensor | np.ndarray,
    title: str = "",
    lim: float | None = None,
    color: str = "C0",
    size: float = 3.0,
    alpha: float = 0.5,
    label: str | None = None,
) -> None:
    """Scatter 2-D points (N, 2) on ``ax`` with equal aspect and a symmetric limit."""
    pts = points.detach().float().cpu().numpy() if torch.is_tensor(points) else np.asarray(points)
    ax.scatter(pts[:, 0], pts[:, 1], s=size, alpha=alpha, linewidths=0, color=color, label=label)
    if title:
        ax.set_title(title, fontsize=FONTSIZE + 1)
    ax.set_aspect("equal")
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.tick_params(labelsize=FONTSIZE - 1)


def cloud_limit(*clouds: Tensor, cap: float = 50.0) -> float:
    """A symmetric axis limit that holds every finite point of ``clouds`` (capped at ``cap``)."""
    vals = [c[torch.isfinite(c)].abs().max() for c in clouds if torch.isfinite(c).any()]
    lim = float(max(vals)) * 1.05 if vals else 1.0
    return min(max(lim, 1e-3), cap)


def scatter_figure(points: Tensor, title: str = "", dpi: int = 100) -> Any:
    """One scatter panel of 2-D points (N, 2)."""
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got shape {tuple(points.shape)}")
    fig = new_figure(5.0, 5.0, dpi)
    scatter(fig.add_subplot(1, 1, 1), points, title, size=4.0, alpha=0.6)
    return fig
