"""Resume: finding the newest checkpoint, refusing to restart silently or to mix runs, W&B run
continuity, weights_only. (Exactness over many stop points: test_resume_exact.py.)"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ddpm.errors import ConfigError
from ddpm.loggers import RUN_FILE, carry_over_wandb_id, read_identity
from ddpm.run import resume_command
from ddpm.run.checkpoint_files import find_checkpoint, resolve_ckpt_path
from ddpm.run.directory import check_run_dir
from ddpm.run.lock import run_dir_lock
from ddpm.run.resume import check_not_finished
from ddpm.tasks.train import train
from hydra_utils import TINY, compose_cfg
from run_utils import load_ckpt, max_diff

# Epochs of 3 batches (digits), dropout on (global RNG), LR warmup still running at the stop,
# EMA, validation at every epoch end (it must not move the training RNG streams).
RESUME = [
    *TINY,
    "+trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.check_val_every_n_epoch=null",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.sample_grid.every_n_steps=1000",
    "callbacks.sample_grid.at_train_end=false",
    "model.dropout=0.1",
    "lr_scheduler.warmup_steps=10",
    "trainer.deterministic=true",
]


def _ckpt(run: Path, name: str = "last.ckpt") -> dict:
    return load_ckpt(run / "checkpoints" / name)


def test_validation_does_not_move_the_training_rng(tmp_path: Path) -> None:
    """Same weights whether the run validates every 2 steps or never (dropout on)."""
    common = [*RESUME, "trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=5"]
    train(compose_cfg([*common, "trainer.val_check_interval=2"], tmp_path / "a"))
    train(
        compose_cfg(
            [*common, "trainer.limit_val_batches=0", "callbacks.best_checkpoint=null"],
            tmp_path / "b",
        )
    )
    a, b = _ckpt(tmp_path / "a" / "run"), _ckpt(tmp_path / "b" / "run")
    assert max_diff(a["state_dict"], b["state_dict"]) == 0.0


def _fake_ckpt(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": step, "epoch": 0}, path)


def test_last_finds_the_newest_loadable_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints"
    _fake_ckpt(ck / "step_0000010.ckpt", 10)
    _fake_ckpt(ck / "last.ckpt", 10)
    _fake_ckpt(ck / "step_0000005.ckpt", 5)
    _fake_ckpt(ck / "best_0000005.ckpt", 5)  # newer file, older step
    newer = max(p.stat().st_mtime for p in ck.iterdir()) + 10
    os.utime(ck / "best_0000005.ckpt", (newer, newer))
    assert find_checkpoint(tmp_path) == str(ck / "last.ckpt")  # tie on step -> last.ckpt
    _fake_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 12)  # Lightning's SLURM requeue checkpoint
    assert resolve_ckpt_path("last", str(tmp_path)) == str(tmp_path / "hpc_ckpt_1.ckpt")
    # a corrupted (truncated) newest file is skipped with a warning, never chosen
    data = (tmp_path / "hpc_ckpt_1.ckpt").read_bytes()
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="unloadable"):
        assert find_checkpoint(tmp_path) == str(ck / "last.ckpt")
    # ... but named explicitly it is an error, not a silent fallback
    with pytest.raises(ConfigError, match="weights_only"):
        resolve_ckpt_path(str(tmp_path / "hpc_ckpt_1.ckpt"), None)
    # .partial files of an interrupted save are not checkpoints
    (ck / "last.ckpt.partial").write_bytes(b"half")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert find_checkpoint(tmp_path) == str(ck / "last.ckpt")


def test_resume_that_finds_nothing_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        resolve_ckpt_path("last", str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_ckpt_path("last", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="run_dir"):
        resolve_ckpt_path("auto", None)
    assert resolve_ckpt_path("auto", str(tmp_path)) is None  # auto: a new run there
    _fake_ckpt(tmp_path / "checkpoints" / "last.ckpt", 3)
    assert resolve_ckpt_path("auto", str(tmp_path)) == str(tmp_path / "checkpoints" / "last.ckpt")
    # through train(): fails before any work, nothing written
    cfg = compose_cfg([*TINY, "ckpt_path=last", f"run_dir={tmp_path / 'empty'}"], tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_resume_refuses_a_pickled_object_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": _Evil()}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        resolve_ckpt_path(str(path), None)
    path.write_bytes(pickle.dumps({"not": "a torch file"}))
    with pytest.raises(ConfigError, match="cannot be loaded"):
        resolve_ckpt_path(str(path), None)


def test_a_run_never_writes_into_another_runs_directory(tmp_path: Path) -> None:
    other = tmp_path / "other"
    _fake_ckpt(other / "checkpoints" / "last.ckpt", 4)
    mine = tmp_path / "mine"
    _fake_ckpt(mine / "checkpoints" / "last.ckpt", 7)
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(mine, None)  # a new run in an old run's directory
    with pytest.raises(ConfigError, match="belongs to another run"):
        check_run_dir(mine, str(other / "checkpoints" / "last.ckpt"))
    check_run_dir(mine, str(mine / "checkpoints" / "last.ckpt"))  # resuming itself: fine
    check_run_dir(tmp_path / "fresh", str(other / "checkpoints" / "last.ckpt"))  # new dir: fine
    # two live processes in one directory: the second one is refused
    with run_dir_lock(mine):
        with pytest.raises(ConfigError, match="in use by another training process"):
            with run_dir_lock(mine):
                pass
    with run_dir_lock(mine):  # released
        pass


def test_refusals_name_the_one_resume_command_and_it_resumes(tmp_path: Path) -> None:
    """Every refusal that says how to continue a run spells the command one way
    (:func:`ddpm.run.resume_command`), and its run_dir / ckpt_path resolve to the run's newest
    checkpoint."""
    run = tmp_path / "run"
    _fake_ckpt(run / "checkpoints" / "step_0000003.ckpt", 3)
    _fake_ckpt(run / "checkpoints" / "last.ckpt", 7)
    command = resume_command(run)
    with pytest.raises(ConfigError) as new_run:
        check_run_dir(run, None)
    with pytest.raises(ConfigError) as foreign:
        check_run_dir(run, str(tmp_path / "other" / "last.ckpt"))
    with pytest.raises(ConfigError) as finished:
        check_not_finished(OmegaConf.create({"trainer": {"max_steps": 7}}), {"global_step": 7}, run)
    assert command in str(new_run.value) and command in str(foreign.value)
    assert f"{command} trainer.max_steps=14" in str(finished.value)
    python, script, *args = command.split()
    assert (python, script) == ("python", "src/train.py")
    given = dict(a.split("=", 1) for a in args)
    newest = resolve_ckpt_path(given["ckpt_path"], given["run_dir"])
    assert newest == str(run / "checkpoints" / "last.ckpt")


def test_wandb_id_follows_a_checkpoint_into_a_new_directory(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _fake_ckpt(old / "checkpoints" / "last.ckpt", 4)
    (old / RUN_FILE).write_text('{"id": "abc123", "project": "p"}')
    cfg = compose_cfg(["logger=wandb"], tmp_path)
    ckpt = str(old / "checkpoints" / "last.ckpt")
    assert carry_over_wandb_id(cfg, old, ckpt) is None  # same directory: the file is there
    assert carry_over_wandb_id(cfg, new, ckpt) == "abc123"
    assert read_identity(new) == {"id": "abc123", "project": "p"}
    (new / RUN_FILE).write_text('{"id": "mine"}')
    assert carry_over_wandb_id(cfg, new, ckpt) is None  # an id already there wins
    assert carry_over_wandb_id(compose_cfg(["logger=csv"], tmp_path), tmp_path / "x", ckpt) is None


@pytest.mark.slow
def test_wandb_run_continues_on_resume(tmp_path: Path) -> None:
    """Real (offline) W&B: resuming in the same directory or from its checkpoint elsewhere keeps
    the run id."""
    common = [
        *RESUME,
        "logger=wandb",
        "trainer.val_check_interval=3",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    train(compose_cfg([*common, "trainer.max_steps=2"], tmp_path / "a"))
    run = tmp_path / "a" / "run"
    run_id = read_identity(run)["id"]
    train(
        compose_cfg(
            [*common, "trainer.max_steps=4", "ckpt_path=last", f"run_dir={run}"], tmp_path / "a"
        )
    )
    assert read_identity(run)["id"] == run_id
    offline = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline), offline
    ckpt = run / "checkpoints" / "last.ckpt"
    train(compose_cfg([*common, "trainer.max_steps=6", f"ckpt_path={ckpt}"], tmp_path / "b"))
    assert read_identity(tmp_path / "b" / "run")["id"] == run_id


def test_run_stopped_by_max_time_leaves_its_final_weights(tmp_path: Path) -> None:
    """trainer.max_time ends off the checkpoint cadence (saves at step 4; the time runs out at
    step 5): last.ckpt still holds the final step, not step 4."""
    cfg = compose_cfg(
        [
            *TINY,
            "trainer.max_steps=-1",
            "trainer.max_time=00:00:00:03",
            "callbacks.model_checkpoint.every_n_train_steps=4",
            "callbacks.sample_grid.at_train_end=false",
            "trainer.val_check_interval=100000",
            "+trainer.limit_train_batches=3",
            "+callbacks.sleep._target_=run_utils.SleepAtStep",
            "+callbacks.sleep.step=5",
            "+callbacks.sleep.seconds=3.5",
        ],
        tmp_path,
    )
    out = train(cfg)
    ckpt = _ckpt(tmp_path / "run")
    assert out["global_step"] in (5, 6) and ckpt["global_step"] == out["global_step"]


# ====================================================================== longer runs
SHORT = [
    *RESUME,
    "trainer.limit_val_batches=0",
    "callbacks.best_checkpoint=null",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.model_checkpoint.save_top_k=-1",
]


def test_extending_a_finished_run_decays_its_lr_over_the_new_length(tmp_path: Path) -> None:
    """A finished cosine run extended with ``trainer.max_steps``, the command its refusal gives:
    from the stored step the LR is the new length's schedule (half the peak for a cosine with no
    warm-up at 4 of 8 steps), not the old schedule's floor of 0 (which left the weights as they
    were), and it ends at the floor again at the new end."""
    lr = 1e-3
    cosine = ["lr_scheduler=cosine", "lr_scheduler.warmup_steps=0", f"optimizer.lr={lr}"]
    train(compose_cfg([*SHORT, *cosine, "trainer.max_steps=4"], tmp_path))
    run = tmp_path / "run"
    resume = ["ckpt_path=last", f"run_dir={run}"]
    with pytest.raises(ConfigError, match=r"from step 4 the LR is 0\.5 x optimizer\.lr") as info:
        train(compose_cfg([*resume, "trainer.max_steps=4"], tmp_path))
    assert "trainer.max_steps=8" in str(info.value)
    train(compose_cfg([*resume, "trainer.max_steps=8"], tmp_path))  # what the message says
    ck = run / "checkpoints"
    steps = {s: load_ckpt(ck / f"step_{s:07d}.ckpt") for s in range(4, 9)}
    assert steps[8]["ddpm_config"]["lr_scheduler"]["total_steps"] == 8
    for s, ckpt in steps.items():  # the LR each step leaves for the next: lr (1 + cos(π s/8)) / 2
        want = 0.0 if s == 4 else lr * (1 + math.cos(math.pi * s / 8)) / 2
        assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(want), s
    assert max_diff(steps[4]["state_dict"], steps[8]["state_dict"]) > 0  # it trained


def test_a_resume_checks_the_samplers_it_will_use(tmp_path: Path) -> None:
    """The sampler may change on a resume (``sampler.steps=20`` changes the run's own DDIM, in the
    sample grid too); one that cannot sample the run's process (more steps than its T) is
    refused before any work, not at the first sample grid."""
    few = ["schedule=cosine", "schedule.num_timesteps=10", "sampler=ddim", "sampler.steps=5"]
    train(compose_cfg([*SHORT, *few, "trainer.max_steps=1"], tmp_path))
    run = tmp_path / "run"
    cfg = compose_cfg(
        ["ckpt_path=last", f"run_dir={run}", "trainer.max_steps=2", "sampler.steps=20"], tmp_path
    )
    grid = r"sampler, callbacks.sample_grid.sampler.* \(ddpm.diffusion.samplers.DDIMSampler\)"
    with pytest.raises(ConfigError, match=rf"{grid}.*steps=20 exceeds T=10"):
        train(cfg)
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 1
