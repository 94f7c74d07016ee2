"""``train(cfg)``: build data, network, diffusion and Trainer from a composed config and fit."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from ddpm.config import ConfigError, resolve_ckpt_path, validate_train_config
from ddpm.module import DiffusionModule
from ddpm.tasks.common import instantiate_dict, metrics_dict, output_dir, to_plain, write_json

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, run_config: dict | None = None) -> DiffusionModule:
    """The LightningModule described by ``cfg`` (network, diffusion, loss, optimizer)."""
    diffusion = instantiate(cfg.diffusion)
    net = instantiate(cfg.model)
    loss = instantiate(cfg.objective.loss)
    lr_scheduler = instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
    return DiffusionModule(
        net=net,
        diffusion=diffusion,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=lr_scheduler,
        timestep_sampler=cfg.objective.get("timestep_sampler", "uniform"),
        train_seed=int(cfg.seed),
        compile=bool(cfg.get("compile", False)),
        run_config=run_config,
    )


def _check_fresh_run_dir(cfg: DictConfig, ckpt_path: str | None) -> None:
    """Refuse to start a new run inside a directory that already holds one."""
    ckpt_dir = output_dir(cfg) / "checkpoints"
    if ckpt_path is None and ckpt_dir.is_dir() and any(ckpt_dir.glob("*.ckpt")):
        raise ConfigError(
            f"{output_dir(cfg)} already holds a run with checkpoints. Resume it with "
            f"ckpt_path=last run_dir={output_dir(cfg)}, or start a new run without run_dir."
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Train; returns the final metrics (``trainer.callback_metrics``) as floats."""
    validate_train_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("run_dir"))
    _check_fresh_run_dir(cfg, ckpt_path)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    run_config = to_plain(cfg)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, run_config)
    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in trainer.loggers:
        lg.log_hyperparams(run_config)

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = metrics_dict(trainer)
    metrics["global_step"] = float(trainer.global_step)
    if trainer.is_global_zero:
        write_json(output_dir(cfg) / "metrics.json", metrics)
        log.info("run directory: %s", output_dir(cfg))
    return metrics
