"""DPM-Solver++ multistep (Lu et al. 2022), the ODE solver and its SDE variant, orders 1-3, in
λ = log(α/σ) on any process of the family."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ddpm.diffusion.process import Process
from ddpm.diffusion.samplers._core import (
    Net,
    SampleCall,
    SampleOutput,
    check_options,
    combine,
    grid,
    with_clean_end,
)
from ddpm.diffusion.samplers.timesteps import dpm_solver_timesteps


def dpm_solver_coefficients(
    alpha: np.ndarray,
    sigma: np.ndarray,
    order: int,
    lower_order_final: bool,
    sde: bool = False,
) -> list[tuple[float, float, float, float, float]]:
    """Per step (a, c0, c1, c2, s): x_next = a x + c0 D_k + c1 D_{k-1} + c2 D_{k-2} + s z, D = x̂₀.

    DPM-Solver++ multistep (Lu et al. 2022, Alg. 2; third order as in diffusers) in λ = log(α/σ)
    on the grid (``alpha``, ``sigma``, descending in t) followed by σ = 0. With h = λ_t - λ_s, H = h (ODE) or 2h (SDE-DPM-Solver++,
    Lu et al. 2022 §5 / diffusers' ``sde-dpmsolver++``) and D1, D2 the divided differences of
    the previous x̂₀: a = (σ_t/σ_s) e^{h-H}, c0 = α_t (1 - e^{-H}), second order (midpoint)
    adds α_t (1 - e^{-H}) D1/2, third order α_t (φ₁ + 1) D1 - α_t (φ₂ - 1/2) D2 with
    φ₁ = (e^{-H} - 1)/H, φ₂ = (e^{-H} - 1 + H)/H²; the SDE adds s z, s = σ_t √(1 - e^{-2h}).
    Order k at the k-th step (warm-up), first order at the last step (to σ = 0: x = x̂₀) and at
    most second order at the one before when ``lower_order_final`` and fewer than 15 steps (as
    diffusers).
    """
    n = len(alpha)
    alpha, sigma, lam = with_clean_end(alpha, sigma)
    m = np.eye(3)  # D_k, D_{k-1}, D_{k-2} as coefficient vectors
    out = []
    for k in range(n):
        h = lam[k + 1] - lam[k]
        big_h = 2.0 * h if sde else h
        em1 = math.expm1(-big_h)
        a = sigma[k + 1] / sigma[k] * (math.exp(-h) if sde else 1.0)
        p = -alpha[k + 1] * em1  # α_t (1 - e^{-H})
        o = min(order, k + 1)
        if k == n - 1:
            o = 1
        elif k == n - 2 and lower_order_final and n < 15:
            o = min(o, 2)
        c = p * m[0]
        if o >= 2:
            r0 = (lam[k] - lam[k - 1]) / h
            d1_0 = (m[0] - m[1]) / r0
            if o == 2:  # midpoint
                c = c + 0.5 * p * d1_0
            else:
                r1 = (lam[k - 1] - lam[k - 2]) / h
                d1_1 = (m[1] - m[2]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                c = (
                    c
                    + alpha[k + 1] * (em1 / big_h + 1.0) * d1
                    - alpha[k + 1] * ((em1 + big_h) / big_h**2 - 0.5) * d2
                )
        s = sigma[k + 1] * math.sqrt(-math.expm1(-2.0 * h)) if sde else 0.0
        out.append((float(a), float(c[0]), float(c[1]), float(c[2]), float(s)))
    return out


@torch.inference_mode()
def dpm_solver_sample(
    net: Net,
    process: Process,
    shape: Sequence[int] | None,
    *,
    steps: int = 20,
    order: int = 2,
    algorithm_type: str = "dpmsolver++",
    spacing: str = "auto",
    lower_order_final: bool = True,
    **common: Any,
) -> SampleOutput:
    """DPM-Solver++(2M/3M) (Lu et al. 2022): multistep data-prediction solver of the diffusion ODE,
    or of the reverse SDE with ``algorithm_type="sde-dpmsolver++"`` (DPM-Solver++(2M) SDE).

    diffusers' ``DPMSolverMultistepScheduler(algorithm_type, solver_order=order,
    final_sigmas_type="zero")`` on the process's λ grid (its ``EDMDPMSolverMultistepScheduler`` on
    EDM's Karras grid; its ``use_flow_sigmas`` on the same rectified-flow grid: diffusers' own
    flow grid is ours shifted by -1/T, and where α = 0 (t = 1) it takes λ = -∞ while ours uses
    α² = 2⁻²⁴ as for zero-terminal-SNR schedules): with h = λ_t - λ_s, the 2M step is
    x_t = (σ_t/σ_s) x_s + α_t (1 - e^{-h}) (D0 + D1/(2 r)), D0 = x̂₀(x_s), D1 = D0 - x̂₀ of the
    previous step, r = h_prev/h (coefficients: :func:`dpm_solver_coefficients`). The first step
    is first order, the last goes to σ = 0 (returns x̂₀). ``clip_denoised`` clips x̂₀ (diffusers'
    thresholding with max value 1). ``order`` in 1 (DDIM), 2, 3. Timesteps:
    :func:`dpm_solver_timesteps`. ``**common``: :class:`~ddpm.diffusion.samplers.SampleCall`.
    """
    call = SampleCall.parse("dpm_solver_sample", common)
    check_options(
        {"order": order, "algorithm_type": algorithm_type, "lower_order_final": lower_order_final}
    )
    sde = algorithm_type == "sde-dpmsolver++"
    g = grid(process, dpm_solver_timesteps(process, steps, spacing), solver=True)
    coefs = dpm_solver_coefficients(g.alpha, g.sigma, order, lower_order_final, sde)
    run = call.start(net, process, shape, g, "DPM-Solver++")
    x = run.x
    d1 = d2 = None  # x̂₀ of the previous two steps
    for k in run.steps(len(g)):
        x = run.correct(x, k)
        x0, _, _ = run.denoise(x, k)
        run.record(k, x, x0)
        a, c0, c1, c2, s = coefs[k]
        x_next = combine(a, x, [(c0, x0), (c1, d1), (c2, d2)])
        if s > 0.0:
            x_next.add_(run.noise(x.shape), alpha=s)
        x, d1, d2 = x_next, x0, d1
    return run.result(x)
