"""sample.py / evaluate.py on a checkpoint made by a tiny real training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.checkpoint import CheckpointError
from ddpm.tasks.evaluate import evaluate
from ddpm.tasks.sample import sample
from ddpm.tasks.train import train
from hydra_utils import SRC_DIR, TINY, compose_cfg
from test_train import run_cli


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    cfg = compose_cfg(
        [
            *TINY,
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "callbacks.sample_grid.every_n_steps=100",
            "sampler.steps=5",
        ],
        tmp,
    )
    train(cfg)
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def sample_cfg(tmp_path: Path, ckpt: Path, *extra: str):
    return compose_cfg(
        [f"ckpt_path={ckpt}", "accelerator=cpu", "progress=false", *extra],
        tmp_path,
        config_name="sample",
    )


def test_sample_writes_npz_of_requested_count_and_grid(tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = sample_cfg(
        tmp_path,
        tiny_ckpt,
        "sampler=ddim",
        "sampler.steps=5",
        "num_samples=10",
        "batch_size=4",
        "seed=3",
    )
    path = sample(cfg)
    arr = np.load(path)["arr_0"]
    assert arr.shape == (10, 16, 16, 1) and arr.dtype == np.uint8
    assert (path.parent / "grid.png").is_file()
    info = json.loads((path.parent / "sample_info.json").read_text())
    assert info["used_ema"] is True and info["num_samples"] == 10


def test_sample_does_not_depend_on_batch_size(tiny_ckpt: Path, tmp_path: Path) -> None:
    a = sample(
        sample_cfg(
            tmp_path / "a",
            tiny_ckpt,
            "sampler=ddpm",
            "sampler.steps=10",
            "num_samples=9",
            "batch_size=9",
        )
    )
    b = sample(
        sample_cfg(
            tmp_path / "b",
            tiny_ckpt,
            "sampler=ddpm",
            "sampler.steps=10",
            "num_samples=9",
            "batch_size=4",
        )
    )
    np.testing.assert_array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver"])
def test_every_sampler_runs_from_the_command_config(
    sampler: str, tiny_ckpt: Path, tmp_path: Path
) -> None:
    path = sample(
        sample_cfg(
            tmp_path,
            tiny_ckpt,
            f"sampler={sampler}",
            "sampler.steps=8",
            "num_samples=3",
            "batch_size=3",
        )
    )
    assert np.load(path)["arr_0"].shape[0] == 3


def test_sample_uses_the_training_sampler_by_default(tiny_ckpt: Path, tmp_path: Path) -> None:
    path = sample(sample_cfg(tmp_path, tiny_ckpt, "num_samples=2", "batch_size=2"))
    info = json.loads((path.parent / "sample_info.json").read_text())
    assert info["sampler"]["steps"] == 5  # what the run was trained with (sampler.steps=5)


def test_sample_errors(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="ckpt_path"):
        sample(compose_cfg(["accelerator=cpu"], tmp_path, config_name="sample"))
    with pytest.raises(CheckpointError, match="not found"):
        sample(sample_cfg(tmp_path, tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="T=50"):
        sample(sample_cfg(tmp_path, tiny_ckpt, "sampler=ddim", "sampler.steps=51"))


def test_checkpoint_from_another_network_is_rejected(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["ddpm_config"]["model"]["model_channels"] = 48  # config says another network
    bad = tmp_path / "other.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        sample(sample_cfg(tmp_path, bad))


def test_evaluate_writes_finite_metrics(tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            f"ckpt_path={tiny_ckpt}",
            "nll.num_images=8",
            "batch_size=8",
            "fid.enabled=false",
            "progress=false",
            "device=cpu",
        ],
        tmp_path,
        config_name="evaluate",
    )
    metrics = evaluate(cfg)
    assert np.isfinite(metrics["test/nll_bpd"]) and metrics["test/nll_bpd"] > 0
    parts = (
        metrics["test/nll_prior_bpd"] + metrics["test/nll_decoder_bpd"] + metrics["test/nll_vb_bpd"]
    )
    assert parts == pytest.approx(metrics["test/nll_bpd"], rel=1e-5)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["test/nll_bpd"] == pytest.approx(metrics["test/nll_bpd"])


@pytest.mark.slow
def test_sample_cli_prints_the_path(tiny_ckpt: Path, tmp_path: Path) -> None:
    res = run_cli(
        [
            f"ckpt_path={tiny_ckpt}",
            "sampler=ddim",
            "sampler.steps=4",
            "num_samples=5",
            "batch_size=5",
            "accelerator=cpu",
            "progress=false",
        ],
        tmp_path,
        script=str(SRC_DIR / "sample.py"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    printed = Path(res.stdout.strip().splitlines()[-1])
    assert printed.name == "samples.npz" and (tmp_path / printed).is_file() or printed.is_file()


def test_evaluate_fid_with_an_offline_extractor(tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            f"ckpt_path={tiny_ckpt}",
            "nll.enabled=false",
            "fid.num_samples=16",
            "fid.batch_size=8",
            "+fid.feature_extractor._target_=ddpm.metrics.RandomConvFeatures",
            "sampler=ddim",
            "sampler.steps=4",
            "progress=false",
            "device=cpu",
            "batch_size=64",
        ],
        tmp_path,
        config_name="evaluate",
    )
    metrics = evaluate(cfg)
    assert np.isfinite(metrics["test/fid"]) and metrics["test/fid"] > 0
    # the reference statistics were cached under paths.cache_dir
    assert list((tmp_path / ".cache").rglob("*.pt"))


def test_evaluate_without_inception_weights_still_reports_nll(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch
) -> None:
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights
    cfg = compose_cfg(
        [
            f"ckpt_path={tiny_ckpt}",
            "nll.num_images=4",
            "batch_size=4",
            "fid.num_samples=8",
            "sampler=ddim",
            "sampler.steps=3",
            "progress=false",
            "device=cpu",
        ],
        tmp_path,
        config_name="evaluate",
    )
    with pytest.warns(UserWarning, match="Inception"):
        metrics = evaluate(cfg)
    assert "test/fid" not in metrics and np.isfinite(metrics["test/nll_bpd"])


def test_evaluate_on_a_2d_playground_checkpoint_reports_distances(tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            "experiment=swiss_roll",
            "logger=none",
            "trainer.max_steps=20",
            "trainer.enable_progress_bar=false",
            "trainer.val_check_interval=20",
            "callbacks.model_checkpoint.every_n_train_steps=20",
            "callbacks.sample_grid.every_n_steps=20",
        ],
        tmp_path / "t",
    )
    train(cfg)
    ckpt = tmp_path / "t" / "run" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(
        [
            f"ckpt_path={ckpt}",
            "fid.num_samples=200",
            "batch_size=200",
            "progress=false",
            "device=cpu",
        ],
        tmp_path / "e",
        config_name="evaluate",
    )
    metrics = evaluate(cfg)
    assert np.isfinite(metrics["test/energy_distance"]) and "test/nll_bpd" not in metrics
