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
from torch.utils.checkpoint import checkpoint

from ddpm.nn.embeddings import ConditionedNet, class_embedding, timestep_mlp
from ddpm.nn.unet_config import UNetConfig

__all__ = ["UNet", "count_parameters"]


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


def _res_block(c: UNetConfig, c_in: int, c_out: int, resample: str | None = None) -> ResBlock:
    return ResBlock(
        c_in,
        c_out,
        4 * c.model_channels,
        c.dropout,
        c.norm_groups,
        c.use_scale_shift_norm,
        resample,
    )


def _attention(c: UNetConfig, channels: int) -> AttentionBlock:
    return AttentionBlock(channels, c.heads(channels), c.norm_groups)


def _down_path(c: UNetConfig) -> tuple[nn.ModuleList, list[tuple[int, int]], list[int]]:
    """Per level ``num_res_blocks`` x (ResBlock [+ attention]), then a down-sampler but after
    the last level. Returns the blocks, each level's [start, stop) in them, and the channels of
    every skip the up path concatenates (the input conv's first, then every block's)."""
    blocks, levels = nn.ModuleList(), []
    ch = c.model_channels
    skips = [ch]
    for level, width in enumerate(c.widths):
        start = len(blocks)
        for _ in range(c.num_res_blocks):
            res = _res_block(c, ch, width)
            ch = width
            attn = _attention(c, ch) if c.attention[level] else None
            blocks.append(UNetBlock(res, attn))
            skips.append(ch)
        if level != len(c.widths) - 1:
            if c.resblock_updown:
                blocks.append(_res_block(c, ch, ch, "down"))
            else:
                blocks.append(Downsample(ch, c.downsample_padding))
            skips.append(ch)
        levels.append((start, len(blocks)))
    return blocks, levels, skips


def _up_path(c: UNetConfig, skips: list[int]) -> tuple[nn.ModuleList, list[tuple[int, int]]]:
    """Per level, deepest first, ``num_res_blocks + 1`` x (concat a skip, ResBlock
    [+ attention]), the last followed by an up-sampler but on the top level. Returns the blocks
    and each level's [start, stop) in them."""
    blocks, levels = nn.ModuleList(), []
    ch = c.widths[-1]
    for level in reversed(range(len(c.widths))):
        width = c.widths[level]
        levels.append((len(blocks), len(blocks) + c.num_res_blocks + 1))
        for i in range(c.num_res_blocks + 1):
            res = _res_block(c, ch + skips.pop(), width)
            ch = width
            attn = _attention(c, ch) if c.attention[level] else None
            up = None
            if level != 0 and i == c.num_res_blocks:
                up = _res_block(c, ch, ch, "up") if c.resblock_updown else Upsample(ch)
            blocks.append(UNetBlock(res, attn, up))
    return blocks, levels


class UNet(ConditionedNet):
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

    Every argument but ``checkpointing`` is checked by :class:`~ddpm.nn.unet_config.UNetConfig`
    and kept, normalised, in ``config`` (``UNet(**net.config)`` builds the same network).
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
        c = UNetConfig(
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
            num_classes=num_classes,
            norm_eps=norm_eps,
            downsample_padding=downsample_padding,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
        )
        t_scale = None if c.num_timesteps is None else 1000.0 / c.num_timesteps
        super().__init__(
            c.num_classes, t_scale, freq_shift=c.freq_shift, flip_sin_to_cos=c.flip_sin_to_cos
        )
        self.config: dict[str, Any] = c.as_dict()
        self.checkpointing = bool(checkpointing)
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        self.image_size, self.model_channels = c.image_size, c.model_channels

        # Timestep embedding (+ class embedding: ADM's label_emb, diffusers' class_embedding);
        # the class table is drawn first.
        label_emb = class_embedding(c.num_classes, 4 * c.model_channels)
        self.time_embed = timestep_mlp(c.model_channels, 4 * c.model_channels)
        self.label_emb = label_emb
        self.input_conv = nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)
        # Down path, middle (ResBlock, attention, ResBlock), up path; every down-path output
        # (and the input conv's) is a skip that one up-path block concatenates.
        self.down, self._down_levels, skips = _down_path(c)
        ch = c.widths[-1]
        self.mid1 = UNetBlock(_res_block(c, ch, ch), _attention(c, ch))
        self.mid2 = _res_block(c, ch, ch)
        self.up, self._up_levels = _up_path(c, skips)
        ch = c.widths[0]
        self.out_norm = _group_norm(ch, c.norm_groups)
        self.out_conv = _zero(nn.Conv2d(ch, c.out_channels, 3, padding=1))

        for m in self.modules():  # one eps for every GroupNorm (DDPM's TF code used 1e-6)
            if isinstance(m, nn.GroupNorm):
                m.eps = float(c.norm_eps)
        # Conv weights in channels_last too (``forward`` feeds NHWC activations): oneDNN then
        # needs no weight reorders and its backward runs 3-8x faster on CPU than in NCHW.
        # ``.to(device)``, ``load_state_dict`` and ``deepcopy`` keep the layout.
        self.to(memory_format=torch.channels_last)

    def _check_inputs(self, x: Tensor) -> None:
        """Shape checks (no host sync)."""
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(
                f"x has {C} channels but the network has in_channels={self.in_channels}"
            )
        if H != self.image_size or W != self.image_size:
            raise ValueError(
                f"x has spatial size {H}x{W} but the network has image_size={self.image_size}"
            )

    def forward(
        self, x: Tensor, t: Tensor | int | float, class_labels: Tensor | None = None
    ) -> Tensor:
        """``x`` (B, in_channels, H, W), ``t`` (B,) or scalar, ``class_labels`` (B,) or None
        -> (B, out_channels, H, W)."""
        self._check_inputs(x)
        emb = self.embed(x, t, class_labels)

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
