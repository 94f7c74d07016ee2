"""The run directory: one run per directory, and a record of which scheduler jobs trained in it (so
a requeued job recognises its own run). One live process per run: :mod:`ddpm.run.lock`."""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime
from pathlib import Path

from ddpm.errors import ConfigError
from ddpm.run import resume_command
from ddpm.run.checkpoint_files import checkpoint_files, inside
from ddpm.utils.distributed import is_launch_rank_zero

log = logging.getLogger(__name__)

RECORD_FILE = "run.json"
LAUNCHES_DIR = "launches"


def scheduler_job_id() -> str | None:
    """The id a scheduler keeps when it requeues a job: SLURM's job id (``<array job>_<task>`` for
    array jobs) or the id of a submitit local job; None outside a scheduler."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("SUBMITIT_LOCAL_JOB_ID"):
        return f"submitit-local:{env['SUBMITIT_LOCAL_JOB_ID']}"
    return None


def read_record(run_dir: Path) -> dict:
    """``<run_dir>/run.json``: ``{"jobs": [scheduler job ids that trained here]}`` (empty if absent)."""
    try:
        record = json.loads((run_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {"jobs": []}
    return record if isinstance(record, dict) else {"jobs": []}


def record_job(run_dir: Path) -> None:
    """Add this process's scheduler job id to the run's record (rank 0, under the lock)."""
    job = scheduler_job_id()
    record = read_record(run_dir)
    if job is None or job in record.get("jobs", []):
        return
    record["jobs"] = [*record.get("jobs", []), job]
    tmp = run_dir / (RECORD_FILE + ".partial")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run_dir / RECORD_FILE)


def requeued_job(run_dir: Path) -> bool:
    """Is this process a requeued (or restarted) scheduler job whose run is ``run_dir``? True when
    the directory holds checkpoints and its record names this very job id: SLURM and submitit
    keep the id across a requeue, and hydra-submitit-launcher re-runs the job in the same
    directory."""
    job = scheduler_job_id()
    return (
        job is not None
        and run_dir.is_dir()
        and job in read_record(run_dir).get("jobs", [])
        and bool(checkpoint_files(run_dir))
    )


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a run (its Hydra record or checkpoints)."""
    return run_dir.is_dir() and ((run_dir / ".hydra").is_dir() or bool(checkpoint_files(run_dir)))


# This process's launch record directory of each run directory (one per process: a requeued job
# is a new process and gets its own, whatever time its pickled config remembers).
_LAUNCH_SUBDIRS: dict[str, str] = {}


def launch_subdir(output_dir: str) -> str:
    """Where this launch's Hydra record (``.hydra/``) and log go, relative to the run directory:
    ``""`` for a new run, ``launches/<time>/`` when the directory already holds a run (a resume,
    a requeue, or a launch that will be refused), so that no launch rewrites the run's own record.
    The time is this process's start of the launch, so every launch (every requeue too) keeps its
    own record; the answer is fixed on the first call, so the record and the log agree. The
    OmegaConf resolver ``${ddpm_launch_subdir:dir}`` (``conf/hydra/default.yaml``). DDP processes
    other than the first (``hydra.output_subdir=null``) log at the top."""
    key = os.path.abspath(output_dir)
    if key not in _LAUNCH_SUBDIRS:
        sub = ""
        if is_launch_rank_zero() and holds_run(Path(output_dir)):
            stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
            # the log file is opened before Hydra writes its record here
            (Path(output_dir) / LAUNCHES_DIR / stamp).mkdir(parents=True, exist_ok=True)
            sub = f"{LAUNCHES_DIR}/{stamp}/"
        _LAUNCH_SUBDIRS[key] = sub
    return _LAUNCH_SUBDIRS[key]


def end_launch_record(output_dir: str | os.PathLike) -> None:
    """The launch into ``output_dir`` is over: a later launch in this process (the Python API,
    a notebook) decides its own record afresh (:func:`launch_subdir`)."""
    _LAUNCH_SUBDIRS.pop(os.path.abspath(output_dir), None)


def check_run_dir(run_dir: Path, ckpt_path: str | None) -> None:
    """A run never writes into another run's directory."""
    if not run_dir.is_dir() or not checkpoint_files(run_dir):
        return
    if ckpt_path is None:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints. Resume it with "
            f"{resume_command(run_dir)}, or start a new run without run_dir."
        )
    if not inside(ckpt_path, run_dir):
        raise ConfigError(
            f"ckpt_path={ckpt_path} belongs to another run, but {run_dir} already holds a run "
            "with checkpoints of its own: drop run_dir to continue from that checkpoint in a new "
            f"directory, or resume this directory's run: {resume_command(run_dir)}"
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


def warn_if_disk_low(directory: Path, n_bytes: int) -> None:
    """Warn when the free space cannot hold a few checkpoints of a network of ``n_bytes``
    (weights + Adam moments + EMA: ~4 copies per checkpoint, 3 checkpoints)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < 4 * n_bytes * 3:
        log.warning(
            "only %.1f MB free in %s; a checkpoint takes ~%.1f MB: saving may fail",
            free / 2**20,
            directory,
            4 * n_bytes / 2**20,
        )
