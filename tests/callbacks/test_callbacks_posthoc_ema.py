"""PostHocEMA (EDM2) in a real run: the EMA reconstructed from the run's snapshots equals the EMA
the EMA callback tracked in the same run; sample.py takes the length; missing pieces are clear
errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import EMA_KEY, POSTHOC_EMA_KEY, CheckpointError, load_model
from ddpm.errors import ConfigError
from ddpm.tasks.evaluate import evaluate
from ddpm.tasks.sample import sample
from ddpm.tasks.train import train
from hydra_utils import TINY, compose_cfg
from run_utils import load_ckpt, max_diff

RUN = [
    *TINY,
    "trainer.max_steps=12",
    "trainer.accumulate_grad_batches=2",  # one update per optimizer step
    "callbacks.posthoc_ema.every_n_steps=3",
    "callbacks.model_checkpoint.every_n_train_steps=6",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.sample_grid.every_n_steps=100",
    "~callbacks.forward_picture",
    "optimizer.lr=3e-3",  # the weights move: profiles of different lengths differ
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose EMA callback tracks σ_rel 0.10 and which tracks post-hoc profiles 0.05 / 0.10
    with a snapshot every 3 steps; checkpoints at steps 6 and 12."""
    root = tmp_path_factory.mktemp("posthoc")
    train(compose_cfg([*RUN, "callbacks.ema.sigma_rel=0.10"], root))
    return root / "run"


@pytest.mark.parametrize("step", [6, 12])
def test_reconstructed_ema_equals_the_ema_tracked_in_the_run(run: Path, step: int) -> None:
    """At step 6 (snapshots 3, 6 listed; 9 and 12 already on disk, not used) and at the end.
    (How close lengths between the tracked ones come: tests/utils/test_posthoc_ema.py.)"""
    ckpt = run / "checkpoints" / f"step_{step:07d}.ckpt"
    tracked = load_ckpt(ckpt)[EMA_KEY]
    record = load_ckpt(ckpt)[POSTHOC_EMA_KEY]
    assert [s["step"] for s in record["snapshots"]] == list(range(3, step + 1, 3))
    got = load_model(ckpt, sigma_rel=0.10).net.state_dict()
    assert max_diff(got, tracked) < 1e-6
    assert max_diff(got, load_model(ckpt, sigma_rel=0.05).net.state_dict()) > 1e-4


def test_sample_takes_the_ema_length(run: Path, tmp_path: Path) -> None:
    """sample.py ema_sigma_rel=0.1 draws what the run's own σ_rel 0.10 EMA draws."""
    ckpt = run / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", "accelerator=cpu", "progress=false", "num_samples=4"]
    common += ["sampler=ddim", "sampler.steps=5"]
    own = sample(compose_cfg(common, tmp_path / "a", config_name="sample"))
    posthoc = sample(compose_cfg([*common, "ema_sigma_rel=0.1"], tmp_path / "b", "sample"))
    a, b = (np.load(p)["arr_0"].astype(int) for p in (own, posthoc))
    assert np.abs(a - b).max() <= 1  # uint8 rounding of float-equal samples


@pytest.mark.parametrize("bad", ["0.5", "0", "abc"])
def test_sample_and_evaluate_refuse_a_bad_length_by_name(
    run: Path, tmp_path: Path, bad: str
) -> None:
    ckpt = run / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", "accelerator=cpu", "progress=false", f"ema_sigma_rel={bad}"]
    with pytest.raises(CheckpointError, match=rf"ema_sigma_rel='?{bad}'? .*sigma_rel must be"):
        sample(compose_cfg(common, tmp_path / "s", config_name="sample"))
    with pytest.raises(CheckpointError, match=rf"ema_sigma_rel='?{bad}'? .*sigma_rel must be"):
        evaluate(compose_cfg(common, tmp_path / "e", config_name="evaluate"))
    with pytest.raises(ConfigError, match="ema_sigma_rel chooses the EMA of ckpt_path"):
        evaluate(compose_cfg(["samples=x.npz", *common[1:]], tmp_path / "f", "evaluate"))


def test_missing_profiles_snapshots_and_contradictions_are_clear(run: Path, tmp_path: Path) -> None:
    ckpt = run / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match="use_ema=false"):
        load_model(ckpt, use_ema=False, sigma_rel=0.1)
    with pytest.raises(CheckpointError, match="must be in"):
        load_model(ckpt, sigma_rel=0.5)
    # the run directory moved: the snapshots are found beside the checkpoints
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(run / "ema_snapshots")
    try:
        before = load_model(moved / "checkpoints" / "last.ckpt", sigma_rel=0.07)
        (moved / "ema_snapshots" / "step_0000003.safetensors").unlink()
        with pytest.raises(CheckpointError, match="snapshots .* are neither in"):
            load_model(moved / "checkpoints" / "last.ckpt", sigma_rel=0.07)
    finally:
        shutil.copytree(moved / "ema_snapshots", run / "ema_snapshots")
    assert before.used_ema
    stripped = load_ckpt(ckpt)
    del stripped[POSTHOC_EMA_KEY]
    torch.save(stripped, tmp_path / "no_posthoc.ckpt")
    with pytest.raises(CheckpointError, match="no post-hoc EMA profiles"):
        load_model(tmp_path / "no_posthoc.ckpt", sigma_rel=0.1)


def test_bad_settings_are_refused_at_start(tmp_path: Path) -> None:
    from ddpm.callbacks.ema import EMA
    from ddpm.callbacks.posthoc_ema import PostHocEMA

    with pytest.raises(ValueError, match="sigma_rels must be distinct"):
        PostHocEMA(sigma_rels=[0.1, 0.1])
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        PostHocEMA(every_n_steps=0)
    with pytest.raises(ValueError, match="sigma_rel .* or half_life_kimg, not both"):
        EMA(sigma_rel=0.1, half_life_kimg=10.0)
