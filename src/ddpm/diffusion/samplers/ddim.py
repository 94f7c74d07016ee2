"""DDIM (Song et al. 2021): sampling with any η and deterministic inversion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.respace import space_timesteps
from ddpm.diffusion.samplers._core import Net, SampleCall, SampleOutput, check_options, grid


def _ddim_coefficients(ac: np.ndarray, eta: float) -> tuple[list[float], list[float], list[float]]:
    """(b, c, σ_t) per step such that DDIM's x_{t-1} = b x̂₀ + c x_t + σ_t z.

    DDIM eq. 12 with ε̂ = (x_t - √ᾱ_t x̂₀)/√(1-ᾱ_t) (recomputed from the possibly clipped x̂₀):
    b = √ᾱ_{t-1} - d √ᾱ_t/√(1-ᾱ_t), c = d/√(1-ᾱ_t), d = √(1-ᾱ_{t-1}-σ_t²). ``ac`` is the grid's ᾱ
    (ascending timesteps; ᾱ = 1 before the first).
    """
    ac_prev = np.append(1.0, ac[:-1])
    sigma = eta * np.sqrt((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev))
    rest = 1.0 - ac_prev - sigma**2
    if np.any(rest < -1e-12):
        raise ValueError(f"eta={eta} is too large: σ_t² exceeds 1 - ᾱ_(t-1) (eta <= 1 is safe)")
    d = np.sqrt(np.maximum(rest, 0.0)) / np.sqrt(1.0 - ac)
    return (np.sqrt(ac_prev) - d * np.sqrt(ac)).tolist(), d.tolist(), sigma.tolist()


@torch.inference_mode()
def ddim_sample(
    net: Net,
    diffusion: GaussianDiffusion,
    shape: Sequence[int] | None,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    **common: Any,
) -> SampleOutput:
    """DDIM (Song et al. 2021, eq. 12): x_{t-1} = √ᾱ_{t-1} x̂₀ + √(1-ᾱ_{t-1}-σ_t²) ε̂ + σ_t z.

    σ_t(η) = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t-1}) (eq. 16): η = 0 is deterministic, η = 1
    with all T steps is DDPM with σ² = β̃. The last step goes to ᾱ = 1, i.e. returns x̂₀. ε̂ is
    recomputed from the (clipped) x̂₀. Timesteps: ``space_timesteps(T, steps, spacing)``.
    ``**common``: :class:`~ddpm.diffusion.samplers.SampleCall`.
    """
    call = SampleCall.parse("ddim_sample", common)
    check_options({"eta": eta})
    ac, net_t = grid(diffusion, space_timesteps(diffusion.num_timesteps, steps, spacing))
    b, c, sigma = _ddim_coefficients(ac, float(eta))
    run = call.start(net, diffusion, shape, ac, net_t, "DDIM", net_t[::-1])
    x = run.x
    n = len(net_t)
    for i in run.steps(n):
        k = n - 1 - i
        x0, _, _ = run.denoise(x, k)
        run.record(i, x, x0)
        if k == 0:  # ᾱ_{t-1} = 1: x₀ = x̂₀
            x = x0
            continue
        x = torch.add(x * c[k], x0, alpha=b[k])  # √ᾱ_{t-1} x̂₀ + √(1-ᾱ_{t-1}-σ_t²) ε̂
        if sigma[k] > 0.0:
            x.add_(run.noise(x.shape), alpha=sigma[k])
    return run.result(x)


@torch.inference_mode()
def ddim_invert(
    net: Net,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    *,
    steps: int = 50,
    spacing: str = "uniform",
    fixed_point_iters: int = 0,
    **common: Any,
) -> SampleOutput:
    """Deterministic DDIM inversion (image -> noise): ``ddim_sample`` with η = 0 run backwards.

    On the grid τ_0 < ... < τ_{K-1} of ``ddim_sample(steps, spacing)``, each step inverts one
    sampling step: x_{τ_k} = √ᾱ_{τ_k} x̂₀ + √(1-ᾱ_{τ_k}) ε̂ with x̂₀ = (x_{τ_{k-1}} -
    √(1-ᾱ_{τ_{k-1}}) ε̂)/√ᾱ_{τ_{k-1}} (ᾱ = 1 before τ_0, so x̂₀ = x₀ at the first step) and ε̂
    predicted at (x, τ_k). The exact inverse needs ε̂ at the unknown x_{τ_k}; the plain inversion
    (``fixed_point_iters=0``, as diffusers' ``DDIMInverseScheduler``) uses x = x_{τ_{k-1}}, an
    O(1/steps) error; each fixed-point iteration re-predicts ε̂ at the new x_{τ_k} (one more
    network call per step) and converges to the exact inverse where the map contracts.
    Returns x_{τ_{K-1}}, the noise from which ``ddim_sample(..., noise=x_T)`` gives back ``x0``.
    No clipping by default (clipping would make the inverse inexact). ``**common``: those of
    :class:`~ddpm.diffusion.samplers.SampleCall` but ``generator`` and ``noise``.
    """
    common = {"clip_denoised": False, **common}
    call = SampleCall.parse("ddim_invert", common, exclude=("generator", "noise"))
    if (
        isinstance(fixed_point_iters, bool)
        or not isinstance(fixed_point_iters, int)
        or fixed_point_iters < 0
    ):
        raise ValueError(f"fixed_point_iters must be an integer >= 0, got {fixed_point_iters!r}")
    ac, net_t = grid(diffusion, space_timesteps(diffusion.num_timesteps, steps, spacing))
    run = replace(call, noise=x0).start(net, diffusion, None, ac, net_t, "DDIM inversion")
    x = run.x
    sqrt_ac, sqrt_1m_ac = np.sqrt(ac).tolist(), np.sqrt(1.0 - ac).tolist()
    n = len(net_t)
    for k in run.steps(n):
        x_next = x
        for _ in range(1 + fixed_point_iters):
            _, eps, _ = run.denoise(x_next, k, need_eps=True)
            if k == 0:  # ᾱ = 1 before the first step: x̂₀ is the image itself
                x0_hat = x
            else:  # the x̂₀ implied by x_{τ_{k-1}} and ε̂ (DDIM eq. 12 solved for x̂₀)
                x0_hat = torch.sub(x, eps, alpha=sqrt_1m_ac[k - 1]).mul_(1.0 / sqrt_ac[k - 1])
            x_next = torch.add(x0_hat * sqrt_ac[k], eps, alpha=sqrt_1m_ac[k])
        x = x_next
        run.record(k, x, x0_hat)
    return run.result(x)
