"""Our U-Net's state_dict <-> ``UNet2DModel``'s: the same tensors under other names, our fused
qkv projection split into diffusers' ``to_q``, ``to_k``, ``to_v``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ddpm.interop.diffusers.configs import UNET_DEFAULTS
from ddpm.interop.diffusers.errors import InteropError
from ddpm.nn.unet_config import attention_levels

__all__ = ["state_dict_from_diffusers", "state_dict_to_diffusers"]

# layer names inside a ResBlock / AttentionBlock -> inside diffusers' ResnetBlock2D / Attention
_SUBLAYERS = {
    "res": {
        "norm1": "norm1",
        "conv1": "conv1",
        "emb_proj": "time_emb_proj",
        "norm2": "norm2",
        "conv2": "conv2",
        "skip": "conv_shortcut",
    },
    "attn": {"norm": "group_norm", "proj": "to_out.0"},
}
_QKV = ("to_q", "to_k", "to_v")


def _module_table(kw: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Our module prefix -> (diffusers module prefix, kind: layer | res | attn)."""
    c = {**UNET_DEFAULTS, **kw}
    levels, r, size = len(c["channel_mult"]), int(c["num_res_blocks"]), int(c["image_size"])
    attn = attention_levels(size, levels, tuple(c["attention_resolutions"]))
    updown = bool(c["resblock_updown"])
    t = {
        "time_embed.0": ("time_embedding.linear_1", "layer"),
        "time_embed.2": ("time_embedding.linear_2", "layer"),
        "label_emb": ("class_embedding", "layer"),
        "input_conv": ("conv_in", "layer"),
        "mid1.res": ("mid_block.resnets.0", "res"),
        "mid1.attn": ("mid_block.attentions.0", "attn"),
        "mid2": ("mid_block.resnets.1", "res"),
        "out_norm": ("conv_norm_out", "layer"),
        "out_conv": ("conv_out", "layer"),
    }
    # a ResBlock resampler is the whole module; a conv resampler is its .conv layer
    resampler = ("", "res") if updown else (".conv", "layer")
    i = 0
    for level in range(levels):
        for j in range(r):
            t[f"down.{i}.res"] = (f"down_blocks.{level}.resnets.{j}", "res")
            if attn[level]:
                t[f"down.{i}.attn"] = (f"down_blocks.{level}.attentions.{j}", "attn")
            i += 1
        if level < levels - 1:
            t[f"down.{i}{resampler[0]}"] = (
                f"down_blocks.{level}.downsamplers.0{resampler[0]}",
                resampler[1],
            )
            i += 1
    k = 0
    for u, level in enumerate(reversed(range(levels))):
        for j in range(r + 1):
            t[f"up.{k}.res"] = (f"up_blocks.{u}.resnets.{j}", "res")
            if attn[level]:
                t[f"up.{k}.attn"] = (f"up_blocks.{u}.attentions.{j}", "attn")
            if level and j == r:
                t[f"up.{k}.resample{resampler[0]}"] = (
                    f"up_blocks.{u}.upsamplers.0{resampler[0]}",
                    resampler[1],
                )
            k += 1
    return t


def _split(key: str, table: Mapping[str, Any]) -> tuple[str, str, str]:
    """``key`` -> (module prefix in ``table``, sub-layer name or "", parameter name)."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in table:
            return prefix, ".".join(parts[n:-1]), parts[-1]
    raise InteropError(f"the weight {key!r} has no counterpart in the other library's U-Net")


def state_dict_to_diffusers(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> dict[str, Tensor]:
    """Our U-Net's weights as ``UNet2DModel`` weights (``config``: our constructor arguments)."""
    table = _module_table(config)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix, sub, param = _split(key, table)
        theirs, kind = table[prefix]
        if kind == "attn" and sub == "qkv":  # (3C, C): q, k, v stacked, each heads x head_dim
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{theirs}.{name}.{param}"] = part
            continue
        name = _SUBLAYERS[kind][sub] if kind != "layer" else sub
        out[".".join(p for p in (theirs, name, param) if p)] = value
    return out


def state_dict_from_diffusers(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> dict[str, Tensor]:
    """``UNet2DModel`` weights as our U-Net's (``config``: our constructor arguments)."""
    table = {theirs: (ours, kind) for ours, (theirs, kind) in _module_table(config).items()}
    inverse = {kind: {v: k for k, v in names.items()} for kind, names in _SUBLAYERS.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        prefix, sub, param = _split(key, table)
        ours, kind = table[prefix]
        if kind == "attn" and sub in _QKV:
            qkv.setdefault(f"{ours}.qkv.{param}", {})[sub] = value
            continue
        if kind != "layer" and sub not in inverse[kind]:
            raise InteropError(f"the weight {key!r} has no counterpart in our U-Net")
        name = inverse[kind][sub] if kind != "layer" else sub
        out[".".join(p for p in (ours, name, param) if p)] = value
    for key, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise InteropError(
                f"{key}: diffusers' attention lacks {sorted(set(_QKV) - set(parts))}"
            )
        out[key] = torch.cat([parts[name] for name in _QKV], dim=0)
    return out
