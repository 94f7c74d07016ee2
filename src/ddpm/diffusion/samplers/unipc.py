"""UniPC (Zhao et al. 2023): unified predictor-corrector multistep solver, data prediction, in
λ = log(α/σ) on any process of the family."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

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


def _unipc_update(
    lam: np.ndarray,
    alpha: np.ndarray,
    sigma: np.ndarray,
    s: int,
    t: int,
    order: int,
    bh2: bool,
    corrector: bool,
) -> tuple[float, np.ndarray]:
    """(a, c) of one UniP (predictor) or UniC (corrector) step from grid point s to t:
    x_t = a x_s + Σ_j c_j D_j with D_0 = x̂₀ at s, D_j (j >= 1) at the j-th point before s, and
    for the corrector c_{-1}, stored last, on x̂₀ at t.

    Zhao et al. 2023, Alg. 1-2 with the B(h) variants (bh1: B(h) = h, bh2: B(h) = e^h - 1) in
    -h for data prediction: with r_j = (λ_{s-j} - λ_s)/h the ρ solve Σ_j ρ_j r_j^(i-1) = b_i,
    b_i = i! φ_{i+1}(h)/B(h); UniP-2 uses ρ = 1/2 and UniC-1 ρ = 1/2 (as the reference code and
    diffusers' ``UniPCMultistepScheduler``).
    """
    h = lam[t] - lam[s]
    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh) if bh2 else hh
    ks = order if corrector else order - 1  # number of ρ (with the corrector's ρ for t)
    rks = [(lam[s - j] - lam[s]) / h for j in range(1, order)] + ([1.0] if corrector else [])
    c = np.zeros(5)  # D_0 .. D_3, D_t
    a = sigma[t] / sigma[s]
    c[0] = -alpha[t] * h_phi_1
    if ks == 0:
        return a, c
    if (order == 2 and not corrector) or (order == 1 and corrector):
        rhos = np.array([0.5])
    else:
        b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1
        for i in range(1, ks + 1):
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        r = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, ks + 1)])
        rhos = np.linalg.solve(r, np.array(b))
    # x_t -= α_t B(h) (Σ_j ρ_j (D_j - D_0)/r_j [+ ρ_t (D_t - D_0)])
    w = -alpha[t] * b_h
    for j in range(1, order):
        c[j] += w * rhos[j - 1] / rks[j - 1]
        c[0] -= w * rhos[j - 1] / rks[j - 1]
    if corrector:
        c[4] += w * rhos[-1]
        c[0] -= w * rhos[-1]
    return a, c


def unipc_coefficients(
    alpha: np.ndarray, sigma: np.ndarray, order: int, solver_type: str = "bh2"
) -> list[tuple[tuple[float, np.ndarray] | None, tuple[float, np.ndarray]]]:
    """Per step k: (corrector (a, c) or None, predictor (a, c)) for :func:`unipc_sample`.

    Grid (``alpha``, ``sigma``, descending in t) followed by σ = 0. The predictor at k has order min(order, k+1, n-k) (warm-up,
    and lower orders at the end, as diffusers' ``lower_order_final``); the corrector at k >= 1
    (it reuses the network call at k, so UniPC costs one call per step) has the order of the
    predictor that led to k.
    """
    n = len(alpha)
    alpha, sigma, lam = with_clean_end(alpha, sigma)
    bh2 = solver_type == "bh2"
    out = []
    prev_order = 0
    for k in range(n):
        corr = None
        if k > 0:
            corr = _unipc_update(lam, alpha, sigma, k - 1, k, prev_order, bh2, corrector=True)
        p = min(order, k + 1, n - k)
        out.append((corr, _unipc_update(lam, alpha, sigma, k, k + 1, p, bh2, corrector=False)))
        prev_order = p
    return out


@torch.inference_mode()
def unipc_sample(
    net: Net,
    process: Process,
    shape: Sequence[int] | None,
    *,
    steps: int = 10,
    order: int = 2,
    solver_type: str = "bh2",
    spacing: str = "auto",
    **common: Any,
) -> SampleOutput:
    """UniPC (Zhao et al. 2023): UniP-p predictor + UniC-p corrector, one network call per step.

    diffusers' ``UniPCMultistepScheduler(solver_order=order, solver_type, predict_x0=True,
    lower_order_final=True, final_sigmas_type="zero")`` on the process's λ grid. At step k
    the network's x̂₀ at the predicted x_k first corrects x_k (UniC, from the previous state),
    then the predictor goes on from the corrected x_k; x̂₀ is not re-evaluated after the
    correction. ``solver_type``: ``bh1`` (B(h) = h, the paper's choice for unconditional
    sampling) or ``bh2`` (B(h) = e^h - 1, diffusers' default). Timesteps as DPM-Solver++
    (:func:`dpm_solver_timesteps`); coefficients: :func:`unipc_coefficients`.
    ``**common``: :class:`~ddpm.diffusion.samplers.SampleCall`.
    """
    call = SampleCall.parse("unipc_sample", common)
    check_options({"order": order, "solver_type": solver_type})
    g = grid(process, dpm_solver_timesteps(process, steps, spacing), solver=True)
    coefs = unipc_coefficients(g.alpha, g.sigma, order, solver_type)
    run = call.start(net, process, shape, g, "UniPC")
    x = run.x
    history: list[Tensor] = []  # x̂₀ of the previous steps, newest first (D_0, D_1, ...)
    x_prev = x
    for k in run.steps(len(g)):
        x0, _, _ = run.denoise(x, k)
        run.record(k, x, x0)
        corr, (a, c) = coefs[k]
        if corr is not None:  # UniC: from the previous state, with D_t = x̂₀ at the new one
            a_c, c_c = corr
            x = combine(a_c, x_prev, [*zip(c_c[:4], history, strict=False), (c_c[4], x0)])
        x = run.correct(x, k)  # Langevin after UniC (which would overwrite it from x_prev)
        history = [x0, *history][:3]
        x_prev = x
        x = combine(a, x, zip(c[:4], history, strict=False))  # UniP
    return run.result(x)
