"""The U-Net's architecture arguments, checked once: one rule per argument, each raising a
ValueError that names the argument and what it allows, before any layer is built."""

from __future__ import annotations

import dataclasses
from typing import Any

from ddpm.nn.embeddings import check_num_classes, frequency_denominator

__all__ = ["UNetConfig", "attention_levels"]


def attention_levels(
    image_size: int, num_levels: int, attention_resolutions: tuple[int, ...]
) -> list[bool]:
    """Whether level ``l`` (feature maps of ``image_size // 2**l`` pixels) has self-attention."""
    return [image_size // 2**level in attention_resolutions for level in range(num_levels)]


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}") from None


def _check_int(name: str, value: Any, null: bool = False) -> None:
    if null and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be {'null or ' * null}an integer >= 1, got {value!r}")


_POSITIVE_INTS = (
    "in_channels",
    "out_channels",
    "image_size",
    "model_channels",
    "num_res_blocks",
    "norm_groups",
)


@dataclasses.dataclass
class UNetConfig:
    """What :class:`~ddpm.nn.UNet` is built from (its arguments but ``checkpointing``; their
    meaning and defaults are there), validated and normalised: ``out_channels`` None becomes
    ``in_channels``, ``num_classes`` 0 becomes None, sequences become tuples of ints."""

    in_channels: int
    out_channels: int | None
    image_size: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float
    num_heads: int
    num_head_channels: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    norm_groups: int
    num_timesteps: int | None
    num_classes: int | None
    norm_eps: float
    downsample_padding: int
    flip_sin_to_cos: bool
    freq_shift: int

    def __post_init__(self) -> None:
        self.channel_mult = _int_tuple("channel_mult", self.channel_mult)
        self.attention_resolutions = _int_tuple("attention_resolutions", self.attention_resolutions)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        for name in _POSITIVE_INTS:
            _check_int(name, getattr(self, name))
        _check_int("num_timesteps", self.num_timesteps, null=True)
        self._check_levels()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a number > 0, got {self.norm_eps!r}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(
                f"downsample_padding must be 1 (symmetric) or 0 (TF 'SAME', DDPM), "
                f"got {self.downsample_padding!r}"
            )
        self.num_classes = check_num_classes(self.num_classes)
        self.flip_sin_to_cos = bool(self.flip_sin_to_cos)
        frequency_denominator(self.model_channels, self.freq_shift)  # freq_shift < ch // 2
        if self.num_head_channels == -1:
            _check_int("num_heads", self.num_heads)
        elif not isinstance(self.num_head_channels, int) or self.num_head_channels < 1:
            raise ValueError(
                f"num_head_channels must be -1 (use num_heads) or an integer >= 1, "
                f"got {self.num_head_channels!r}"
            )

    def _check_levels(self) -> None:
        """``channel_mult`` gives the levels; ``image_size`` halves at each but the last and
        ``attention_resolutions`` must be among the sizes that occur."""
        mult = self.channel_mult
        if not mult or min(mult) < 1:
            raise ValueError(
                f"channel_mult must be a non-empty sequence of integers >= 1, got {mult}"
            )
        factor = 2 ** (len(mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**(len(channel_mult)-1)="
                f"{factor} (channel_mult={mult} down-samples {len(mult) - 1} times); "
                f"use a multiple of {factor} or a shorter channel_mult"
            )
        sizes = [self.image_size // 2**level for level in range(len(mult))]
        absent = [r for r in self.attention_resolutions if r not in sizes]
        if absent:
            raise ValueError(
                f"attention_resolutions {absent} never occur; the feature-map sizes of this "
                f"network are {sizes} (image_size={self.image_size}, channel_mult={mult})"
            )

    @property
    def widths(self) -> list[int]:
        """Channels of each level, ``model_channels * channel_mult[l]``."""
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def attention(self) -> list[bool]:
        """Whether each level's ResBlocks are followed by self-attention."""
        return attention_levels(self.image_size, len(self.channel_mult), self.attention_resolutions)

    def heads(self, channels: int) -> int:
        """Attention heads of a block with ``channels`` channels (``num_heads``, or
        ``channels // num_head_channels`` unless that is -1); they must divide ``channels``."""
        if self.num_head_channels == -1:
            if channels % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} must divide the {channels} channels of an "
                    f"attention block"
                )
            return self.num_heads
        if channels % self.num_head_channels:
            raise ValueError(
                f"num_head_channels={self.num_head_channels} must divide the {channels} "
                f"channels of an attention block"
            )
        return channels // self.num_head_channels

    def as_dict(self) -> dict[str, Any]:
        """The arguments as a plain dict (``UNet.config``; ``UNet(**config)`` rebuilds it)."""
        return dataclasses.asdict(self)
