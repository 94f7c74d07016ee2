"""FID / IS for ``evaluate.py``: the training-time :class:`FIDCallback`, run once through a
single-device Lightning ``validate`` so both share generation, caching and metric code."""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.callbacks.fid import FIDCallback
from ddpm.checkpoint import LoadedModel
from ddpm.module import DiffusionModule
from ddpm.tasks.sample import build_sampler


class _RunOnce(pl.Callback):
    """Runs the FID callback once, after a one-batch validation has attached everything."""

    def __init__(self, fid: FIDCallback) -> None:
        self.fid = fid
        self.metrics: dict[str, float] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fid.setup(trainer, pl_module, "fit")
        self.metrics = self.fid.evaluate(trainer, pl_module)


def fid_is_metrics(
    loaded: LoadedModel, dm: Any, cfg: DictConfig, device: torch.device
) -> dict[str, float]:
    """``test/fid`` (and ``test/is``) of ``cfg.fid.num_samples`` samples; {} (with one warning)
    when the Inception weights cannot be had."""
    fcfg = cfg.fid
    extractor = instantiate(fcfg.feature_extractor) if fcfg.get("feature_extractor") else None
    fid = FIDCallback(
        sampler=build_sampler(cfg.get("sampler"), loaded),
        every_n_steps=None,
        num_samples=int(fcfg.num_samples),
        batch_size=int(fcfg.batch_size),
        seed=int(cfg.seed),
        cache_dir=str(fcfg.cache_dir),
        reference_split=str(fcfg.reference_split),
        feature_extractor=extractor,
        feature_extractor_weights_path=fcfg.get("feature_extractor_weights_path"),
        progress=bool(cfg.get("progress", False)),
    )
    loss = instantiate(OmegaConf.create(loaded.config["objective"]["loss"]))
    module = DiffusionModule(loaded.net, loaded.diffusion, loss, optimizer=torch.optim.Adam)
    runner = _RunOnce(fid)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        callbacks=[runner],
        limit_val_batches=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.validate(module, datamodule=dm, verbose=False)
    if not runner.metrics:
        return {}
    return {k.replace("val/", "test/"): v for k, v in runner.metrics.items()}
