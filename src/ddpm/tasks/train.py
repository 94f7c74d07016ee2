"""``train(cfg)``: build data, network, diffusion and Trainer from a composed config and fit.

Reliability, in order of what happens:

1. The config is validated (one message per problem) and ``ckpt_path`` resolved (``last`` /
   ``auto`` / a file, opened with ``weights_only=True``) before anything is built.
2. The run directory is locked (rank 0 holds an ``flock`` on ``<run dir>/.lock`` while training);
   a new run refuses a directory that already holds checkpoints, and a resume refuses to write a
   different run's checkpoint into a directory that holds a run of its own.
3. Resuming from a checkpoint of another directory continues that run's W&B run.
4. ``trainer.fit(..., weights_only=True)``: no pickled code is executed from a checkpoint.
5. A stop signal ends with ``last.ckpt`` written and :class:`TrainingInterrupted` re-raised
   (exit code 128 + signal) after ``metrics.json`` recorded it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ddpm.callbacks.checkpoint import remove_partial_files
from ddpm.callbacks.preemption import PreemptionCheckpoint, TrainingInterrupted
from ddpm.config import ConfigError, _checkpoint_files, resolve_ckpt_path, validate_train_config
from ddpm.loggers import carry_over_wandb_id, finish_wandb, log_hyperparameters
from ddpm.module import DiffusionModule
from ddpm.tasks.common import instantiate_dict, metrics_dict, output_dir, to_plain, write_json
from ddpm.utils.config_tree import print_config_tree

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


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


def _is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0, judged from the environment before any Trainer
    exists (Lightning's DDP launcher, torchrun and SLURM set these for the other ranks)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def _inside(path: str, directory: Path) -> bool:
    try:
        Path(path).resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def check_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    """A run never writes into another run's directory."""
    existing = _checkpoint_files(run_dir) if run_dir.is_dir() else []
    if not existing:
        return
    if ckpt_path is None:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints. Resume it with "
            f"ckpt_path=last run_dir={run_dir}, or start a new run without run_dir."
        )
    if not _inside(ckpt_path, run_dir):
        raise ConfigError(
            f"ckpt_path={ckpt_path} belongs to another run, but {run_dir} already holds a run "
            "with checkpoints of its own: drop run_dir to continue from that checkpoint in a new "
            "directory, or resume this directory with ckpt_path=last."
        )


def check_writable(directory: Path) -> None:
    """Fail before any work when checkpoints could not be written at all."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"the output directory {directory} is not writable ({type(e).__name__}: {e}); "
            "choose another one with paths.log_dir=... or run_dir=..."
        ) from e


def warn_if_disk_low(directory: Path, module: DiffusionModule) -> None:
    """Warn when the free space cannot hold a few checkpoints (weights + Adam moments + EMA)."""
    import shutil

    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    need = 4 * n_bytes * 3  # ~4 copies of the weights per checkpoint, 3 checkpoints
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < need:
        log.warning(
            "only %.1f MB free in %s; a checkpoint takes ~%.1f MB: saving may fail",
            free / 2**20,
            directory,
            4 * n_bytes / 2**20,
        )


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<run_dir>/.lock`` (released when the process dies, even by
    SIGKILL): two live processes never train in the same directory."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = path.read_text().strip() or "unknown"
            raise ConfigError(
                f"{run_dir} is in use by another training process ({owner}); a run never writes "
                "into another run's directory. Wait for it to end or stop it first."
            ) from None
        except OSError as e:  # a file system without locks (some network file systems)
            log.warning("cannot lock %s (%s): concurrent runs in it are not detected", path, e)
        else:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _order_callbacks(callbacks: list) -> list:
    """Preemption checkpoints after the ModelCheckpoints (so ``trainer.checkpoint_callback`` is a
    ModelCheckpoint and a checkpoint written at the same step is not written twice)."""
    return sorted(callbacks, key=lambda cb: isinstance(cb, PreemptionCheckpoint))


def train(cfg: DictConfig) -> dict[str, float]:
    """Train; returns the final metrics (``trainer.callback_metrics``) as floats."""
    validate_train_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("run_dir"))
    run_dir = output_dir(cfg)
    check_run_dir(run_dir, ckpt_path)
    if _is_launch_rank_zero():
        check_writable(run_dir)
    lock = run_dir_lock(run_dir) if _is_launch_rank_zero() else contextlib.nullcontext()
    with lock:
        if ckpt_path is not None:
            log.info("resuming from %s", ckpt_path)
            if _is_launch_rank_zero():
                remove_partial_files(run_dir / "checkpoints")  # stale: no other writer (lock)
                carry_over_wandb_id(cfg, run_dir, ckpt_path)
        return _fit(cfg, run_dir, ckpt_path)


def _fit(cfg: DictConfig, run_dir: Path, ckpt_path: str | None) -> dict[str, float]:
    print_config_tree(cfg, run_dir)  # rank 0: on screen and in <run dir>/config_tree.log
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_config = to_plain(cfg)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, run_config)
    if _is_launch_rank_zero():
        warn_if_disk_low(run_dir, module)
    callbacks = _order_callbacks(instantiate_dict(cfg.get("callbacks")))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_hyperparameters(trainer, module, run_config)

    interrupted: TrainingInterrupted | None = None
    try:
        # weights_only=True: a downloaded checkpoint cannot run code (everything we store is
        # tensors and plain data; see ddpm.module.DiffusionModule.on_save_checkpoint).
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except TrainingInterrupted as e:
        interrupted = e
    except BaseException:
        finish_wandb(trainer, exit_code=1)
        raise
    finish_wandb(trainer, exit_code=0, preempted=interrupted is not None)

    metrics = metrics_dict(trainer)
    metrics["global_step"] = float(trainer.global_step)
    if interrupted is not None:
        metrics["interrupted_by_signal"] = float(interrupted.signum)
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        log.info("run directory: %s", run_dir)
    if interrupted is not None:
        if trainer.is_global_zero:
            log.warning(
                "%s; resume with: python src/train.py ckpt_path=last run_dir=%s",
                interrupted,
                run_dir,
            )
        raise interrupted
    return metrics
