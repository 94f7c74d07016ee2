"""Timestep grids of the samplers, and how their ``spacing`` names map to diffusers'.

Every grid is a list of the network's own (integer) timesteps. After the last one the sampler
goes to the clean end: ᾱ = 1 for DDPM/DDIM, σ = 0 for the σ/λ-space solvers (σ = √((1-ᾱ)/ᾱ),
EDM's σ(t) of a variance-preserving schedule; λ = log(α/σ) = -log σ).

| ``spacing``   | DDPM, DDIM, Heun: n timesteps | DPM-Solver++, UniPC: n timesteps | diffusers    |
|---------------|-------------------------------|----------------------------------|--------------|
| ``uniform``   | round(linspace(0, T-1, n))    | round(linspace(0, T-1, n+1)) > 0 | linspace     |
| ``leading``   | i·(T//n), i = 0..n-1          | i·(T//(n+1)), i = 1..n           | leading      |
| ``trailing``  | round(T - i·T/n) - 1          | round(T - i·T/n) - 1             | trailing     |
| ``karras``    | Heun: Karras σ_i, ρ = 7       | Karras σ_i, ρ = 7                | Karras σ     |
| ``quadratic`` | the DDIM paper's              | --                               | --           |
| ``logSNR``    | --                            | n+1 uniform in λ, not the last   | --           |

diffusers: ``timestep_spacing="linspace"`` etc. with ``steps_offset=0``; Karras σ is
``use_karras_sigmas=True``. Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) -
σ_max^(1/ρ)))^ρ from σ_max = σ(T-1) to σ_min = σ(0). A discrete network is evaluated at the
timestep nearest to σ_i in log σ, the rounding of diffusers' ``_sigma_to_t`` (so the grids equal
diffusers' ``timesteps``), and the solver then uses the σ of that timestep, as EDM's
``round_sigma`` does for discrete models: network and solver agree on the noise level.
(diffusers keeps the unrounded Karras σ in the update, and its Heun scheduler calls the network
at fractional timesteps; k-diffusion's discrete wrappers interpolate t by default.) With ρ = 7
the σ_i crowd both ends: where one timestep would serve several of them (near σ(0) with many
steps; near the cosine schedule's σ(T-1) = 2·10⁴ already at 10) the grid is an error, not a
shorter grid: use fewer steps or ``uniform``.
"""

from __future__ import annotations

import numpy as np

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.respace import SPACINGS, check_steps, space_timesteps
from ddpm.diffusion.samplers._core import alphas_cumprod, check_choice, solver_alphas_cumprod

DPM_SPACINGS = ("uniform", "leading", "trailing", "karras", "logSNR")
HEUN_SPACINGS = (*SPACINGS, "karras")
KARRAS_RHO = 7.0


def _distinct(ts: np.ndarray | list[int], steps: int, spacing: str, T: int) -> list[int]:
    """The timesteps descending; an error when rounding merged some."""
    out = sorted({int(t) for t in ts}, reverse=True)
    if len(out) != steps:
        raise ValueError(
            f"spacing={spacing!r} gives only {len(out)} distinct timesteps for "
            f"steps={steps} and T={T}; use fewer steps or another spacing"
        )
    return out


def karras_timesteps(
    diffusion: GaussianDiffusion, steps: int, rho: float = KARRAS_RHO
) -> list[int]:
    """Indices of ``diffusion`` nearest (in log σ) to Karras et al.'s σ_i (eq. 5), descending."""
    T = diffusion.num_timesteps
    steps = check_steps(steps, T)
    ac = solver_alphas_cumprod(diffusion)
    log_sigma = 0.5 * (np.log1p(-ac) - np.log(ac))  # increasing in t
    if np.any(np.diff(log_sigma) <= 0):
        raise ValueError("spacing='karras' needs ᾱ strictly decreasing in t")
    s_max, s_min = np.exp(log_sigma[-1]), np.exp(log_sigma[0])
    ramp = np.linspace(0.0, 1.0, steps)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    ts = np.round(np.interp(np.log(sigmas), log_sigma, np.arange(T)))
    return _distinct(ts, steps, "karras", T)


def dpm_solver_timesteps(
    diffusion: GaussianDiffusion, steps: int, spacing: str = "uniform"
) -> list[int]:
    """Indices of ``diffusion`` where DPM-Solver++ and UniPC call the network, descending.

    ``spacing`` as in the module table (``uniform``: steps <= T-1). ``logSNR``: steps+1 points
    uniform in λ from λ(T-1) to λ(0), the nearest timesteps without the last (an error when two
    points fall on one timestep, e.g. 20 steps at T = 100: λ changes fast near t = 0). Grids
    ending at t = 0 before σ = 0 (the DDIM ``uniform`` grid) are not offered: that last jump is
    long in λ and a second-order step overshoots; ``karras`` ends at t = 0 with a short one.
    """
    check_choice(spacing, "spacing", DPM_SPACINGS)
    T = diffusion.num_timesteps
    if spacing == "karras":
        return karras_timesteps(diffusion, steps)
    if spacing == "trailing":
        return space_timesteps(T, steps, spacing)[::-1]
    if spacing == "logSNR":
        steps = check_steps(steps, T)
        ac = alphas_cumprod(diffusion)
        if ac[-1] <= 0.0:
            raise ValueError("spacing='logSNR' needs ᾱ_T > 0 (zero-terminal-SNR schedule)")
        lam = 0.5 * (np.log(ac) - np.log1p(-ac))
        grid = np.linspace(lam[-1], lam[0], steps + 1)[:-1]
        ts = np.argmin(np.abs(lam[None, :] - grid[:, None]), axis=1)
        return _distinct(ts, steps, spacing, T)
    # uniform / leading: n+1 points ending at 0, the 0 replaced by σ = 0 (diffusers)
    steps = check_steps(steps, T, max_steps=max(T - 1, 1), why=f" for {spacing} spacing")
    if T == 1:
        return [0]
    if spacing == "uniform":
        ts = np.round(np.linspace(0, T - 1, steps + 1))[1:]
    else:
        ts = np.arange(1, steps + 1) * (T // (steps + 1))
    return _distinct(ts, steps, spacing, T)


def heun_timesteps(diffusion: GaussianDiffusion, steps: int, spacing: str = "karras") -> list[int]:
    """Indices of ``diffusion`` where the Heun sampler's steps start, descending (module table)."""
    check_choice(spacing, "spacing", HEUN_SPACINGS)
    if spacing == "karras":
        return karras_timesteps(diffusion, steps)
    return space_timesteps(diffusion.num_timesteps, steps, spacing)[::-1]
