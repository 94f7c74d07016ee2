"""Timestep subsets and respacing (Nichol & Dhariwal 2021, §4).

A sampler with fewer steps keeps a subset S = {S_0 < S_1 < ... < S_{K-1}} of the T training
timesteps and runs the diffusion with β_i = 1 - ᾱ_{S_i}/ᾱ_{S_{i-1}} (ᾱ_{S_{-1}} := 1), so the
respaced chain has exactly the ᾱ of the kept timesteps. The network is still called with the
original timestep ``timestep_map[i] = S_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ddpm.diffusion.gaussian import GaussianDiffusion

SPACINGS = ("uniform", "quadratic", "trailing", "leading")


def check_steps(
    steps: int,
    num_timesteps: int,
    *,
    name: str = "steps",
    max_steps: int | None = None,
    why: str = "",
) -> int:
    """Validate a step count: an integer in [1, max_steps] (default max: T). Returns it as int."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    if steps < 1:
        raise ValueError(f"{name} must be >= 1, got {steps}")
    if steps > num_timesteps:
        raise ValueError(
            f"{name}={steps} exceeds T={num_timesteps}, the number of diffusion timesteps"
        )
    if max_steps is not None and steps > max_steps:
        raise ValueError(f"{name}={steps} exceeds {max_steps} (T={num_timesteps}){why}")
    return int(steps)


def space_timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """Pick ``steps`` of the timesteps 0..T-1 (sorted ascending, all distinct).

    Spacings (``steps`` <= T):

    * ``uniform``: round(linspace(0, T-1, steps)), improved DDPM's even spacing and diffusers'
      DDIM ``linspace``; includes 0 and T-1 (a single step uses T-1).
    * ``quadratic``: int(linspace(0, √(0.8 T), steps)²), the DDIM paper's CIFAR-10 choice; the i-th
      is raised to at least i, where int() repeats timesteps near 0 (DDIM's code repeats them).
    * ``trailing``: round(T - i·T/steps) - 1, Lin et al. 2023 (Table 2); always includes T-1.
    * ``leading``: i·(T // steps), diffusers' DDIM ``leading`` (with ``steps_offset=0``).
    """
    T = int(num_timesteps)
    steps = check_steps(steps, T)
    if spacing == "uniform":
        ts = [T - 1] if steps == 1 else np.round(np.linspace(0, T - 1, steps)).astype(np.int64)
    elif spacing == "quadratic":
        ts = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64)
        ts = np.maximum(ts, np.arange(steps))  # q_i convex: only the first ones can repeat
    elif spacing == "trailing":
        ts = np.round(T - np.arange(steps) * (T / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = np.arange(steps, dtype=np.int64) * (T // steps)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    out = sorted({int(t) for t in ts})
    if len(out) != steps:
        raise ValueError(
            f"spacing={spacing!r} gives only {len(out)} distinct timesteps for steps={steps} and "
            f"T={T}; use fewer steps or spacing='uniform'"
        )
    return out


def respace(diffusion: GaussianDiffusion, use_timesteps: Sequence[int]) -> GaussianDiffusion:
    """A diffusion over the kept timesteps S (improved DDPM §4): β_i = 1 - ᾱ_{S_i}/ᾱ_{S_{i-1}}.

    Same ``prediction_type`` and ``variance_type``; the attribute ``timestep_map`` (LongTensor,
    a buffer) maps the new indices to the timesteps the network must be called with. Respacing
    an already respaced diffusion composes the maps.
    """
    T = diffusion.num_timesteps
    kept = sorted({int(t) for t in use_timesteps})
    if not kept:
        raise ValueError("use_timesteps must not be empty")
    if kept[0] < 0 or kept[-1] >= T:
        raise ValueError(f"use_timesteps must lie in [0, {T - 1}], got [{kept[0]}, {kept[-1]}]")
    ac = diffusion.alphas_cumprod_f64.detach().cpu().numpy()[kept]
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    new = GaussianDiffusion(
        betas,
        schedule=diffusion.schedule,
        prediction_type=diffusion.prediction_type,
        variance_type=diffusion.variance_type,
        # A zero-terminal-SNR schedule keeps ᾱ = 0 (β = 1) at its last step; re-applying the
        # rescale to such a schedule is the identity, it only lets β = 1 through validation.
        rescale_zero_terminal_snr=bool(ac[-1] == 0.0),
    )
    old_map = getattr(diffusion, "timestep_map", None)
    tmap = torch.as_tensor(kept, dtype=torch.long)
    if old_map is not None:
        tmap = old_map.detach().cpu()[tmap]
    new.register_buffer("timestep_map", tmap, persistent=False)
    return new
