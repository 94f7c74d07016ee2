"""Start-up of a training launch: decide what it continues, refuse what it must not do, and only
then touch the run directory."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ddpm.checkpoint import CONFIG_KEY
from ddpm.loggers import carry_over_wandb_id
from ddpm.run.checkpoint_files import (
    find_checkpoint,
    load_checkpoint,
    remove_partial_files,
    resolve_ckpt_path,
    source_run_dir,
)
from ddpm.run.directory import check_run_dir, check_writable, record_job, requeued_job, run_dir_lock
from ddpm.run.resume import check_not_finished, check_resumable_config, restore_run_config
from ddpm.utils.distributed import is_launch_rank_zero

log = logging.getLogger(__name__)


@dataclass
class Launch:
    """What a launch does: train ``cfg`` in ``run_dir``, from ``ckpt_path`` (None: from scratch)."""

    cfg: DictConfig
    run_dir: Path
    ckpt_path: str | None = None
    requeued: bool = False
    checkpoint: dict[str, Any] | None = None  # memory-mapped, for the weights check

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Rank 0: lock the run directory for the whole fit, record this scheduler job in the
        run's record, remove the ``*.partial`` files of a killed save, carry the W&B run over."""
        if not is_launch_rank_zero():
            yield
            return
        check_writable(self.run_dir)
        with run_dir_lock(self.run_dir):
            record_job(self.run_dir)
            if self.ckpt_path is not None:
                remove_partial_files(self.run_dir / "checkpoints")  # no other writer (lock)
                carry_over_wandb_id(self.cfg, self.run_dir, self.ckpt_path)
            yield


def prepare_launch(cfg: DictConfig, run_dir: Path) -> Launch:
    """Resolve what the launch resumes (``ckpt_path``, or a requeued job's own run), check the run
    directory, and restore the run's config: :class:`~ddpm.errors.ConfigError` before anything is
    written when the launch must not run."""
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.get("run_dir"))
    requeued = ckpt_path is None and requeued_job(run_dir)
    if requeued:
        ckpt_path = find_checkpoint(run_dir)
        log.info("requeued job: resuming its own run in %s from %s", run_dir, ckpt_path)
    check_run_dir(run_dir, ckpt_path)
    if ckpt_path is None:
        return Launch(cfg, run_dir)
    ckpt = load_checkpoint(ckpt_path)
    stored = ckpt.get(CONFIG_KEY)
    if isinstance(stored, dict):
        check_resumable_config(stored, cfg, ckpt_path)
        cfg = restore_run_config(cfg, stored, ckpt_path)
    else:
        log.warning("%s stores no run config: resuming with this command's config", ckpt_path)
    check_not_finished(cfg, ckpt, source_run_dir(ckpt_path))
    return Launch(cfg, run_dir, ckpt_path, requeued, ckpt)
