"""Load a trained model from a checkpoint alone: the resolved config inside rebuilds the network
and the diffusion; weights load with ``weights_only=True`` (no pickle code execution).

Checkpoint layout (a Lightning checkpoint plus):
    ``ddpm_config``     the resolved run config (plain data)
    ``state_dict``      the LightningModule's raw weights (``net.*``)
    ``ema_state_dict``  the EMA network's weights (keys of ``net``), when EMA ran
Exported files (``src/export.py``) are safetensors with the config as JSON metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import ddpm.config  # noqa: F401 - resolvers
from ddpm.diffusion import GaussianDiffusion
from ddpm.module import CONFIG_KEY

EMA_KEY = "ema_state_dict"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the requested network."""


@dataclass
class LoadedModel:
    net: nn.Module
    diffusion: GaussianDiffusion
    config: dict[str, Any]
    used_ema: bool
    global_step: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (C, H, W) for images, (D,) for vectors."""
        data = self.config["data"]
        if "image_size" in data and "channels" in data:
            return (int(data["channels"]), int(data["image_size"]), int(data["image_size"]))
        return (int(self.config["model"].get("data_dim", 2)),)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.ckpt`` (weights_only) or exported ``.safetensors`` file into a plain dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if CONFIG_KEY not in meta:
            raise CheckpointError(f"{path} has no '{CONFIG_KEY}' metadata: not a ddpm export")
        return {
            CONFIG_KEY: json.loads(meta[CONFIG_KEY]),
            EMA_KEY: load_file(path),
            "global_step": int(meta.get("global_step", 0)),
            "exported": True,
        }
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, unsafe pickle content
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def build_from_config(config: dict[str, Any]) -> tuple[nn.Module, GaussianDiffusion]:
    """Instantiate the network and the diffusion described by a stored run config."""
    cfg = OmegaConf.create({k: config[k] for k in ("model", "diffusion") if k in config})
    if "model" not in cfg or "diffusion" not in cfg:
        raise CheckpointError("the stored config lacks 'model' or 'diffusion'")
    return instantiate(cfg.model), instantiate(cfg.diffusion)


def net_state_dict(ckpt: dict[str, Any], use_ema: bool = True) -> tuple[dict[str, Any], bool]:
    """The network weights in ``ckpt``: EMA when present and asked for, else the raw ones."""
    if use_ema and EMA_KEY in ckpt:
        return ckpt[EMA_KEY], True
    if "state_dict" not in ckpt:
        if EMA_KEY in ckpt:
            return ckpt[EMA_KEY], True
        raise CheckpointError("checkpoint holds no 'state_dict'")
    sd = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    return sd, False


def load_model(
    path: str | os.PathLike, *, use_ema: bool = True, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Rebuild network + diffusion from a checkpoint and load its (EMA) weights, in eval mode."""
    ckpt = read_checkpoint(path)
    config = ckpt.get(CONFIG_KEY)
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} holds no ddpm config ('{CONFIG_KEY}'): was it written by this framework?"
        )
    net, diffusion = build_from_config(config)
    sd, used_ema = net_state_dict(ckpt, use_ema)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"the weights in {path} do not fit the network its config describes: {e}"
        ) from e
    net.to(device).eval()
    diffusion.to(device)
    return LoadedModel(
        net=net,
        diffusion=diffusion,
        config=config,
        used_ema=used_ema,
        global_step=int(ckpt.get("global_step", 0)),
    )
