"""Wiring shared by the tasks: build objects from config, callbacks and loggers as named dicts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig


def instantiate_dict(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a named dict (``callbacks``, ``logger``)."""
    if not node:
        return []
    out = []
    for _, sub in node.items():
        if isinstance(sub, DictConfig) and "_target_" in sub:
            out.append(instantiate(sub))
    return out


def output_dir(cfg: DictConfig) -> Path:
    """This run's directory (``paths.output_dir``)."""
    return Path(cfg.paths.output_dir)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def metrics_dict(trainer: pl.Trainer) -> dict[str, float]:
    out = {}
    for k, v in trainer.callback_metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out
