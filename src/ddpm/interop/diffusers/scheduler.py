"""Our ``GaussianDiffusion`` <-> a diffusers ``DDPMScheduler`` / ``DDIMScheduler`` config: the same
ᾱ (a named ``beta_schedule`` when diffusers' float32 one matches, else ``trained_betas``), the
same prediction and variance types, and the sampler spacings diffusers names."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ddpm.diffusion.gaussian import DISCRETE_PREDICTION_TYPES, GaussianDiffusion
from ddpm.diffusion.process import Process
from ddpm.interop.diffusers.errors import InteropError, require_diffusers

__all__ = ["TIMESTEP_SPACINGS", "diffusion_from_scheduler_config", "scheduler_config"]

# our sampler spacings -> diffusers' timestep_spacing (the same timestep subsets)
TIMESTEP_SPACINGS = {"uniform": "linspace", "leading": "leading", "trailing": "trailing"}


def _named_schedules(betas: np.ndarray) -> list[dict[str, Any]]:
    """diffusers' named schedules that could produce ``betas`` (checked numerically after)."""
    # β from float64 ᾱ ratios carry ~1e-12 noise: 9.999999999998899e-05 is written as 1e-4
    start, end = (float(f"{b:.10g}") for b in (betas[0], betas[-1]))
    return [
        {"beta_schedule": "linear", "beta_start": start, "beta_end": end},
        {"beta_schedule": "scaled_linear", "beta_start": start, "beta_end": end},
        {"beta_schedule": "squaredcos_cap_v2"},
    ]


def scheduler_config(
    diffusion: Process,
    *,
    clip_sample: bool = True,
    timestep_spacing: str = "leading",
) -> dict[str, Any]:
    """A ``DDPMScheduler`` config whose process equals ``diffusion``: a named ``beta_schedule``
    when diffusers' float32 ᾱ matches ours to 1e-6 (DDPM's linear -> ``linear`` with its scaled
    endpoints, cosine -> ``squaredcos_cap_v2``, ``scaled_linear``), else ``trained_betas``."""
    diffusers = require_diffusers()
    if not diffusion.discrete:
        raise InteropError(
            f"{type(diffusion).__name__} (schedule={diffusion.schedule!r}) is a continuous process: "
            "only DDPM's discrete chain exports as a DDPMScheduler (EDM's and rectified flow's "
            "network inputs and time conditioning are not a diffusers U-Net pipeline's)"
        )
    if diffusion.variance_type == "learned":
        raise InteropError(
            "variance_type='learned' (the network outputs log σ²) has no diffusers scheduler "
            "variant: DDPMScheduler's 'learned' reads the output as σ². Improved DDPM's "
            "learned_range (eq. 15) maps."
        )
    if hasattr(diffusion, "timestep_map"):
        raise InteropError("a respaced diffusion does not map; export the trained process")
    ac = diffusion.alphas_cumprod_f64.detach().cpu().numpy()
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    common = dict(
        num_train_timesteps=int(diffusion.num_timesteps),
        prediction_type=diffusion.prediction_type,
        variance_type=diffusion.variance_type,
        clip_sample=bool(clip_sample),
        clip_sample_range=1.0,
        thresholding=False,
        timestep_spacing=timestep_spacing,
        steps_offset=0,
    )
    if ac[-1] > 0:  # a zero-terminal-SNR schedule goes as trained_betas (already rescaled)
        for named in _named_schedules(betas):
            config = {**common, **named, "rescale_betas_zero_snr": False}
            theirs = diffusers.DDPMScheduler(**config).alphas_cumprod.double().numpy()
            if np.abs(theirs - ac).max() <= 1e-6:
                return config
    return {**common, "trained_betas": betas.tolist(), "rescale_betas_zero_snr": False}


def diffusion_from_scheduler_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """(our ``GaussianDiffusion`` config node, sampler hints ``clip_denoised`` and ``spacing``)
    for a diffusers DDPM/DDIM scheduler config."""
    c = dict(config)
    T = c.get("num_train_timesteps")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise InteropError(
            f"num_train_timesteps={T!r}: the scheduler describes no diffusion process (T must be "
            "an integer >= 1)"
        )
    prediction = c.get("prediction_type", "epsilon")
    if prediction not in DISCRETE_PREDICTION_TYPES:
        raise InteropError(
            f"prediction_type={prediction!r} (ours: one of {DISCRETE_PREDICTION_TYPES})"
        )
    variances = {
        "fixed_small": "fixed_small",
        "fixed_small_log": "fixed_small",
        "fixed_large": "fixed_large",
        "learned_range": "learned_range",
    }
    variance = c.get("variance_type", "fixed_small")  # DDIMScheduler has none: DDPM's default
    if variance not in variances:
        raise InteropError(
            f"variance_type={variance!r} has no counterpart here (ours: {sorted(variances)}; "
            "diffusers' 'learned' is σ² itself, ours log σ²)"
        )
    node: dict[str, Any] = {
        "_target_": "ddpm.diffusion.GaussianDiffusion",
        "num_timesteps": T,
        "prediction_type": prediction,
        "variance_type": variances[variance],
        "rescale_zero_terminal_snr": bool(c.get("rescale_betas_zero_snr", False)),
    }
    name = c.get("beta_schedule", "linear")
    if c.get("trained_betas") is not None:
        betas = [float(b) for b in c["trained_betas"]]
        node.update(schedule="custom", betas=betas)
        # β_T = 1 is a zero-terminal-SNR schedule (ours accepts it only as such; the rescale
        # of a schedule with ᾱ_T = 0 is the identity)
        node["rescale_zero_terminal_snr"] |= betas[-1] == 1.0
    elif name in ("linear", "scaled_linear"):  # ours are given for T=1000 and scaled by 1000/T
        scale = T / 1000.0
        node.update(
            schedule=name,
            schedule_kwargs={
                "beta_start": float(c.get("beta_start", 1e-4)) * scale,
                "beta_end": float(c.get("beta_end", 0.02)) * scale,
            },
        )
    elif name == "squaredcos_cap_v2":
        node.update(schedule="cosine", schedule_kwargs={"s": 0.008, "max_beta": 0.999})
    else:
        raise InteropError(
            f"beta_schedule={name!r} has no counterpart here (ours: linear, scaled_linear, "
            "squaredcos_cap_v2 or trained_betas; diffusers' 'sigmoid' is GeoDiff's sigmoid on β, "
            "not our sigmoid on ᾱ)"
        )
    clip = bool(c.get("clip_sample", True))
    if clip and not math.isclose(float(c.get("clip_sample_range", 1.0)), 1.0):
        raise InteropError(f"clip_sample_range={c['clip_sample_range']} (ours: x̂₀ in [-1, 1])")
    inverse = {theirs: ours for ours, theirs in TIMESTEP_SPACINGS.items()}
    spacing = inverse.get(c.get("timestep_spacing", "leading"), "uniform")
    try:  # the process itself checks the rest (β in (0, 1), ...): refused here, not at sampling
        GaussianDiffusion(**{k: v for k, v in node.items() if k != "_target_"})
    except ValueError as e:
        raise InteropError(f"the scheduler config describes no usable process: {e}") from None
    return node, {"clip_denoised": clip, "spacing": spacing}
