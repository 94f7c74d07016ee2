"""Wiring shared by the tasks: build objects from config, callbacks and loggers as named dicts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
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


def launch_dir(run_dir: str | os.PathLike) -> Path:
    """Where this launch keeps its own record: the run directory for the launch that created the
    run, ``<run>/launches/<time>/`` for a later one (resume, requeue), so no launch rewrites what
    an earlier one wrote. That is where Hydra put this launch's log file (``conf/hydra``'s
    ``output_subdir``, decided when the launch started); without one (the compose API), where
    ``output_subdir`` says now."""
    run_dir = Path(run_dir).resolve()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            log_file = Path(handler.baseFilename).resolve()
            if log_file.is_relative_to(run_dir):
                return log_file.parent
    subdir = HydraConfig.get().get("output_subdir") if HydraConfig.initialized() else None
    return run_dir / Path(str(subdir)).parent if subdir else run_dir


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
