"""EDM's Heun sampler (Karras et al. 2022, Alg. 1-2) on a discrete variance-preserving schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.samplers._core import (
    Net,
    SampleCall,
    SampleOutput,
    check_options,
    grid,
    solver_alphas_cumprod,
)
from ddpm.diffusion.samplers.timesteps import heun_timesteps


def _churned(sigmas: np.ndarray, all_sigmas: np.ndarray, n: int, churn: tuple) -> np.ndarray:
    """Indices of the discrete σ nearest to σ̂_i = (1 + γ_i) σ_i (Alg. 2, line 4-5, with EDM's
    ``round_sigma`` for discrete models), γ_i = min(S_churn/N, √2 - 1) on [S_tmin, S_tmax]."""
    s_churn, s_tmin, s_tmax = churn
    s_tmax = math.inf if s_tmax is None else s_tmax
    gamma = np.where(
        (sigmas >= s_tmin) & (sigmas <= s_tmax), min(s_churn / n, math.sqrt(2.0) - 1.0), 0.0
    )
    wanted = (1.0 + gamma) * sigmas
    return np.argmin(np.abs(all_sigmas[None, :] - wanted[:, None]), axis=1)


@torch.inference_mode()
def heun_sample(
    net: Net,
    diffusion: GaussianDiffusion,
    shape: Sequence[int] | None,
    *,
    steps: int = 10,
    spacing: str = "karras",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
    **common: Any,
) -> SampleOutput:
    """EDM's second-order Heun sampler (Karras et al. 2022, Alg. 1; Alg. 2 with ``s_churn`` > 0).

    In σ(t) = √((1-ᾱ_t)/ᾱ_t) and x_σ = x_t/√ᾱ_t (the probability-flow ODE dx/dσ = (x - D(x; σ))/σ,
    D = x̂₀): an Euler step to σ_{i+1}, then, unless σ_{i+1} = 0, the trapezoidal correction
    with the slope at the Euler point. ``steps`` = N timesteps (:func:`heun_timesteps`, then
    σ = 0) cost 2N - 1 network calls. Alg. 2 first raises σ_i in [S_tmin, S_tmax] (``s_tmax``
    None: no bound) to σ̂_i = (1 + γ_i) σ_i, rounded to the nearest σ of the schedule, adding
    noise of variance σ̂_i² - σ_i² (times ``s_noise``²). x_T = ``noise`` (unit variance, as every
    sampler here) is x_σ = x_T/√ᾱ. ``s_churn = 0`` is diffusers' ``HeunDiscreteScheduler``
    (which takes fractional timesteps on a ``uniform`` grid; ours are the nearest integers).
    The first step starts at σ(T-1): a schedule where that is huge (cosine: 2·10⁴; zero
    terminal SNR) makes it one long, inaccurate trapezoid (EDM starts at σ_max = 80).
    ``**common``: :class:`~ddpm.diffusion.samplers.SampleCall`.
    """
    call = SampleCall.parse("heun_sample", common)
    check_options({"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise})
    ts = heun_timesteps(diffusion, steps, spacing)
    n = len(ts)
    all_ac = solver_alphas_cumprod(diffusion)
    all_sigmas = np.sqrt((1.0 - all_ac) / all_ac)
    sig = all_sigmas[ts]
    hat = _churned(sig, all_sigmas, n, (s_churn, s_tmin, s_tmax)) if s_churn > 0 else ts
    # network calls: step i at σ̂_i (index i), its correction at σ_{i+1} (index n + i)
    ac, net_t = grid(diffusion, [*hat, *ts[1:]], solver=True)
    scale_in = np.sqrt(ac).tolist()  # x_t = √ᾱ x_σ
    sig_hat = all_sigmas[list(hat)].tolist()
    sig_next = [*sig[1:].tolist(), 0.0]
    run = call.start(net, diffusion, shape, ac, net_t, "Heun", net_t[:n])
    x = run.x / math.sqrt(all_ac[ts[0]])  # x_σ
    for i in run.steps(n):
        if sig_hat[i] > sig[i]:  # Alg. 2: x̂ = x + √(σ̂² - σ²) S_noise ε
            std = math.sqrt(sig_hat[i] ** 2 - sig[i] ** 2) * s_noise
            x = x + run.noise(x.shape) * std
        x_t = x * scale_in[i]
        x0, _, _ = run.denoise(x_t, i)
        run.record(i, x_t, x0)
        d = (x - x0) / sig_hat[i]
        dt = sig_next[i] - sig_hat[i]
        x_next = x + d * dt  # Euler
        if sig_next[i] > 0.0:  # second order: the mean of the slopes at both ends
            x0_next, _, _ = run.denoise(x_next * scale_in[n + i], n + i)
            x_next = x + (d + (x_next - x0_next) / sig_next[i]) * (0.5 * dt)
        x = x_next
    return run.result(x)
