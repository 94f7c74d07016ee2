"""Noise schedules β_1..β_T, built in float64.

Names follow diffusers' ``beta_schedule`` vocabulary. Naming traps:

* ``linear`` here is DDPM's schedule: β linear from 1e-4 to 0.02 at T=1000 (Ho et al. 2020,
  §4), endpoints scaled by 1000/T for other T (improved DDPM's ``get_named_beta_schedule``).
* ``scaled_linear`` is linear in √β (diffusers' name). latent-diffusion / Stable Diffusion call
  this one "linear" and call DDPM's linear "sqrt_linear" -- do not mix them up.
* ``cosine`` is improved DDPM's ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T)+s)/(1+s)·π/2), s=0.008,
  β clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17). diffusers calls it "squaredcos_cap_v2".
* ``sigmoid`` is a sigmoid on ᾱ: ᾱ(t) ∝ σ(τ⁻¹ end) - σ(τ⁻¹ (t/T (end - start) + start))
  (Jabri et al. 2022), denoising-diffusion-pytorch's ``sigmoid_beta_schedule`` and its default.
  diffusers' ``beta_schedule="sigmoid"`` is a different schedule, a sigmoid on β (GeoDiff, Xu
  et al. 2022): that one is ``sigmoid_beta`` here. Same word, different ᾱ curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid", "sigmoid_beta")


def _check_T(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, (int, np.integer)) or isinstance(num_timesteps, bool):
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")


def linear_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """DDPM's linear schedule; endpoints are scaled by 1000/T so that any T gives the same curve."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """Linear in √β (latent diffusion's "linear"); endpoints are given for T=1000 and scaled."""
    scale = 1000.0 / num_timesteps
    return (
        np.linspace(
            math.sqrt(scale * beta_start),
            math.sqrt(scale * beta_end),
            num_timesteps,
            dtype=np.float64,
        )
        ** 2
    )


def betas_from_alphas_cumprod(alphas_cumprod: np.ndarray, max_beta: float = 0.999) -> np.ndarray:
    """β_t = 1 - ᾱ_t / ᾱ_{t-1} (ᾱ_0 := 1), clipped at ``max_beta``."""
    prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    return np.clip(1.0 - alphas_cumprod / prev, 0.0, max_beta)


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """ᾱ_t = f(t)/f(0) for t = 1..T (improved DDPM eq. 17), before β clipping."""
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return f[1:] / f[0]


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: β_t = 1 - ᾱ_t/ᾱ_{t-1}, clipped at 0.999."""
    return betas_from_alphas_cumprod(cosine_alphas_cumprod(num_timesteps, s), max_beta)


def sigmoid_betas(
    num_timesteps: int,
    start: float = -3.0,
    end: float = 3.0,
    tau: float = 1.0,
    max_beta: float = 0.999,
) -> np.ndarray:
    """Sigmoid schedule on ᾱ (Jabri et al. 2022; denoising-diffusion-pytorch's default). Not
    diffusers' ``sigmoid``, which is :func:`sigmoid_beta_betas`."""
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps

    def sig(x: np.ndarray | float) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))

    v_start, v_end = sig(start / tau), sig(end / tau)
    f = (-sig((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
    return betas_from_alphas_cumprod(f[1:] / f[0], max_beta)


def sigmoid_beta_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Sigmoid on β (GeoDiff, Xu et al. 2022; diffusers' ``beta_schedule="sigmoid"``):
    β = beta_start + (beta_end - beta_start) σ(linspace(-6, 6, T)); endpoints given for T=1000 and
    scaled by 1000/T like ``linear``."""
    scale = 1000.0 / num_timesteps
    sig = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)))
    return scale * (beta_start + (beta_end - beta_start) * sig)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1: shift and scale √ᾱ so that √ᾱ_T = 0 while √ᾱ_1 is kept."""
    sqrt_ac = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def make_beta_schedule(
    name: str = "linear",
    num_timesteps: int = 1000,
    *,
    betas: Sequence[float] | None = None,
    rescale_to_zero_terminal_snr: bool = False,
    **kwargs: float,
) -> np.ndarray:
    """Return β_1..β_T (float64, shape (T,)) for a named schedule or user-given ``betas``.

    ``name`` is one of ``linear``, ``scaled_linear``, ``cosine``, ``sigmoid`` (on ᾱ,
    denoising-diffusion-pytorch's), ``sigmoid_beta`` (on β, diffusers' "sigmoid"), or ``custom``
    (then ``betas`` is required). Extra keyword arguments go to the schedule function
    (``beta_start``/``beta_end``, ``s``, ``start``/``end``/``tau``, ``max_beta``).
    """
    if betas is not None:
        out = np.asarray(list(betas), dtype=np.float64)
        if out.ndim != 1 or out.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {out.shape}")
    else:
        _check_T(num_timesteps)
        fns = {
            "linear": linear_betas,
            "scaled_linear": scaled_linear_betas,
            "cosine": cosine_betas,
            "sigmoid": sigmoid_betas,
            "sigmoid_beta": sigmoid_beta_betas,
        }
        if name not in fns:
            raise ValueError(
                f"schedule name must be one of {sorted(fns)} (or pass betas=[...]), got {name!r}"
            )
        try:
            out = fns[name](num_timesteps, **kwargs)
        except TypeError as e:
            raise ValueError(f"bad arguments for the {name!r} schedule: {e}") from None
    if rescale_to_zero_terminal_snr:
        out = rescale_zero_terminal_snr(out)
        # β_T = 1 exactly: allowed only in this mode (ᾱ_T = 0).
        bad = ~((out > 0) & (out <= 1))
    else:
        bad = ~((out > 0) & (out < 1))
    if np.any(bad) or not np.all(np.isfinite(out)):
        i = int(np.argmax(bad | ~np.isfinite(out)))
        raise ValueError(f"betas must lie in (0, 1); beta[{i}] = {out[i]!r}")
    return out
