"""The 2-D playground, pictured and measured: the forward diffusion of the point cloud (DDPM's
discrete chain), the reverse trajectory of every sampler, the learned score field
s_θ(x, t) = -ε̂(x, t)/σ_t at a few t (any process of the family),
and a number for sample quality: the energy distance (and MMD) between generated points and
held-out data, next to the same distance for N(0, I) (the sampler's starting point) and for a
second sample of the data (the estimator's noise floor)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion import Process
from ddpm.metrics.distances import distribution_distances
from ddpm.viz.forward import forward_diffusion, forward_figure
from ddpm.viz.plots import FONTSIZE, cloud_limit, new_figure, scatter
from ddpm.viz.reverse import sampler_label, strip_timesteps

Net = Callable[[Tensor, Tensor], Tensor]


def _fractions(T: int, fractions: Sequence[float], lo: int = 0, hi: int | None = None) -> list[int]:
    hi = T - 1 if hi is None else hi
    return sorted({int(min(max(round(f * T), lo), hi)) for f in fractions})


def process_times(process: Process, fractions: Sequence[float]) -> list[float]:
    """Times at ``fractions`` of the process's range: DDPM's integer timesteps (of T), else
    f·t_max clipped to [t_min, t_max]."""
    if process.discrete:
        return _fractions(int(process.num_timesteps), fractions)
    return sorted({min(max(f * process.t_max, process.t_min), process.t_max) for f in fractions})


def _time_tensor(process: Process, t: float, n: int, device: Any = "cpu") -> Tensor:
    dtype = torch.long if process.discrete else torch.float32
    return torch.full((n,), t, dtype=dtype, device=device)


@torch.no_grad()
def score_field(
    net: Net,
    diffusion: Process,
    t: float,
    lim: float,
    grid_size: int = 21,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """The learned score -ε̂(x, t)/σ_t (σ_t = √(1-ᾱ_t) on DDPM's chain) on a ``grid_size``² grid
    over [-lim, lim]² at process time ``t`` (ε̂ from any prediction type via
    ``Process.model_predictions``)."""
    axis = torch.linspace(-lim, lim, grid_size)
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    x = torch.stack([gx.flatten(), gy.flatten()], dim=1).to(device)
    tt = _time_tensor(diffusion, t, x.shape[0], device)
    out = diffusion.network_output(net, x, tt)
    _, eps = diffusion.model_predictions(out, x, tt, clip_denoised=False)
    sigma = diffusion.alpha_sigma(tt, 2)[1]
    return {"points": x.cpu(), "score": (-eps / sigma).float().cpu()}


@torch.no_grad()
def playground_report(
    net: Net,
    diffusion: Process,
    reference: Tensor,
    samplers: Mapping[str, Callable[..., Any]],
    *,
    second_reference: Tensor | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    frames: int = 6,
    score_timesteps: Sequence[int] | None = None,
    forward_timesteps: Sequence[int] | None = None,
    grid_size: int = 21,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Everything the playground shows, as data.

    ``reference``: held-out data (N, 2); ``second_reference``: another sample of the data for the
    noise floor (optional). Each sampler draws ``num_samples`` (default N) points from a
    ``torch.Generator`` seeded with ``seed``, recording ~``frames`` steps.

    Returns ``distances`` (``{sampler name | "gaussian" | "data": {"energy_distance", "mmd"}}``),
    ``samples`` (``{name: (n, 2)}``), ``trajectories`` (``{name: {timesteps, x_t, pred_xstart}}``),
    ``forward`` (:func:`forward_diffusion` of ``reference`` under the model's schedule; None on a
    continuous process), ``scores`` (``{t: score_field}``) and ``reference``. The timesteps are
    DDPM's integer ones or, on a continuous process, process times.
    """
    reference = reference.detach().float().cpu()
    if reference.ndim != 2 or reference.shape[1] != 2:
        raise ValueError(f"reference must be 2-D points (N, 2), got {tuple(reference.shape)}")
    if not samplers:
        raise ValueError("samplers must name at least one sampler")
    n = int(num_samples or reference.shape[0])
    T = diffusion.num_timesteps
    if diffusion.discrete:
        wanted: list[float] = list(strip_timesteps(T, frames))
    else:
        wanted = np.linspace(diffusion.t_max, diffusion.t_min, frames).tolist()
    distances: dict[str, dict[str, float]] = {}
    samples: dict[str, Tensor] = {}
    trajectories: dict[str, dict[str, Tensor]] = {}
    for name, sampler in samplers.items():
        g = torch.Generator().manual_seed(int(seed))
        x, inter = sampler(
            net, diffusion, (n, 2), generator=g, return_intermediates=wanted, device=device
        )
        samples[name] = x.float().cpu()
        trajectories[name] = inter
        if not torch.isfinite(samples[name]).all():
            distances[name] = {"energy_distance": float("nan"), "mmd": float("nan")}
        else:
            distances[name] = distribution_distances(samples[name], reference)
    g = torch.Generator().manual_seed(int(seed) + 1)
    gaussian = torch.randn((n, 2), generator=g)
    distances["gaussian"] = distribution_distances(gaussian, reference)
    if second_reference is not None:
        distances["data"] = distribution_distances(second_reference.float().cpu()[:n], reference)

    forward = None
    if diffusion.discrete:
        fwd_t = (
            [int(round(f * T)) for f in (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)]
            if forward_timesteps is None
            else [int(t) for t in forward_timesteps]
        )
        forward = forward_diffusion(
            reference,
            {diffusion.schedule: diffusion},
            sorted(set(fwd_t)),
            generator=torch.Generator().manual_seed(int(seed) + 2),
        )
    score_t = (
        process_times(diffusion, (0.01, 0.05, 0.15, 0.4, 0.8))
        if score_timesteps is None
        else sorted({int(t) if diffusion.discrete else float(t) for t in score_timesteps})
    )
    lo, hi = (0, T - 1) if diffusion.discrete else (diffusion.t_min, diffusion.t_max)
    if min(score_t) < lo or max(score_t) > hi:
        raise ValueError(f"score_timesteps must lie in [{lo}, {hi}], got {score_t}")
    lim = max(3.0, cloud_limit(reference))
    scores = {t: score_field(net, diffusion, t, lim, grid_size, device) for t in score_t}
    g = torch.Generator().manual_seed(int(seed) + 3)
    for t, field in scores.items():  # the noisy data the score field acts on, for context
        tt = _time_tensor(diffusion, t, reference.shape[0])
        field["x_t"] = diffusion.q_sample(reference, tt, torch.randn(reference.shape, generator=g))
    return {
        "distances": distances,
        "samples": samples,
        "gaussian": gaussian,
        "trajectories": trajectories,
        "forward": forward,
        "scores": scores,
        "reference": reference,
        "lim": lim,
        "sampler_labels": {name: sampler_label(s) for name, s in samplers.items()},
    }


def playground_figures(
    report: Mapping[str, Any], dpi: int = 100, max_points: int = 1000
) -> dict[str, Any]:
    """``{"forward", "reverse", "score", "samples": Figure}`` of a :func:`playground_report`
    (no ``forward`` on a continuous process).

    The forward and reverse panels draw at most ``max_points`` points each (rendering time)."""
    ref, lim = report["reference"], report["lim"]
    dist = report["distances"]
    fwd = report["forward"]
    figs: dict[str, Any] = {}
    if fwd is not None:
        fwd = {**fwd, "x_t": {k: v[:, :max_points] for k, v in fwd["x_t"].items()}}
        figs["forward"] = forward_figure(fwd, dpi=dpi)

    # reverse: one row per sampler, x_t at the recorded steps, then the final samples over data
    trajs = report["trajectories"]
    k = max(len(tr["timesteps"]) for tr in trajs.values()) + 1
    fig = new_figure(2.3 * k, 2.4 * len(trajs) + 0.4, dpi)
    for r, (name, tr) in enumerate(trajs.items()):
        for c, t in enumerate(tr["timesteps"].tolist()):
            ax = fig.add_subplot(len(trajs), k, r * k + c + 1)
            scatter(ax, tr["x_t"][c, :max_points], f"{name}: x_t, t={t:.4g}", lim)
        ax = fig.add_subplot(len(trajs), k, r * k + k)
        scatter(ax, ref, lim=lim, color="0.75", label="data")
        scatter(ax, report["samples"][name], f"{name}: samples", lim, color="C1", label="samples")
        ax.legend(fontsize=FONTSIZE - 1, loc="lower right", markerscale=3)
    fig.suptitle("Reverse trajectories (x_t) of each sampler", fontsize=FONTSIZE + 3)
    fig.tight_layout()
    figs["reverse"] = fig

    # score field: one panel per t; arrows show the direction, colour the magnitude
    scores = report["scores"]
    fig = new_figure(4.0 * len(scores), 3.9, dpi)
    for i, (t, field) in enumerate(scores.items()):
        ax = fig.add_subplot(1, len(scores), i + 1)
        pts, s = field["points"].numpy(), field["score"].numpy()
        mag = np.linalg.norm(s, axis=1)
        u = s / np.maximum(mag, 1e-12)[:, None]
        xt = field.get("x_t")
        if xt is not None:
            scatter(ax, xt, lim=lim, color="0.7", size=2)
        q = ax.quiver(
            pts[:, 0],
            pts[:, 1],
            u[:, 0],
            u[:, 1],
            np.log10(mag + 1e-12),
            cmap="viridis",
            angles="xy",
            pivot="mid",
            width=0.006,
            scale=1.3 * np.sqrt(len(pts)),
            scale_units="width",
        )
        cb = fig.colorbar(q, ax=ax, shrink=0.75)
        cb.set_label("log10 |s_θ|", fontsize=FONTSIZE)
        cb.ax.tick_params(labelsize=FONTSIZE - 1)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(f"t={t:.4g}", fontsize=FONTSIZE + 1)
        ax.tick_params(labelsize=FONTSIZE - 1)
    fig.suptitle(
        "Learned score s_θ(x, t) = -ε̂/σ_t: arrows = direction, colour = log10 |s_θ|; "
        "grey = noisy data x_t",
        fontsize=FONTSIZE + 3,
    )
    fig.tight_layout()
    figs["score"] = fig

    # samples vs data, with the distances
    names = list(report["samples"])
    panels = (
        [("data (held out)", ref, "0.4")]
        + [(f"{report['sampler_labels'].get(nm, nm)}", report["samples"][nm], "C1") for nm in names]
        + [("N(0, I) (sampler start)", report["gaussian"], "C7")]
    )
    keys = [None, *names, "gaussian"]
    fig = new_figure(3.3 * len(panels), 3.8, dpi)
    for i, ((title, pts, color), key) in enumerate(zip(panels, keys, strict=True)):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if key is not None:
            d = dist[key]
            title = f"{title}\nenergy dist {d['energy_distance']:.4f}, MMD² {d['mmd']:.4f}"
        elif "data" in dist:
            title = (
                f"{title}\nfloor (2nd data sample): energy dist "
                f"{dist['data']['energy_distance']:.4f}"
            )
        scatter(ax, pts, title, lim, color=color)
    fig.suptitle("Generated vs held-out data", fontsize=FONTSIZE + 3)
    fig.tight_layout()
    figs["samples"] = fig
    return figs
