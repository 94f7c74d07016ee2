"""Our U-Net's constructor arguments <-> diffusers' ``UNet2DModel`` config (the table in
:mod:`ddpm.interop.diffusers`); what does not map raises :class:`InteropError` naming it."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from ddpm.interop.diffusers.errors import InteropError
from ddpm.nn import UNet
from ddpm.nn.unet_config import UNetConfig, attention_levels

__all__ = ["unet_from_diffusers_config", "unet_to_diffusers_config"]

UNET_DEFAULTS = {k: p.default for k, p in inspect.signature(UNet).parameters.items()}
# every architecture argument maps but num_timesteps (t * 1000 / T: UNet2DModel takes t as is)
UNET_MAPPED = {f.name for f in dataclasses.fields(UNetConfig)} - {"num_timesteps"}


def _attention_head_dim(c: Mapping[str, Any], widths: list[int]) -> int | None:
    """diffusers' single ``attention_head_dim`` for attention blocks of ``widths`` channels."""
    if c["num_head_channels"] != -1:
        return int(c["num_head_channels"])
    heads = int(c["num_heads"])
    if heads == 1:
        return None  # UNet2DModel: one head of all the block's channels
    dims = sorted({w // heads for w in widths})
    if len(dims) > 1:
        raise InteropError(
            f"num_heads={heads} gives heads of {dims} channels in attention blocks of {widths} "
            "channels, but diffusers' UNet2DModel has one attention_head_dim for every block: "
            "use num_head_channels (channels per head) instead of num_heads"
        )
    return dims[0]


def unet_to_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``UNet2DModel`` config of our U-Net with constructor arguments ``config``."""
    c = {**UNET_DEFAULTS, **config}
    extra = sorted(k for k in c if k not in UNET_MAPPED and c[k] != UNET_DEFAULTS.get(k, ...))
    if extra:
        raise InteropError(f"U-Net options {extra} have no diffusers UNet2DModel counterpart")
    mult = [int(m) for m in c["channel_mult"]]
    if mult[0] != 1:
        raise InteropError(
            f"channel_mult={mult} does not map: diffusers' UNet2DModel gives its input conv "
            "block_out_channels[0] channels, ours model_channels; channel_mult[0] must be 1"
        )
    ch, size = int(c["model_channels"]), int(c["image_size"])
    attn = attention_levels(size, len(mult), tuple(c["attention_resolutions"]))
    widths = [ch * m for m in mult]
    head_dim = _attention_head_dim(c, [w for w, a in zip(widths, attn) if a] + widths[-1:])
    updown = bool(c["resblock_updown"])
    plain_down, plain_up = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
        if updown
        else ("DownBlock2D", "UpBlock2D")
    )
    classes = c["num_classes"] or None
    return {
        "sample_size": size,
        "in_channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"] or c["in_channels"]),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "freq_shift": int(c["freq_shift"]),
        "flip_sin_to_cos": bool(c["flip_sin_to_cos"]),
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
        "block_out_channels": widths,
        "layers_per_block": int(c["num_res_blocks"]),
        "mid_block_scale_factor": 1,
        "downsample_padding": int(c["downsample_padding"]),
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": float(c["dropout"]),
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": int(c["norm_groups"]),
        "attn_norm_num_groups": int(c["norm_groups"]),
        "norm_eps": float(c["norm_eps"]),
        "resnet_time_scale_shift": "scale_shift" if c["use_scale_shift_norm"] else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None if classes is None else int(classes) + 1,
        "num_train_timesteps": None,
    }


_DOWN = {"DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"}
_UP = {"UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"}


def unet_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our U-Net's constructor arguments for a ``UNet2DModel`` config (``unet.config``)."""
    c = dict(config)
    name = c.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise InteropError(f"{name} does not map: only diffusers' UNet2DModel maps onto our U-Net")
    problems: list[str] = []

    def expect(key: str, allowed: tuple) -> Any:
        value = c.get(key)
        if value not in allowed:
            problems.append(f"{key}={value!r} (ours: one of {list(allowed)})")
        return value

    expect("center_input_sample", (False,))
    expect("time_embedding_type", ("positional",))
    expect("act_fn", ("silu", "swish"))
    expect("mid_block_type", ("UNetMidBlock2D",))
    expect("mid_block_scale_factor", (1,))
    expect("add_attention", (True,))
    expect("class_embed_type", (None,))
    expect("downsample_padding", (0, 1))
    shift = expect("resnet_time_scale_shift", ("default", "scale_shift"))
    widths = [int(b) for b in c["block_out_channels"]]
    ch = widths[0]
    if any(w % ch for w in widths):
        problems.append(f"block_out_channels={widths} (ours: multiples of the first)")
    if c.get("time_embedding_dim") not in (None, 4 * ch):
        problems.append(f"time_embedding_dim={c['time_embedding_dim']} (ours: 4 x {ch} = {4 * ch})")
    groups = c.get("norm_num_groups")
    if not isinstance(groups, int):
        problems.append(f"norm_num_groups={groups!r} (ours: an integer)")
    attn_groups = c.get("attn_norm_num_groups")
    if attn_groups is None and shift != "default":
        problems.append(
            "attn_norm_num_groups=None with resnet_time_scale_shift='scale_shift': the middle "
            "attention then has no GroupNorm (ours always has one)"
        )
    elif attn_groups not in (None, groups):
        problems.append(f"attn_norm_num_groups={attn_groups} (ours: norm_num_groups={groups})")
    if not isinstance(c.get("layers_per_block"), int):
        problems.append(f"layers_per_block={c.get('layers_per_block')!r} (ours: an integer)")
    size = c.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int):
        problems.append(f"sample_size={c.get('sample_size')!r} (ours: square images)")
        size = 0
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    levels = len(widths)
    attn, resample = [], set()
    for level in range(levels):
        d, u = down[level], up[levels - 1 - level]
        if d not in _DOWN or u not in _UP:
            problems.append(f"level {level}: {d} / {u} (ours: {sorted(_DOWN)} / {sorted(_UP)})")
            continue
        attn.append(d.startswith("Attn"))
        if attn[-1] != u.startswith("Attn"):
            problems.append(f"level {level}: attention in only one of {d} / {u}")
        if level < levels - 1:
            via_resnet = d.startswith("Resnet") or (attn[-1] and c["downsample_type"] == "resnet")
            resample.add("resnet" if via_resnet else "conv")
        if level > 0:
            via_resnet = u.startswith("Resnet") or (attn[-1] and c["upsample_type"] == "resnet")
            resample.add("resnet" if via_resnet else "conv")
    if len(resample) > 1:
        problems.append("a mix of conv and ResNet resampling (ours: one kind for every level)")
    embeds = c.get("num_class_embeds")
    if embeds is not None and embeds < 2:
        problems.append(f"num_class_embeds={embeds} (ours: K + 1 >= 2, the last the null class)")
    if problems:
        raise InteropError(
            "this diffusers UNet2DModel does not map onto our U-Net:\n  - "
            + "\n  - ".join(problems)
        )
    head_dim = c.get("attention_head_dim")
    return {
        "in_channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"]),
        "image_size": size,
        "model_channels": ch,
        "channel_mult": [w // ch for w in widths],
        "num_res_blocks": int(c["layers_per_block"]),
        "attention_resolutions": [size // 2**level for level, a in enumerate(attn) if a],
        "dropout": float(c.get("dropout", 0.0)),
        "num_heads": 1,
        "num_head_channels": -1 if head_dim is None else int(head_dim),
        "use_scale_shift_norm": shift == "scale_shift",
        "resblock_updown": resample == {"resnet"},
        "norm_groups": groups,
        "num_classes": None if embeds is None else int(embeds) - 1,
        "norm_eps": float(c["norm_eps"]),
        "downsample_padding": int(c["downsample_padding"]),
        "flip_sin_to_cos": bool(c["flip_sin_to_cos"]),
        "freq_shift": int(c["freq_shift"]),
    }
