"""The checkpoint files of a run directory: which exist, which is newest, which one a launch
resumes from (``ckpt_path=last`` / ``auto`` / a file, resolved before anything is built, and
never silently nothing: Lightning's own ``"last"`` trains from scratch in a fresh directory), and
the ``*.partial`` files an interrupted save leaves behind."""

from __future__ import annotations

import contextlib
import glob
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ddpm.checkpoint import CheckpointError, open_checkpoint
from ddpm.errors import ConfigError
from ddpm.run import resume_command

# What an atomic save writes before it renames the file (:mod:`ddpm.callbacks.atomic_checkpoint`).
PARTIAL_SUFFIX = ".partial"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Open a training checkpoint the way a resume will (:func:`ddpm.checkpoint.open_checkpoint`:
    weights only, memory-mapped, so cheap); :class:`ConfigError` if the file is missing, truncated,
    not a training checkpoint, or holds objects other than tensors and plain data."""
    try:
        ckpt = open_checkpoint(path, mmap=True)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if "state_dict" not in ckpt:
        raise ConfigError(f"{path} is not a training checkpoint (no 'state_dict')")
    return ckpt


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """``global_step`` and ``epoch`` of a checkpoint (see :func:`load_checkpoint`)."""
    ckpt = load_checkpoint(path)
    return {"global_step": int(ckpt.get("global_step", 0)), "epoch": int(ckpt.get("epoch", 0))}


def checkpoint_files(run_dir: str | os.PathLike) -> list[str]:
    """Every ``*.ckpt`` file under ``run_dir`` (not the ``*.partial`` of an interrupted save)."""
    pattern = str(Path(run_dir) / "**" / "*.ckpt")
    return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]


def newest_first(paths: Iterable[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """(the loadable checkpoints among ``paths``, newest first; one message per file that cannot
    be loaded). Newest = highest ``global_step`` stored in the file; ties go to ``last.ckpt``,
    then to the newer file. A file that vanished since it was listed (rotated away by a run
    still writing there) is neither: it is simply not there."""
    ranked, broken = [], []
    for p in map(os.fspath, paths):
        try:
            info = checkpoint_info(p)
            mtime = os.path.getmtime(p)
        except ConfigError as e:
            if os.path.exists(p):
                broken.append(str(e))
            continue
        except FileNotFoundError:
            continue
        is_last = os.path.basename(p) == "last.ckpt"
        ranked.append((info["global_step"], is_last, mtime, p))
    return [p for *_, p in sorted(ranked, reverse=True)], broken


def find_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """The newest loadable checkpoint of a run directory (:func:`newest_first`), or None. Files
    that cannot be loaded (e.g. corrupted on disk) are skipped with a warning."""
    ranked, broken = newest_first(checkpoint_files(run_dir))
    if broken:
        warnings.warn("skipping unloadable checkpoint(s):\n  " + "\n  ".join(broken), stacklevel=2)
    return ranked[0] if ranked else None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | None) -> str | None:
    """Turn the user's ``ckpt_path`` into a checkpoint file, or fail clearly.

    * ``null``: a new run (or, for a requeued job, see :func:`ddpm.run.directory.requeued_job`).
    * ``last``: the newest checkpoint of ``run_dir``; an error if there is none.
    * ``auto``: the newest checkpoint of ``run_dir`` if there is one, else a new run there (for
      job scripts that are re-run after preemption).
    * a path: that file, which must load with ``torch.load(weights_only=True)``.
    """
    if ckpt_path in (None, "", "null", "None"):
        return None
    ckpt_path = str(ckpt_path)
    if ckpt_path in ("last", "auto"):
        if not run_dir:
            example = resume_command(
                "outputs/train/runs/2026-01-01_12-00-00_000000", ckpt_path=ckpt_path
            )
            raise ConfigError(
                f"ckpt_path={ckpt_path} needs the run to resume: add run_dir=<that run's "
                f"directory> (e.g. {example})"
            )
        if ckpt_path == "last" and not os.path.isdir(run_dir):
            raise ConfigError(f"ckpt_path=last: run_dir={run_dir} does not exist")
        found = find_checkpoint(run_dir) if os.path.isdir(run_dir) else None
        if found is None and ckpt_path == "last":
            raise ConfigError(
                f"ckpt_path=last: no checkpoint (*.ckpt) found under {run_dir}. Nothing to resume; "
                "drop ckpt_path to start a new run (or use ckpt_path=auto)."
            )
        return found
    if not os.path.isfile(ckpt_path):
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    checkpoint_info(ckpt_path)
    return ckpt_path


def source_run_dir(ckpt_path: str | os.PathLike) -> Path:
    """The run directory a checkpoint file belongs to (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    parent = Path(ckpt_path).resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def inside(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """Whether ``path`` lies under ``directory``."""
    try:
        Path(path).resolve().relative_to(Path(directory).resolve())
        return True
    except ValueError:
        return False


def remove_partial_files(dirpath: str | os.PathLike) -> list[Path]:
    """Delete stale ``*.partial`` files left by a process killed mid-save; returns them."""
    removed = []
    d = Path(dirpath)
    if d.is_dir():
        for p in d.glob(f"*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
