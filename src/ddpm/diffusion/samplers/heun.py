"""EDM's Heun sampler (Karras et al. 2022, Alg. 1-2) on any process of the family, in the
scaled variable x̃ = x/α and its noise level σ̃ = σ/α."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ddpm.diffusion.process import ZERO_SNR_ALPHA_CUMPROD, Process
from ddpm.diffusion.samplers._core import Net, SampleCall, SampleOutput, check_options, grid
from ddpm.diffusion.samplers.timesteps import step_timesteps


def _churned(process: Process, sigmas: np.ndarray, n: int, churn: tuple) -> list[float]:
    """The times of σ̂_i = (1 + γ_i) σ_i (Alg. 2, line 4-5), γ_i = min(S_churn/N, √2 - 1) on
    [S_tmin, S_tmax]: on a discrete process the index of the nearest σ̃ (EDM's ``round_sigma``
    for discrete models), on a continuous one t(σ̂) itself."""
    s_churn, s_tmin, s_tmax = churn
    s_tmax = math.inf if s_tmax is None else s_tmax
    gamma = np.where(
        (sigmas >= s_tmin) & (sigmas <= s_tmax), min(s_churn / n, math.sqrt(2.0) - 1.0), 0.0
    )
    wanted = (1.0 + gamma) * sigmas
    if not process.discrete:
        return process.time_of_log_snr(-np.log(wanted)).tolist()
    all_sigmas = process.sigma_tilde_np(np.arange(process.num_timesteps), floor=True)
    return np.argmin(np.abs(all_sigmas[None, :] - wanted[:, None]), axis=1).tolist()


@torch.inference_mode()
def heun_sample(
    net: Net,
    process: Process,
    shape: Sequence[int] | None,
    *,
    steps: int = 10,
    spacing: str = "auto",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
    **common: Any,
) -> SampleOutput:
    """EDM's second-order Heun sampler (Karras et al. 2022, Alg. 1; Alg. 2 with ``s_churn`` > 0).

    In σ̃ = σ/α and x̃ = x/α (the probability-flow ODE dx̃/dσ̃ = (x̃ - D(x; σ̃))/σ̃, D = x̂₀; on a
    discrete schedule σ̃(t) = √((1-ᾱ_t)/ᾱ_t)): an Euler step to σ̃_{i+1}, then, unless σ̃_{i+1} = 0,
    the trapezoidal correction with the slope at the Euler point. ``steps`` = N times
    (:func:`~ddpm.diffusion.samplers.timesteps.step_timesteps`, ``auto``: ``karras`` except on
    rectified flow, then σ = 0) cost 2N - 1 network calls (EDM: 18 steps, 35 calls; 2N - 2 where
    sampling starts at α = 0, whose first step is Euler's: rectified flow, zero terminal SNR). Alg. 2
    first raises σ̃_i in [S_tmin, S_tmax] (``s_tmax`` None: no bound) to σ̂_i = (1 + γ_i) σ̃_i
    (rounded to the nearest σ̃ of a discrete schedule), adding noise of variance σ̂_i² - σ̃_i²
    (times ``s_noise``²). x starts as ``noise`` times the process's prior std. ``s_churn = 0``
    on DDPM's schedule is diffusers' ``HeunDiscreteScheduler`` (which takes fractional timesteps
    on a ``uniform`` grid; ours are the nearest integers). The first step starts at σ̃(t_max): a
    schedule where that is huge (cosine: 2·10⁴; zero terminal SNR; rectified flow, where α = 0
    is floored at 2⁻¹²) makes it one long step (EDM starts at σ_max = 80): from α = 0 it is
    taken as an Euler step, exact there for a constant x̂₀ (a trapezoid gave unrecognisable
    samples of a rectified-flow model); from a large finite σ̃ (cosine) it stays inaccurate.
    ``**common``: :class:`~ddpm.diffusion.samplers.SampleCall`.
    """
    call = SampleCall.parse("heun_sample", common)
    check_options({"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise})
    ts = step_timesteps(process, steps, spacing, default="karras")
    n = len(ts)
    sig = process.sigma_tilde_np(ts, floor=True)
    hat = _churned(process, sig, n, (s_churn, s_tmin, s_tmax)) if s_churn > 0 else ts
    # network calls: step i at σ̂_i (index i), its correction at σ_{i+1} (index n + i)
    g = grid(process, [*hat, *ts[1:]], solver=True)
    scale_in = g.alpha.tolist()  # x = α x̃
    sig_hat = process.sigma_tilde_np(hat, floor=True).tolist()
    sig_next = [*sig[1:].tolist(), 0.0]
    recorded = (g.net_t if process.discrete else g.t)[:n]
    run = call.start(net, process, shape, g, "Heun", recorded, prior=False)
    alpha0 = float(process.alpha_sigma_np([ts[0]], floor=True)[0][0])
    x = run.x * process.prior_std(ts[0]) / alpha0  # x̃
    # From α = 0 (floored: σ̃ ~ 4096) the trapezoid would weigh the slope at σ̃_1 over the whole
    # step, a large error; the Euler step there is exact for a constant x̂₀ (DDIM's first step).
    euler_first = alpha0 <= math.sqrt(ZERO_SNR_ALPHA_CUMPROD) * (1.0 + 1e-6)
    for i in run.steps(n):
        if sig_hat[i] > sig[i]:  # Alg. 2: x̂ = x + √(σ̂² - σ²) S_noise ε
            std = math.sqrt(sig_hat[i] ** 2 - sig[i] ** 2) * s_noise
            x = x + run.noise(x.shape) * std
        x_t = x * scale_in[i]
        if call.corrector is not None:  # Langevin in x, at the step's noise level
            x_t = run.correct(x_t, i)
            x = x_t / scale_in[i]
        x0, _, _ = run.denoise(x_t, i)
        run.record(i, x_t, x0)
        d = (x - x0) / sig_hat[i]
        dt = sig_next[i] - sig_hat[i]
        x_next = x + d * dt  # Euler
        if sig_next[i] > 0.0 and not (i == 0 and euler_first):  # second order: mean slope
            x0_next, _, _ = run.denoise(x_next * scale_in[n + i], n + i)
            x_next = x + (d + (x_next - x0_next) / sig_next[i]) * (0.5 * dt)
        x = x_next
    return run.result(x)
