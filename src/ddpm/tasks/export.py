"""``export(cfg)``: write a checkpoint's EMA (or raw) network weights to safetensors, with the
resolved config as JSON metadata; ``sample.py`` and ``evaluate.py`` load the file directly."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig
from safetensors.torch import save_file

from ddpm.checkpoint import CheckpointError, load_model
from ddpm.module import CONFIG_KEY
from ddpm.tasks.common import output_dir


def export(cfg: DictConfig) -> Path:
    """Export; returns the path of the ``.safetensors`` file."""
    if not cfg.get("ckpt_path"):
        raise CheckpointError("ckpt_path is required: python src/export.py ckpt_path=PATH")
    loaded = load_model(cfg.ckpt_path, use_ema=bool(cfg.use_ema))
    out = Path(cfg.out) if cfg.get("out") else output_dir(cfg) / "model.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in loaded.net.state_dict().items()}
    meta = {
        CONFIG_KEY: json.dumps(loaded.config),
        "global_step": str(loaded.global_step),
        "ema": str(loaded.used_ema).lower(),
        "format": "ddpm-net-v1",
    }
    tmp = out.with_name(out.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out)
    print(out)
    return out
