"""W&B as its users know it, and never a prompt or a hang: real (offline) W&B runs, a real
terminal (pty) where a login prompt would block, real 2-process DDP (gloo) for the run id."""

from __future__ import annotations

import csv
import json
import math
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm.callbacks.preemption import TrainingInterrupted
from ddpm.diffusion import LossSecondMomentTimestepSampler
from ddpm.loggers import RUN_ID_ENV, log_hyperparameters, read_identity, wandb_logger
from ddpm.module import DiffusionModule
from ddpm.tasks.train import train
from ddpm.utils.config_tree import to_plain
from hydra_utils import SRC_DIR, TINY, compose_cfg
from wandb_utils import artifacts, history, offline_runs, records, run_record, summary


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


NEVER_PROMPTS = """
import os, sys, time
import wandb
from ddpm.loggers import wandb_logger

def run(mode, save_dir):
    t0 = time.monotonic()
    logger = wandb_logger(mode=mode, save_dir=save_dir)
    logger.log_metrics({"loss": 1.0}, step=1)
    offline = logger.experiment.offline
    wandb.finish()
    print(f"PHASE {mode} offline={offline} seconds={time.monotonic() - t0:.1f}", flush=True)

run("auto", sys.argv[1])  # no credentials, WANDB_MODE unset
wandb.teardown()
os.environ["WANDB_API_KEY"] = "k" * 40  # credentials, for a server that is down
os.environ["WANDB_BASE_URL"] = sys.argv[3]
run("online", sys.argv[2])
"""


def test_no_credentials_or_a_dead_server_never_prompts_or_hangs(tmp_path: Path) -> None:
    """In a terminal (where W&B would ask for a key), with no credentials and WANDB_MODE unset,
    and then with a key for a self-hosted server on a closed port, runs go offline at once."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WANDB_") and k not in ("NETRC", RUN_ID_ENV)
    }
    env.update(HOME=str(tmp_path), PYTHONPATH=str(SRC_DIR))
    url = f"http://127.0.0.1:{_closed_port()}"
    args = [str(tmp_path / "a"), str(tmp_path / "b"), url]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", NEVER_PROMPTS, *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        cwd=tmp_path,
    )
    os.close(terminal)
    out, deadline = b"", time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([controller], [], [], 1.0)[0]:
            try:
                out += os.read(controller, 65536)
            except OSError:  # the process closed the terminal
                break
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"hung (a prompt or a wait for the server?):\n{out.decode()[-3000:]}")
    os.close(controller)
    text = out.decode(errors="replace")
    assert code == 0, text[-3000:]
    phases = [line for line in text.splitlines() if line.startswith("PHASE")]
    assert len(phases) == 2 and all("offline=True" in p for p in phases), text[-3000:]
    assert all(float(p.rsplit("=", 1)[1]) < 30 for p in phases), phases
    assert list((tmp_path / "a" / "wandb").glob("offline-run-*")), text[-3000:]
    assert list((tmp_path / "b" / "wandb").glob("offline-run-*")), text[-3000:]
    assert "API key" not in text and "anonymous" not in text.lower(), text[-3000:]


def test_multirun_jobs_are_grouped_named_and_log_config_and_parameters(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "logger=wandb", "schedule=cosine"], tmp_path)
    sweep = tmp_path / "multiruns" / "2026-01-01_12-00-00_000001"
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep)
        cfg.hydra.job.override_dirname = "schedule=cosine"
    HydraConfig.instance().set_config(cfg)
    save = tmp_path / "job0"
    logger = wandb_logger(mode="offline", save_dir=str(save), system_metrics=False, tags=["a"])
    try:
        run = logger.experiment
        assert run.group == f"sweep-{sweep.name}" and run.name == "schedule=cosine"
        assert run.settings.x_disable_stats and list(run.tags) == ["a"]
        assert read_identity(save)["id"] == run.id == logger.version
        module = DiffusionModule.from_config(cfg)
        trainer = pl.Trainer(logger=logger, accelerator="cpu", enable_progress_bar=False)
        log_hyperparameters(trainer, module, to_plain(cfg))
        n = sum(p.numel() for p in module.parameters())
        assert run.config["model/params/total"] == n > 0
        assert run.config["model/params/non_trainable"] == 0
        assert run.config["schedule"]["name"] == "cosine"
    finally:
        import wandb

        wandb.finish()
    # the defaults: system metrics and console capture on
    logger = wandb_logger(mode="disabled", save_dir=str(tmp_path / "job1"))
    assert not logger.experiment.settings.x_disable_stats
    assert logger.experiment.settings.console != "off"
    wandb.finish()


# ------------------------------------------------------------------ rank safety under DDP
def _rank_worker(rank: int, world: int, tmp: str) -> None:
    os.environ["RANK"] = str(rank)
    os.environ.pop(RUN_ID_ENV, None)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    out: dict = {}
    # The importance sampler: rank 1 drops a NaN loss, so the ranks hold 4 and 3 pairs.
    sampler = LossSecondMomentTimestepSampler(num_timesteps=4, history=2)
    t = torch.arange(4)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1)
    if rank == 1:
        losses[2] = math.nan
    finite = torch.isfinite(losses)
    sampler.update(t[finite], losses[finite])
    sampler.update(t, losses)  # unfiltered: the NaN is dropped inside
    out["hist"], out["count"] = torch.from_numpy(sampler._hist), torch.from_numpy(sampler._count)
    # The W&B id: rank 1 starts first (as under srun) and must not write the shared file.
    save = Path(tmp) / "run"
    if rank == 1:
        out["early_id"] = wandb_logger(mode="disabled", save_dir=str(save)).version
        out["file_after_rank1"] = bool(read_identity(save))
    dist.barrier()
    if rank == 0:
        logger = wandb_logger(mode="disabled", save_dir=str(save))
        out["id"], out["env"] = logger.version, os.environ.get(RUN_ID_ENV)
    dist.barrier()
    if rank == 1:
        out["id"] = wandb_logger(mode="disabled", save_dir=str(save)).version
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_ranks_share_the_run_id_and_unequal_sampler_updates(tmp_path: Path) -> None:
    mp.start_processes(_rank_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # both ranks hold the same statistics: every finite pair of both ranks, in rank order
    reference = LossSecondMomentTimestepSampler(num_timesteps=4, history=2)
    for _ in range(2):
        reference.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
        reference.update(torch.tensor([0, 1, 3]), torch.tensor([2.0, 4.0, 8.0]))
    for r in (r0, r1):
        assert torch.equal(r["count"], torch.from_numpy(reference._count))
        assert torch.equal(r["hist"], torch.from_numpy(reference._hist))
    # only rank 0 wrote the id file; the others read it (or the environment rank 0 set)
    assert r1["file_after_rank1"] is False and r1["early_id"] is None
    assert r0["id"] == r0["env"] == r1["id"] == read_identity(tmp_path / "run")["id"]


# ------------------------------------------------------------------ a training run's record
def _csv_rows(path: Path, key: str) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def test_a_stopped_then_redone_run_keeps_every_log_and_its_checkpoints_as_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_sigint: None
) -> None:
    """A run stopped by Ctrl-C at step 4, then resumed from its step-2 checkpoint (what a resume
    after a hard kill does: steps 3 and 4 are redone) to step 6, with every logger and W&B's
    environment variables set. W&B: the variables win over the config, each validation
    metric's summary is its best value, the step, best and last checkpoints (the one written on
    the signal and the final one) are artifacts. Nothing is lost: metrics.csv keeps the first
    launch's rows, TensorBoard shows each step once (the redone ones as redone), the top
    config_tree.log stays the first launch's."""
    env = {
        "WANDB_PROJECT": "env-project",
        "WANDB_RUN_GROUP": "env-group",
        "WANDB_TAGS": "a,b",
        "WANDB_JOB_TYPE": "env-job",
        "WANDB_RUN_ID": "envrun01",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),  # where artifacts are staged
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    common = [
        *TINY,
        "logger=many_loggers",
        "logger.wandb.project=config-project",
        "logger.wandb.log_model=true",
        "logger.wandb.system_metrics=false",
        "logger.wandb.console=off",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid.every_n_steps=100",
        "callbacks.sample_grid.at_train_end=false",
        "+callbacks.sig._target_=run_utils.SignalAt",
    ]
    with pytest.raises(TrainingInterrupted):
        train(compose_cfg([*common, "+callbacks.sig.step=3", "trainer.max_steps=50"], tmp_path))
    run = tmp_path / "run"
    tree = (run / "config_tree.log").read_bytes()
    first_rows = _csv_rows(run / "csv" / "metrics.csv", "train/loss")
    redo = [f"ckpt_path={run / 'checkpoints' / 'step_0000002.ckpt'}", f"run_dir={run}"]
    train(compose_cfg([*common, "+callbacks.sig.step=100", "trainer.max_steps=6", *redo], tmp_path))

    # config_tree.log: the first launch's at the top, the resume's in its own record
    assert (run / "config_tree.log").read_bytes() == tree
    assert len(list((run / "launches").glob("*/config_tree.log"))) == 1
    # metrics.csv: the first launch's rows, then the resume's from step 2 on (Lightning logs
    # optimizer step k + 1 at step k); a redone step's rows appear twice, with equal values
    rows = _csv_rows(run / "csv" / "metrics.csv", "train/loss")
    assert [s for s, _ in first_rows] == [0, 1, 2] and rows[:3] == first_rows
    assert [s for s, _ in rows[3:]] == [2, 3, 4, 5] and rows[3][1] == pytest.approx(rows[2][1])
    # TensorBoard: both event files kept; the redone steps shown once, as the resume logged them
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    shown = events.Scalars("train/loss")
    assert [e.step for e in shown] == [0, 1, 2, 3, 4, 5]
    assert [e.value for e in shown] == pytest.approx([v for _, v in rows[:2] + rows[3:]])

    assert read_identity(run) == {
        "id": "envrun01",
        "project": "env-project",
        "entity": None,
        "group": "env-group",
    }
    first, second = offline_runs(tmp_path / "wandb_dir", "envrun01")
    recs = [records(first), records(second)]
    meta = run_record(recs[0])
    assert (meta["project"], meta["run_group"], meta["job_type"]) == (
        "env-project",
        "env-group",
        "env-job",
    )
    assert meta["tags"] == ["a", "b"]
    # W&B: the resume re-logs the redone steps (optimizer steps 3 and 4) into the same run
    steps = [[r["trainer/global_step"] for r in history(p) if "train/loss" in r] for p in recs]
    assert steps == [[0, 1, 2], [2, 3, 4, 5]]
    for part in recs:
        val = [r["val/loss"] for r in history(part) if "val/loss" in r]
        assert summary(part)["val/loss"] == {"min": min(val)}, val
    for part, step_file in zip(recs, ("step_0000002", "step_0000006")):
        logged = {json.loads(a["metadata"])["original_filename"]: a for a in artifacts(part)}
        stems = {Path(f).stem for f in logged}
        assert {step_file, "last"} <= stems and any(s.startswith("best_") for s in stems), stems
        for name, a in logged.items():
            assert a["name"] == "model-envrun01"
            assert {"latest", Path(name).stem} <= set(a["aliases"])
            assert ("best" in a["aliases"]) == name.startswith("best_"), (name, a["aliases"])
