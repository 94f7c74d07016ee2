"""The forward process, pictured: one batch at x_t for several t under several schedules (improved
DDPM's Figure 3), and the schedules themselves (ᾱ_t, β_t, log SNR(t) on shared axes).

Here t counts forward steps as in the papers: t = 0 is the data x₀ itself and t = T is x_T, the
last latent (model timestep T-1). Every schedule noises the batch with the same ε, so columns
differ only through ᾱ_t: x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε (DDPM eq. 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion import GaussianDiffusion
from ddpm.utils.images import make_grid_uint8
from ddpm.viz.plots import (
    FONTSIZE,
    cell_inches,
    cloud_limit,
    image_grid_panel,
    new_figure,
    scatter,
)

DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


def make_diffusions(
    schedules: Sequence[str | Mapping[str, Any]], num_timesteps: int
) -> dict[str, GaussianDiffusion]:
    """``{label: GaussianDiffusion}`` for schedule names (``linear``, ``cosine``, ...) or dicts
    ``{name, num_timesteps?, kwargs?, rescale_zero_terminal_snr?, label?}``."""
    if isinstance(schedules, str) or not schedules:
        raise ValueError(
            f"schedules must be a non-empty list of schedule names, e.g. [linear, cosine], got "
            f"{schedules!r}"
        )
    out: dict[str, GaussianDiffusion] = {}
    for entry in schedules:
        if isinstance(entry, str):
            spec: dict[str, Any] = {"name": entry}
        elif isinstance(entry, Mapping):
            spec = dict(entry)
        else:
            raise ValueError(f"schedules entries must be names or dicts, got {entry!r}")
        name = spec.get("name")
        zero_snr = bool(spec.get("rescale_zero_terminal_snr", False))
        label = str(spec.get("label") or (f"{name}+zero-SNR" if zero_snr else name))
        if label in out:
            raise ValueError(f"schedules lists {label!r} twice")
        out[label] = GaussianDiffusion(
            schedule=name,
            num_timesteps=int(spec.get("num_timesteps") or num_timesteps),
            schedule_kwargs=dict(spec.get("kwargs") or {}),
            rescale_zero_terminal_snr=zero_snr,
            # ε cannot be recovered at ᾱ_T = 0; the forward process does not care
            prediction_type="v_prediction" if zero_snr else "epsilon",
        )
    return out


def forward_timesteps(num_timesteps: int, timesteps: Sequence[int] | None = None) -> list[int]:
    """Forward-step counts t in [0, T] (ascending, unique); default 0, .05T, .1T, ..., T."""
    T = int(num_timesteps)
    if timesteps is None:
        ts = [int(round(f * T)) for f in DEFAULT_FRACTIONS]
    else:
        ts = [int(t) for t in timesteps]
    if not ts or min(ts) < 0 or max(ts) > T:
        raise ValueError(
            f"timesteps must be a non-empty list of forward steps in [0, T={T}] (0 = data, "
            f"T = x_T), got {list(timesteps) if timesteps is not None else ts}"
        )
    return sorted(set(ts))


def alpha_bar_at(diffusion: GaussianDiffusion, t: int) -> float:
    """ᾱ after ``t`` forward steps (1 at t = 0)."""
    return 1.0 if t == 0 else float(diffusion.alphas_cumprod_f64[t - 1])


@torch.no_grad()
def forward_diffusion(
    x0: Tensor,
    diffusions: Mapping[str, GaussianDiffusion],
    timesteps: Sequence[int],
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """x_t of the batch ``x0`` after each number of forward steps in ``timesteps``, per schedule.

    Returns ``x0``, ``noise`` (the shared ε), ``timesteps`` (list), ``x_t`` (``{label: (K, B,
    ...)}``, ``x_t[label][k] == x0`` where ``timesteps[k] == 0``) and ``alphas_cumprod``
    (``{label: [ᾱ at each t]}``).
    """
    x0 = x0.detach().float().cpu()
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator)
    noise = noise.float().cpu()
    out: dict[str, Tensor] = {}
    abar: dict[str, list[float]] = {}
    for label, diffusion in diffusions.items():
        T = diffusion.num_timesteps
        frames = []
        for t in timesteps:
            if not 0 <= t <= T:
                raise ValueError(f"timesteps must lie in [0, {T}], got {t}")
            if t == 0:
                frames.append(x0.clone())
                continue
            tt = torch.full((x0.shape[0],), t - 1, dtype=torch.long)
            frames.append(diffusion.q_sample(x0, tt, noise))
        out[label] = torch.stack(frames)
        abar[label] = [alpha_bar_at(diffusion, t) for t in timesteps]
    return {
        "x0": x0,
        "noise": noise,
        "timesteps": list(timesteps),
        "x_t": out,
        "alphas_cumprod": abar,
        "num_timesteps": {label: d.num_timesteps for label, d in diffusions.items()},
    }


def _column_label(t: int, T: int, abar: float) -> str:
    name = "t=0 (x₀)" if t == 0 else ("t=T (x_T)" if t == T else f"t={t}")
    return f"{name}\nᾱ={abar:.2g}"


def forward_figure(
    result: Mapping[str, Any],
    max_images: int = 8,
    denormalize: Any = None,
    dpi: int = 100,
) -> Any:
    """The forward grid: images side by side per schedule (rows: images, columns: t), or for 2-D
    points one row of scatter panels per schedule."""
    x_t: Mapping[str, Tensor] = result["x_t"]
    ts: list[int] = list(result["timesteps"])
    labels = list(x_t)
    k = len(ts)
    first = x_t[labels[0]]
    if first.ndim == 3:  # (K, N, 2) point clouds
        lim = cloud_limit(*x_t.values(), cap=6.0)
        fig = new_figure(2.3 * k, 2.4 * len(labels) + 0.4, dpi)
        for r, label in enumerate(labels):
            for c, t in enumerate(ts):
                ax = fig.add_subplot(len(labels), k, r * k + c + 1)
                abar = result["alphas_cumprod"][label][c]
                scatter(ax, x_t[label][c], f"t={t}, ᾱ={abar:.2g}", lim)
                if c == 0:
                    ax.set_ylabel(label, fontsize=FONTSIZE + 1)
        fig.suptitle("Forward diffusion q(x_t | x₀) of the point cloud", fontsize=FONTSIZE + 3)
        fig.tight_layout()
        return fig

    n = min(int(max_images), first.shape[1])
    h, w = first.shape[-2:]
    cell = cell_inches(max(h, w))
    fig = new_figure(len(labels) * (k * cell + 0.6) + 0.6, n * cell + 1.4, dpi)
    padding = 2
    for i, label in enumerate(labels):
        frames = x_t[label][:, :n]  # (K, n, C, H, W) -> rows = images, columns = t
        images = frames.transpose(0, 1).reshape(-1, *frames.shape[2:])
        grid = make_grid_uint8(images, nrow=k, denormalize=denormalize, padding=padding)
        ax = fig.add_subplot(1, len(labels), i + 1)
        T = result["num_timesteps"][label]
        cols = [
            _column_label(t, T, a) for t, a in zip(ts, result["alphas_cumprod"][label], strict=True)
        ]
        rows = [f"image {j}" for j in range(n)] if i == 0 else []
        image_grid_panel(ax, grid, (h, w), padding, cols, rows, f"{label} schedule")
    fig.suptitle(
        "Forward diffusion x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε (same ε for every schedule)",
        fontsize=FONTSIZE + 3,
    )
    return fig


def schedule_curves(diffusion: GaussianDiffusion) -> dict[str, np.ndarray]:
    """``t`` (1..T), ``alphas_cumprod``, ``betas`` and ``log_snr`` = log(ᾱ/(1-ᾱ)) as arrays."""
    ac = diffusion.alphas_cumprod_f64.detach().cpu().numpy()
    betas = diffusion.betas.detach().cpu().double().numpy()
    with np.errstate(divide="ignore"):
        log_snr = np.log(ac) - np.log1p(-ac)
    return {
        "t": np.arange(1, len(ac) + 1),
        "alphas_cumprod": ac,
        "betas": betas,
        "log_snr": log_snr,
    }


def schedule_figure(diffusions: Mapping[str, GaussianDiffusion], dpi: int = 100) -> Any:
    """ᾱ_t, β_t (log scale) and log SNR(t) of every schedule: three panels, one curve per
    schedule in each (the same colour across panels), x = t/T so different T line up."""
    fig = new_figure(13.5, 3.8, dpi)
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    panels = [
        ("alphas_cumprod", "ᾱ_t (signal fraction)", "linear"),
        ("betas", "β_t", "log"),
        ("log_snr", "log SNR(t) = log ᾱ_t/(1-ᾱ_t)", "linear"),
    ]
    for i, (label, diffusion) in enumerate(diffusions.items()):
        curves = schedule_curves(diffusion)
        x = curves["t"] / diffusion.num_timesteps
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            y = curves[key]
            ax.plot(
                x,
                np.where(np.isfinite(y), y, np.nan),
                color=f"C{i}",
                label=f"{label} (T={diffusion.num_timesteps})",
            )
    for ax, (_, ylabel, yscale) in zip(axes, panels, strict=True):
        ax.set_yscale(yscale)
        ax.set_xlabel("t / T", fontsize=FONTSIZE + 1)
        ax.set_ylabel(ylabel, fontsize=FONTSIZE + 1)
        ax.set_title(ylabel.split(" (")[0].split(" =")[0] + " vs t", fontsize=FONTSIZE + 2)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=FONTSIZE)
        ax.legend(fontsize=FONTSIZE)
    fig.suptitle("Noise schedules", fontsize=FONTSIZE + 3)
    fig.tight_layout()
    return fig
