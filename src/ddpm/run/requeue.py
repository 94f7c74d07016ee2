"""Who requeues a job that a signal stopped: exactly one mechanism, after ``last.ckpt`` is written.

* SIGUSR2 under submitit (hydra-submitit-launcher): submitit's handler, which was in charge before
  training started, is called once the run is saved and cleaned up. It pickles the job again and
  requeues it (``scontrol requeue`` on SLURM; exit code 144, which the local executor restarts),
  and the requeued job finds its own checkpoints (:func:`ddpm.run.directory.requeued_job`).
* SIGUSR1 with Lightning's SLURM auto-requeue: Lightning's handler would write ``hpc_ckpt_*.ckpt``
  from inside the signal handler, wherever the step happens to be; it is not run. Instead rank 0
  requeues the job with the same ``scontrol requeue <job id>`` Lightning uses.
* Anything else (SIGTERM, Ctrl+C, no scheduler): no requeue; the process exits with 128 + signal.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from typing import Any

from ddpm.utils.distributed import is_launch_rank_zero

log = logging.getLogger(__name__)

_LIGHTNING = ("pytorch_lightning.", "lightning.pytorch.", "lightning_fabric.", "lightning.fabric.")


def _module(handler: Any) -> str:
    return getattr(handler, "__module__", None) or type(handler).__module__


def _handlers(handler: Any) -> list[Any]:
    """The handlers inside Lightning's ``_HandlersCompose`` (or ``[handler]``)."""
    inner = getattr(handler, "signal_handlers", None)
    return (
        list(inner) if _module(handler).startswith(_LIGHTNING) and inner is not None else [handler]
    )


def is_lightning_slurm_requeue(handler: Any) -> bool:
    """Lightning's SLURM auto-requeue handler (``SLURMEnvironment(auto_requeue=True)``)."""
    return _module(handler).startswith(_LIGHTNING) and "slurm" in getattr(handler, "__name__", "")


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` for array jobs), as Lightning."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """``scontrol requeue <this job>`` from global rank 0; whether it succeeded."""
    job = slurm_job_id()
    if not is_launch_rank_zero() or job is None or not re.fullmatch(r"[0-9_]+", job):
        return False
    try:
        result = subprocess.call(["scontrol", "requeue", job], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not requeue SLURM job %s: %s", job, e)
        return False
    if result != 0:
        log.warning("scontrol requeue %s failed with exit code %s", job, result)
        return False
    log.info("requeued SLURM job %s", job)
    return True


def hand_over(signum: int, previous_handler: Any) -> None:
    """Let the mechanism that handled ``signum`` before training started do its part now that the
    run is saved: requeue (see the module docstring). May not return (submitit exits)."""
    for handler in _handlers(previous_handler):
        if not callable(handler) or handler is signal.default_int_handler:
            continue  # SIG_DFL / SIG_IGN / Python's KeyboardInterrupt
        if is_lightning_slurm_requeue(handler):
            requeue_slurm_job()
        elif not _module(handler).startswith(_LIGHTNING):  # e.g. submitit's
            handler(signum, None)
