"""Our U-Net and diffusion process <-> diffusers' ``UNet2DModel`` and ``DDPMScheduler``.

Export (``python src/export.py ckpt_path=PATH format=diffusers out=DIR``) writes a pipeline folder
that ``DDPMPipeline.from_pretrained(DIR)`` and ``DDIMPipeline.from_pretrained(DIR)`` load without
this package. Import reads a diffusers folder into our :class:`~ddpm.nn.UNet`:
``python src/train.py model=diffusers model.path=DIR`` fine-tunes it (:func:`unet_from_pretrained`)
and ``python src/export.py ckpt_path=DIR out=model.safetensors`` writes one of our checkpoints.

Our ``UNet`` arguments and the ``UNet2DModel`` config they become:

    model_channels * channel_mult     block_out_channels (channel_mult[0] must be 1)
    num_res_blocks                    layers_per_block
    attention_resolutions             AttnDownBlock2D / AttnUpBlock2D at those levels (middle: always)
    num_heads, num_head_channels      attention_head_dim (None: one head in every block)
    use_scale_shift_norm              resnet_time_scale_shift="scale_shift"
    resblock_updown                   ResnetDownsampleBlock2D / ResnetUpsampleBlock2D, "resnet" types
    norm_groups                       norm_num_groups and attn_norm_num_groups
    num_classes = K                   num_class_embeds = K + 1 (class_embed_type None; K = null)
    dropout, norm_eps, downsample_padding, flip_sin_to_cos, freq_shift: the same names

The weights correspond one to one (our fused qkv projection is diffusers' to_q, to_k, to_v), so
a round trip is bit-identical. What has no counterpart is refused with :class:`InteropError`
naming it, never converted into a different model. Everything here needs diffusers
(``pip install '.[diffusers]'``).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ddpm.diffusion.gaussian import PREDICTION_TYPES, GaussianDiffusion
from ddpm.nn.unet import UNet

__all__ = [
    "InteropError",
    "diffusion_from_scheduler_config",
    "from_diffusers_unet",
    "load_unet",
    "model_card",
    "require_diffusers",
    "scheduler_config",
    "state_dict_from_diffusers",
    "state_dict_to_diffusers",
    "to_diffusers_unet",
    "unet_from_diffusers_config",
    "unet_from_pretrained",
    "unet_to_diffusers_config",
]

INSTALL_HINT = "pip install '.[diffusers]' (or pip install diffusers)"
# our sampler spacings -> diffusers' timestep_spacing (the same timestep subsets)
TIMESTEP_SPACINGS = {
    "uniform": "linspace",
    "time_uniform": "linspace",
    "leading": "leading",
    "trailing": "trailing",
}


class InteropError(ValueError):
    """A network, process or folder with no exact counterpart on the other side."""


def require_diffusers() -> Any:
    """The ``diffusers`` module, or an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"this needs the optional dependency diffusers: {INSTALL_HINT}") from e
    return diffusers


# ------------------------------------------------------------------------------ network configs
_UNET_DEFAULTS = {k: p.default for k, p in inspect.signature(UNet).parameters.items()}
_UNET_MAPPED = {
    "in_channels",
    "out_channels",
    "image_size",
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "dropout",
    "num_heads",
    "num_head_channels",
    "use_scale_shift_norm",
    "resblock_updown",
    "norm_groups",
    "num_classes",
    "norm_eps",
    "downsample_padding",
    "flip_sin_to_cos",
    "freq_shift",
}


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
    c = {**_UNET_DEFAULTS, **config}
    extra = sorted(k for k in c if k not in _UNET_MAPPED and c[k] != _UNET_DEFAULTS.get(k, ...))
    if extra:
        raise InteropError(f"U-Net options {extra} have no diffusers UNet2DModel counterpart")
    mult = [int(m) for m in c["channel_mult"]]
    if mult[0] != 1:
        raise InteropError(
            f"channel_mult={mult} does not map: diffusers' UNet2DModel gives its input conv "
            "block_out_channels[0] channels, ours model_channels; channel_mult[0] must be 1"
        )
    ch, size = int(c["model_channels"]), int(c["image_size"])
    attn = [size // 2**level in tuple(c["attention_resolutions"]) for level in range(len(mult))]
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
    """Our U-Net's constructor arguments for a ``UNet2DModel`` config (``model.config``)."""
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


# ------------------------------------------------------------------------------------ weights
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
    c = {**_UNET_DEFAULTS, **kw}
    levels, r, size = len(c["channel_mult"]), int(c["num_res_blocks"]), int(c["image_size"])
    attn = [size // 2**level in tuple(c["attention_resolutions"]) for level in range(levels)]
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


# ------------------------------------------------------------------------------------ modules
def _empty(build: Any, device: torch.device) -> nn.Module:
    """``build()`` with uninitialised weights on ``device`` (no random init to overwrite)."""
    with torch.device("meta"):
        module = build()
    return module.to_empty(device=device)


def to_diffusers_unet(net: nn.Module) -> Any:
    """A ``diffusers.UNet2DModel`` computing exactly what our U-Net ``net`` computes."""
    diffusers = require_diffusers()
    if not isinstance(net, UNet):
        raise InteropError(
            f"{type(net).__name__} has no diffusers counterpart: only our U-Net (ddpm.nn.UNet) "
            "maps onto diffusers' UNet2DModel, which its image pipelines run"
        )
    config = unet_to_diffusers_config(net.config)
    model = _empty(lambda: diffusers.UNet2DModel(**config), next(net.parameters()).device)
    model.load_state_dict(state_dict_to_diffusers(net.state_dict(), net.config), strict=True)
    return model.train(net.training)


def from_diffusers_unet(model: nn.Module) -> UNet:
    """Our U-Net computing exactly what the ``diffusers.UNet2DModel`` ``model`` computes."""
    kw = unet_from_diffusers_config(model.config)
    net = _empty(lambda: UNet(**kw), next(model.parameters()).device)
    net.load_state_dict(state_dict_from_diffusers(model.state_dict(), kw), strict=True)
    return net.train(model.training)


def _unet_folder(path: Path) -> tuple[Path, str | None]:
    """(folder, subfolder) of the ``UNet2DModel`` in a pipeline or a model folder."""
    if (path / "unet" / "config.json").is_file():
        return path, "unet"
    if (path / "config.json").is_file():
        return path, None
    raise InteropError(
        f"{path} is neither a diffusers pipeline folder (model_index.json and unet/) nor a "
        "UNet2DModel folder (config.json and weights), as save_pretrained writes them"
    )


def load_unet(path: str | Path) -> Any:
    """The ``UNet2DModel`` saved in a local folder (a pipeline's ``unet/`` or a model's)."""
    diffusers = require_diffusers()
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"diffusers folder not found: {path}")
    folder, sub = _unet_folder(path)
    config = diffusers.UNet2DModel.load_config(folder, subfolder=sub)
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise InteropError(f"{name} does not map: only diffusers' UNet2DModel maps onto our U-Net")
    return diffusers.UNet2DModel.from_pretrained(folder, subfolder=sub, local_files_only=True)


def unet_from_pretrained(
    path: str,
    in_channels: int | None = None,
    out_channels: int | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
) -> UNet:
    """Our U-Net with the architecture and weights of the ``UNet2DModel`` in the folder ``path``
    (``model=diffusers model.path=DIR``). The other arguments, when given, must agree with the
    folder (they come from the data and objective): a mismatch is an error, never a different
    network."""
    net = from_diffusers_unet(load_unet(path))
    given = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        image_size=image_size,
        num_classes=num_classes,
    )
    wrong = [
        f"{k}: the folder has {net.config[k]}, the run needs {v}"
        for k, v in given.items()
        if v is not None and net.config[k] != v
    ]
    if wrong:
        raise InteropError(
            f"the UNet2DModel in {path} does not fit this run (data / objective):\n  - "
            + "\n  - ".join(wrong)
        )
    return net.train()  # like any freshly built network (from_pretrained gives eval mode)


# ---------------------------------------------------------------------------------- scheduler
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
    diffusion: GaussianDiffusion,
    *,
    clip_sample: bool = True,
    timestep_spacing: str = "leading",
) -> dict[str, Any]:
    """A ``DDPMScheduler`` config whose process equals ``diffusion``: a named ``beta_schedule``
    when diffusers' float32 ᾱ matches ours to 1e-6 (DDPM's linear -> ``linear`` with its scaled
    endpoints, cosine -> ``squaredcos_cap_v2``, ``scaled_linear``), else ``trained_betas``."""
    diffusers = require_diffusers()
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
    T = int(c["num_train_timesteps"])
    prediction = c.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise InteropError(f"prediction_type={prediction!r} (ours: one of {PREDICTION_TYPES})")
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
    inverse = {"linspace": "uniform", "leading": "leading", "trailing": "trailing"}
    spacing = inverse.get(c.get("timestep_spacing", "leading"), "uniform")
    return node, {"clip_denoised": clip, "spacing": spacing}


# ---------------------------------------------------------------------------------- model card
def model_card(
    run_config: Mapping[str, Any],
    scheduler: Mapping[str, Any],
    unet: Mapping[str, Any],
    *,
    global_step: int,
    used_ema: bool,
    metrics: Mapping[str, float] | None = None,
    source: str = "",
) -> str:
    """The README.md of an exported pipeline folder: how to load it, what differs, the run."""
    classes = unet.get("num_class_embeds")
    learned = scheduler["variance_type"] == "learned_range"
    notes = [
        "- `DDIMPipeline(..., use_clipped_model_output=True)` is our DDIM: ε recomputed from the "
        "clipped x̂₀, as improved-diffusion does.",
        "- diffusers' DDIM steps from t to t - T // steps whatever `timestep_spacing` says "
        "(huggingface/diffusers#12633): with `linspace` its chain differs from ours; "
        "`leading` and `trailing` (steps dividing T) reproduce ours exactly.",
    ]
    if learned:
        notes.append(
            "- Learned variance (`learned_range`, improved DDPM eq. 15): the U-Net outputs "
            f"{unet['out_channels']} channels; `DDPMPipeline` uses them, `DDIMScheduler` does "
            "not split them, so `DDIMPipeline` cannot run this model."
        )
    if classes:
        notes.append(
            f"- Class conditional: {classes - 1} classes and the null class {classes - 1} "
            "(`num_class_embeds` = K + 1). `DDPMPipeline` / `DDIMPipeline` call the U-Net "
            "without `class_labels`, which diffusers refuses, and cannot express classifier-free "
            "guidance; run the scheduler loop yourself with `unet(x, t, class_labels=y)` and "
            "ε = ε(null) + s (ε(y) - ε(null))."
        )
    schedule = (
        "custom (`trained_betas`)"
        if scheduler.get("trained_betas") is not None
        else scheduler["beta_schedule"]
    )
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted((metrics or {}).items()))
    metrics_md = f"| metric | value |\n|---|---|\n{rows}" if rows else "(none recorded)"
    config_json = json.dumps(dict(run_config), indent=2, sort_keys=True, default=str)
    pipeline_call = (
        "DDPMPipeline.from_pretrained(folder)(batch_size=16).images"
        if not classes
        else "# see the notes: the pipelines do not pass class labels"
    )
    return f"""---
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags:
- ddpm
- diffusion
---

# DDPM U-Net, exported from ddpm

{unet["sample_size"]}x{unet["sample_size"]}, {unet["in_channels"]} channel(s); trained for
{global_step} steps; {"EMA" if used_ema else "raw (non-EMA)"} weights. Exported from `{source}`.

```python
from diffusers import DDIMPipeline, DDPMPipeline

folder = "path/to/this/folder"
images = {pipeline_call}
```

## Process

T = {scheduler["num_train_timesteps"]}, beta schedule {schedule}, prediction type
`{scheduler["prediction_type"]}`, variance `{scheduler["variance_type"]}`, x̂₀ clipping
{scheduler["clip_sample"]}, timestep spacing `{scheduler["timestep_spacing"]}`.

## Notes

{chr(10).join(notes)}

## Metrics

{metrics_md}

## Training config

```json
{config_json}
```
"""
