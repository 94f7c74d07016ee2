"""``export(cfg)``: convert between checkpoint formats.

* ``format=ddpm`` (default): a checkpoint's EMA (or raw) network weights as safetensors, with the
  resolved config as JSON metadata; ``sample.py``, ``evaluate.py`` and ``visualize.py`` load it.
  When ``ckpt_path`` is a diffusers pipeline folder this imports it (``data=...`` records the
  data set the model was trained on, for ``evaluate.py``).
* ``format=diffusers``: a diffusers pipeline folder (``DDPMPipeline`` / ``DDIMPipeline``) with
  safetensors weights, the scheduler of our process and a README.md model card
  (:mod:`ddpm.interop.diffusers`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import Tensor

from ddpm.checkpoint import CONFIG_KEY, CheckpointError, LoadedModel, load_model
from ddpm.interop import diffusers as interop
from ddpm.project import command
from ddpm.run.checkpoint_files import source_run_dir
from ddpm.tasks.common import output_dir

FORMATS = ("ddpm", "diffusers")


def export(cfg: DictConfig) -> Path:
    """Export; returns the path written (a ``.safetensors`` file or a diffusers folder)."""
    if not cfg.get("ckpt_path"):
        raise CheckpointError(f"ckpt_path is required: {command('export')} ckpt_path=PATH")
    fmt = cfg.get("format") or "ddpm"
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    source = Path(cfg.ckpt_path)
    if source.is_dir():
        if fmt != "ddpm":
            raise ValueError(
                f"ckpt_path={source} is a folder (a diffusers pipeline?): import it with "
                "format=ddpm; format=diffusers exports one of our checkpoints"
            )
        out = _import_diffusers(source, cfg)
    else:
        loaded = load_model(source, use_ema=bool(cfg.use_ema))
        out = _export_diffusers(loaded, cfg) if fmt == "diffusers" else _export_ddpm(loaded, cfg)
    print(out)
    return out


def write_safetensors(
    out: Path, tensors: dict[str, Tensor], config: dict[str, Any], global_step: int, ema: bool
) -> Path:
    """Our export format ``ddpm-net-v1``: network weights + the run config as metadata."""
    meta = {
        CONFIG_KEY: json.dumps(config),
        "global_step": str(global_step),
        "ema": str(ema).lower(),
        "format": "ddpm-net-v1",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def _export_ddpm(loaded: LoadedModel, cfg: DictConfig) -> Path:
    out = Path(cfg.out) if cfg.get("out") else output_dir(cfg) / "model.safetensors"
    return write_safetensors(
        out, loaded.net.state_dict(), loaded.config, loaded.global_step, loaded.used_ema
    )


def _run_metrics(ckpt_path: Path) -> dict[str, float]:
    """The run's ``metrics.json`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/metrics.json``)."""
    path = source_run_dir(str(ckpt_path)) / "metrics.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def _fresh_dir(out: Path) -> Path:
    """A temporary sibling of ``out`` to write into; ``out`` must not hold files already."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"out={out} exists and is not empty: choose another out= or remove it"
        )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _export_diffusers(loaded: LoadedModel, cfg: DictConfig) -> Path:
    diffusers = interop.require_diffusers()
    out = Path(cfg.out) if cfg.get("out") else output_dir(cfg) / "diffusers"
    sampler = loaded.config.get("sampler") or {}
    clip = sampler.get("clip_denoised", True)
    spacing = interop.TIMESTEP_SPACINGS.get(sampler.get("spacing"), "leading")
    unet = interop.to_diffusers_unet(loaded.net.cpu()).eval()
    scheduler = diffusers.DDPMScheduler(
        **interop.scheduler_config(
            loaded.diffusion, clip_sample=bool(clip), timestep_spacing=spacing
        )
    )
    card = interop.model_card(
        loaded.config,
        dict(scheduler.config),
        dict(unet.config),
        global_step=loaded.global_step,
        used_ema=loaded.used_ema,
        metrics=_run_metrics(Path(cfg.ckpt_path)),
        source=Path(cfg.ckpt_path).name,
    )
    tmp = _fresh_dir(out)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(
        tmp, safe_serialization=True
    )
    (tmp / "README.md").write_text(card)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _import_diffusers(source: Path, cfg: DictConfig) -> Path:
    """A diffusers pipeline folder (UNet2DModel + DDPM/DDIM scheduler) as our safetensors."""
    scheduler_file = source / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise CheckpointError(
            f"{scheduler_file} not found: importing a checkpoint needs the pipeline's scheduler "
            "(the diffusion process). A lone UNet2DModel folder can be fine-tuned with "
            f"{command('train')} model=diffusers model.path=DIR"
        )
    net = interop.from_diffusers_unet(interop.load_unet(source))
    diffusion, hints = interop.diffusion_from_scheduler_config(
        json.loads(scheduler_file.read_text())
    )
    if net.out_channels == 2 * net.in_channels and diffusion["variance_type"] != "learned_range":
        raise CheckpointError(
            f"the U-Net in {source} outputs 2 x {net.in_channels} channels but the scheduler's "
            f"variance_type is {diffusion['variance_type']!r}, not learned_range"
        )
    data = {"channels": net.in_channels, "image_size": net.image_size}
    if cfg.get("data") is not None:
        given = OmegaConf.to_container(cfg.data, resolve=True)
        wrong = {k: given.get(k) for k, v in data.items() if given.get(k) != v}
        data = given
        if wrong:
            raise CheckpointError(
                f"data={data.get('name')} has {wrong}, but the U-Net in {source} takes "
                f"{net.in_channels} channels at {net.image_size}x{net.image_size}"
            )
    config = {
        "model": {"_target_": "ddpm.nn.UNet", **net.config},
        "diffusion": diffusion,
        "data": data,
        "sampler": {
            "_target_": "ddpm.diffusion.samplers.DDIMSampler",
            "steps": min(50, diffusion["num_timesteps"]),
            "eta": 0.0,
            "spacing": hints["spacing"],
            "clip_denoised": hints["clip_denoised"],
        },
        "imported_from": {"format": "diffusers", "path": str(source.resolve())},
    }
    out = Path(cfg.out) if cfg.get("out") else output_dir(cfg) / "model.safetensors"
    return write_safetensors(out, net.state_dict(), config, 0, True)
