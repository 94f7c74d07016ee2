"""Load a trained model from a checkpoint alone: the resolved config inside rebuilds the network
and the diffusion. Checkpoints are data, never code:

* :func:`open_checkpoint` is the one way a ``.ckpt`` file is opened (loading a model, resuming,
  finding a run's checkpoints): ``torch.load(weights_only=True)``, so a pickled object cannot run
  code, with a message of ours for unsafe, truncated and empty files.
* The stored config may only name the project's own classes (:data:`LOADABLE_TARGETS`, plus the
  public builders of the modules in :data:`LOADABLE_MODULES`): anything else is refused before
  anything is built, wherever it hides (nested nodes, lists, ``_partial_`` nodes), and so are
  ``${...}`` interpolations (a stored config is resolved; a resolver could build objects).

Checkpoint layout (a Lightning checkpoint plus the keys below, each named once here):
    ``state_dict``      the LightningModule's raw weights (``net.*``)
    ``ddpm_config``     :data:`CONFIG_KEY`: the resolved run config (plain data)
    ``ddpm_t_sampler``  :data:`T_SAMPLER_KEY`: the timestep sampler's state (tensors), when it
                        has one (importance sampling's loss history)
    ``ema_state_dict``  :data:`EMA_KEY`: the EMA network's weights (keys of ``net``), when EMA ran
    ``ema_state``       :data:`EMA_STATE_KEY`: the EMA's counters
Exported files (``src/export.py``) are safetensors with the config as JSON metadata (under
:data:`CONFIG_KEY`).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from torch import nn

from ddpm.diffusion import Process

CONFIG_KEY = "ddpm_config"
T_SAMPLER_KEY = "ddpm_t_sampler"
EMA_KEY = "ema_state_dict"
EMA_STATE_KEY = "ema_state"

# What a stored config may build: our networks, processes, losses and timestep samplers, samplers
# and data modules (everything `sample.py`, `evaluate.py` and `visualize.py` build from a
# checkpoint).
LOADABLE_TARGETS: set[str] = {
    "ddpm.nn.UNet",
    "ddpm.nn.MLPDenoiser",
    "ddpm.diffusion.GaussianDiffusion",
    "ddpm.diffusion.EDMProcess",
    "ddpm.diffusion.RectifiedFlow",
    "ddpm.diffusion.DiffusionLoss",
    "ddpm.diffusion.UniformTimestepSampler",
    "ddpm.diffusion.LossSecondMomentTimestepSampler",
    "ddpm.diffusion.LogNormalTimestepSampler",
    "ddpm.diffusion.FlowTimestepSampler",
    "ddpm.data.ImageDataModule",
    "ddpm.data.ToyDataModule",
}
# Modules whose public builders are all loadable: a name in the module's ``__all__`` (when it
# has one) that is a class or function defined in that module or its package (not one it
# imported from elsewhere, such as ``os.system``).
LOADABLE_MODULES: set[str] = {"ddpm.diffusion.samplers", "ddpm.interop.diffusers"}
# The sections of a stored config that loading builds (the others are a record of the run).
BUILT_SECTIONS = ("model", "diffusion", "objective", "sampler", "data")
_HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the requested network."""


def register_loadable(target: str) -> None:
    """Allow a stored config to build ``target`` (a dotted path to one of our classes)."""
    LOADABLE_TARGETS.add(target)


def is_loadable(target: str) -> bool:
    """Whether a stored config may build ``target`` (imports nothing outside our modules)."""
    if target in LOADABLE_TARGETS:
        return True
    module, _, name = target.rpartition(".")
    if module not in LOADABLE_MODULES or not name.isidentifier() or name.startswith("_"):
        return False
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    public = getattr(mod, "__all__", None)
    obj = getattr(mod, name, None)
    defined_in = str(getattr(obj, "__module__", ""))
    return (
        (public is None or name in public)
        and callable(obj)
        and (defined_in == module or defined_in.startswith(module + "."))
    )


def check_stored_config(
    config: Any,
    source: str,
    sections: Sequence[str] | None = BUILT_SECTIONS,
    allowed: Callable[[str, str], bool] | None = None,
) -> None:
    """Refuse a stored config whose built sections name anything but our own classes.

    Every ``_target_`` under ``sections`` (default :data:`BUILT_SECTIONS`; None: the whole
    config), in nested nodes and lists too, must be loadable (or pass ``allowed(target, path)``),
    Hydra's special keys are limited to the ones our configs use, and no string may be an
    interpolation. Raises :class:`CheckpointError` naming the first offending key.
    """
    ok = allowed or (lambda target, path: is_loadable(target))

    def refuse(path: str, why: str) -> None:
        raise CheckpointError(
            f"{source} is refused: its stored config {why} at {path}. A checkpoint may only "
            "build this project's own networks, processes, samplers and data modules; it was "
            "not written by ddpm or was altered."
        )

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    refuse(f"{path}[{key!r}]", "has a non-string key")
                if key == "_target_":
                    if not isinstance(value, str) or not ok(value, path):
                        refuse(f"{path}._target_", f"names {value!r}, which is not ours")
                elif key.startswith("_") and key.endswith("_") and key not in _HYDRA_KEYS:
                    refuse(f"{path}.{key}", "uses an unknown special key")
                walk(value, f"{path}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        elif isinstance(node, str) and "${" in node:
            refuse(path, f"holds an interpolation {node!r}")
        elif node is not None and not isinstance(node, (int, float, bool, str)):
            refuse(path, f"holds a {type(node).__name__}, not plain data")

    if not isinstance(config, dict):
        raise CheckpointError(
            f"{source} holds no ddpm config ('{CONFIG_KEY}'): was it written by this framework?"
        )
    for section in config if sections is None else sections:
        if section in config:
            walk(config[section], section)


def _unsafe_reason(message: str) -> str:
    """What torch's weights-only unpickler refused, without its "re-run with
    weights_only=False" advice (which would run the file's code)."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", message)
    if found:
        return f"a reference to the Python object {found.group(1)}"
    return "pickled Python objects other than tensors and plain data"


def open_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Open a ``.ckpt`` file with ``torch.load(weights_only=True)`` (memory-mapped when ``mmap``:
    cheap for reading a few fields) on the CPU; :class:`CheckpointError` with an actionable
    message when the file is missing, empty, truncated, or holds code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: the file is empty (0 bytes), e.g. from an "
            "interrupted copy. Use another checkpoint of the run."
        )
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:  # legacy (non-zip) serialization cannot be memory-mapped
            if not mmap or "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: it holds {_unsafe_reason(str(e))}, which "
            "could run code when opened, so it is refused (checkpoints are opened with "
            "torch.load(weights_only=True); ddpm's hold only tensors and plain data). It was "
            "not written by ddpm or was altered: use one of your run's own checkpoints."
        ) from None
    except Exception as e:  # truncated zip, EOF, not a torch file
        first = str(e).strip().split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded (torch.load(weights_only=True): {first}): the "
            "file is truncated (an interrupted save or copy?) or not a PyTorch checkpoint. Use "
            "another checkpoint of the run."
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


@dataclass
class LoadedModel:
    """A trained network and its process (``diffusion``: DDPM's discrete chain, EDM's process or
    rectified flow, with the parameterisation the network was trained in)."""

    net: nn.Module
    diffusion: Process
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


def _read_safetensors(path: str) -> dict[str, Any]:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} cannot be loaded ({e}): the file is truncated or not a safetensors file."
        ) from None
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path} has no '{CONFIG_KEY}' metadata: not a ddpm export")
    try:
        config = json.loads(meta[CONFIG_KEY])
        step = int(meta.get("global_step", 0))
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable '{CONFIG_KEY}' metadata ({e})") from None
    return {CONFIG_KEY: config, EMA_KEY: tensors, "global_step": step, "exported": True}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.ckpt`` or exported ``.safetensors`` file into a plain dict whose stored config
    passed :func:`check_stored_config`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    ckpt = _read_safetensors(path) if path.endswith(".safetensors") else open_checkpoint(path)
    check_stored_config(ckpt.get(CONFIG_KEY), path)
    return ckpt


def build_from_config(config: dict[str, Any]) -> tuple[nn.Module, Process]:
    """Instantiate the network and the process described by a stored run config (checked with
    :func:`check_stored_config` first)."""
    check_stored_config(config, "the checkpoint")
    if "model" not in config or "diffusion" not in config:
        raise CheckpointError("the stored config lacks 'model' or 'diffusion'")
    cfg = OmegaConf.create({k: config[k] for k in ("model", "diffusion")})
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
    config = ckpt[CONFIG_KEY]
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
