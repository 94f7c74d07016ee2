"""What ``evaluate.py`` and ``sample.py`` find goes to the tracker, next to the training curves.

``tracker.run=training`` (the default): into the W&B run of the training run the checkpoint
came from, resumed by the identity its run directory keeps (``<run dir>/wandb_run.json``:
id, project, entity, group), with every key under ``eval/`` (``eval/fid``, ``eval/nll_bpd``,
``eval/samples``, ...) at the checkpoint's step on W&B's ``trainer/global_step`` axis, and the
best value of each score as its summary. ``tracker.run=own``: a run of its own (job type
``evaluate`` / ``sample``, the task's config) in the training run's group (the training run's
id when it had none). ``tracker.run=none``: files only. Offline as online (``tracker.mode``,
``WANDB_MODE`` wins): an offline task run writes its part of the run under its own directory
and prints the ``wandb sync`` command that uploads it. Global rank 0 only; never prompts, never
fails the task (a tracker that cannot start is a warning).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm.errors import ConfigError
from ddpm.loggers import (
    STEP_METRIC,
    define_summaries,
    env_settings,
    init_wandb_run,
    read_identity,
    resolve_wandb_mode,
)
from ddpm.run.checkpoint_files import source_run_dir
from ddpm.utils.distributed import rank_and_world

log = logging.getLogger(__name__)

RUNS = ("training", "own", "none")
PREFIX = "eval/"


@dataclass
class TaskRun:
    """A started W&B run of a task: :meth:`log` scores and :meth:`log_image` pictures at the
    checkpoint's ``step``, :meth:`finish` when done."""

    run: Any
    step: int
    defined: set[str] = field(default_factory=set)

    def log(self, results: Mapping[str, Any]) -> None:
        """The numbers among ``results`` under ``eval/`` (``test/nll_bpd`` as
        ``eval/nll_bpd``)."""
        metrics = {
            PREFIX + key.rpartition("/")[2]: float(value)
            for key, value in results.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if metrics:
            define_summaries(self.run, metrics, self.defined)
            self.run.log({**metrics, STEP_METRIC: self.step})

    def log_image(self, key: str, path: str | os.PathLike) -> None:
        import wandb

        self.run.log({PREFIX + key: wandb.Image(str(path)), STEP_METRIC: self.step})

    def finish(self, exit_code: int = 0) -> None:
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:  # a tracker never turns a result into a crash
            log.warning("could not finish the W&B run: %s: %s", type(e).__name__, e)


def check_tracker(tracker: Mapping[str, Any] | None) -> None:
    """A clear error for a bad ``tracker.run`` before any work."""
    run = (tracker or {}).get("run", "none")
    if run not in RUNS:
        raise ConfigError(f"tracker.run must be one of {list(RUNS)}, got {run!r}")


def training_run_dir(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The run directory a checkpoint belongs to (None without a checkpoint)."""
    return None if not ckpt_path else source_run_dir(Path(ckpt_path).resolve())


def start_task_run(
    tracker: Mapping[str, Any] | None,
    task: str,
    ckpt_path: str | os.PathLike | None,
    step: int,
    config: dict[str, Any],
    out_dir: Path,
) -> TaskRun | None:
    """Start the W&B run ``tracker`` asks for (see the module docstring) on global rank 0; None
    on the other ranks, with ``tracker.run=none``, or when there is nothing to log into."""
    tracker = dict(tracker or {})
    check_tracker(tracker)
    which = tracker.get("run", "none")
    if which == "none" or rank_and_world()[0] != 0:
        return None
    run_dir = training_run_dir(ckpt_path)
    identity = read_identity(run_dir) if run_dir is not None else {}
    if which == "training" and not identity:
        where = f"{run_dir} has" if run_dir is not None else "without ckpt_path there is"
        log.info(
            "tracker.run=training: %s no W&B run (wandb_run.json); %s logs to its files only "
            "(tracker.run=own starts a run of its own)",
            where,
            task,
        )
        return None
    mode, reason = resolve_wandb_mode(str(tracker.get("mode", "auto")))
    if mode == "disabled":
        return None
    init: dict[str, Any] = {
        "project": identity.get("project") or "ddpm",
        "entity": identity.get("entity"),
        "dir": str(out_dir),
        "reinit": "finish_previous",
    }
    if which == "training":
        init.update(id=identity["id"], resume="allow")
    else:
        group = identity.get("group") or identity.get("id")
        name = f"{task}-{identity['id']}" if identity else None
        init.update(job_type=task, group=group, name=name, config=config)
        init.update({k: v for k, v in env_settings().items() if k != "id"})
    import wandb

    settings = wandb.Settings(console="off", x_disable_stats=True, init_timeout=90.0)
    try:
        Path(init["dir"]).mkdir(parents=True, exist_ok=True)
        run = init_wandb_run(init, mode, settings)
    except Exception as e:
        log.warning(
            "%s: could not start W&B (%s: %s); results stay in files", task, type(e).__name__, e
        )
        return None
    run.define_metric(STEP_METRIC)
    run.define_metric(PREFIX + "*", step_metric=STEP_METRIC, step_sync=True)
    what = f"the training run {run.id}" if which == "training" else f"run {run.id} ({run.group})"
    if run.offline:
        log.info(
            "%s logs to W&B %s offline (%s); upload with: wandb sync %s/wandb/offline-run-*-%s",
            task,
            what,
            reason or "offline",
            init["dir"],
            run.id,
        )
    else:
        log.info("%s logs to W&B %s: %s", task, what, run.url)
    return TaskRun(run, int(step))
