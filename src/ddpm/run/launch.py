"""Start-up of a training launch: lock the run directory, decide what the launch continues, refuse
what it must not do, and only then touch the run directory."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ddpm.checkpoint import CONFIG_KEY
from ddpm.config import sampler_problems
from ddpm.errors import ConfigError
from ddpm.loggers import carry_over_wandb_id
from ddpm.run.checkpoint_files import (
    find_checkpoint,
    load_checkpoint,
    remove_partial_files,
    resolve_ckpt_path,
    source_run_dir,
)
from ddpm.run.directory import (
    check_run_dir,
    check_writable,
    end_launch_record,
    record_job,
    requeued_job,
)
from ddpm.run.lock import run_dir_lock
from ddpm.run.resume import (
    check_not_finished,
    check_resumable_config,
    restore_run_config,
    run_finished,
)
from ddpm.utils.distributed import is_launch_rank_zero

log = logging.getLogger(__name__)


@dataclass
class Launch:
    """What a launch does: train ``cfg`` in ``run_dir``, from ``ckpt_path`` (None: from scratch);
    ``finished``: nothing, the run it was requeued into already finished."""

    cfg: DictConfig
    run_dir: Path
    ckpt_path: str | None = None
    requeued: bool = False
    checkpoint: dict[str, Any] | None = None  # memory-mapped, for the weights check
    finished: bool = False


@contextlib.contextmanager
def start_launch(cfg: DictConfig, run_dir: Path) -> Iterator[Launch]:
    """The launch (:func:`prepare_launch`), for the whole fit. Rank 0 first takes the run
    directory's lock (:mod:`ddpm.run.lock`), so that what it resumes (``ckpt_path=last`` or
    ``auto``, a requeue) is read from a directory no other live process writes; then it records
    this scheduler job in the run's record, removes the ``*.partial`` files of a killed save and
    carries the W&B run over."""
    if not is_launch_rank_zero():
        yield prepare_launch(cfg, run_dir)
        return
    check_writable(run_dir)
    try:
        with run_dir_lock(run_dir):
            launch = prepare_launch(cfg, run_dir)
            if not launch.finished:
                record_job(run_dir)
            if launch.ckpt_path is not None and not launch.finished:
                remove_partial_files(run_dir / "checkpoints")  # no other writer (lock)
                carry_over_wandb_id(launch.cfg, run_dir, launch.ckpt_path)
            yield launch
    finally:
        end_launch_record(run_dir)


def prepare_launch(cfg: DictConfig, run_dir: Path) -> Launch:
    """Resolve what the launch resumes (``ckpt_path``, or a requeued job's own run), check the run
    directory, and restore the run's config: :class:`~ddpm.errors.ConfigError` before anything is
    written when the launch must not run. A finished run refuses a resume (saying how to extend
    it), except in the job that was requeued into it (a time-limit signal during the final
    sample grid): that job has nothing left to do, and succeeds."""
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
    if requeued and run_finished(cfg, ckpt):
        log.info("requeued job: the run in %s already finished; nothing left to do", run_dir)
        return Launch(cfg, run_dir, ckpt_path, requeued, ckpt, finished=True)
    check_not_finished(cfg, ckpt, source_run_dir(ckpt_path))
    problems = sampler_problems(cfg)
    if problems:
        raise ConfigError(
            "the resumed run cannot sample with these settings:\n  - " + "\n  - ".join(problems)
        )
    return Launch(cfg, run_dir, ckpt_path, requeued, ckpt)
