"""Interpolation through the latent space of DDIM (Song et al. 2021, §5.3): invert two inputs to
their x_T with deterministic DDIM inversion, interpolate the latents spherically (slerp, as DDIM
does, since x_T ~ N(0, I) concentrates on a sphere), and decode each latent with DDIM (η = 0) on
the same timestep grid. α = 0 and α = 1 give back the inputs up to the inversion error."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpm.diffusion import GaussianDiffusion, ddim_invert, ddim_sample
from ddpm.viz.plots import FONTSIZE, cloud_limit, labelled_image_grid, new_figure, scatter


def slerp(z0: Tensor, z1: Tensor, alpha: float) -> Tensor:
    """Spherical interpolation per sample (over all non-batch dims): sin((1-α)θ)/sin θ z0 +
    sin(αθ)/sin θ z1, θ the angle between z0 and z1; linear when they are (anti)parallel."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]
    sin = torch.sin(theta)
    safe = sin.abs() > 1e-6
    w0 = torch.where(
        safe,
        torch.sin((1.0 - alpha) * theta) / torch.where(safe, sin, 1.0),
        torch.full_like(theta, 1.0 - alpha),
    )
    w1 = torch.where(
        safe, torch.sin(alpha * theta) / torch.where(safe, sin, 1.0), torch.full_like(theta, alpha)
    )
    return (w0 * a + w1 * b).reshape(z0.shape).to(z0.dtype)


def interpolation_alphas(num_frames: int) -> list[float]:
    """``num_frames`` >= 2 evenly spaced α in [0, 1]."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
        raise ValueError(f"num_frames must be an integer >= 2, got {num_frames!r}")
    return [i / (num_frames - 1) for i in range(num_frames)]


@torch.no_grad()
def interpolate(
    net: Callable[[Tensor, Tensor], Tensor],
    diffusion: GaussianDiffusion,
    x_a: Tensor,
    x_b: Tensor,
    *,
    alphas: Sequence[float] | None = None,
    num_frames: int = 9,
    steps: int = 50,
    spacing: str = "uniform",
    fixed_point_iters: int = 2,
    clip_denoised: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Invert ``x_a`` and ``x_b`` (one sample each, shape ``sample_shape``), slerp their
    latents at ``alphas`` (default ``num_frames`` evenly in [0, 1]) and decode.

    Returns ``alphas`` (list), ``latents`` (2, ...) (x_T of a and b), ``decoded`` (len(alphas),
    ...), ``inputs`` (2, ...) and ``reconstruction_error`` (max |decoded - input| at α = 0 and
    α = 1; ``nan`` when an end is not among ``alphas``). ``clip_denoised`` applies to both
    inversion and decoding (clipping makes the inverse inexact; off by default).
    """
    alphas = interpolation_alphas(num_frames) if alphas is None else [float(a) for a in alphas]
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of numbers in [0, 1], got {alphas}")
    if x_a.shape != x_b.shape:
        raise ValueError(
            f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}"
        )
    inputs = torch.stack([x_a, x_b]).float()
    latents = ddim_invert(
        net,
        diffusion,
        inputs,
        steps=steps,
        spacing=spacing,
        fixed_point_iters=fixed_point_iters,
        clip_denoised=clip_denoised,
        device=device,
    ).float()
    z = torch.cat([slerp(latents[:1], latents[1:], a) for a in alphas])
    decoded = (
        ddim_sample(
            net,
            diffusion,
            None,
            steps=steps,
            eta=0.0,
            spacing=spacing,
            clip_denoised=clip_denoised,
            noise=z,
            device=device,
        )
        .float()
        .cpu()
    )
    inputs = inputs.cpu()
    err = []
    for end, idx in ((0.0, 0), (1.0, 1)):
        hits = [i for i, a in enumerate(alphas) if math.isclose(a, end)]
        err.append(float((decoded[hits[0]] - inputs[idx]).abs().max()) if hits else math.nan)
    return {
        "alphas": alphas,
        "latents": latents.cpu(),
        "decoded": decoded,
        "inputs": inputs,
        "reconstruction_error": err,
    }


def interpolation_figure(
    result: dict[str, Any],
    title: str = "",
    denormalize: Any = None,
    reference: Tensor | None = None,
    dpi: int = 100,
) -> Any:
    """Images: one strip [input A | decoded at each α | input B]. 2-D points: the decoded path
    over the data cloud ``reference``."""
    decoded, inputs, alphas = result["decoded"], result["inputs"], result["alphas"]
    err = result["reconstruction_error"]
    default = (
        f"DDIM latent slerp interpolation (ends reconstruct inputs to max |err| "
        f"{err[0]:.2g} / {err[1]:.2g})"
    )
    if decoded.ndim == 2:  # 2-D points: the decoded path
        clouds = [decoded, inputs] + ([reference] if reference is not None else [])
        lim = cloud_limit(*clouds, cap=6.0)
        fig = new_figure(5.5, 5.5, dpi)
        ax = fig.add_subplot(1, 1, 1)
        if reference is not None:
            scatter(ax, reference, lim=lim, color="0.7", label="data")
        path = decoded.numpy()
        ax.plot(path[:, 0], path[:, 1], "-o", color="C1", markersize=3, label="decoded, α: 0→1")
        ax.scatter(
            inputs[:, 0], inputs[:, 1], color="C3", marker="x", s=60, zorder=3, label="inputs A, B"
        )
        ax.legend(fontsize=FONTSIZE)
        ax.set_title(title or default, fontsize=FONTSIZE + 1)
        ax.set_xlabel("x₁", fontsize=FONTSIZE + 1)
        ax.set_ylabel("x₂", fontsize=FONTSIZE + 1)
        return fig
    images = torch.cat([inputs[:1], decoded, inputs[1:]])
    cols = ["input A"] + [f"α={a:.2f}" for a in alphas] + ["input B"]
    return labelled_image_grid(
        images,
        nrow=len(cols),
        col_labels=cols,
        title=title or default,
        denormalize=denormalize,
        dpi=dpi,
    )
