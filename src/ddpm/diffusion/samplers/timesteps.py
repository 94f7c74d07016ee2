"""Timestep grids of the samplers, and how their ``spacing`` names map to diffusers'.

A grid is the list of process times (descending) where a sampler calls the network; after the
last one it goes to the clean end σ = 0 (ᾱ = 1). Two families: the step-by-step samplers
(DDPM, DDIM, Euler, Heun: ``STEP_SPACINGS``), whose grid ends at the least noisy time t_min, and
the λ-space multistep solvers (DPM-Solver++, UniPC: ``DPM_SPACINGS``). ``auto`` is the process's
natural grid (``Process.natural_spacing``): ``karras`` on EDM's process (``logSNR`` for the
λ-space solvers, ``Process.natural_solver_spacing``), ``uniform`` on rectified flow, and on DDPM's
discrete schedules each sampler's usual one (``uniform``; Heun ``karras``).

DDPM's discrete process (t an integer index, T timesteps):

| ``spacing``   | DDPM, DDIM, Heun: n timesteps | DPM-Solver++, UniPC: n timesteps | diffusers    |
|---------------|-------------------------------|----------------------------------|--------------|
| ``uniform``   | round(linspace(0, T-1, n))    | round(linspace(0, T-1, n+1)) > 0 | linspace     |
| ``leading``   | i·(T//n), i = 0..n-1          | i·(T//(n+1)), i = 1..n           | leading      |
| ``trailing``  | round(T - i·T/n) - 1          | round(T - i·T/n) - 1             | trailing     |
| ``karras``    | Karras σ_i, ρ = 7             | Karras σ_i, ρ = 7                | Karras σ     |
| ``quadratic`` | the DDIM paper's              | --                               | --           |
| ``logSNR``    | n uniform in λ                | n+1 uniform in λ, not the last   | --           |

diffusers: ``timestep_spacing="linspace"`` etc. with ``steps_offset=0``; Karras σ is
``use_karras_sigmas=True``. Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) -
σ_max^(1/ρ)))^ρ from σ_max = σ(T-1) to σ_min = σ(0), σ = σ̃ = √((1-ᾱ)/ᾱ). A discrete network is
evaluated at the timestep nearest to σ_i in log σ, the rounding of diffusers' ``_sigma_to_t``
(so the grids equal diffusers' ``timesteps``), and the solver then uses the σ of that timestep,
as EDM's ``round_sigma`` does for discrete models: network and solver agree on the noise level.
(diffusers keeps the unrounded Karras σ in the update, and its Heun scheduler calls the network
at fractional timesteps; k-diffusion's discrete wrappers interpolate t by default.) With ρ = 7
the σ_i crowd both ends: where one timestep would serve several of them (near σ(0) with many
steps; near the cosine schedule's σ(T-1) = 2·10⁴ already at 10) the grid is an error, not a
shorter grid: use fewer steps or ``uniform``.

A continuous process (EDM's, rectified flow) takes the times themselves, between its t_max and
t_min (σ_max = 80 and σ_min = 0.002 for EDM; 1 and 1/T for rectified flow):

| ``spacing``  | DDPM, DDIM, Euler, Heun: n times   | DPM-Solver++, UniPC: n times           |
|--------------|------------------------------------|----------------------------------------|
| ``uniform``  | linspace(t_max, t_min, n)          | linspace(t_max, t_min, n+1), not last  |
| ``karras``   | Karras σ̃_i, ρ = 7, σ̃(t_max)..σ̃(t_min) | the same                            |
| ``logSNR``   | n uniform in λ                     | n+1 uniform in λ, not the last         |

``uniform`` on rectified flow is diffusers' ``FlowMatchEulerDiscreteScheduler`` grid (σ from 1 to
1/T, then 0); ``karras`` on EDM is EDM's (18 steps: σ from 80 to 0.002, then 0). Where α = 0
(rectified flow at t = 1) σ̃ and λ use α² = 2⁻²⁴ (``ZERO_SNR_ALPHA_CUMPROD``).
"""

from __future__ import annotations

import numpy as np

from ddpm.diffusion.process import Process
from ddpm.diffusion.respace import SPACINGS, check_steps, space_timesteps
from ddpm.diffusion.samplers._core import check_choice

STEP_SPACINGS = ("auto", *SPACINGS, "karras", "logSNR")
DPM_SPACINGS = ("auto", "uniform", "leading", "trailing", "karras", "logSNR")
CONTINUOUS_SPACINGS = ("uniform", "karras", "logSNR")
KARRAS_RHO = 7.0

Times = list[int] | list[float]


def resolve_spacing(process: Process, spacing: str, default: str, solver: bool = False) -> str:
    """``auto`` -> the process's natural spacing (its λ-space solvers' one when ``solver``), else
    the sampler's ``default``."""
    if spacing != "auto":
        return spacing
    natural = process.natural_solver_spacing if solver else None
    return natural or process.natural_spacing or default


def _distinct(ts: np.ndarray | list[int], steps: int, spacing: str, T: int) -> list[int]:
    """The timesteps descending; an error when rounding merged some."""
    out = sorted({int(t) for t in ts}, reverse=True)
    if len(out) != steps:
        raise ValueError(
            f"spacing={spacing!r} gives only {len(out)} distinct timesteps for "
            f"steps={steps} and T={T}; use fewer steps or another spacing"
        )
    return out


def _karras_sigmas(s_max: float, s_min: float, steps: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. 2022, eq. 5: ``steps`` σ_i from s_max down to s_min."""
    ramp = np.linspace(0.0, 1.0, steps)
    return (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def karras_timesteps(process: Process, steps: int, rho: float = KARRAS_RHO) -> Times:
    """The times of Karras et al.'s σ̃_i (eq. 5), descending: on a discrete process the indices
    nearest in log σ̃ (module docstring), on a continuous one the exact times."""
    if not process.discrete:
        steps = _check_continuous_steps(steps)
        s_max, s_min = process.sigma_tilde_np([process.t_max, process.t_min], floor=True)
        sig = _karras_sigmas(float(s_max), float(s_min), steps, rho)
        return _continuous(process.time_of_log_snr(-np.log(sig)), process)
    T = process.num_timesteps
    steps = check_steps(steps, T)
    log_sigma = -process.log_snr_np(np.arange(T), floor=True)  # log σ̃, increasing in t
    if np.any(np.diff(log_sigma) <= 0):
        raise ValueError("spacing='karras' needs ᾱ strictly decreasing in t")
    sigmas = _karras_sigmas(np.exp(log_sigma[-1]), np.exp(log_sigma[0]), steps, rho)
    ts = np.round(np.interp(np.log(sigmas), log_sigma, np.arange(T)))
    return _distinct(ts, steps, "karras", T)


def _check_continuous_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _continuous(ts: np.ndarray, process: Process) -> list[float]:
    """Times descending, clipped to the process's range (rounding at the ends)."""
    return np.clip(np.asarray(ts, dtype=np.float64), process.t_min, process.t_max).tolist()


def _log_snr_times(process: Process, n: int, drop_last: bool) -> Times:
    """n (+1, the last dropped) points uniform in λ from λ(t_max) to λ(t_min)."""
    lo, hi = process.log_snr_np([process.t_max, process.t_min], floor=True)
    lam = np.linspace(lo, hi, n + 1 if drop_last else n)
    lam = lam[:-1] if drop_last else lam
    if not process.discrete:
        return _continuous(process.time_of_log_snr(lam), process)
    if process.alphas_cumprod_f64[-1] <= 0.0:
        raise ValueError("spacing='logSNR' needs ᾱ_T > 0 (zero-terminal-SNR schedule)")
    return _distinct(process.time_of_log_snr(lam), n, "logSNR", process.num_timesteps)


def _continuous_grid(process: Process, steps: int, spacing: str, solver: bool) -> list[float]:
    if spacing not in CONTINUOUS_SPACINGS:
        raise ValueError(
            f"spacing={spacing!r} picks among DDPM's discrete timesteps; on the continuous "
            f"{type(process).__name__} use one of {('auto', *CONTINUOUS_SPACINGS)}"
        )
    steps = _check_continuous_steps(steps)
    if spacing == "karras":
        return karras_timesteps(process, steps)
    if spacing == "logSNR":
        return _log_snr_times(process, steps, drop_last=solver)
    ts = np.linspace(process.t_max, process.t_min, steps + 1 if solver else steps)
    return _continuous(ts[:-1] if solver else ts, process)


def dpm_solver_timesteps(process: Process, steps: int, spacing: str = "auto") -> Times:
    """Times where DPM-Solver++ and UniPC call the network, descending (module tables).

    Discrete: ``uniform`` needs steps <= T-1. ``logSNR``: steps+1 points uniform in λ from
    λ(T-1) to λ(0), the nearest timesteps without the last (an error when two points fall on one
    timestep, e.g. 20 steps at T = 100: λ changes fast near t = 0). Grids ending at t = 0 before
    σ = 0 (the DDIM ``uniform`` grid) are not offered: that last jump is long in λ and a
    second-order step overshoots; ``karras`` ends at t = 0 with a short one.
    """
    check_choice(spacing, "spacing", DPM_SPACINGS)
    spacing = resolve_spacing(process, spacing, "uniform", solver=True)
    if not process.discrete:
        return _continuous_grid(process, steps, spacing, solver=True)
    T = process.num_timesteps
    if spacing == "karras":
        return karras_timesteps(process, steps)
    if spacing == "trailing":
        return space_timesteps(T, steps, spacing)[::-1]
    if spacing == "logSNR":
        return _log_snr_times(process, check_steps(steps, T), drop_last=True)
    # uniform / leading: n+1 points ending at 0, the 0 replaced by σ = 0 (diffusers)
    steps = check_steps(steps, T, max_steps=max(T - 1, 1), why=f" for {spacing} spacing")
    if T == 1:
        return [0]
    if spacing == "uniform":
        ts = np.round(np.linspace(0, T - 1, steps + 1))[1:]
    else:
        ts = np.arange(1, steps + 1) * (T // (steps + 1))
    return _distinct(ts, steps, spacing, T)


def step_timesteps(
    process: Process, steps: int, spacing: str = "auto", default: str = "uniform"
) -> Times:
    """Times where the step-by-step samplers (DDPM, DDIM, Euler, Heun) call the network,
    descending, the last one t_min (module tables); ``default``: what ``auto`` means on the
    discrete process (Heun: ``karras``)."""
    check_choice(spacing, "spacing", STEP_SPACINGS)
    spacing = resolve_spacing(process, spacing, default)
    if not process.discrete:
        return _continuous_grid(process, steps, spacing, solver=False)
    if spacing == "karras":
        return karras_timesteps(process, steps)
    if spacing == "logSNR":
        return _log_snr_times(process, check_steps(steps, process.num_timesteps), False)
    return space_timesteps(process.num_timesteps, steps, spacing)[::-1]
