"""DDIM (Song et al. 2021) on any process of the family, with any η, and its deterministic
inversion; η = 0 is the Euler step of the probability-flow ODE (``euler``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion.process import Process
from ddpm.diffusion.samplers._core import Net, SampleCall, SampleOutput, check_options, grid
from ddpm.diffusion.samplers.timesteps import step_timesteps


def ddim_coefficients(
    alpha: np.ndarray, sigma: np.ndarray, eta: float
) -> tuple[list[float], list[float], list[float]]:
    """(b, d, c) per step such that DDIM's step from the grid's t_k to the next time (the clean
    end α = 1, σ = 0 after the last) is x_next = b x̂₀ + d x_t + c z.

    DDIM eq. 12 written in (α, σ): x_s = α_s x̂₀ + √(σ_s² - c²) ε̂ + c z with ε̂ = (x_t - α_t x̂₀)/σ_t
    (recomputed from the possibly clipped x̂₀), so d = √(σ_s² - c²)/σ_t and b = α_s - d α_t; the
    noise c = η √(posterior variance) = η σ_s √(1 - (α_t σ_s/(α_s σ_t))²) (eq. 16 on a
    variance-preserving process, where it is η √((1-ᾱ_s)/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_s)). ``alpha`` and
    ``sigma``: the grid's, descending in t.
    """
    a_next = np.append(alpha[1:], 1.0)
    s_next = np.append(sigma[1:], 0.0)
    ratio = (alpha * s_next) / (a_next * sigma)
    c = eta * s_next * np.sqrt(np.maximum(1.0 - ratio**2, 0.0))
    rest = s_next**2 - c**2
    if np.any(rest < -1e-12):
        raise ValueError(
            f"eta={eta} is too large: the noise exceeds σ of the next step (eta <= 1 is safe)"
        )
    d = np.where(c > 0.0, np.sqrt(np.maximum(rest, 0.0)), s_next) / sigma
    return (a_next - d * alpha).tolist(), d.tolist(), c.tolist()


@torch.inference_mode()
def ddim_sample(
    net: Net,
    process: Process,
    shape: Sequence[int] | None,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "auto",
    **common: Any,
) -> SampleOutput:
    """DDIM (Song et al. 2021, eq. 12): x_s = α_s x̂₀ + √(σ_s² - c²) ε̂ + c z (:func:`ddim_coefficients`).

    η = 0 is deterministic: the Euler step of the probability-flow ODE in (x/α, σ/α) (Karras
    et al. 2022, eq. 4 with EDM's σ(t) = t; Song et al. 2021's DDIM-as-ODE remark), which on
    rectified flow is x_s = x_t + (s - t) u, diffusers' ``FlowMatchEulerDiscreteScheduler``, and on
    EDM's process its ``EDMEulerScheduler``. η = 1 with all T steps of DDPM's chain is DDPM with
    σ² = β̃. The last step goes to the clean end, i.e. returns x̂₀. Times:
    :func:`~ddpm.diffusion.samplers.timesteps.step_timesteps` (``steps``, ``spacing``).
    ``**common``: :class:`~ddpm.diffusion.samplers.SampleCall`.
    """
    call = SampleCall.parse("ddim_sample", common)
    check_options({"eta": eta})
    g = grid(process, step_timesteps(process, steps, spacing))
    b, d, c = ddim_coefficients(g.alpha, g.sigma, float(eta))
    run = call.start(net, process, shape, g, "DDIM")
    x = run.x
    n = len(g)
    for k in run.steps(n):
        x = run.correct(x, k)
        x0, _, _ = run.denoise(x, k)
        run.record(k, x, x0)
        if k == n - 1:  # the clean end: x₀ = x̂₀
            x = x0
            continue
        x = torch.add(x * d[k], x0, alpha=b[k])  # α_s x̂₀ + √(σ_s² - c²) ε̂
        if c[k] > 0.0:
            x.add_(run.noise(x.shape), alpha=c[k])
    return run.result(x)


@torch.inference_mode()
def ddim_invert(
    net: Net,
    process: Process,
    x0: Tensor,
    *,
    steps: int = 50,
    spacing: str = "auto",
    fixed_point_iters: int = 0,
    **common: Any,
) -> SampleOutput:
    """Deterministic DDIM inversion (image -> noise): ``ddim_sample`` with η = 0 run backwards.

    On the grid τ_0 < ... < τ_{K-1} of ``ddim_sample(steps, spacing)``, each step inverts one
    sampling step: x_{τ_k} = α_{τ_k} x̂₀ + σ_{τ_k} ε̂ with x̂₀ = (x_{τ_{k-1}} - σ_{τ_{k-1}} ε̂)/α_{τ_{k-1}}
    (the clean end before τ_0, so x̂₀ = x₀ at the first step) and ε̂ predicted at (x, τ_k). The
    exact inverse needs ε̂ at the unknown x_{τ_k}; the plain inversion (``fixed_point_iters=0``,
    as diffusers' ``DDIMInverseScheduler``) uses x = x_{τ_{k-1}}, an O(1/steps) error; each
    fixed-point iteration re-predicts ε̂ at the new x_{τ_k} (one more network call per step) and
    converges to the exact inverse where the map contracts. Returns x_{τ_{K-1}}, the noise from
    which ``ddim_sample(..., noise=x_T)`` gives back ``x0`` (x_T divided by the prior std on a
    process whose prior is not unit, EDM's VE). No clipping by default (clipping would make the
    inverse inexact). ``**common``: those of :class:`~ddpm.diffusion.samplers.SampleCall` but
    ``generator`` and ``noise``.
    """
    common = {"clip_denoised": False, **common}
    call = SampleCall.parse("ddim_invert", common, exclude=("generator", "noise"))
    if (
        isinstance(fixed_point_iters, bool)
        or not isinstance(fixed_point_iters, int)
        or fixed_point_iters < 0
    ):
        raise ValueError(f"fixed_point_iters must be an integer >= 0, got {fixed_point_iters!r}")
    g = grid(process, step_timesteps(process, steps, spacing)[::-1])
    run = replace(call, noise=x0).start(net, process, None, g, "DDIM inversion", prior=False)
    x = run.x
    alpha, sigma = g.alpha.tolist(), g.sigma.tolist()
    for k in run.steps(len(g)):
        x_next = x
        for _ in range(1 + fixed_point_iters):
            _, eps, _ = run.denoise(x_next, k, need_eps=True)
            if k == 0:  # the clean end before the first step: x̂₀ is the image itself
                x0_hat = x
            else:  # the x̂₀ implied by x_{τ_{k-1}} and ε̂ (DDIM eq. 12 solved for x̂₀)
                x0_hat = torch.sub(x, eps, alpha=sigma[k - 1]).mul_(1.0 / alpha[k - 1])
            x_next = torch.add(x0_hat * alpha[k], eps, alpha=sigma[k])
        x = x_next
        run.record(k, x, x0_hat)
    return run.result(x)
