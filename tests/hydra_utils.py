"""Compose the real Hydra config in tests, with the Hydra runtime set (so ${hydra:...} resolves);
the repository's directories and the override lists shared by the tests of real runs."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import ddpm.hydra_setup  # noqa: F401 - resolvers and U-Net presets, before composing

REPO_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO_DIR / "conf")
SRC_DIR = REPO_DIR / "src"
TESTS_DIR = REPO_DIR / "tests"  # the helper modules: on PYTHONPATH in subprocess runs

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

# TINY for the command line (src/train.py in a subprocess), with a small DDIM sample grid.
CLI_TINY = [o for o in TINY if not o.startswith("trainer.enable")] + [
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.batch_size=4",
    "sampler=ddim",
    "sampler.steps=5",
]

# A micro U-Net on 8x8 digits with the default recipe's shape (batch 128: 12 batches an epoch),
# and everything a resume must restore exactly happening between its steps; RngProbe records the
# global RNG streams after every step (tests/run/test_resume_exact.py).
MICRO = [
    *(o for o in TINY if not o.startswith(("data.batch_size", "trainer.limit_val_batches"))),
    "data.batch_size=128",  # the default recipe's shape: 12 batches an epoch of digits
    "data.image_size=8",
    "data.random_flip=true",  # flips drawn at collate time, one batch ahead of the model
    "model.model_channels=8",
    "model.channel_mult=[1]",
    "model.attention_resolutions=[]",
    "model.norm_groups=4",
    "model.dropout=0.1",  # dropout draws from the global RNG
    "lr_scheduler.warmup_steps=50",  # the warmup is still running at every split
    "trainer.val_check_interval=5",  # validation between steps
    "trainer.limit_val_batches=1",
    "callbacks.sample_grid.every_n_steps=7",  # sample grids between steps
    "callbacks.sample_grid.num_samples=2",
    "callbacks.sample_grid.batch_size=2",
    "callbacks.sample_grid.strip_seeds=[0]",
    "~callbacks.forward_picture",
    "callbacks.sample_grid.at_train_end=false",
    "sampler.steps=2",
    "callbacks.posthoc_ema.every_n_steps=5",  # post-hoc EMA snapshots between steps
    "+callbacks.probe._target_=run_utils.RngProbe",
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


def compose_group(group: str, name: str) -> DictConfig:
    """One option of a config group composed on its own (``conf/<group>/<name>.yaml`` with its
    own defaults list, e.g. a sampler's ``base/default``), as a node to instantiate."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=f"{CONF_DIR}/{group}", version_base="1.3"):
        return compose(config_name=name)
