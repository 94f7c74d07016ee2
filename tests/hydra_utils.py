"""Compose the real Hydra config in tests, with the Hydra runtime set (so ${hydra:...} resolves)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import ddpm.hydra_setup  # noqa: F401 - resolvers and U-Net presets, before composing

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
SRC_DIR = Path(__file__).resolve().parents[1] / "src"

# Tiny, fast settings for a real Trainer run on the CPU.
TINY = [
    "model=tiny",
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "schedule.num_timesteps=50",
    "data.batch_size=16",
    "lr_scheduler.warmup_steps=0",
    "optimizer.lr=1e-3",
    "trainer.limit_val_batches=2",
]


def compose_cfg(overrides: list[str], tmp_path: Path, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides; outputs go under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            overrides=[f"paths.root_dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    out = tmp_path / "run"
    out.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg
