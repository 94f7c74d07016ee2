"""Exact negative log-likelihood bound in bits/dim (DDPM eq. 5; improved DDPM §3).

    L = L_T + Σ_{t=2}^{T} L_{t-1} + L_0
      = KL(q(x_T|x₀) ‖ N(0, I)) + Σ_t KL(q(x_{t-1}|x_t,x₀) ‖ p_θ(x_{t-1}|x_t)) - log p_θ(x₀|x₁)

for 8-bit data scaled to [-1, 1]. Every term is per image and averaged over dimensions, then
divided by ln 2: the total is the bound in bits/dim. Costs T network calls per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.likelihood import process_nll
from ddpm.diffusion.losses import LN2, mean_flat, normal_kl, vb_terms_bpd
from ddpm.diffusion.process import Process, require_discrete
from ddpm.utils.progress import progress_iter
from ddpm.utils.seeding import PerSampleGenerator, randn


def prior_bpd(diffusion: GaussianDiffusion, x_start: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x₀) ‖ N(0, I)) in bits/dim, per image (B,)."""
    t = torch.full(
        (x_start.shape[0],), diffusion.num_timesteps - 1, device=x_start.device, dtype=torch.long
    )
    mean, _, log_var = diffusion.q_mean_variance(x_start, t)
    zeros = torch.zeros_like(mean)
    return mean_flat(normal_kl(mean, log_var, zeros, zeros)) / LN2


@torch.no_grad()
def calc_bpd_loop(
    net: Callable[[Tensor, Tensor], Tensor],
    diffusion: GaussianDiffusion,
    x_start: Tensor,
    *,
    clip_denoised: bool = True,
    generator: torch.Generator | PerSampleGenerator | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The full variational bound of the network ``net(x_t, t)`` for a batch of images in [-1, 1].

    Returns per-image tensors: ``total_bpd`` (B,), ``prior_bpd`` (B,), ``vb`` (B, T) with
    ``vb[:, 0]`` = L_0 (decoder NLL) and ``vb[:, t]`` = L_t, ``xstart_mse`` (B, T) and
    ``mse`` (B, T) of the ε prediction. Noise for each x_t comes from ``generator`` (a
    :class:`~ddpm.utils.seeding.PerSampleGenerator` makes each image's bound independent of the
    batch it is in). A respaced diffusion (:func:`~ddpm.diffusion.respace.respace`) is the bound
    of its K-step chain, with the network called at the original timesteps ``timestep_map``.
    """
    require_discrete(diffusion, "The variational bound (bits/dim)")
    x_start = x_start.float()
    b, T = x_start.shape[0], diffusion.num_timesteps
    device = x_start.device
    vb, xstart_mse, mse = (torch.zeros(b, T, device=device) for _ in range(3))
    for t_idx in progress_iter(range(T - 1, -1, -1), total=T, desc="NLL bound", enabled=progress):
        t = torch.full((b,), t_idx, device=device, dtype=torch.long)
        noise = randn(x_start.shape, generator, device)
        x_t = diffusion.q_sample(x_start, t, noise)
        out = vb_terms_bpd(
            diffusion, diffusion.network_output(net, x_t, t), x_start, x_t, t, clip_denoised
        )
        vb[:, t_idx] = out["output"]
        xstart_mse[:, t_idx] = mean_flat((out["pred_xstart"] - x_start) ** 2)
        eps = diffusion.predict_noise_from_start(x_t, t, out["pred_xstart"])
        mse[:, t_idx] = mean_flat((eps - noise) ** 2)
    prior = prior_bpd(diffusion, x_start)
    return {
        "total_bpd": vb.sum(dim=1) + prior,
        "prior_bpd": prior,
        "vb": vb,
        "xstart_mse": xstart_mse,
        "mse": mse,
    }


# the per-image sums of :func:`nll_sums`, in order (``vb`` = Σ_{t>1} L_{t-1})
NLL_SUMS = ("total_bpd", "prior_bpd", "decoder_bpd", "vb_bpd", "ode_bpd", "ode_nfe")


def nll_sums(
    net: Callable[..., Tensor],
    process: Process,
    x_start: Tensor,
    *,
    bound: bool,
    ode: dict[str, Any] | None,
    generator: Callable[[], torch.Generator | PerSampleGenerator],
    clip_denoised: bool = True,
    progress: bool = False,
) -> Tensor:
    """Both likelihoods of a batch as per-image sums (float64, :data:`NLL_SUMS` order; zeros for
    a part not asked for): DDPM's bound and its parts (``bound``, :func:`calc_bpd_loop`) and the
    probability-flow ODE's dequantised bits/dim with its network evaluations (``ode``: options
    of :func:`~ddpm.diffusion.likelihood.process_nll`). Each part draws from a fresh
    ``generator()``, so one does not shift the other's draws."""
    sums = torch.zeros(len(NLL_SUMS), dtype=torch.float64, device=x_start.device)
    if bound:
        out = calc_bpd_loop(
            net,
            process,
            x_start,
            clip_denoised=clip_denoised,
            generator=generator(),
            progress=progress,
        )
        vb = out["vb"].double()
        sums[0] = out["total_bpd"].double().sum()
        sums[1] = out["prior_bpd"].double().sum()
        sums[2] = vb[:, 0].sum()
        sums[3] = vb[:, 1:].sum()
    if ode is not None:
        out = process_nll(net, process, x_start, dequantize=True, generator=generator(), **ode)
        sums[4] = out["bpd"].double().sum()
        sums[5] = out["nfe"].double().sum()
    return sums
