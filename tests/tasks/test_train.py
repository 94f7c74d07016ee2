"""Real Trainer runs through the real config: every schedule, overfitting, CLI, DDP, multirun, W&B."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from cli_utils import run_cli
from ddpm.checkpoint import load_model
from ddpm.loggers import read_identity
from ddpm.tasks.evaluate import evaluate
from ddpm.tasks.train import train
from hydra_utils import CLI_TINY, TINY, compose_cfg, compose_group

TINY_NO_CALLBACKS = [o for o in CLI_TINY if not o.startswith("callbacks.")]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid", "scaled_linear"])
def test_fast_dev_run_every_schedule(schedule: str, tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, f"schedule={schedule}", "debug=fdr"], tmp_path)
    metrics = train(cfg)
    assert metrics["global_step"] == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.parametrize(
    ("objective", "schedule", "process"),
    [
        ("edm", "edm", "EDMProcess"),
        ("edm", "edm_vp", "EDMProcess"),
        ("flow_matching", "rectified_flow", "RectifiedFlow"),
    ],
)
def test_continuous_objectives_train_and_sample(objective, schedule, process, tmp_path) -> None:
    """objective=edm | flow_matching through the real config and Trainer: a few steps with the
    sample grid and its denoising strip, then the checkpoint alone samples with every sampler."""
    cfg = compose_cfg(
        [
            *TINY,
            f"objective={objective}",
            f"schedule={schedule}",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "callbacks.model_checkpoint.every_n_train_steps=3",
            "callbacks.sample_grid.every_n_steps=3",
            "callbacks.sample_grid.num_samples=2",
            "callbacks.sample_grid.batch_size=2",
            "sampler=euler",
            "sampler.steps=3",
            "callbacks=[default,nll]",  # no bound on this process: the PF-ODE likelihood
            "callbacks.nll.every_n_steps=3",
            "callbacks.nll.num_images=2",
            "callbacks.nll.batch_size=2",
            "callbacks.nll.ode_rtol=1e-3",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert metrics["global_step"] == 3 and torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert np.isfinite(metrics["val/nll_ode_bpd"]) and "val/nll_bpd" not in metrics
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    loaded = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert type(loaded.diffusion).__name__ == process
    for name in ("euler", "heun", "ddim", "dpm_solver", "unipc", "ddpm"):
        sampler = instantiate(compose_group("sampler", name), steps=3, corrector="langevin")
        x = sampler(loaded.net, loaded.diffusion, (2, *loaded.sample_shape), generator=None)
        assert x.shape == (2, *loaded.sample_shape) and torch.isfinite(x).all(), name
    # its likelihood: the probability-flow ODE's (no variational bound on a continuous process)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    nll = ["nll.num_images=2", "batch_size=2", "metrics.enabled=false", "nll.ode.rtol=1e-3"]
    evaluated = evaluate(
        compose_cfg([f"ckpt_path={ckpt}", *nll], tmp_path / "eval", config_name="evaluate")
    )
    assert np.isfinite(evaluated["test/nll_ode_bpd"]) and evaluated["test/nll_ode_nfe"] > 0
    assert "test/nll_bpd" not in evaluated


def test_overfitting_one_batch_lowers_the_loss(tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            *TINY,
            "debug=overfit",
            "trainer.max_steps=150",
            "callbacks=none",
            "logger=csv",
            "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=1000",
        ],
        tmp_path,
    )
    train(cfg)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) > 100
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_run_writes_config_checkpoint_and_rebuilds_from_it(tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            *TINY,
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "callbacks.model_checkpoint.every_n_train_steps=3",
            "callbacks.sample_grid.every_n_steps=3",
            "callbacks.sample_grid.num_samples=4",
            "callbacks.sample_grid.batch_size=4",
            "sampler.steps=5",
            "logger=csv",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    run = tmp_path / "run"
    assert metrics["global_step"] == 6
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 6
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert not list((run / "checkpoints").glob("*.partial"))
    loaded = load_model(ckpt)  # a checkpoint alone rebuilds network + schedule
    assert loaded.diffusion.num_timesteps == 50
    assert loaded.global_step == 6
    x = torch.zeros(2, *loaded.sample_shape)
    assert loaded.net(x, torch.zeros(2, dtype=torch.long)).shape == x.shape
    assert list((run / "samples").glob("*.png"))


def test_cli_default_run_dir_and_outputs(tmp_path: Path) -> None:
    res = run_cli(
        [
            *CLI_TINY,
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "callbacks.sample_grid.every_n_steps=4",
            "logger=csv",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "metrics.json").is_file()


def test_cli_bad_input_fails_clearly(tmp_path: Path) -> None:
    res = run_cli([*CLI_TINY, "data=image_folder", f"data.root={tmp_path / 'missing'}"], tmp_path)
    assert res.returncode != 0
    assert "missing" in res.stderr and "Traceback" in res.stderr
    res = run_cli([*CLI_TINY, "data=nonexistent_dataset"], tmp_path)
    assert res.returncode != 0 and "nonexistent_dataset" in res.stderr
    res = run_cli([*CLI_TINY, "data.batch_size=9", "trainer.devices=2"], tmp_path)
    assert res.returncode != 0 and "divisible" in res.stderr
    # nothing half-written: no checkpoints anywhere
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_multirun_writes_one_directory_per_job(tmp_path: Path) -> None:
    res = run_cli(
        [
            "-m",
            *TINY_NO_CALLBACKS,
            "schedule=linear,cosine",
            "trainer.max_steps=2",
            "callbacks=none",
            "trainer.val_check_interval=2",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    schedules = {
        (j / ".hydra" / "overrides.yaml").read_text().count("schedule=cosine") for j in jobs
    }
    assert schedules == {0, 1}
    for j in jobs:
        assert (j / "metrics.json").is_file()


@pytest.mark.slow
def test_wandb_offline_without_prompt(tmp_path: Path) -> None:
    env = {"WANDB_API_KEY": "", "HOME": str(tmp_path), "WANDB_MODE": ""}
    env = {k: v for k, v in env.items()}
    res = run_cli(
        [
            *TINY_NO_CALLBACKS,
            "logger=wandb",
            "trainer.max_steps=2",
            "callbacks=none",
            "trainer.val_check_interval=2",
        ],
        tmp_path,
        extra_env=env,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = next((tmp_path / "outputs" / "train" / "runs").iterdir())
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert offline_runs, list(run.rglob("*"))[:20]
    assert read_identity(run)["id"] in offline_runs[0].name


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    dump = tmp_path / "ranks"
    res = run_cli(
        [
            *CLI_TINY,
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "callbacks.sample_grid.every_n_steps=4",
            "logger=csv",
            "+callbacks.rank_dump._target_=ddp_probe.RankWeightDump",
            f"+callbacks.rank_dump.out_dir={dump}",
        ],
        tmp_path,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    w0 = torch.load(dump / "rank0.pt", weights_only=True)
    w1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
