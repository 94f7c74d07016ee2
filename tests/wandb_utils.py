"""What a W&B run wrote, read from its offline run files with W&B's own reader (``wandb leet
inspect --json``, which parses the run's ``.wandb`` transaction log): no network, no server.
That reader came with wandb 0.28; on an older wandb (the dependency floor, ``make test-floors``)
the tests that read run files skip."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

READER_WANDB = "0.28"


def offline_runs(directory: Path, run_id: str = "") -> list[Path]:
    """The offline run directories under ``directory`` (recursively) of ``run_id`` (any when
    empty), oldest first (their names start with the start time)."""
    found = directory.rglob(f"offline-run-*{run_id}")
    return sorted((p for p in found if p.is_dir()), key=lambda p: p.name)


def records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of one offline run, as W&B reads them."""
    if Version(version("wandb")) < Version(READER_WANDB):
        pytest.skip(f"reading W&B run files needs `wandb leet inspect` (wandb>={READER_WANDB})")
    (log,) = run_dir.glob("run-*.wandb")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def history(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The logged rows (``run.log`` calls), in order."""
    return [r["history"]["item"] for r in recs if r["type"] == "history"]


def summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's summary after all its records (later updates win, key by key)."""
    out: dict[str, Any] = {}
    for r in recs:
        if r["type"] == "summary":
            out.update(r["summary"].get("update", {}))
            for key in r["summary"].get("remove", []) or []:
                out.pop(key, None)
    return out


def run_record(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's own record: id, project, group, job type, tags, ..."""
    return next(r["run"] for r in recs if r["type"] == "run")


def artifacts(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The artifacts the run logged (name, aliases, metadata, files)."""
    return [r["artifact"] for r in recs if r["type"] == "artifact"]
