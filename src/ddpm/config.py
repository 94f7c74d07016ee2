"""Config helpers: OmegaConf resolvers and start-up validation with one clear message per problem.
(What a launch resumes from, and with which config, is decided in :mod:`ddpm.run`.)"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


def _first_not_none(*values: Any) -> Any:
    for v in values:
        if v is not None and v != "None" and v != "null":
            return v
    return None


def _model_out_channels(channels: int, variance_type: str) -> int:
    """Network output channels: doubled when the variance is learned (improved DDPM)."""
    return int(channels) * (2 if variance_type in ("learned", "learned_range") else 1)


def _launch_subdir(output_dir: str, stamp: str) -> str:
    from ddpm.run.directory import launch_subdir

    return launch_subdir(str(output_dir), str(stamp))


def register_resolvers() -> None:
    """Register ``${ddpm_first:a,b}``, ``${model_out_channels:C,variance_type}`` and
    ``${ddpm_launch_subdir:run_dir,stamp}`` (:func:`ddpm.run.directory.launch_subdir`)."""
    if not OmegaConf.has_resolver("ddpm_first"):
        OmegaConf.register_new_resolver("ddpm_first", _first_not_none)
    if not OmegaConf.has_resolver("model_out_channels"):
        OmegaConf.register_new_resolver("model_out_channels", _model_out_channels)
    if not OmegaConf.has_resolver("ddpm_launch_subdir"):
        OmegaConf.register_new_resolver("ddpm_launch_subdir", _launch_subdir)


register_resolvers()


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _devices_count(devices: Any, accelerator: Any) -> int | None:
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
# Numeric settings checked at start-up (null = not set, always fine). Each class checks its own
# arguments again when built; these catch a bad value before any work and say which setting.
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
    "schedule.num_timesteps": _COUNT,
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
    bs = _get(cfg, "data.batch_size")
    devices = _devices_count(_get(cfg, "trainer.devices"), _get(cfg, "trainer.accelerator"))
    nodes = _get(cfg, "trainer.num_nodes", 1) or 1
    if isinstance(bs, int) and bs >= 1 and devices:
        world = devices * int(nodes)
        if bs % world:
            problems.append(
                f"data.batch_size={bs} is the global batch size and must be divisible by the "
                f"{world} devices (trainer.devices={devices} x trainer.num_nodes={nodes}); "
                f"use e.g. data.batch_size={max(world, bs // world * world)}"
            )
    image_size = _get(cfg, "data.image_size")
    mult = _get(cfg, "model.channel_mult")
    if isinstance(image_size, int) and mult is not None:
        factor = 2 ** (len(mult) - 1)
        if image_size % factor:
            problems.append(
                f"data.image_size={image_size} must be divisible by {factor}: the network "
                f"down-samples {len(mult) - 1} times (model.channel_mult={list(mult)})"
            )
        else:
            sizes = [image_size // 2**i for i in range(len(mult))]
            for r in _get(cfg, "model.attention_resolutions") or []:
                if r not in sizes:
                    problems.append(
                        f"model.attention_resolutions contains {r}, but the feature maps of this "
                        f"network are {sizes} pixels wide (data.image_size={image_size})"
                    )
    in_ch, data_ch = _get(cfg, "model.in_channels"), _get(cfg, "data.channels")
    if isinstance(in_ch, int) and isinstance(data_ch, int) and in_ch != data_ch:
        problems.append(f"model.in_channels={in_ch} does not match data.channels={data_ch}")
    ckpt = _get(cfg, "ckpt_path")
    if ckpt in ("last", "auto") and not _get(cfg, "run_dir"):
        problems.append(f"ckpt_path={ckpt} needs run_dir=<the run's directory>")
    problems += unknown_key_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def _accepted_names(target: str) -> set[str] | None:
    """Keyword names ``target`` accepts, or None when it takes ``**kwargs`` (or is opaque)."""
    import inspect

    from hydra._internal.utils import _locate

    obj = _locate(target)
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
    import difflib

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
