"""Classifier-free guidance at several scales: the same seeds, the same classes, one panel per
guidance scale s (ε̃ = ε_∅ + s (ε_y - ε_∅), Ho & Salimans 2022; s = 0 the unconditional branch,
s = 1 plain conditional sampling). Images: rows = classes, columns = seeds; 2-D points: one
cloud per scale, coloured by class."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpm.utils.images import make_grid_uint8
from ddpm.utils.seeding import PerSampleGenerator
from ddpm.viz.plots import (
    cell_inches,
    class_colour,
    cloud_limit,
    image_grid_panel,
    new_figure,
    scatter,
)


@torch.inference_mode()
def guidance_sweep(
    sampler: Any,
    net: Any,
    diffusion: Any,
    sample_shape: Sequence[int],
    classes: Sequence[int],
    seeds: Sequence[int],
    scales: Sequence[float],
    device: torch.device | str = "cpu",
) -> Tensor:
    """Samples (len(scales), len(classes) * len(seeds), *sample_shape) on the CPU: for each scale,
    class c with seed j at position ``c_index * len(seeds) + j``; the same seed draws the same
    noise at every scale (per-sample generators). ``sampler`` is a sampler dataclass
    (``ddpm.diffusion.samplers``), run with each ``guidance_scale``."""
    if not dataclasses.is_dataclass(sampler) or not hasattr(sampler, "guidance_scale"):
        raise ValueError("the guidance picture needs a sampler with a guidance_scale field")
    labels = torch.tensor([c for c in classes for _ in seeds], dtype=torch.long, device=device)
    all_seeds = [s for _ in classes for s in seeds]
    out = []
    for s in scales:
        guided = dataclasses.replace(sampler, guidance_scale=float(s))
        x = guided(
            net,
            diffusion,
            (len(all_seeds), *sample_shape),
            generator=PerSampleGenerator(all_seeds, device=device),
            device=device,
            class_labels=labels,
        )
        out.append(x.float().cpu())
    return torch.stack(out)


def guidance_figure(
    samples: Tensor,
    scales: Sequence[float],
    class_names: Sequence[str],
    seeds: Sequence[int],
    denormalize: Callable[[Tensor], Tensor] | None = None,
    title: str = "",
    dpi: int = 100,
) -> Any:
    """One panel per guidance scale of :func:`guidance_sweep`'s samples."""
    n = len(scales)
    if samples.ndim == 3:  # 2-D points: a cloud per scale, coloured by class
        fig = new_figure(3.2 * n, 3.6, dpi)
        lim = cloud_limit(*samples)
        labels = [c for c in range(len(class_names)) for _ in seeds]
        for i, s in enumerate(scales):
            ax = fig.add_subplot(1, n, i + 1)
            for c, name in enumerate(class_names):
                mine = samples[i][torch.tensor(labels) == c]
                scatter(ax, mine, lim=lim, color=class_colour(c), label=name if i == 0 else None)
            ax.set_title(f"guidance s = {s:g}", fontsize=9)
        fig.legend(fontsize=7, loc="lower center", ncol=min(len(class_names), 8), markerscale=3)
    else:
        padding = 2
        h, w = samples.shape[-2:]
        cell = cell_inches(max(h, w))
        fig = new_figure(n * (len(seeds) * cell + 0.6) + 0.6, len(class_names) * cell + 1.0, dpi)
        for i, s in enumerate(scales):
            grid = make_grid_uint8(samples[i], nrow=len(seeds), denormalize=denormalize)
            ax = fig.add_subplot(1, n, i + 1)
            rows = list(class_names) if i == 0 else []
            image_grid_panel(ax, grid, (h, w), padding, (), rows, f"s = {s:g}")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
