"""Ancestral sampling, DDPM Algorithm 2 (Ho et al. 2020), on the full or a respaced chain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.respace import respace, space_timesteps
from ddpm.diffusion.samplers._core import Net, SampleCall, SampleOutput, grid


@torch.inference_mode()
def ddpm_sample(
    net: Net,
    diffusion: GaussianDiffusion,
    shape: Sequence[int] | None,
    *,
    steps: int | None = None,
    spacing: str = "uniform",
    **common: Any,
) -> SampleOutput:
    """Ancestral sampling, DDPM Algorithm 2: x_{t-1} = μ̃_t(x̂₀, x_t) + σ_t z, z = 0 at the last step.

    The mean is the posterior mean at the predicted x̂₀ (eq. 7; eq. 11 for an ε-network without
    clipping); σ_t² follows the diffusion's ``variance_type``: ``fixed_large`` β_t,
    ``fixed_small`` β̃_t (eq. 6-7), ``learned_range`` / ``learned`` Σ_θ (improved DDPM eq. 15).
    ``steps`` < T respaces the chain to ``space_timesteps(T, steps, spacing)`` (improved DDPM §4).
    ``**common``: :class:`~ddpm.diffusion.samplers.SampleCall`.
    """
    call = SampleCall.parse("ddpm_sample", common)
    T = diffusion.num_timesteps
    kept = space_timesteps(T, T if steps is None else steps, spacing)
    sched = diffusion if len(kept) == T else respace(diffusion, kept)
    n = sched.num_timesteps
    ac, net_t = grid(sched, range(n))
    run = call.start(net, sched, shape, ac, net_t, "DDPM", net_t[::-1])
    x = run.x
    coef1 = sched.posterior_mean_coef1.tolist()
    coef2 = sched.posterior_mean_coef2.tolist()
    learned = sched.learned_variance
    if learned:
        min_log = sched.posterior_log_variance_clipped.tolist()
        max_log = sched.log_betas.tolist()
    else:
        std = sched.p_variance(torch.arange(n), (n,))[0].sqrt().tolist()
    for i in run.steps(n):
        k = n - 1 - i
        x0, _, var_values = run.denoise(x, k)
        run.record(i, x, x0)
        x = torch.add(x0 * coef1[k], x, alpha=coef2[k])  # μ̃_t(x̂₀, x_t); = x̂₀ at k = 0
        if k == 0:
            continue
        z = run.noise(x.shape)
        if not learned:
            x.add_(z, alpha=std[k])
            continue
        if sched.variance_type == "learned":
            log_var = var_values
        else:  # improved DDPM eq. 15: log Σ = v log β + (1-v) log β̃, v = (output+1)/2
            log_var = (var_values + 1.0) * (0.5 * (max_log[k] - min_log[k])) + min_log[k]
        x.addcmul_(torch.exp(0.5 * log_var), z)
    return run.result(x)
