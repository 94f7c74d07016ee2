"""Start-up validation of a training config, with one clear message per problem. (The resolvers
and presets Hydra composes with are :mod:`ddpm.hydra_setup`; what a launch resumes from, and with
which config, is decided in :mod:`ddpm.run`.)"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.callbacks.inputs import default_sampler
from ddpm.data import per_device_batch_size
from ddpm.errors import ConfigError
from ddpm.run import resume_command
from ddpm.utils.posthoc_ema import MAX_SIGMA_REL


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def devices_count(devices: Any, accelerator: Any) -> int | None:
    """Number of devices per node from Lightning's ``devices`` value, when knowable up front."""
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str):
        s = devices.strip()
        if s.isdigit():
            return int(s)
        if "," in s:
            return len([d for d in s.split(",") if d.strip()])
        if s in ("auto", "-1") and accelerator == "cpu":
            return 1
    return None


@dataclass(frozen=True)
class _Range:
    """Allowed values of a numeric setting: an integer or a finite number within bounds."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    also: tuple[Any, ...] = ()  # special values also allowed (e.g. -1 = no limit)

    def accepts(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if v in self.also:
            return True
        if (self.integer and not isinstance(v, int)) or not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        also = " or ".join(repr(a) for a in self.also)
        text = f"{kind} {' and '.join(bounds)}".strip()
        return f"{text}, or {also}" if also else text


_POSITIVE = _Range(low=0, low_open=True)
_NON_NEGATIVE = _Range(low=0)
_COUNT = _Range(integer=True, low=1)
_STEPS = _Range(integer=True, low=0)
_UNIT_OPEN = _Range(low=0, high=1, high_open=True)
# Numeric settings checked at start-up (null = not set, always fine) whose owner is not built
# before the fit (optimizer, scheduler, Trainer, callbacks, ...): these catch a bad value before
# any work and say which setting. The process, the loss and the network check their own
# arguments: :func:`build_problems` builds them and collects what they say.
NUMERIC_SETTINGS: dict[str, _Range] = {
    "seed": _Range(integer=True),
    "p_uncond": _Range(low=0, high=1),
    "optimizer.lr": _POSITIVE,
    "optimizer.eps": _NON_NEGATIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.momentum": _NON_NEGATIVE,
    "optimizer.betas[0]": _UNIT_OPEN,
    "optimizer.betas[1]": _UNIT_OPEN,
    "lr_scheduler.warmup_steps": _STEPS,
    "lr_scheduler.total_steps": _Range(integer=True, low=1),
    "lr_scheduler.min_lr_ratio": _Range(low=0, high=1),
    "data.batch_size": _COUNT,
    "trainer.max_steps": _Range(integer=True, low=1, also=(-1,)),
    "trainer.max_epochs": _Range(integer=True, low=0, also=(-1,)),
    "trainer.accumulate_grad_batches": _COUNT,
    "trainer.gradient_clip_val": _NON_NEGATIVE,
    "trainer.log_every_n_steps": _COUNT,
    "trainer.val_check_interval": _Range(low=0, low_open=True),
    "objective.loss.lambda_vlb": _NON_NEGATIVE,
    "objective.loss.min_snr_gamma": _POSITIVE,
    "callbacks.ema.decay": _Range(low=0, high=1, low_open=True, high_open=True),
    "callbacks.ema.half_life_kimg": _POSITIVE,
    "callbacks.ema.sigma_rel": _Range(low=0, high=MAX_SIGMA_REL, low_open=True),
    "callbacks.posthoc_ema.every_n_steps": _COUNT,
    "callbacks.ema.update_every": _COUNT,
    "callbacks.ema.start_step": _STEPS,
    "callbacks.model_checkpoint.every_n_train_steps": _STEPS,
    "callbacks.nonfinite_guard.max_consecutive": _COUNT,
}


def _select_setting(cfg: DictConfig, key: str) -> Any:
    """``cfg``'s value at ``key`` (``a.b[i]`` indexes a list), None when absent or unset."""
    base, _, index = key.partition("[")
    value = _get(cfg, base)
    if index and value is not None:
        i = int(index.rstrip("]"))
        if not (OmegaConf.is_list(value) or isinstance(value, (list, tuple))) or len(value) <= i:
            return value  # reported as not a number
        value = value[i]
    return value


def numeric_problems(cfg: DictConfig) -> list[str]:
    """One message per numeric setting (:data:`NUMERIC_SETTINGS`) outside its allowed values:
    non-finite (``optimizer.lr=inf``), out of range, or not a number (``trainer.max_steps=abc``)."""
    problems = []
    for key, allowed in NUMERIC_SETTINGS.items():
        try:
            value = _select_setting(cfg, key)
        except Exception as e:  # an interpolation that cannot resolve
            problems.append(f"{key} cannot be read: {type(e).__name__}: {e}")
            continue
        if value is not None and not allowed.accepts(value):
            problems.append(f"{key} must be {allowed.describe()}, got {value!r}")
    return problems


# Keys that train.yaml, the objectives and the model presets derive by interpolation, with the key
# that owns the value: the process from `schedule` (T, betas) and `objective` (parameterisation),
# the timestep sampler's and the network's T and the network's input from `schedule` and `data`.
# Each value has one override path; setting a derived key would make the process, the network and
# the data disagree.
DERIVED_KEYS: dict[str, str] = {
    "diffusion": "schedule / objective",
    "objective.timestep_sampler.num_timesteps": "schedule.num_timesteps",
    "model.num_timesteps": "schedule.num_timesteps",
    "model.in_channels": "data.channels",
    "model.image_size": "data.image_size",
}


def derived_key_problems(cfg: DictConfig) -> list[str]:
    """One message per derived key (:data:`DERIVED_KEYS`) that is set directly instead of
    interpolated from its owner (e.g. ``diffusion.num_timesteps=500``: T is
    ``schedule.num_timesteps``)."""
    problems = []
    for path, owner_key in DERIVED_KEYS.items():
        parent_path, _, key = path.rpartition(".")
        parent = _get(cfg, parent_path) if parent_path else cfg
        if not OmegaConf.is_dict(parent) or key not in parent:
            continue
        node = parent[key] if OmegaConf.is_dict(parent._get_node(key)) else None
        leaves = [(key, parent)] if node is None else [(k, node) for k in node if k != "_target_"]
        for k, holder in leaves:
            if OmegaConf.is_interpolation(holder, k):
                continue
            value = OmegaConf.to_container(holder, resolve=False)[k]
            fix = f"set {owner_key}={value} instead"
            if node is not None:  # a node built from groups: the group key of the same name
                found = [f"{g}.{k}" for g in owner_key.split(" / ") if k in (_get(cfg, g) or {})]
                fix = f"set {found[0]}={value} instead" if found else "set the groups' keys"
            problems.append(
                f"{path if node is None else f'{path}.{k}'}={value} is derived from the "
                f"{owner_key} settings and cannot be set on its own: {fix}"
            )
    return problems


# The objects built at start-up to let them check their own arguments (cheap: the network is
# built on the meta device, without memory or initialisation). A network given by a function (a
# loader such as model=diffusers) is checked when it is called.
BUILT_AT_START = ("diffusion", "objective.loss", "model")


def build_problems(cfg: DictConfig) -> list[str]:
    """What the objects of :data:`BUILT_AT_START` say about their arguments (each class
    validates its own: T and the schedule in GaussianDiffusion, the image size and attention
    resolutions in the U-Net, ...), one message per object, and the loss's check against the
    process (a learned variance needs a loss that trains it)."""
    problems: list[str] = []
    built: dict[str, Any] = {}
    for path in BUILT_AT_START:
        node = _get(cfg, path)
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            continue
        try:
            if OmegaConf.missing_keys(node):
                continue  # reported as missing
            target = get_object(str(node._target_))
            if path == "model" and not inspect.isclass(target):
                continue
            with torch.device("meta") if path == "model" else contextlib.nullcontext():
                built[path] = instantiate(node)
        except InstantiationException as e:
            cause = e.__cause__
            if isinstance(cause, (ValueError, TypeError)):
                problems.append(f"{path} ({node._target_}): {cause}{_settings_named(node, cause)}")
        except Exception:  # unresolvable or unimportable: the other checks report it
            continue
    loss, diffusion = built.get("objective.loss"), built.get("diffusion")
    if loss is not None and diffusion is not None and hasattr(loss, "check"):
        try:
            loss.check(diffusion)
        except ValueError as e:
            problems.append(f"objective: {e}")
    return problems


def _settings_named(node: DictConfig, error: BaseException) -> str:
    """`` (num_timesteps is schedule.num_timesteps)``: the settings behind the arguments an
    object's message names, where the node interpolates them from elsewhere."""
    raw = OmegaConf.to_container(node, resolve=False)
    assert isinstance(raw, dict)
    named = [
        f"{k} is {v[2:-1]}"
        for k, v in raw.items()
        if isinstance(v, str)
        and re.fullmatch(r"\$\{[\w.]+\}", v)
        and re.search(rf"\b{re.escape(str(k))}\b", str(error))
    ]
    return f" ({'; '.join(named)})" if named else ""


def samplers_used(cfg: DictConfig) -> dict[str, Any]:
    """The sampler nodes a training run samples with, by the settings that give them: ``sampler``
    and every callback's ``sampler`` (the sample grid's, FID's, the playground's; null: the
    callback's default, :func:`ddpm.callbacks.inputs.default_sampler`). Settings that resolve to
    the same sampler (``${sampler}``) are listed together, ``a, b``."""
    found: dict[str, tuple[list[str], Any]] = {}

    def add(path: str, node: Any) -> None:
        plain = None if node is None else OmegaConf.to_container(node, resolve=True)
        key = repr(plain)
        found.setdefault(key, ([], plain))[0].append(path)

    if OmegaConf.is_dict(_get(cfg, "sampler")):
        add("sampler", cfg.sampler)
    callbacks = _get(cfg, "callbacks")
    for name in callbacks or {}:
        node = callbacks[name]
        if OmegaConf.is_dict(node) and "_target_" in node and "sampler" in node:
            add(f"callbacks.{name}.sampler", node.sampler)
    return {", ".join(paths): plain for paths, plain in found.values()}


class _ZeroNet:
    """A network that predicts zeros, ``out_channels`` of them: what a sampler is run on at
    start-up to check it against the process (its grid, steps vs T, guidance) without a model."""

    def __init__(self, out_channels: int) -> None:
        self.out_channels, self.null_class = out_channels, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return x.new_zeros((x.shape[0], self.out_channels, *x.shape[2:]))


def sampler_problems(cfg: DictConfig) -> list[str]:
    """One message per sampler the run uses (:func:`samplers_used`) that cannot sample its
    process: each is built and run once on one 1-pixel sample of a network that predicts zeros,
    so what it would only find at the first sample grid or FID (``sampler.steps=20`` with
    ``schedule.num_timesteps=10``, a spacing, guidance without labels) is found before any
    work."""
    used = samplers_used(cfg)
    if not used:
        return []
    try:
        diffusion = instantiate(cfg.diffusion)
    except Exception:  # reported by build_problems
        return []
    data = _get(cfg, "data") or {}
    channels = data.get("channels") if "image_size" in data else None
    shape = (1, int(channels), 1, 1) if channels else (1, int(_get(cfg, "model.data_dim", 2)))
    out_channels = getattr(diffusion, "model_output_channels", lambda c: c)(shape[1])
    net = _ZeroNet(out_channels)
    labels = torch.zeros(1, dtype=torch.long) if data.get("conditional") else None
    problems = []
    for paths, node in used.items():
        try:
            sampler = default_sampler() if node is None else instantiate(node)
            if dataclasses.is_dataclass(sampler) and getattr(sampler, "compile", False):
                sampler = dataclasses.replace(sampler, compile=False)
            with torch.inference_mode():
                sampler(net, diffusion, shape, class_labels=labels)
        except (InstantiationException, ValueError, TypeError) as e:
            cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ else e
            what = "the default sampler" if node is None else node.get("_target_")
            T = getattr(diffusion, "num_timesteps", None)
            problems.append(
                f"{paths} ({what}) cannot sample the run's process"
                + (f" (T={T}: schedule.num_timesteps)" if T is not None else "")
                + f": {cause}"
            )
        except Exception:  # noqa: BLE001 - the stand-in network, not the settings: the run tells
            continue
    return problems


def validate_train_config(cfg: DictConfig) -> None:
    """Check a training config before any work; raise :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    missing = OmegaConf.missing_keys(cfg)
    for key in sorted(missing):
        if key.startswith("hydra."):
            continue
        hint = " (e.g. data=image_folder data.root=/path/to/images)" if key == "data.root" else ""
        problems.append(f"{key} is required but was not given{hint}")
    problems += numeric_problems(cfg)
    problems += derived_key_problems(cfg)
    if not _get(cfg, "ckpt_path"):  # a resume builds the run's own objects, not the command's
        problems += build_problems(cfg)
        problems += sampler_problems(cfg)  # a resume's: ddpm.run.launch.prepare_launch
    bs = _get(cfg, "data.batch_size")
    devices = devices_count(_get(cfg, "trainer.devices"), _get(cfg, "trainer.accelerator"))
    nodes = _get(cfg, "trainer.num_nodes", 1) or 1
    if isinstance(bs, int) and bs >= 1 and devices and isinstance(nodes, int):
        try:
            per_device_batch_size(bs, devices * nodes)
        except ValueError as e:
            problems.append(f"{e} (trainer.devices={devices} x trainer.num_nodes={nodes})")
    ckpt = _get(cfg, "ckpt_path")
    if ckpt in ("last", "auto") and not _get(cfg, "run_dir"):
        run = resume_command("<the run's directory>", ckpt_path=str(ckpt))
        problems.append(f"ckpt_path={ckpt} needs run_dir, the run to resume: {run}")
    problems += unknown_key_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def _accepted_names(target: str) -> set[str] | None:
    """Keyword names ``target`` accepts, or None when it takes ``**kwargs`` (or is opaque)."""
    obj = get_object(target)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def unknown_key_problems(cfg: DictConfig) -> list[str]:
    """Keys of ``_target_`` nodes that the target does not accept (e.g. ``+trainer.max_step=10``,
    a typo in an experiment file), and targets that cannot be imported: caught before any work
    instead of as a TypeError halfway through start-up."""
    problems: list[str] = []

    def walk(node: Any, path: str) -> None:
        if OmegaConf.is_list(node):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")
            return
        if not OmegaConf.is_dict(node):
            return
        keys = [str(k) for k in node.keys()]
        target = node._get_node("_target_") if "_target_" in keys else None
        if target is not None and not OmegaConf.is_missing(node, "_target_"):
            name = str(node["_target_"])
            try:
                accepted = _accepted_names(name)
            except Exception as e:  # ImportError, AttributeError, ...
                first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                problems.append(
                    f"{path}._target_={name} cannot be imported: {type(e).__name__}: {first}"
                )
                accepted = None
            if accepted is not None:
                for key in keys:
                    if key in _HYDRA_KEYS or key in accepted:
                        continue
                    close = difflib.get_close_matches(key, sorted(accepted), n=1)
                    hint = f" (did you mean {path}.{close[0]}?)" if close else ""
                    problems.append(f"{path}.{key} is not a parameter of {name}{hint}")
        for key in keys:
            if key.startswith("_") or key == "hydra":
                continue
            child = node._get_node(key)
            if child is not None and (OmegaConf.is_dict(child) or OmegaConf.is_list(child)):
                walk(child, f"{path}.{key}" if path else key)

    walk(cfg, "")
    return problems
