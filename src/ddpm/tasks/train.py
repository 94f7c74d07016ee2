"""``train(cfg)``: build data, network, diffusion and Trainer from a composed config and fit.

What a launch does before and after the fit (what happens when a run is killed and restarted is
told in :mod:`ddpm.run`):

1. The config is validated (one message per problem).
2. Rank 0 locks the run directory for the whole fit (:func:`ddpm.run.launch.start_launch`);
   then :func:`ddpm.run.launch.prepare_launch` decides what the launch continues (``ckpt_path``,
   or a requeued job's own run), checks the run directory and restores the run's own config,
   all before anything is written there, and the scheduler job is recorded. A job requeued into
   a run that already finished does nothing and succeeds.
3. ``trainer.fit(..., weights_only=True)``: no pickled code is executed from a checkpoint.
4. In a sweep that optimises ``optimized_metric`` (Optuna), the metric describes the final
   weights: validated once more at the end if the last validation was at an earlier step.
5. A stop signal ends with ``last.ckpt`` written, ``metrics.json`` recording it, the requeue
   handed over (:func:`ddpm.run.requeue.hand_over`) and :class:`TrainingInterrupted` re-raised
   (exit code 128 + signal).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.callbacks.preemption import PreemptionCheckpoint, TrainingInterrupted
from ddpm.checkpoint import init_weights
from ddpm.config import validate_train_config
from ddpm.errors import ConfigError
from ddpm.loggers import continue_loggers, finish_wandb, log_hyperparameters
from ddpm.module import DiffusionModule
from ddpm.run import resume_command
from ddpm.run.directory import warn_if_disk_low
from ddpm.run.launch import Launch, start_launch
from ddpm.run.requeue import hand_over
from ddpm.run.resume import check_weights_fit
from ddpm.tasks.common import instantiate_dict, launch_dir, metrics_dict, output_dir, write_json
from ddpm.utils.config_tree import print_config_tree, to_plain
from ddpm.utils.distributed import is_launch_rank_zero

log = logging.getLogger(__name__)


def record_classes(cfg: DictConfig, datamodule: Any) -> None:
    """With ``data.conditional=true`` write the data's classes into ``cfg`` (``data.num_classes``,
    which the model configs read, and ``data.class_names``; stored with the run config), and
    check the network is conditional on exactly those classes; without it, that it is not."""
    model_k = OmegaConf.select(cfg, "model.num_classes", default=None)
    if not cfg.data.get("conditional"):
        if model_k:
            raise ConfigError(
                f"model.num_classes={model_k} makes the network class-conditional, but the data "
                "is not: set data.conditional=true (the classes then come from the data)"
            )
        return
    k, names = datamodule.num_classes, datamodule.class_names
    with open_dict(cfg):
        cfg.data.num_classes = k
        cfg.data.class_names = list(names)
    model_k = OmegaConf.select(cfg, "model.num_classes", default=None)
    if model_k != k:
        raise ConfigError(
            f"data.conditional=true: the data has {k} classes but model.num_classes={model_k}; "
            "the model config should read them from the data: "
            "num_classes: ${oc.select:data.num_classes,null}"
        )
    log.info("class-conditional on %d classes: %s", k, ", ".join(map(str, names)))


def _order_callbacks(callbacks: list) -> list:
    """Preemption checkpoints after the ModelCheckpoints (so ``trainer.checkpoint_callback`` is a
    ModelCheckpoint and a checkpoint written at the same step is not written twice)."""
    return sorted(callbacks, key=lambda cb: isinstance(cb, PreemptionCheckpoint))


def train(cfg: DictConfig) -> dict[str, float]:
    """Train; returns the final metrics (``trainer.callback_metrics``) as floats."""
    validate_train_config(cfg)
    with start_launch(cfg, output_dir(cfg)) as launch:
        if launch.finished:
            return _finished_metrics(launch)
        return _fit(launch)


def _finished_metrics(launch: Launch) -> dict[str, float]:
    """What a launch that has nothing to do returns: the run's final metrics (``metrics.json``,
    without the signal that interrupted its end-of-training work)."""
    try:
        metrics = json.loads((launch.run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    metrics.pop("interrupted_by_signal", None)
    step = (launch.checkpoint or {}).get("global_step", 0)
    return {**metrics, "global_step": float(step)}


def optimising_sweep() -> bool:
    """Whether this launch is a job of a sweep that optimises its return value (a Hydra sweeper
    other than the basic one, e.g. ``hparams_search=optuna``)."""
    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    target = str(hydra_cfg.sweeper.get("_target_", ""))
    return hydra_cfg.mode == RunMode.MULTIRUN and not target.endswith("BasicSweeper")


def _validate_final_weights(
    trainer: pl.Trainer, module: DiffusionModule, datamodule: Any, metric: str | None
) -> None:
    """Make ``metric`` describe the final weights: when the fit's last validation was at an
    earlier step (or there was none), validate once more."""
    if not metric or trainer.limit_val_batches == 0:
        return
    if metric in trainer.callback_metrics and module.validated_step == trainer.global_step:
        return
    log.info("validating the final weights (step %d) for %s", trainer.global_step, metric)
    trainer.validate(module, datamodule=datamodule, verbose=False)


@contextlib.contextmanager
def _resume_quiet(trainer: pl.Trainer, resuming: bool) -> Iterator[None]:
    """A resume continues in the run's own checkpoint directories: Lightning's "Checkpoint
    directory <dir> exists and is not empty." (ModelCheckpoint's setup) is expected there, so that
    message, for those directories, is not shown; a new run into a used directory still warns."""
    with warnings.catch_warnings():
        if resuming:
            for cb in trainer.checkpoint_callbacks:
                if getattr(cb, "dirpath", None):
                    message = f"Checkpoint directory {cb.dirpath} exists and is not empty."
                    warnings.filterwarnings("ignore", message=re.escape(message))
        yield


def _fit(launch: Launch) -> dict[str, float]:
    cfg, run_dir, ckpt_path = launch.cfg, launch.run_dir, launch.ckpt_path
    print_config_tree(cfg, launch_dir(run_dir))  # rank 0: on screen and in this launch's record
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    record_classes(cfg, datamodule)
    run_config = to_plain(cfg)
    module = DiffusionModule.from_config(cfg, run_config)
    resumed_step = None
    if launch.checkpoint is not None:
        resumed_step = int(launch.checkpoint.get("global_step", 0))
        check_weights_fit(module, launch.checkpoint, str(ckpt_path))
        launch.checkpoint = None  # release the memory map
    elif cfg.get("init_from"):
        used_ema = init_weights(module.net, cfg.init_from)
        log.info(
            "network initialised from %s (%s weights)", cfg.init_from, "EMA" if used_ema else "raw"
        )
    if is_launch_rank_zero():
        warn_if_disk_low(run_dir, sum(p.numel() * p.element_size() for p in module.parameters()))
    callbacks = _order_callbacks(instantiate_dict(cfg.get("callbacks")))
    loggers = instantiate_dict(cfg.get("logger"))
    continue_loggers(loggers, resumed_step)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_hyperparameters(trainer, module, run_config)

    interrupted: TrainingInterrupted | None = None
    try:
        # weights_only=True: a downloaded checkpoint cannot run code (everything we store is
        # tensors and plain data; see ddpm.module.DiffusionModule.on_save_checkpoint).
        with _resume_quiet(trainer, ckpt_path is not None):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if optimising_sweep():
            _validate_final_weights(trainer, module, datamodule, cfg.get("optimized_metric"))
    except TrainingInterrupted as e:
        interrupted = e
    except BaseException:
        finish_wandb(trainer, exit_code=1)
        raise
    finish_wandb(trainer, exit_code=0, preempted=interrupted is not None)

    metrics = metrics_dict(trainer)
    metrics["global_step"] = float(trainer.global_step)
    metric = cfg.get("optimized_metric")
    if interrupted is None and metric and metric not in metrics and optimising_sweep():
        raise ConfigError(
            f"optimized_metric={metric} was not logged by this run, so the sweep has nothing to "
            f"optimise (logged: {sorted(metrics)}). Pick one of those, or make sure validation "
            "runs (trainer.limit_val_batches > 0; val/loss_ema needs the EMA callback)."
        )
    if interrupted is not None:
        metrics["interrupted_by_signal"] = float(interrupted.signum)
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        log.info("run directory: %s", run_dir)
    if interrupted is not None:
        if trainer.is_global_zero:
            log.warning("%s; resume with: %s", interrupted, resume_command(run_dir))
        hand_over(interrupted.signum, interrupted.previous_handler)
        raise interrupted
    return metrics
