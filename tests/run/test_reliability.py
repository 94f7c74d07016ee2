"""Preemption (SIGTERM / SIGINT / SIGKILL), numerical faults, disk faults, bad config, safety
(weights_only checkpoints, safetensors export round trip). Real Trainers and real subprocesses."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_utils import start_cli, wait_for
from ddpm.callbacks.atomic_checkpoint import CheckpointWriteError
from ddpm.callbacks.nonfinite import NonFiniteStepError, NonFiniteWeightsError
from ddpm.callbacks.preemption import PreemptionCheckpoint, TrainingInterrupted
from ddpm.checkpoint import load_model
from ddpm.config import validate_train_config
from ddpm.errors import ConfigError
from ddpm.run.checkpoint_files import find_checkpoint
from ddpm.tasks.train import train
from hydra_utils import TINY, compose_cfg
from run_utils import DISK, load_ckpt

FAST = [
    *TINY,
    "callbacks.sample_grid.every_n_steps=1000",
    "callbacks.sample_grid.at_train_end=false",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "trainer.val_check_interval=1000",
    "trainer.limit_val_batches=1",
]


CLI = [o for o in FAST if not o.startswith("trainer.enable")] + [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


# ====================================================================== preemption
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start_cli([*CLI, "trainer.max_steps=100000", f"run_dir={run}"], tmp_path)
    first = run / "checkpoints" / "step_0000002.ckpt"
    wait_for(first.is_file, first.name, proc)
    steps = run / "checkpoints"  # a few more steps: the next periodic checkpoint
    wait_for(lambda: len(list(steps.glob("step_*.ckpt"))) >= 2, "a second step_*.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "resume with" in err.lower()
    last = load_ckpt(run / "checkpoints" / "last.ckpt")
    step = last["global_step"]
    assert step >= 2
    assert json.loads((run / "metrics.json").read_text())["interrupted_by_signal"] == 15
    assert not list(run.rglob("*.partial"))
    # resume from it and take 3 more steps
    res = start_cli(
        [*CLI, f"trainer.max_steps={step + 3}", "ckpt_path=last", f"run_dir={run}"], tmp_path
    )
    out, err = res.communicate(timeout=300)
    assert res.returncode == 0, err[-3000:]
    assert f"Restoring states from the checkpoint path at {run / 'checkpoints'}" in err
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == step + 3


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "saving"
    proc = start_cli(
        [
            *CLI,
            "trainer.max_steps=100000",
            f"run_dir={run}",
            "+callbacks.slow._target_=run_utils.SlowLastSave",
            f"+callbacks.slow.marker={marker}",
        ],
        tmp_path,
    )
    wait_for(marker.is_file, "the half-written last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 in the middle of writing last.ckpt
    proc.communicate(timeout=60)
    ckpts = run / "checkpoints"
    assert (ckpts / "last.ckpt.partial").is_file()  # the half-written file
    with pytest.raises((RuntimeError, EOFError, ValueError)):
        load_ckpt(ckpts / "last.ckpt.partial")
    assert load_ckpt(ckpts / "last.ckpt")["global_step"] == 2  # the previous one, intact
    assert int(marker.read_text()) == 4
    assert find_checkpoint(run) == str(ckpts / "step_0000004.ckpt")  # newest complete one
    # The run's own callback is vouched for by naming it on the resuming command.
    vouch = "+callbacks.slow._target_=run_utils.SlowLastSave"
    res = start_cli(
        [*CLI, "trainer.max_steps=6", "ckpt_path=last", f"run_dir={run}", vouch], tmp_path
    )
    out, err = res.communicate(timeout=300)
    assert res.returncode == 0, err[-3000:]
    assert not (ckpts / "last.ckpt.partial").exists()
    assert load_ckpt(ckpts / "last.ckpt")["global_step"] == 6


def test_sigint_in_process_saves_stops_and_resumes(tmp_path: Path, default_sigint: None) -> None:
    cfg = compose_cfg(
        [
            *FAST,
            "trainer.max_steps=50",
            "+callbacks.sig._target_=run_utils.SignalAt",
            "+callbacks.sig.step=3",
        ],
        tmp_path,
    )
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg)
    assert info.value.code == 128 + signal.SIGINT
    assert info.value.global_step == 4  # the step in flight was finished, then saved
    run = tmp_path / "run"
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert json.loads((run / "metrics.json").read_text())["interrupted_by_signal"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    vouch = "+callbacks.sig._target_=run_utils.SignalAt"  # the run's own callback
    metrics = train(
        compose_cfg(
            [*FAST, "trainer.max_steps=6", "ckpt_path=last", f"run_dir={run}", vouch], tmp_path
        )
    )
    assert metrics["global_step"] == 6


def test_second_sigint_aborts_immediately(default_sigint: None) -> None:
    cb = PreemptionCheckpoint()
    cb._install_handlers()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        wait_for(
            lambda: cb.signum is not None, "the handler to record the first SIGINT", timeout=10
        )
        assert cb.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(lambda: False, "KeyboardInterrupt from the second SIGINT", timeout=10)
    finally:
        cb._restore_handlers()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(ValueError, match="signals"):
        PreemptionCheckpoint(signals=["SIGKILL"])


# ====================================================================== numerical faults
def test_nonfinite_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            *FAST,
            "trainer.max_steps=6",
            "logger=csv",
            "trainer.log_every_n_steps=1",
            "+callbacks.nan._target_=run_utils.NaNAt",
            "+callbacks.nan.steps=[2,3]",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert metrics["global_step"] == 6
    assert metrics["train/nonfinite_steps"] == 2
    ckpt = load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.isfinite(v).all() for v in ckpt[key].values() if v.is_floating_point())
    assert ckpt["callbacks"]["NonFiniteGuard"] == {"skipped": 2, "consecutive": 0}
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    logged = [float(r["train/nonfinite_steps"]) for r in rows if r.get("train/nonfinite_steps")]
    assert logged[-1] == 2


def test_k_consecutive_nonfinite_steps_stop_the_run(tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            *FAST,
            "trainer.max_steps=50",
            "callbacks.nonfinite_guard.max_consecutive=3",
            "+callbacks.nan._target_=run_utils.NaNAt",
            "+callbacks.nan.from_step=4",
        ],
        tmp_path,
    )
    with pytest.raises(NonFiniteStepError, match=r"3 consecutive .*global steps 5\.\.7") as info:
        train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    last, good = load_ckpt(ckpts / "last.ckpt"), load_ckpt(ckpts / "step_0000004.ckpt")
    assert last["global_step"] == 6  # written during the streak: skipped steps changed nothing
    for k, v in good["state_dict"].items():
        assert torch.equal(v, last["state_dict"][k]), k
    # step 4's weights gave the first non-finite step (5), and last.ckpt holds them too: the
    # message names the newest checkpoint from before them
    named = f"step 4, whose weights gave the first non-finite step 5) is {ckpts}/step_0000002.ckpt"
    assert f"from before the divergence (before global {named}" in str(info.value)


def test_a_divergence_before_any_checkpoint_is_said_so(tmp_path: Path) -> None:
    """A huge LR: every step after the second is non-finite. No checkpoint predates the weights
    that diverged, and the message says so instead of naming one holding them."""
    cfg = compose_cfg(
        [
            *FAST,
            "trainer.max_steps=50",
            "callbacks.nonfinite_guard.max_consecutive=3",
            "+callbacks.nan._target_=run_utils.NaNAt",
            "+callbacks.nan.from_step=2",
        ],
        tmp_path,
    )
    with pytest.raises(NonFiniteStepError, match=r"global steps 3\.\.5") as info:
        train(cfg)
    assert "No checkpoint predates the divergence: the weights after global step 2" in str(
        info.value
    )
    assert "step_0000002.ckpt" not in str(info.value)


@pytest.mark.parametrize(
    ("step", "caught_by"),
    [(3, "after optimizer step 3"), (4, "so step_0000004.ckpt is not written")],
)
def test_nonfinite_weights_are_never_saved_and_the_finite_checkpoint_is_named(
    step: int, caught_by: str, tmp_path: Path
) -> None:
    """Inf in a weight after step 3 (no save due) is caught by the next step's guard; after step
    4 by the checkpoint writer. Either way last.ckpt keeps step 2's finite weights."""
    cfg = compose_cfg(
        [
            *FAST,
            "trainer.max_steps=8",
            "+callbacks.inf._target_=run_utils.InfWeightAfter",
            f"+callbacks.inf.step={step}",
        ],
        tmp_path,
    )
    with pytest.raises(NonFiniteWeightsError, match=caught_by) as info:
        train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert f"finite weights is {ckpts / 'last.ckpt'}" in str(info.value)
    last = load_ckpt(ckpts / "last.ckpt")
    assert last["global_step"] == 2
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step_0000002.ckpt"]
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.isfinite(v).all() for v in last[key].values() if v.is_floating_point())


# ====================================================================== disk faults
@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch):
    """Checkpoint writes fail with ENOSPC (half the file written) or the rename with EROFS,
    once ``DISK['full']`` is set."""
    from lightning_fabric.plugins.io import torch_io

    import ddpm.callbacks.atomic_checkpoint as ckpt_mod

    real_save, real_replace = torch_io._atomic_save, os.replace

    def save(checkpoint, filepath):
        if DISK["full"] and DISK["where"] == "write":
            Path(filepath).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(filepath))
        real_save(checkpoint, filepath)

    def replace(src, dst):
        if DISK["full"] and DISK["where"] == "rename":
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(torch_io, "_atomic_save", save)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    DISK["full"] = False
    yield DISK
    DISK["full"] = False


@pytest.mark.parametrize("where", ["write", "rename"])
def test_disk_full_fails_clearly_and_keeps_the_previous_checkpoint(
    where: str, full_disk: dict, tmp_path: Path
) -> None:
    full_disk["where"] = where
    cfg = compose_cfg(
        [
            *FAST,
            "trainer.max_steps=8",
            "+callbacks.disk._target_=run_utils.DiskFullFrom",
            "+callbacks.disk.step=3",
        ],
        tmp_path,
    )
    needle = "No space left" if where == "write" else "Read-only"
    with pytest.raises(CheckpointWriteError, match="last.ckpt|step_0000004.ckpt") as info:
        train(cfg)
    assert needle in str(info.value) and "intact" in str(info.value)
    ckpts = tmp_path / "run" / "checkpoints"
    assert load_ckpt(ckpts / "last.ckpt")["global_step"] == 2
    assert not list(ckpts.glob("*.partial"))
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step_0000002.ckpt"]


# ====================================================================== bad config
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["+trainer.max_step=5"], "did you mean trainer.max_steps"),
        (["+model.chanel_mult=[1,2]"], "did you mean model.channel_mult"),
        (["+callbacks.ema.decy=0.9"], "callbacks.ema.decy is not a parameter"),
        (["data._target_=ddpm.data.NoSuchModule"], "cannot be imported"),
        (["lr_scheduler.warmup_steps=-1"], "warmup_steps"),
        (["trainer.accumulate_grad_batches=0"], "accumulate_grad_batches"),
        (["ckpt_path=last"], "run_dir"),
        (["optimizer.lr=inf"], r"optimizer.lr must be a finite number > 0, got inf"),
        (["optimizer.lr=nan"], r"optimizer.lr must be a finite number > 0, got nan"),
        (["optimizer.lr=-0.1"], "optimizer.lr"),
        (["trainer.max_steps=abc"], r"trainer.max_steps must be an integer >= 1, or -1, got 'abc'"),
        (["optimizer.betas=[0.9,1.5]"], r"optimizer.betas\[1\]"),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay"),
        (["trainer.gradient_clip_val=inf"], "trainer.gradient_clip_val"),
        (["callbacks.ema.decay=1.5"], "callbacks.ema.decay"),
        (["data.batch_size=0"], "data.batch_size"),
        (["schedule.num_timesteps=1.5"], "schedule.num_timesteps"),
    ],
)
def test_bad_config_is_rejected_before_any_work(
    overrides: list[str], needle: str, tmp_path: Path
) -> None:
    cfg = compose_cfg([*TINY, *overrides], tmp_path)
    with pytest.raises(ConfigError, match=needle):
        validate_train_config(cfg)
    with pytest.raises(ConfigError):
        train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


# ====================================================================== safety + export
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(
        [
            *FAST,
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "objective=hybrid",
            "callbacks=[default,nll]",
            "callbacks.nll.every_n_steps=2",
            "callbacks.nll.num_images=4",
            "callbacks.nll.batch_size=4",
        ],
        tmp,
    )
    train(cfg)
    return tmp / "run"


def _plain(obj, path: str = "") -> None:
    """Only tensors and plain data (what weights_only allows, minus numpy)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), (path, k)
            _plain(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _plain(v, f"{path}[{i}]")
    else:
        assert obj is None or isinstance(obj, (torch.Tensor, str, int, float, bool)), (path, obj)
        assert not isinstance(obj, np.generic), path


def test_checkpoints_hold_only_tensors_and_plain_data(trained_run: Path) -> None:
    names = sorted(p.name for p in (trained_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and any(n.startswith("best_") for n in names), names
    ckpt = load_ckpt(trained_run / "checkpoints" / "last.ckpt")
    _plain(ckpt)
    assert ckpt["ddpm_config"]["objective"]["loss"]["loss_type"] == "hybrid"
    assert {
        "ema_state_dict",
        "ema_state",
        "optimizer_states",
        "lr_schedulers",
        "loops",
        "callbacks",
    } <= set(ckpt)


def test_export_round_trips_and_samples(trained_run: Path, tmp_path: Path) -> None:
    from ddpm.tasks.export import export
    from ddpm.tasks.sample import sample

    ckpt_path = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "model.safetensors"
    export(compose_cfg([f"ckpt_path={ckpt_path}", f"out={out}"], tmp_path, "export"))
    exported, original = load_model(out), load_model(ckpt_path)
    assert exported.used_ema and original.used_ema
    assert exported.global_step == original.global_step == 4
    ema = load_ckpt(ckpt_path)["ema_state_dict"]
    sd = exported.net.state_dict()
    assert sd.keys() == ema.keys()
    for k in sd:
        assert torch.equal(sd[k], ema[k]), k
    images = {}
    for name, path in (("ckpt", ckpt_path), ("safetensors", out)):
        overrides = [
            f"ckpt_path={path}",
            "num_samples=3",
            "batch_size=2",
            "sampler=ddim",
            "sampler.steps=3",
            "accelerator=cpu",
            "progress=false",
        ]
        npz = sample(compose_cfg(overrides, tmp_path / name, "sample"))
        images[name] = np.load(npz)["arr_0"]
    assert images["ckpt"].shape == (3, 16, 16, 1) and images["ckpt"].dtype == np.uint8
    assert np.array_equal(images["ckpt"], images["safetensors"])
    assert math.isfinite(float(images["ckpt"].mean()))


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_sigterm_to_rank_zero_stops_every_rank_with_a_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start_cli(
        [
            *CLI,
            "trainer.max_steps=100000",
            "trainer.strategy=ddp",
            "trainer.devices=2",
            f"run_dir={run}",
        ],
        tmp_path,
    )
    wait_for((run / "checkpoints" / "step_0000002.ckpt").is_file, "step_0000002.ckpt", proc)
    os.kill(proc.pid, signal.SIGTERM)  # only the launching process (rank 0) gets it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] >= 2
    res = start_cli(
        [
            *CLI,
            f"trainer.max_steps={ckpt['global_step'] + 2}",
            "trainer.strategy=ddp",
            "trainer.devices=2",
            "ckpt_path=last",
            f"run_dir={run}",
        ],
        tmp_path,
    )
    out, err = res.communicate(timeout=300)
    assert res.returncode == 0, err[-3000:]
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == ckpt["global_step"] + 2


def test_unwritable_output_directory_fails_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = compose_cfg([*TINY], tmp_path)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = str(blocker / "run")  # a directory inside a file
    with pytest.raises(ConfigError, match="not writable"):
        train(cfg)
