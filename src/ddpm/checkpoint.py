"""Load a trained model from a checkpoint alone: the resolved config inside rebuilds the network
and the diffusion. Checkpoints are data, never code:

* :func:`open_checkpoint` is the one way a ``.ckpt`` file is opened (loading a model, resuming,
  finding a run's checkpoints): ``torch.load(weights_only=True)``, so a pickled object cannot run
  code, with a message of ours for unsafe, truncated and empty files.
* The stored config may only build, in each of its :data:`BUILT_SECTIONS`, what the project's
  own configs (``conf/``) name in that section (:func:`shipped_targets`: one list, read from the
  configs, so a new network, process, sampler or data module is loadable as soon as a config
  names it): anything else is refused before anything is built, wherever it hides (nested
  nodes, lists, ``_partial_`` nodes), and so are ``${...}`` interpolations (a stored config is
  resolved; a resolver could build objects).

Checkpoint layout (a Lightning checkpoint plus the keys below, each named once here):
    ``state_dict``      the LightningModule's raw weights (``net.*``)
    ``ddpm_config``     :data:`CONFIG_KEY`: the resolved run config (plain data)
    ``ddpm_t_sampler``  :data:`T_SAMPLER_KEY`: the timestep sampler's state (tensors), when it
                        has one (importance sampling's loss history)
    ``ema_state_dict``  :data:`EMA_KEY`: the EMA network's weights (keys of ``net``), when EMA ran
    ``ema_state``       :data:`EMA_STATE_KEY`: the EMA's counters
    ``ema_posthoc``     :data:`POSTHOC_EMA_KEY`: post-hoc EMA profiles and their snapshot files,
                        when the run tracked them (:mod:`ddpm.utils.posthoc_ema`)
Exported files (``src/export.py``) are safetensors with the config as JSON metadata (under
:data:`CONFIG_KEY`).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from torch import nn

from ddpm.diffusion import Process
from ddpm.errors import ConfigError
from ddpm.project import conf_dir
from ddpm.utils.posthoc_ema import reconstruct

CONFIG_KEY = "ddpm_config"
T_SAMPLER_KEY = "ddpm_t_sampler"
EMA_KEY = "ema_state_dict"
EMA_STATE_KEY = "ema_state"
POSTHOC_EMA_KEY = "ema_posthoc"

# The project's config groups: what they name is what a stored config may build.
CONF_DIR = conf_dir()
# The sections of a stored config that loading builds (the others are a record of the run).
BUILT_SECTIONS = ("model", "diffusion", "objective", "sampler", "data")
_HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)", re.MULTILINE)


class CheckpointError(ConfigError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the requested network (a
    :class:`ConfigError`: the file a setting names cannot be used)."""


def _targets(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(section, target) of every ``_target_`` in a YAML node at dotted ``path``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str) and path:
                yield path.split(".")[0], value
            elif key != "defaults":
                yield from _targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value, path)


def _file_targets(path: Path, package: str) -> Iterator[tuple[str, str]]:
    """(section, target) of one config file placed at ``package``, and of the files its defaults
    list includes ``@_here_`` (a group's shared ``base/...``), which land where it does (the
    U-Net presets included so are ConfigStore nodes, data without targets)."""
    node = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    yield from _targets(node, package)
    for entry in node.get("defaults", []) if isinstance(node, dict) else []:
        if isinstance(entry, str) and entry.endswith("@_here_"):
            included = path.parent / f"{entry.removesuffix('@_here_')}.yaml"
            if included.is_file():
                yield from _file_targets(included, package)


@functools.cache
def shipped_targets(conf_dir: Path = CONF_DIR) -> dict[str, frozenset[str]]:
    """Every ``_target_`` the config files under ``conf_dir`` name, by section (the first key of
    where it lands: ``conf/sampler/x.yaml`` -> ``sampler``, a ``# @package _global_`` file and the
    primary configs at the top -> the keys they write, ``diffusion`` of ``train.yaml``; a file
    included ``@_here_`` lands where its includer does)."""
    found: dict[str, set[str]] = {}
    for path in sorted(Path(conf_dir).rglob("*.yaml")):
        group = path.relative_to(conf_dir).parent.as_posix()
        header = _PACKAGE.search(path.read_text())
        package = header.group(1) if header else group.replace("/", ".")
        package = "" if package in ("_global_", ".") else package
        for section, target in _file_targets(path, package):
            found.setdefault(section, set()).add(target)
    return {section: frozenset(targets) for section, targets in found.items()}


def is_loadable(target: str, section: str | None = None) -> bool:
    """Whether a stored config may build ``target`` in ``section`` (None: in any of
    :data:`BUILT_SECTIONS`): a shipped config names it there (:func:`shipped_targets`)."""
    shipped = shipped_targets()
    sections = BUILT_SECTIONS if section is None else (section,)
    return any(target in shipped.get(s, ()) for s in sections)


def _section(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0]


def check_stored_config(
    config: Any,
    source: str,
    sections: Sequence[str] | None = BUILT_SECTIONS,
    allowed: Callable[[str, str], bool] | None = None,
) -> None:
    """Refuse a stored config whose built sections name anything but our own classes.

    Every ``_target_`` under ``sections`` (default :data:`BUILT_SECTIONS`; None: the whole
    config), in nested nodes and lists too, must be named in its section by a shipped config
    (:func:`is_loadable`; or pass ``allowed(target, path)``),
    Hydra's special keys are limited to the ones our configs use, and no string may be an
    interpolation. Raises :class:`CheckpointError` naming the first offending key.
    """
    ok = allowed or (lambda target, path: is_loadable(target, _section(path)))

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


# How torch's weights-only unpickler names a global it refused, over the versions: "Unsupported
# global: GLOBAL io.open was not an allowed global by default" (2.4+), "Trying to load unsupported
# GLOBAL posix.system whose module posix is blocked" (2.6+), "Unsupported class os.system" (<2.4).
_REFUSED_GLOBAL = re.compile(r"(?:\bGLOBAL|[Uu]nsupported class)\s+([A-Za-z_][\w.]*)")


def _refused_global(message: str) -> str | None:
    """The Python object a weights-only load refused (``posix.system``), None when the file was
    refused for another reason (not a pickle, an opcode it does not know)."""
    found = _REFUSED_GLOBAL.search(message)
    return found.group(1) if found else None


def open_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Open a ``.ckpt`` file with ``torch.load(weights_only=True)`` (memory-mapped when ``mmap``:
    cheap for reading a few fields) on the CPU; :class:`CheckpointError` with an actionable
    message when the file is missing, empty, truncated, or holds code."""
    path = os.fspath(path)
    try:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
    except OSError:  # removed since (a checkpoint rotated away)
        empty = False
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if empty:
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
        refused = _refused_global(str(e))
        if refused is None:  # random bytes, a plain pickle: not a checkpoint, nothing to run
            raise CheckpointError(
                f"checkpoint {path} cannot be loaded: it is not a PyTorch checkpoint (or it is "
                "damaged). Use one of your run's own checkpoints."
            ) from None
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded: it holds a reference to the Python object "
            f"{refused}, which could run code when opened, so it is refused (checkpoints are "
            "opened with torch.load(weights_only=True); ddpm's hold only tensors and plain "
            "data). It was not written by ddpm or was altered: use one of your run's own "
            "checkpoints."
        ) from None
    except FileNotFoundError:  # removed since it was found
        raise CheckpointError(f"checkpoint not found: {path}") from None
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


def posthoc_state_dict(
    ckpt: dict[str, Any], path: str | os.PathLike, sigma_rel: float
) -> dict[str, Any]:
    """The EMA of relative width ``sigma_rel`` reconstructed from the run's post-hoc EMA snapshots
    (EDM2; :func:`ddpm.utils.posthoc_ema.reconstruct`). The snapshot files are looked for in the
    recorded directory, then in a directory of that name beside the checkpoint's directory (the
    run directory was moved)."""
    record = ckpt.get(POSTHOC_EMA_KEY)
    if record is None:
        raise CheckpointError(
            f"{path} holds no post-hoc EMA profiles, so ema_sigma_rel cannot be reconstructed: "
            "train with the posthoc_ema callback (callbacks.posthoc_ema), or use ema_sigma_rel=null"
        )
    recorded = os.fspath(record["dirpath"])
    moved = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(path))), os.path.basename(recorded)
    )
    names = [str(e["file"]) for e in record["snapshots"]]
    found = [d for d in (recorded, moved) if all(os.path.isfile(os.path.join(d, n)) for n in names)]
    if not found:
        raise CheckpointError(
            f"the post-hoc EMA snapshots of {path} ({len(names)} files) are neither in {recorded} "
            f"nor in {moved}"
        )
    try:
        weights, _ = reconstruct(record, found[0], sigma_rel)
    except ValueError as e:
        raise CheckpointError(f"ema_sigma_rel={sigma_rel!r} for {path}: {e}") from None
    return weights


def load_model(
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    sigma_rel: float | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Rebuild network + diffusion from a checkpoint and load its (EMA) weights, in eval mode;
    with ``sigma_rel`` the EMA of that relative width, reconstructed post hoc (EDM2)."""
    ckpt = read_checkpoint(path)
    config = ckpt[CONFIG_KEY]
    net, diffusion = build_from_config(config)
    if sigma_rel is None:
        sd, used_ema = net_state_dict(ckpt, use_ema)
    elif not use_ema:
        raise CheckpointError(
            f"ema_sigma_rel={sigma_rel!r} asks for an EMA but use_ema=false: set one of them"
        )
    else:
        sd, used_ema = posthoc_state_dict(ckpt, path, sigma_rel), True
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


def init_weights(net: nn.Module, path: str | os.PathLike, setting: str = "init_from") -> bool:
    """Load the network weights of the checkpoint ``path`` (its EMA when it has one) into ``net``
    to start training from them (fine-tuning; reflow's student starts as its teacher); returns
    whether they were the EMA. A network of another shape is an error naming ``setting``."""
    sd, used_ema = net_state_dict(read_checkpoint(path), use_ema=True)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{setting}={os.fspath(path)}: its weights do not fit this run's network (the model "
            f"section must be the checkpoint's): {e}"
        ) from e
    return used_ema
