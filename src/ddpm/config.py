"""Config helpers: OmegaConf resolvers, start-up validation with one clear message per problem,
and resume-path resolution (``ckpt_path=last`` never silently starts from scratch)."""

from __future__ import annotations

import glob
import os
from pathlib import Path
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


def register_resolvers() -> None:
    """Register ``${ddpm_first:a,b}`` and ``${model_out_channels:C,variance_type}``."""
    if not OmegaConf.has_resolver("ddpm_first"):
        OmegaConf.register_new_resolver("ddpm_first", _first_not_none)
    if not OmegaConf.has_resolver("model_out_channels"):
        OmegaConf.register_new_resolver("model_out_channels", _model_out_channels)


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


def validate_train_config(cfg: DictConfig) -> None:
    """Check a training config before any work; raise :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    missing = OmegaConf.missing_keys(cfg)
    for key in sorted(missing):
        if key.startswith("hydra."):
            continue
        hint = " (e.g. data=image_folder data.root=/path/to/images)" if key == "data.root" else ""
        problems.append(f"{key} is required but was not given{hint}")

    lr = _get(cfg, "optimizer.lr")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        problems.append(f"optimizer.lr must be a number > 0, got {lr!r}")
    T = _get(cfg, "schedule.num_timesteps")
    if T is not None and not (isinstance(T, int) and not isinstance(T, bool) and T >= 1):
        problems.append(f"schedule.num_timesteps (T) must be an integer >= 1, got {T!r}")
    bs = _get(cfg, "data.batch_size")
    if bs is not None and not (isinstance(bs, int) and bs >= 1):
        problems.append(f"data.batch_size must be an integer >= 1, got {bs!r}")
    steps = _get(cfg, "trainer.max_steps")
    if steps is not None and isinstance(steps, int) and steps == 0:
        problems.append("trainer.max_steps must be > 0 or -1 (no limit), got 0")
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
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def find_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint of a run directory (``last.ckpt`` if present), or None."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return str(last)
    candidates = [p for p in glob.glob(str(run_dir / "**" / "*.ckpt"), recursive=True)
                  if os.path.isfile(p)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | None) -> str | None:
    """Turn the user's ``ckpt_path`` into a file, or fail clearly when a resume finds nothing."""
    if ckpt_path in (None, "", "null", "None"):
        return None
    if ckpt_path == "last":
        if not run_dir:
            raise ConfigError(
                "ckpt_path=last needs the run to resume: add run_dir=<that run's directory> "
                "(e.g. run_dir=outputs/train/runs/2026-01-01_12-00-00_000000)"
            )
        found = find_checkpoint(run_dir)
        if found is None:
            raise ConfigError(
                f"ckpt_path=last: no checkpoint (*.ckpt) found under {run_dir}. Nothing to resume; "
                "drop ckpt_path to start a new run."
            )
        return found
    if not os.path.isfile(ckpt_path):
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return str(ckpt_path)
