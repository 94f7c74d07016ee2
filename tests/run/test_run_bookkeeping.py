"""Run bookkeeping (ddpm.run): a resume restores the run's own config, a refused or resumed launch
never rewrites the run's record, a requeued job resumes its own run, stop signals hand the requeue
to exactly one mechanism, a signal during end-of-training work stops at once, a sweep that
optimises a metric gets it for the final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

import ddpm.run.directory as directory
from cli_utils import run_cli, wait_for
from ddpm.callbacks.preemption import TrainingInterrupted
from ddpm.errors import ConfigError
from ddpm.tasks.train import train
from hydra_utils import MICRO, SRC_DIR, TESTS_DIR, compose_cfg
from run_utils import load_ckpt

BASE = [o for o in MICRO if "callbacks.probe" not in o] + [
    "callbacks.sample_grid.every_n_steps=1000",
    "trainer.val_check_interval=1000",
]


# ====================================================================== resume restores the run
def test_resume_continues_the_runs_own_config_and_refuses_changes(tmp_path: Path) -> None:
    train(compose_cfg([*BASE, "schedule=cosine", "trainer.max_steps=2"], tmp_path))
    run = tmp_path / "run"
    resume = ["ckpt_path=last", f"run_dir={run}"]

    def refused(*extra: str) -> str:
        with pytest.raises(ConfigError) as info:
            train(compose_cfg([*BASE, "trainer.max_steps=4", *extra, *resume], tmp_path))
        return str(info.value)

    msg = refused("schedule=linear")  # not silently continued on the default schedule
    assert "schedule.name: 'cosine' (the run) -> 'linear' (this command)" in msg
    assert "resume_overrides=force" in msg
    assert "diffusion.num_timesteps: 50 (the run) -> 20" in refused("schedule.num_timesteps=20")
    msg = refused("objective=hybrid")  # no raw size mismatch: the differences by name
    assert "objective.loss.loss_type: 'simple' (the run) -> 'hybrid'" in msg
    assert "model.out_channels: 1 (the run) -> 2" in msg
    # forced, a network that cannot take the weights is still refused by name
    msg = refused("model.model_channels=16", "resume_overrides=force")
    assert "does not fit the weights" in msg and "(8,) in the checkpoint, (16,) here" in msg
    msg = refused("trainer.max_steps=2")  # a finished run says how to extend it
    assert "already finished" in msg and f"run_dir={run} ckpt_path=last trainer.max_steps=4" in msg
    # `run_dir=X ckpt_path=last` alone continues X as X was configured (cosine, micro network,
    # 8x8 data), changing only what may change mid-run
    out = train(compose_cfg([*resume, "trainer.max_steps=3", "logger=none"], tmp_path))
    assert out["global_step"] == 3
    config = load_ckpt(run / "checkpoints" / "last.ckpt")["ddpm_config"]
    assert config["schedule"]["name"] == "cosine" and config["model"]["model_channels"] == 8
    assert config["trainer"]["max_steps"] == 3 and config["data"]["image_size"] == 8


@pytest.mark.slow
def test_refused_and_resumed_launches_never_rewrite_the_runs_record(tmp_path: Path) -> None:
    """Through the real CLI (Hydra writes its record before any of our code runs)."""
    cli = [o for o in BASE if not o.startswith("trainer.enable")] + ["trainer.max_steps=2"]
    first = run_cli(cli, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()

    def record() -> dict[str, bytes]:
        return {
            str(p.relative_to(run)): p.read_bytes()
            for p in run.rglob("*")
            if p.is_file() and "launches" not in p.parts and p.name != ".lock"
        }

    before = record()
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "metrics.json"} <= set(
        before
    )
    # a new run into a directory holding a run: refused, nothing of the run rewritten
    refused = run_cli([*cli, f"run_dir={run}"], tmp_path)
    assert refused.returncode != 0 and "already holds a run" in refused.stderr
    assert record() == before
    # a resume: continues with the run's config; the run's .hydra and log stay as they were
    resumed = run_cli([f"run_dir={run}", "ckpt_path=last", "trainer.max_steps=4"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = record()
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "train.log"):
        assert after[name] == before[name], name
    launches = sorted((run / "launches").iterdir())
    assert len(launches) == 2  # the refused one and the resume, each with its own record
    assert "trainer.max_steps=4" in (launches[1] / ".hydra" / "overrides.yaml").read_text()
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4


# ====================================================================== requeue
def test_a_requeued_job_resumes_its_own_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    command = [*BASE, f"run_dir={run}", "trainer.max_steps=4"]
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    interrupted = [
        *command,
        "+callbacks.sig._target_=run_utils.SignalAt",
        "+callbacks.sig.step=1",
        "+callbacks.sig.signum=15",
    ]
    with pytest.raises(TrainingInterrupted):
        train(compose_cfg(interrupted, tmp_path))
    assert json.loads((run / "run.json").read_text())["jobs"] == ["slurm:77"]
    # another job re-running the same command into that directory is refused ...
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(compose_cfg(command, tmp_path))
    # ... the requeued job itself (same id, same command, no ckpt_path) continues its run
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert train(compose_cfg(interrupted, tmp_path))["global_step"] == 4


def test_a_requeue_of_a_finished_run_succeeds_doing_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submitit's time-limit SIGUSR2 during the final sample grid: the job stops (the final step
    is saved) and submitit requeues it; the requeued job finds its run finished and succeeds."""
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "91")
    run = tmp_path / "run"
    command = [
        *BASE,
        f"run_dir={run}",
        "trainer.max_steps=3",
        "+callbacks.slow_end._target_=run_utils.SignalDuringTrainEnd",
        "+callbacks.slow_end.seconds=30",
        f"+callbacks.slow_end.signum={int(signal.SIGUSR2)}",
    ]
    with pytest.raises(TrainingInterrupted) as info:
        train(compose_cfg(command, tmp_path))
    assert info.value.code == 128 + signal.SIGUSR2
    last = run / "checkpoints" / "last.ckpt"
    saved = last.stat().st_mtime_ns
    metrics = train(compose_cfg(command, tmp_path))  # the requeued job: same id, same command
    assert metrics["global_step"] == 3 and "interrupted_by_signal" not in metrics
    assert last.stat().st_mtime_ns == saved  # nothing trained, nothing written
    monkeypatch.setenv("SLURM_JOB_ID", "92")  # anyone else is still told how to extend it
    with pytest.raises(ConfigError, match="already finished"):
        train(compose_cfg([*command, "ckpt_path=last"], tmp_path))


def test_every_launch_into_a_run_keeps_its_own_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requeued job is a new process with the config submitit pickled, whose ``${now:...}``
    Hydra resolved (and copies into each job's config) at submission: its record still goes to
    a directory of its own, and the record and the log agree within a launch."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)  # a run is there already
    master = compose_cfg([f"run_dir={run}"], tmp_path)
    OmegaConf.select(master, "hydra.sweep.dir")  # resolves ${now:...}: the controller's time

    def job_record() -> tuple[str, str]:
        monkeypatch.setattr(directory, "_LAUNCH_SUBDIRS", {}, raising=False)  # a new process
        job = compose_cfg([f"run_dir={run}"], tmp_path)  # hydra.runtime.output_dir: run
        OmegaConf.copy_cache(from_config=master, to_config=job)  # Hydra's load_sweep_config
        log = str(job.hydra.job_logging.handlers.file.filename)
        return str(job.hydra.output_subdir), log

    (first, first_log), (second, _) = job_record(), job_record()
    assert first.startswith("launches/") and second.startswith("launches/") and first != second
    assert Path(first_log).parent == run / first.removesuffix(".hydra")  # with the record


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SLURM batch job as Lightning detects it, with a ``scontrol`` that records its calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SUBMITIT_LOCAL_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "ddpm",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return calls


def test_usr1_under_lightnings_slurm_requeue_saves_then_requeues_once(
    tmp_path: Path, fake_slurm: Path
) -> None:
    cfg = compose_cfg(
        [
            *BASE,
            "trainer.max_steps=50",
            "+callbacks.sig._target_=run_utils.SignalAt",
            "+callbacks.sig.step=2",
            f"+callbacks.sig.signum={int(signal.SIGUSR1)}",
        ],
        tmp_path,
    )
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    assert info.value.code == 128 + signal.SIGUSR1 and info.value.global_step == 3
    assert load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert fake_slurm.read_text().split("\n") == ["requeue 4242", ""]  # once, by us
    assert not list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))  # Lightning's handler not run


def test_usr2_hands_over_to_the_handler_in_charge_after_saving(tmp_path: Path) -> None:
    """submitit installs its USR2 handler before the job runs; it is called once, after
    ``last.ckpt`` holds the finished step."""
    calls: list[tuple[int, int]] = []
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"

    def submitit_like(signum: int, frame: Any) -> None:
        calls.append((signum, load_ckpt(last)["global_step"]))

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        cfg = compose_cfg(
            [
                *BASE,
                "trainer.max_steps=50",
                "+callbacks.sig._target_=run_utils.SignalAt",
                "+callbacks.sig.step=2",
                f"+callbacks.sig.signum={int(signal.SIGUSR2)}",
            ],
            tmp_path,
        )
        with pytest.raises(TrainingInterrupted) as info:
            train(cfg)
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # restored
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert info.value.code == 128 + signal.SIGUSR2
    assert calls == [(int(signal.SIGUSR2), 3)]


@pytest.mark.slow
def test_submitit_local_job_survives_usr2_by_requeue(tmp_path: Path) -> None:
    """hydra-submitit-launcher's local launcher: USR2 mid-run (submitit's time-limit signal) ->
    last.ckpt, submitit requeues the job, the requeued job resumes its own run in the same
    directory; the final weights equal an uninterrupted run's."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    command = [o for o in BASE if not o.startswith("trainer.enable")] + [
        "trainer.max_steps=30",
        "num_threads=1",
    ]
    probe = tmp_path / "probe.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SRC_DIR / "train.py"),
            "-m",
            "hydra/launcher=submitit_local",
            f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}",
            "hydra.launcher.timeout_min=10",
            f"paths.root_dir={tmp_path}",
            *command,
            "+callbacks.probe._target_=soak.StepProbe",
            f"+callbacks.probe.path={probe}",
        ],
        cwd=tmp_path,
        env={
            **os.environ,
            "WANDB_MODE": "offline",
            "PYTHONPATH": os.pathsep.join(
                [str(SRC_DIR), str(TESTS_DIR), str(SRC_DIR.parent / "bench")]
            ),
        },
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state: dict = {}

    def stepped() -> bool:
        try:
            state.update(json.loads(probe.read_text()))
        except (OSError, ValueError):
            return False
        return state.get("step", 0) >= 5

    wait_for(stepped, f"step 5 of the submitit job in {probe}", proc, timeout=300)
    first_pid = state["pid"]
    os.kill(first_pid, signal.SIGUSR2)  # what submitit's controller sends before the time limit
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    (job,) = [p for p in (tmp_path / "outputs" / "train" / "multiruns").glob("*/0")]
    final = json.loads(probe.read_text())
    assert final["pid"] != first_pid and 5 <= final["start"] < 30  # a requeued process resumed
    assert json.loads((job / "metrics.json").read_text())["global_step"] == 30
    assert (job / "launches").is_dir()  # the requeued launch kept its record apart
    reference = train(compose_cfg([*command], tmp_path / "reference"))
    assert reference["global_step"] == 30
    a = load_ckpt(tmp_path / "reference" / "run" / "checkpoints" / "last.ckpt")
    b = load_ckpt(job / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "ema_state_dict"):
        for k in a[key]:
            assert (a[key][k] - b[key][k]).abs().max() < 1e-6, (key, k)


# ====================================================================== end of training
def test_a_signal_during_end_of_training_work_stops_at_once(
    tmp_path: Path, default_sigint: None
) -> None:
    cfg = compose_cfg(
        [
            *BASE,
            "trainer.max_steps=3",
            "+callbacks.slow_end._target_=run_utils.SignalDuringTrainEnd",
            "+callbacks.slow_end.seconds=30",
        ],
        tmp_path,
    )
    t0 = time.monotonic()
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    assert time.monotonic() - t0 < 25  # not after the 30 s of work
    assert info.value.code == 128 + signal.SIGINT
    assert load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ====================================================================== sweeps
def test_an_optimising_sweep_gets_the_metric_of_the_final_weights(tmp_path: Path) -> None:
    """``hparams_search=optuna ... trainer.max_steps=3``: no validation was due, so the job
    validates its final weights instead of returning nothing to Optuna."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg([*BASE, "hparams_search=optuna", "trainer.max_steps=3"], tmp_path)
    metrics = train(cfg)
    assert metrics["global_step"] == 3 and "val/loss_ema" in metrics
    with pytest.raises(ConfigError, match="optimized_metric=val/nope was not logged"):
        train(
            compose_cfg(
                [
                    *BASE,
                    "hparams_search=optuna",
                    "optimized_metric=val/nope",
                    "trainer.max_steps=2",
                ],
                tmp_path / "b",
            )
        )


def test_a_setting_that_follows_another_is_touched_with_it() -> None:
    """A resume that changes the grid's cadence changes what follows it, through ``${a.b}`` or
    ``${oc.select:a.b,default}`` (the picture callbacks follow the grid's cadence)."""
    from omegaconf import OmegaConf

    from ddpm.run.resume import touched_paths

    cfg = OmegaConf.create(
        {
            "callbacks": {
                "sample_grid": {"every_n_steps": 5},
                "playground": {
                    "every_n_steps": "${oc.select:callbacks.sample_grid.every_n_steps,4}"
                },
                "forward_picture": {"every_n_steps": "${callbacks.sample_grid.every_n_steps}"},
                "nll": {"every_n_steps": "${oc.select:trainer.val_check_interval,4}"},
            }
        }
    )
    touched = touched_paths(cfg, ["callbacks.sample_grid.every_n_steps=5"], {})
    assert "callbacks.playground.every_n_steps" in touched
    assert "callbacks.forward_picture.every_n_steps" in touched
    assert "callbacks.nll.every_n_steps" not in touched
