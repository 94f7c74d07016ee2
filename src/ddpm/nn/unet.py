"""The DDPM U-Net (Ho et al. 2020, App. B; improved-diffusion's ``UNetModel`` options).

Layout (``L = len(channel_mult)`` levels, feature-map size halving between levels)::

    t -> sinusoidal(model_channels) -> Linear -> SiLU -> Linear  (emb, 4 * model_channels)
    x -> conv3x3 -> [level l: num_res_blocks x (ResBlock [+ attention]), downsample] x L
      -> middle: ResBlock, attention, ResBlock
      -> [level l reversed: (num_res_blocks + 1) x (concat skip, ResBlock [+ attention]),
          upsample] x L
      -> GroupNorm -> SiLU -> conv3x3 (zero-init) -> (B, out_channels, H, W)

Every down-path output (and the input conv's) is a skip that one up-path block concatenates,
as in DDPM. ResBlocks: GroupNorm, SiLU, conv3x3, + projection of the timestep embedding,
GroupNorm, SiLU, dropout, conv3x3 (zero-init), 1x1 skip conv when channels change. Attention
is multi-head self-attention over the H*W positions (``F.scaled_dot_product_attention``) with
a zero-initialised output projection. With ``cifar10`` settings this is DDPM's 35.7M-parameter
CIFAR-10 model. GroupNorm uses PyTorch's eps 1e-5 (improved-diffusion; DDPM's TF used 1e-6).

The network knows nothing of noise schedules: ``forward(x_t, t)`` returns whatever the caller
trains it to predict (ε, x_0, v, and optionally the variance interpolation ``v`` of improved
DDPM, eq. 15, when ``out_channels = 2 * in_channels``). With ``num_classes=K`` it is class
conditional: ``forward(x_t, t, class_labels)`` adds a learned class embedding to the timestep
embedding after its MLP (ADM's ``label_emb``); label ``K`` is the null class of classifier-free
guidance (Ho & Salimans 2022) and ``class_labels=None`` means it for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.nn.embeddings import (
    broadcast_timesteps,
    check_class_labels,
    class_embedding,
    timestep_embedding,
    timestep_frequencies,
)

__all__ = ["PRESETS", "UNet", "count_parameters", "unet_preset"]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise all parameters of ``module`` (DDPM's ``init_scale=0``) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that, on CPU under bf16/fp16 autocast, normalises the input upcast to
    float32 and rounds the result back to the input's dtype.

    CPU autocast runs GroupNorm as is, in the mixed-dtype kernel (reduced-precision input,
    float32 statistics and affine parameters, reduced-precision output); for channels_last
    inputs that kernel is 3-10x slower (forward and backward) than the float32 one, and
    GroupNorm was the second-largest cost of a bf16 training step (``bench/profile_step.py``).
    Same parameters and state_dict; the output differs from the mixed kernel's only by the
    rounding of float32 sums (it is the float32 result rounded once). On CUDA autocast already
    runs GroupNorm in float32 and nothing changes.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            return super().forward(x.float()).to(x.dtype)
        return super().forward(x)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        divisors = [g for g in range(1, channels + 1) if channels % g == 0]
        raise ValueError(
            f"norm_groups={groups} does not divide a feature map with {channels} channels; "
            f"allowed values divide every channel count, e.g. one of {divisors}"
        )
    return GroupNorm(groups, channels)


def _resample(x: Tensor, mode: str) -> Tensor:
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResBlock(nn.Module):
    """DDPM residual block with the timestep projection added after the first conv.

    ``use_scale_shift_norm`` (improved DDPM / BigGAN): instead of adding the projection, the
    second GroupNorm output is modulated as ``norm(h) * (1 + scale) + shift``. ``resample``
    ("up" | "down") resamples inside the block (``resblock_updown``; nearest / 2x2 average).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float,
        norm_groups: int,
        use_scale_shift_norm: bool = False,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.norm1 = _group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(
            emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels
        )
        self.norm2 = _group_norm(out_channels, norm_groups)
        # p = 0: no dropout kernel at all (it showed up in profiles even as a no-op).
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x`` (B, C_in, H, W), ``emb`` (B, emb_channels) already passed through SiLU."""
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h = _resample(h, self.resample)
            x = _resample(x, self.resample)
        h = self.conv1(h)
        e = self.emb_proj(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions: GroupNorm, qkv projection, SDPA, zero-init proj.

    The projections are ``nn.Linear`` on (B, HW, C) tokens (equivalent to DDPM's 1x1 convs):
    this gives SDPA queries with a contiguous head dim, which its fused CPU kernel needs, for
    both NCHW and channels_last inputs, at the cost of at most one transpose of the input.
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # a view if channels_last
        # (B, HW, 3C) -> (B, HW, 3, heads, head_dim) -> q, k, v: (B, heads, HW, head_dim)
        q, k, v = (
            self.qkv(h).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        )
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        # (B, HW, C) -> (B, C, H, W) with channels_last strides; the sum takes x's layout.
        return x + self.proj(h).reshape(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Stride-2 conv3x3 (DDPM's ``resamp_with_conv``), padding 1 as in improved-diffusion.

    ``padding=0`` is DDPM's TensorFlow "SAME" padding, asymmetric (0 left/top, 1 right/bottom;
    diffusers' ``downsample_padding=0``): same parameters, one-pixel shift of the sampling grid;
    needed to run DDPM's released weights (the ``google/ddpm-*`` ports) exactly.
    """

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.pad = (0, 1, 0, 1) if padding == 0 else None
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x if self.pad is None else F.pad(x, self.pad))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetBlock(nn.Module):
    """ResBlock, then optional attention, then optional resampling (``Upsample`` / ResBlock)."""

    def __init__(
        self, res: ResBlock, attn: AttentionBlock | None = None, resample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.resample = resample

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.res(x, emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.resample is not None:
            h = self.resample(h, emb)
        return h


def _as_int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}") from None


class UNet(nn.Module):
    """The DDPM / improved-DDPM U-Net; ``forward(x, t, class_labels=None) -> (B, C_out, H, W)``.

    Args:
        in_channels: image channels C.
        out_channels: output channels; ``None`` means ``in_channels`` (pass ``2 * in_channels``
            when the variance is learned, improved DDPM §3.1).
        image_size: H = W of the inputs; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        model_channels: base width ``ch``; level ``l`` has ``ch * channel_mult[l]`` channels and
            the timestep embedding has ``4 * ch``.
        channel_mult: width multiplier per level (one down-sampling between levels).
        num_res_blocks: ResBlocks per level on the way down (``+ 1`` on the way up).
        attention_resolutions: feature-map sizes (pixels) at which self-attention follows each
            ResBlock (16 means where the map is 16x16). The middle block always has attention.
        dropout: dropout probability before the second conv of each ResBlock.
        num_heads: attention heads (used when ``num_head_channels == -1``).
        num_head_channels: channels per head; overrides ``num_heads`` unless -1.
        use_scale_shift_norm: FiLM-like conditioning on the timestep (improved DDPM).
        resblock_updown: resample with ResBlocks instead of conv / nearest+conv (BigGAN style).
        norm_groups: GroupNorm groups; must divide every channel count.
        num_timesteps: if set (T), ``t`` is multiplied by 1000 / T before the embedding, so the
            network sees t in [0, 1000) for any T (improved-diffusion's ``rescale_timesteps``);
            None feeds ``t`` as is (DDPM).
        num_classes: K >= 1 makes the network class conditional (K + 1 embeddings, label K the
            null class); None or 0 is unconditional.
        norm_eps, downsample_padding, flip_sin_to_cos, freq_shift: diffusers' ``UNet2DModel``
            options of the same names, to run DDPM's released weights exactly (1e-6, 0, False, 1;
            ``ddpm.interop.diffusers``); the defaults are improved-diffusion's.
        checkpointing: activation checkpointing per level (Chen et al. 2016, "Training deep
            nets with sublinear memory cost"): when gradients are on, each down level, the
            middle and each up level keep only their inputs and recompute their activations in
            the backward pass (``torch.utils.checkpoint``, non-reentrant; dropout masks are
            replayed, so gradients equal the plain ones). Less memory for one more forward
            pass; not part of the architecture (``config``) or the state_dict.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int = 32,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        norm_groups: int = 32,
        num_timesteps: int | None = None,
        num_classes: int | None = None,
        norm_eps: float = 1e-5,
        downsample_padding: int = 1,
        flip_sin_to_cos: bool = False,
        freq_shift: int = 0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = bool(checkpointing)
        channel_mult = _as_int_tuple("channel_mult", channel_mult)
        attention_resolutions = _as_int_tuple("attention_resolutions", attention_resolutions)
        out_channels = in_channels if out_channels is None else out_channels
        for name, value, low in [
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("image_size", image_size, 1),
            ("model_channels", model_channels, 1),
            ("num_res_blocks", num_res_blocks, 1),
            ("norm_groups", norm_groups, 1),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if num_timesteps is not None and (
            not isinstance(num_timesteps, int)
            or isinstance(num_timesteps, bool)
            or num_timesteps < 1
        ):
            raise ValueError(
                f"num_timesteps must be null or an integer >= 1, got {num_timesteps!r}"
            )
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(
                f"channel_mult must be a non-empty sequence of integers >= 1, got {channel_mult}"
            )
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1)={factor} "
                f"(channel_mult={channel_mult} down-samples {len(channel_mult) - 1} times); "
                f"use a multiple of {factor} or a shorter channel_mult"
            )
        resolutions = [image_size // 2**level for level in range(len(channel_mult))]
        absent = [r for r in attention_resolutions if r not in resolutions]
        if absent:
            raise ValueError(
                f"attention_resolutions {absent} never occur; the feature-map sizes of this "
                f"network are {resolutions} (image_size={image_size}, channel_mult={channel_mult})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not (isinstance(norm_eps, (int, float)) and norm_eps > 0):
            raise ValueError(f"norm_eps must be a number > 0, got {norm_eps!r}")
        if downsample_padding not in (0, 1):
            raise ValueError(
                f"downsample_padding must be 1 (symmetric) or 0 (TF 'SAME', DDPM), "
                f"got {downsample_padding!r}"
            )
        label_emb = class_embedding(num_classes, 4 * model_channels)  # validates num_classes
        self.num_classes = num_classes or None
        self.time_embedding_kw = dict(freq_shift=freq_shift, flip_sin_to_cos=bool(flip_sin_to_cos))
        timestep_frequencies(model_channels, freq_shift=freq_shift)  # validates freq_shift
        if num_head_channels == -1:
            if not isinstance(num_heads, int) or num_heads < 1:
                raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
        elif not isinstance(num_head_channels, int) or num_head_channels < 1:
            raise ValueError(
                f"num_head_channels must be -1 (use num_heads) or an integer >= 1, "
                f"got {num_head_channels!r}"
            )

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.model_channels = model_channels
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            image_size=image_size,
            model_channels=model_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            norm_groups=norm_groups,
            num_timesteps=num_timesteps,
            num_classes=self.num_classes,
            norm_eps=norm_eps,
            downsample_padding=downsample_padding,
            flip_sin_to_cos=bool(flip_sin_to_cos),
            freq_shift=freq_shift,
        )
        self.t_scale = None if num_timesteps is None else 1000.0 / num_timesteps

        emb_channels = 4 * model_channels

        def res_block(c_in: int, c_out: int, resample: str | None = None) -> ResBlock:
            return ResBlock(
                c_in, c_out, emb_channels, dropout, norm_groups, use_scale_shift_norm, resample
            )

        def attention(channels: int) -> AttentionBlock:
            if num_head_channels == -1:
                if channels % num_heads:
                    raise ValueError(
                        f"num_heads={num_heads} must divide the {channels} channels of an "
                        f"attention block"
                    )
                heads = num_heads
            else:
                if channels % num_head_channels:
                    raise ValueError(
                        f"num_head_channels={num_head_channels} must divide the {channels} "
                        f"channels of an attention block"
                    )
                heads = channels // num_head_channels
            return AttentionBlock(channels, heads, norm_groups)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels),
            nn.SiLU(),
            nn.Linear(emb_channels, emb_channels),
        )
        self.label_emb = label_emb  # ADM's label_emb, diffusers' class_embedding
        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        # Down path: every block's output is a skip for the up path.
        ch = model_channels
        skip_channels = [ch]
        self.down = nn.ModuleList()
        self._down_levels: list[tuple[int, int]] = []  # [start, stop) of each level in down
        for level, mult in enumerate(channel_mult):
            start = len(self.down)
            res = resolutions[level]
            for _ in range(num_res_blocks):
                block = res_block(ch, model_channels * mult)
                ch = model_channels * mult
                attn = attention(ch) if res in attention_resolutions else None
                self.down.append(UNetBlock(block, attn))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(
                    res_block(ch, ch, "down")
                    if resblock_updown
                    else Downsample(ch, downsample_padding)
                )
                skip_channels.append(ch)
            self._down_levels.append((start, len(self.down)))

        # Middle: ResBlock, attention, ResBlock.
        self.mid1 = UNetBlock(res_block(ch, ch), attention(ch))
        self.mid2 = res_block(ch, ch)

        # Up path: num_res_blocks + 1 blocks per level, each concatenating one skip.
        self.up = nn.ModuleList()
        self._up_levels: list[tuple[int, int]] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            self._up_levels.append((len(self.up), len(self.up) + num_res_blocks + 1))
            res = resolutions[level]
            for i in range(num_res_blocks + 1):
                block = res_block(ch + skip_channels.pop(), model_channels * mult)
                ch = model_channels * mult
                attn = attention(ch) if res in attention_resolutions else None
                upsample = None
                if level != 0 and i == num_res_blocks:
                    upsample = res_block(ch, ch, "up") if resblock_updown else Upsample(ch)
                self.up.append(UNetBlock(block, attn, upsample))

        self.out_norm = _group_norm(ch, norm_groups)
        self.out_conv = _zero(nn.Conv2d(ch, out_channels, 3, padding=1))
        for m in self.modules():  # one eps for every GroupNorm (DDPM's TF code used 1e-6)
            if isinstance(m, nn.GroupNorm):
                m.eps = float(norm_eps)
        # Conv weights in channels_last too (``forward`` feeds NHWC activations): oneDNN then
        # needs no weight reorders and its backward runs 3-8x faster on CPU than in NCHW.
        # ``.to(device)``, ``load_state_dict`` and ``deepcopy`` keep the layout.
        self.to(memory_format=torch.channels_last)

    def _check_inputs(self, x: Tensor, t: Tensor | int | float) -> Tensor:
        """Shape checks (no host sync); returns ``t`` as a (B,) tensor on ``x.device``."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f"x has {C} channels but the model has in_channels={self.in_channels}")
        if H != self.image_size or W != self.image_size:
            raise ValueError(
                f"x has spatial size {H}x{W} but the model has image_size={self.image_size}"
            )
        return broadcast_timesteps(t, B, x.device)

    @property
    def null_class(self) -> int | None:
        """The label of the null class (``num_classes``), None when unconditional."""
        return self.num_classes

    def forward(
        self, x: Tensor, t: Tensor | int | float, class_labels: Tensor | None = None
    ) -> Tensor:
        """``x`` (B, in_channels, H, W), ``t`` (B,) or scalar, ``class_labels`` (B,) or None
        -> (B, out_channels, H, W)."""
        t = self._check_inputs(x, t)
        if self.t_scale is not None:
            t = t * self.t_scale
        labels = check_class_labels(class_labels, self.num_classes, x.shape[0], x.device)
        emb = timestep_embedding(t, self.model_channels, **self.time_embedding_kw)
        emb = self.time_embed(emb.to(self.input_conv.weight.dtype))
        if labels is not None:
            emb = emb + self.label_emb(labels)
        # Every block starts its timestep projection with SiLU; apply it once here.
        emb = F.silu(emb)

        # channels_last activations: oneDNN's convolutions (above all their backward) are several
        # times faster in NHWC on CPU than in NCHW; the layout propagates through every layer.
        h = self.input_conv(x.contiguous(memory_format=torch.channels_last))
        if self.checkpointing and torch.is_grad_enabled():
            h = self._checkpointed_levels(h, emb)
        else:
            skips = [h]
            for block in self.down:
                h = block(h, emb)
                skips.append(h)
            h = self._middle(h, emb)
            for block in self.up:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h))).contiguous()

    def _middle(self, h: Tensor, emb: Tensor) -> Tensor:
        return self.mid2(self.mid1(h, emb), emb)

    def _down_level(self, start: int, stop: int, h: Tensor, emb: Tensor) -> tuple[Tensor, ...]:
        """Blocks ``down[start:stop]``; returns every block's output (the level's skips)."""
        outs = []
        for i in range(start, stop):
            h = self.down[i](h, emb)
            outs.append(h)
        return tuple(outs)

    def _up_level(self, start: int, stop: int, h: Tensor, emb: Tensor, *skips: Tensor) -> Tensor:
        """Blocks ``up[start:stop]``, each concatenating the last of ``skips`` still unused."""
        for i, skip in zip(range(start, stop), reversed(skips)):
            h = self.up[i](torch.cat([h, skip], dim=1), emb)
        return h

    def _checkpointed_levels(self, h: Tensor, emb: Tensor) -> Tensor:
        """The down, middle and up paths with one activation checkpoint per level."""
        from torch.utils.checkpoint import checkpoint

        skips = [h]
        for start, stop in self._down_levels:
            skips += checkpoint(self._down_level, start, stop, h, emb, use_reentrant=False)
            h = skips[-1]
        h = checkpoint(self._middle, h, emb, use_reentrant=False)
        for start, stop in self._up_levels:
            n = stop - start
            level_skips, skips = skips[-n:], skips[:-n]
            h = checkpoint(self._up_level, start, stop, h, emb, *level_skips, use_reentrant=False)
        return h


# Constructor kwargs of named configurations; ``unet_preset(name, **overrides)`` builds one. The
# one source of the architectures: ``conf/model/<name>.yaml`` takes them from here (registered
# for Hydra by ``ddpm.config``), so every key a config can override is spelled out.
_DDPM_BLOCKS: dict[str, Any] = dict(
    num_heads=1,
    num_head_channels=-1,
    use_scale_shift_norm=False,
    resblock_updown=False,
    norm_groups=32,
)
PRESETS: dict[str, dict[str, Any]] = {
    # DDPM CIFAR-10 (Ho et al. 2020, App. B): 35.7M parameters.
    "cifar10": dict(
        in_channels=3,
        image_size=32,
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
        **_DDPM_BLOCKS,
    ),
    # improved-diffusion's CIFAR-10 U-Net (Nichol & Dhariwal 2021; its README's CIFAR-10 flags
    # --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 on the defaults
    # attention_resolutions 16,8, num_heads 4, use_scale_shift_norm): 52,546,438 parameters with
    # learned variances (6 output channels), as its UNetModel.
    "cifar10_iddpm": dict(
        in_channels=3,
        image_size=32,
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=3,
        attention_resolutions=(16, 8),
        dropout=0.3,
        **{**_DDPM_BLOCKS, "num_heads": 4, "use_scale_shift_norm": True},
    ),
    # For unit tests on CPU (0.18M parameters).
    "tiny": dict(
        in_channels=3,
        image_size=16,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        dropout=0.0,
        **{**_DDPM_BLOCKS, "norm_groups": 8},
    ),
    # 8x8 sklearn digits upscaled to 16x16, for minutes of CPU training (1.1M parameters):
    # 16 -> 8 -> 4 with 32, 64, 64 channels, one ResBlock a level, attention at 8, no dropout
    # (short runs do not overfit); 16 groups keep 2+ channels a group.
    "digits": dict(
        in_channels=1,
        image_size=16,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        dropout=0.0,
        **{**_DDPM_BLOCKS, "norm_groups": 16},
    ),
    # MNIST 28x28: 28 -> 14 -> 7, attention at 14.
    "mnist": dict(
        in_channels=1,
        image_size=28,
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(14,),
        dropout=0.1,
        **_DDPM_BLOCKS,
    ),
    # CelebA 64x64: DDIM's CelebA-64 model (Song et al. 2021, configs/celeba.yml):
    # 64 -> 32 -> 16 -> 8 -> 4, attention at 16.
    "celeba64": dict(
        in_channels=3,
        image_size=64,
        model_channels=128,
        channel_mult=(1, 2, 2, 2, 4),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
        **_DDPM_BLOCKS,
    ),
    # DDPM LSUN / CelebA-HQ 256x256 (Ho et al. 2020, App. B): 114M parameters, no dropout.
    "lsun256": dict(
        in_channels=3,
        image_size=256,
        model_channels=128,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.0,
        **_DDPM_BLOCKS,
    ),
}


def unet_preset(name: str, **overrides: Any) -> UNet:
    """Build the ``PRESETS[name]`` U-Net, with constructor kwargs overridden by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; allowed values: {sorted(PRESETS)}")
    return UNet(**{**PRESETS[name], **overrides})
