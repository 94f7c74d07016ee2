"""The reverse process, pictured: for a few seeds, x_t and the network's x̂₀ at chosen steps of any
sampler (``visualize.py what=reverse``, and the denoising strip the sample grid logs while
training)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion.samplers.timesteps import step_timesteps
from ddpm.utils.images import Denormalize, make_grid_uint8
from ddpm.utils.seeding import PerSampleGenerator
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


def strip_timesteps(num_timesteps: int, num_frames: int = 8) -> list[int]:
    """``num_frames`` model timesteps evenly spaced from T-1 down to 0."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return sorted(
        {int(round(t)) for t in np.linspace(num_timesteps - 1, 0, num_frames)}, reverse=True
    )


def _checked_times(process: Any, timesteps: Sequence[float]) -> list[float]:
    """``timesteps`` descending, refused outside the process's time range."""
    if process.discrete:
        wanted: list[float] = sorted({int(t) for t in timesteps}, reverse=True)
        lo, hi = 0, process.num_timesteps - 1
    else:
        wanted = sorted({float(t) for t in timesteps}, reverse=True)
        lo, hi = process.t_min, process.t_max
    if not wanted or wanted[-1] < lo or wanted[0] > hi:
        raise ValueError(
            f"timesteps must be a non-empty list in [{lo}, {hi}], got {list(timesteps)}"
        )
    return wanted


@torch.inference_mode()
def denoising_trajectory(
    sampler: Callable[..., Any],
    net: Callable[[Tensor, Tensor], Tensor],
    diffusion: Any,
    sample_shape: Sequence[int],
    seeds: Sequence[int],
    *,
    timesteps: Sequence[int] | None = None,
    num_frames: int = 8,
    device: torch.device | str | None = None,
    class_labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """Run ``sampler`` once for ``seeds`` (one per-sample seed each; ``class_labels`` one per
    seed for a class-conditional network) and record the steps of the sampler's own grid nearest
    to the model ``timesteps`` (default :func:`strip_timesteps` ``(T, num_frames)`` on DDPM's
    chain; on a continuous process ``num_frames`` times of its natural grid, matched in log t).

    Returns ``timesteps`` (K,), ``x_t`` and ``pred_xstart`` (K, len(seeds), *sample_shape) on
    the CPU, and the final ``samples``.
    """
    if timesteps is not None:
        wanted = _checked_times(diffusion, timesteps)
    elif diffusion.discrete:
        wanted = strip_timesteps(diffusion.num_timesteps, num_frames)
    else:  # the process's natural grid (Karras σ on EDM's, uniform t on rectified flow)
        wanted = step_timesteps(diffusion, num_frames)
    gen = PerSampleGenerator(list(seeds), device=device or "cpu")
    extra = {} if class_labels is None else {"class_labels": class_labels}
    out = sampler(
        net,
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


def reverse_figure(
    traj: dict[str, Tensor],
    seeds: Sequence[int],
    title: str = "",
    denormalize: Denormalize | None = None,
    dpi: int = 100,
) -> Any:
    """A :func:`denoising_trajectory`, columns from the noisiest recorded step (left) to the last
    one. Images: rows "seed s: x_t" and "seed s: x̂₀" for each of ``seeds`` (x_t can exceed
    [-1, 1]: it is clamped like any image). 2-D points: the x_t and x̂₀ clouds."""
    ts = [
        f"{t:.3g}" if traj["timesteps"].is_floating_point() else int(t)
        for t in traj["timesteps"].tolist()
    ]
    x_t, x0 = traj["x_t"], traj["pred_xstart"]  # (K, S, ...)
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
    # per seed one row of x_t and one of x̂₀: (2 * S * K, C, H, W), row-major
    images = torch.cat([frames[:, i] for i in range(x_t.shape[1]) for frames in (x_t, x0)])
    padding = 2
    grid = make_grid_uint8(images, nrow=k, denormalize=denormalize, padding=padding)
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
