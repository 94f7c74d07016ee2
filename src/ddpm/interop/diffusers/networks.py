"""Our U-Net <-> a ``diffusers.UNet2DModel`` object computing the same function, and the
``UNet2DModel`` of a local diffusers folder as our U-Net (``model=diffusers model.path=DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.interop.diffusers.configs import unet_from_diffusers_config, unet_to_diffusers_config
from ddpm.interop.diffusers.errors import InteropError, require_diffusers
from ddpm.interop.diffusers.weights import state_dict_from_diffusers, state_dict_to_diffusers
from ddpm.nn import UNet

__all__ = ["from_diffusers_unet", "load_unet", "to_diffusers_unet", "unet_from_pretrained"]


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
    unet = _empty(lambda: diffusers.UNet2DModel(**config), next(net.parameters()).device)
    unet.load_state_dict(state_dict_to_diffusers(net.state_dict(), net.config), strict=True)
    return unet.train(net.training)


def from_diffusers_unet(unet: nn.Module) -> UNet:
    """Our U-Net computing exactly what the ``diffusers.UNet2DModel`` ``unet`` computes."""
    kw = unet_from_diffusers_config(unet.config)
    net = _empty(lambda: UNet(**kw), next(unet.parameters()).device)
    net.load_state_dict(state_dict_from_diffusers(unet.state_dict(), kw), strict=True)
    return net.train(unet.training)


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
