"""The reverse process, pictured: for a few seeds, x_t and the network's x̂₀ at chosen steps of any
sampler. The trajectory and the uint8 strip come from :mod:`ddpm.utils.images` (the same strip
the sample-grid callback logs during training); this module adds labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpm.utils.images import denoising_trajectory, strip_grid
from ddpm.viz.plots import FONTSIZE, cell_inches, cloud_limit, image_grid_panel, new_figure, scatter


def sampler_label(sampler: Any) -> str:
    """``ddim (50 steps, η=0)``-style description of a sampler object."""
    name = getattr(sampler, "name", "") or type(sampler).__name__
    parts = []
    steps = getattr(sampler, "steps", None)
    parts.append("all steps" if steps is None and name == "ddpm" else f"{steps} steps")
    if getattr(sampler, "eta", None) is not None:
        parts.append(f"η={sampler.eta:g}")
    if getattr(sampler, "order", None) is not None:
        parts.append(f"order {sampler.order}")
    return f"{name} ({', '.join(parts)})"


def reverse_trajectory(
    sampler: Callable[..., Any],
    model: Callable[[Tensor, Tensor], Tensor],
    diffusion: Any,
    sample_shape: Sequence[int],
    seeds: Sequence[int],
    timesteps: Sequence[int] | None = None,
    num_frames: int = 8,
    device: torch.device | str | None = None,
    class_labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """:func:`ddpm.utils.images.denoising_trajectory` (``timesteps``: model timesteps to record,
    the nearest steps of the sampler's grid; default ``num_frames`` evenly spaced)."""
    return denoising_trajectory(
        sampler,
        model,
        diffusion,
        sample_shape,
        seeds,
        num_frames,
        device=device,
        timesteps=timesteps,
        class_labels=class_labels,
    )


def reverse_figure(
    traj: dict[str, Tensor],
    seeds: Sequence[int],
    title: str = "",
    denormalize: Any = None,
    dpi: int = 100,
) -> Any:
    """Images: one two-row strip per seed (x_t above, x̂₀ below; columns from the noisiest step
    to the last). 2-D points: x_t and x̂₀ clouds at each recorded step."""
    ts = [int(t) for t in traj["timesteps"]]
    x_t, x0 = traj["x_t"], traj["pred_xstart"]
    k = len(ts)
    if x_t.ndim == 3:  # (K, N, 2)
        lim = cloud_limit(x_t, x0, cap=6.0)
        fig = new_figure(2.3 * k, 5.0, dpi)
        for c, t in enumerate(ts):
            ax = fig.add_subplot(2, k, c + 1)
            scatter(ax, x_t[c], f"x_t, t={t}", lim)
            ax = fig.add_subplot(2, k, k + c + 1)
            scatter(ax, x0[c], f"x̂₀ predicted at t={t}", lim, color="C1")
        fig.suptitle(title or "Reverse trajectory", fontsize=FONTSIZE + 3)
        fig.tight_layout()
        return fig
    padding = 2
    grid = strip_grid(traj, denormalize, padding=padding)
    h, w = x_t.shape[-2:]
    cell = cell_inches(max(h, w))
    rows = []
    for s in seeds:
        rows += [f"seed {s}: x_t", f"seed {s}: x̂₀"]
    fig = new_figure(k * cell + 1.6, len(rows) * cell + 1.0, dpi)
    ax = fig.add_subplot(1, 1, 1)
    cols = [f"t={t}" for t in ts]
    image_grid_panel(ax, grid, (h, w), padding, cols, rows, title or "Reverse trajectory")
    return fig
