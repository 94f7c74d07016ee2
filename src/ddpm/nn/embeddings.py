"""Sinusoidal timestep embedding shared by the U-Net and the toy MLP.

Transformer position encoding applied to the diffusion step (Ho et al. 2020, §4 / App. B;
Vaswani et al. 2017, §3.5): for ``half = dim // 2`` frequencies
``ω_i = max_period^(-i / half)``, ``i = 0..half-1``,

    emb(t) = [sin(t ω_0), ..., sin(t ω_{half-1}), cos(t ω_0), ..., cos(t ω_{half-1})]

(sin half first, as in DDPM's ``get_timestep_embedding``; the exponent divides by ``half`` as in
improved-diffusion, so ``dim=2`` is well defined). An odd ``dim`` gets one trailing zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_frequencies(
    dim: int, max_period: float = 10000.0, device: torch.device | str | None = None
) -> Tensor:
    """The ``dim // 2`` float32 frequencies ``ω_i = max_period^(-i / half)``."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=device) * (
        -math.log(max_period) / max(half, 1)
    )
    return torch.exp(exponent)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps ``t`` (shape (B,), int or float) -> float32 (B, dim).

    ``t = 0`` gives ``[0, ..., 0, 1, ..., 1]`` (sin half, then cos half).
    """
    if dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got shape {tuple(t.shape)}")
    freqs = timestep_frequencies(dim, max_period, device=t.device)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def broadcast_timesteps(t: Tensor | int | float, batch_size: int, device: torch.device) -> Tensor:
    """``t`` as a (B,) tensor: a Python number, a 0-d or (1,) tensor is broadcast (no sync)."""
    if not isinstance(t, Tensor):
        return torch.full((batch_size,), t, device=device)
    if t.ndim == 0 or t.shape == (1,):
        return t.reshape(1).expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(
            f"t must be a scalar or have shape (B,) = ({batch_size},), got shape {tuple(t.shape)}"
        )
    return t
