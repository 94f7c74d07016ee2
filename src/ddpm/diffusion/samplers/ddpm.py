"""Ancestral sampling, DDPM Algorithm 2 (Ho et al. 2020): on DDPM's full or respaced chain, and
with the Gaussian posterior q(x_s | x_t, x̂₀) between grid times on a continuous process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.process import Process
from ddpm.diffusion.respace import respace
from ddpm.diffusion.samplers._core import Grid, Net, SampleCall, SampleOutput, grid
from ddpm.diffusion.samplers.timesteps import step_timesteps


def posterior_coefficients(
    alpha: np.ndarray, sigma: np.ndarray, variance_type: str
) -> tuple[list[float], list[float], list[float]]:
    """(coef1, coef2, std) per step: x_s = coef1 x̂₀ + coef2 x_t + std z from the grid's t_k to
    the next time s (the clean end after the last), for any process x_t = α_t x₀ + σ_t ε.

    The posterior q(x_s | x_t, x₀) (Kingma et al. 2021, eq. 10-12; DDPM eq. 6-7 for adjacent
    steps of a variance-preserving chain): with α_{t|s} = α_t/α_s and σ²_{t|s} = σ_t² - α²_{t|s} σ_s²,
    mean (α_s σ²_{t|s}/σ_t²) x̂₀ + (α_{t|s} σ_s²/σ_t²) x_t and variance σ²_{t|s} σ_s²/σ_t²
    (``fixed_small``, β̃) or σ²_{t|s} (``fixed_large``, DDPM's β); no noise into the clean end.
    """
    a_s = np.append(alpha[1:], 1.0)
    s_s = np.append(sigma[1:], 0.0)
    a_ts = alpha / a_s
    var_ts = sigma**2 - a_ts**2 * s_s**2
    coef1 = a_s * var_ts / sigma**2
    coef2 = a_ts * s_s**2 / sigma**2
    var = var_ts * s_s**2 / sigma**2 if variance_type == "fixed_small" else var_ts
    std = np.sqrt(np.maximum(var, 0.0))
    std[-1] = 0.0
    return coef1.tolist(), coef2.tolist(), std.tolist()


def _discrete_chain(
    process: GaussianDiffusion, kept: list[int]
) -> tuple[GaussianDiffusion, Grid, list[float], list[float], list[float] | None]:
    """The (respaced) chain over the ``kept`` timesteps: its grid and its own posterior
    coefficients (improved DDPM §4), the std per step unless the variance is learned."""
    sched = process if len(kept) == process.num_timesteps else respace(process, kept)
    n = sched.num_timesteps
    g = grid(sched, range(n - 1, -1, -1))
    coef1 = sched.posterior_mean_coef1.tolist()[::-1]
    coef2 = sched.posterior_mean_coef2.tolist()[::-1]
    std = None
    if not sched.learned_variance:
        std = sched.p_variance(torch.arange(n), (n,))[0].sqrt().tolist()[::-1]
    return sched, g, coef1, coef2, std


@torch.inference_mode()
def ddpm_sample(
    net: Net,
    process: Process,
    shape: Sequence[int] | None,
    *,
    steps: int | None = None,
    spacing: str = "auto",
    **common: Any,
) -> SampleOutput:
    """Ancestral sampling, DDPM Algorithm 2: x_s = μ̃(x̂₀, x_t) + σ z, z = 0 at the last step.

    The mean is the posterior mean at the predicted x̂₀ (eq. 7; eq. 11 for an ε-network without
    clipping). On DDPM's discrete process σ² follows its ``variance_type``: ``fixed_large`` β_t,
    ``fixed_small`` β̃_t (eq. 6-7), ``learned_range`` / ``learned`` Σ_θ (improved DDPM eq. 15),
    and ``steps`` < T respaces the chain to ``space_timesteps(T, steps, spacing)`` (improved DDPM
    §4); ``steps=None`` runs all T. On a continuous process the chain is the posterior between
    the times of ``step_timesteps(steps, spacing)`` (:func:`posterior_coefficients`; ``steps``
    required): DDIM with η = 1 for ``fixed_small``. ``**common``:
    :class:`~ddpm.diffusion.samplers.SampleCall`.
    """
    call = SampleCall.parse("ddpm_sample", common)
    if process.discrete:
        T = process.num_timesteps
        kept = step_timesteps(process, T if steps is None else steps, spacing)[::-1]
        sched, g, coef1, coef2, std = _discrete_chain(process, kept)
    else:
        if steps is None:
            raise ValueError(
                f"the ddpm sampler needs sampler.steps on the continuous {type(process).__name__} "
                "(all T steps exist only on DDPM's discrete chain)"
            )
        sched = process
        g = grid(process, step_timesteps(process, steps, spacing))
        coef1, coef2, std = posterior_coefficients(g.alpha, g.sigma, process.variance_type)
    run = call.start(net, sched, shape, g, "DDPM")
    x = run.x
    n = len(g)
    if std is None:  # learned: log Σ = v log β + (1-v) log β̃, v = (output+1)/2 (iDDPM eq. 15)
        min_log = sched.posterior_log_variance_clipped.tolist()[::-1]
        max_log = sched.log_betas.tolist()[::-1]
    for k in run.steps(n):
        x = run.correct(x, k)
        x0, _, var_values = run.denoise(x, k)
        run.record(k, x, x0)
        x = torch.add(x0 * coef1[k], x, alpha=coef2[k])  # μ̃(x̂₀, x_t); = x̂₀ at the last step
        if k == n - 1:
            continue
        z = run.noise(x.shape)
        if std is not None:
            x.add_(z, alpha=std[k])
            continue
        if sched.variance_type == "learned":
            log_var = var_values
        else:
            log_var = (var_values + 1.0) * (0.5 * (max_log[k] - min_log[k])) + min_log[k]
        x.addcmul_(torch.exp(0.5 * log_var), z)
    return run.result(x)
