"""The conditioning every network shares: sinusoidal timestep embedding, its MLP, class labels.

Transformer position encoding applied to the diffusion step (Ho et al. 2020, §4 / App. B;
Vaswani et al. 2017, §3.5): for ``half = dim // 2`` frequencies
``ω_i = max_period^(-i / half)``, ``i = 0..half-1``,

    emb(t) = [sin(t ω_0), ..., sin(t ω_{half-1}), cos(t ω_0), ..., cos(t ω_{half-1})]

(sin half first, as in DDPM's ``get_timestep_embedding``; the exponent divides by ``half`` as in
improved-diffusion, so ``dim=2`` is well defined). An odd ``dim`` gets one trailing zero.
diffusers' ``Timesteps`` options describe the variants: ``freq_shift=1`` divides by ``half - 1``
(DDPM's TF code and the ``google/ddpm-*`` ports), ``flip_sin_to_cos=True`` puts the cos half first.

Class labels (Ho & Salimans 2022; ADM's ``label_emb``): a conditional network holds ``K + 1``
embeddings, label ``K`` being the learned "null" class of classifier-free guidance.
:class:`ConditionedNet` wires them the same way for the U-Net and the MLP.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def frequency_denominator(dim: int, freq_shift: float = 0.0) -> float:
    """``half - freq_shift`` (``half = dim // 2``), the exponent's denominator; a ValueError
    unless it is > 0."""
    half = dim // 2
    denominator = half - freq_shift if half > 1 else 1  # one frequency: ω_0 = 1 whatever the shift
    if denominator <= 0:
        raise ValueError(f"freq_shift={freq_shift!r} must be < dim // 2 = {half}")
    return denominator


def timestep_frequencies(
    dim: int,
    max_period: float = 10000.0,
    device: torch.device | str | None = None,
    freq_shift: float = 0.0,
) -> Tensor:
    """The ``dim // 2`` float32 frequencies ``ω_i = max_period^(-i / (half - freq_shift))``."""
    denominator = frequency_denominator(dim, freq_shift)
    exponent = torch.arange(dim // 2, dtype=torch.float32, device=device) * (
        -math.log(max_period) / denominator
    )
    return torch.exp(exponent)


def timestep_embedding(
    t: Tensor,
    dim: int,
    max_period: float = 10000.0,
    *,
    freq_shift: float = 0.0,
    flip_sin_to_cos: bool = False,
) -> Tensor:
    """Sinusoidal embedding of timesteps ``t`` (shape (B,), int or float) -> float32 (B, dim).

    ``t = 0`` gives ``[0, ..., 0, 1, ..., 1]`` (sin half, then cos half; reversed if
    ``flip_sin_to_cos``).
    """
    if dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got shape {tuple(t.shape)}")
    freqs = timestep_frequencies(dim, max_period, device=t.device, freq_shift=freq_shift)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    trig = (
        (torch.cos(args), torch.sin(args))
        if flip_sin_to_cos
        else (torch.sin(args), torch.cos(args))
    )
    emb = torch.cat(trig, dim=1)
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


def timestep_mlp(dim: int, emb_dim: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear on the sinusoidal embedding (DDPM's ``temb`` dense layers)."""
    return nn.Sequential(nn.Linear(dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def check_num_classes(num_classes: Any) -> int | None:
    """``K`` of a class-conditional network, None for an unconditional one (``num_classes``
    None or 0); a ValueError for anything else."""
    if num_classes is None or num_classes == 0:
        return None
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(
            f"num_classes must be null/0 (unconditional) or an integer >= 1, got {num_classes!r}"
        )
    return num_classes


def class_embedding(num_classes: int | None, dim: int) -> nn.Embedding | None:
    """``K + 1`` learned class embeddings (the last is the null class), or None for ``K`` None/0."""
    k = check_num_classes(num_classes)
    return None if k is None else nn.Embedding(k + 1, dim)


def check_class_labels(
    class_labels: Tensor | None, num_classes: int | None, batch_size: int, device: torch.device
) -> Tensor | None:
    """The labels a network embeds: None on an unconditional network, the null class ``K`` for
    the whole batch when ``class_labels`` is None. Raises ValueError for labels given to an
    unconditional network, a shape other than (B,), a non-integer dtype or labels outside [0, K].
    """
    if not num_classes:
        if class_labels is not None:
            raise ValueError(
                "class_labels were given to an unconditional network; build it with "
                "num_classes=K to condition on K classes"
            )
        return None
    if class_labels is None:
        return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)
    if not isinstance(class_labels, Tensor) or class_labels.shape != (batch_size,):
        shape = tuple(class_labels.shape) if isinstance(class_labels, Tensor) else class_labels
        raise ValueError(f"class_labels must be a LongTensor of shape ({batch_size},), got {shape}")
    if (
        class_labels.dtype.is_floating_point
        or class_labels.dtype.is_complex
        or (class_labels.dtype == torch.bool)
    ):
        raise ValueError(f"class_labels must be integers, got dtype {class_labels.dtype}")
    # one host sync; skipped where data-dependent control flow is impossible (compile, meta)
    if class_labels.device.type != "meta" and not torch.compiler.is_compiling():
        bad = (class_labels < 0) | (class_labels > num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"class_labels must lie in [0, {num_classes}] ({num_classes} is the null class), "
                f"got {class_labels[bad].unique().tolist()}"
            )
    return class_labels


class ConditionedNet(nn.Module):
    """Base of our networks: the conditioning vector every block reads,
    ``SiLU(time_embed(sinusoidal(t * t_scale)) + label_emb(y))`` (DDPM's ``temb``; ADM adds
    ``label_emb`` after the MLP). A subclass builds ``time_embed`` (:func:`timestep_mlp`) and
    ``label_emb`` (:func:`class_embedding`) in its own order; ``t_scale`` None feeds ``t`` as is,
    ``time_embedding_kw`` are :func:`timestep_embedding`'s variant options.
    """

    time_embed: nn.Sequential
    label_emb: nn.Embedding | None

    def __init__(self, num_classes: int | None, t_scale: float | None, **time_embedding_kw: Any):
        super().__init__()
        self.num_classes = num_classes or None
        self.t_scale = t_scale
        self.time_embedding_kw = time_embedding_kw

    @property
    def null_class(self) -> int | None:
        """The label of the null class (``num_classes``), None when unconditional."""
        return self.num_classes

    def embed(self, x: Tensor, t: Tensor | int | float, class_labels: Tensor | None) -> Tensor:
        """The (B, emb_dim) conditioning of the batch ``x`` at timesteps ``t`` (B,) or scalar,
        labels ``class_labels`` (B,) or None (the null class)."""
        t = broadcast_timesteps(t, x.shape[0], x.device)
        if self.t_scale is not None:
            t = t * self.t_scale
        labels = check_class_labels(class_labels, self.num_classes, x.shape[0], x.device)
        linear = self.time_embed[0]
        emb = timestep_embedding(t, linear.in_features, **self.time_embedding_kw)
        emb = self.time_embed(emb.to(linear.weight.dtype))
        if labels is not None:
            emb = emb + self.label_emb(labels)
        # Every block starts its projection of the embedding with SiLU: apply it once here.
        return F.silu(emb)
