"""sample.py / evaluate.py on a checkpoint made by a tiny real training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_utils import run_cli
from ddpm.checkpoint import CheckpointError
from ddpm.tasks.evaluate import evaluate
from ddpm.tasks.sample import sample
from ddpm.tasks.train import train
from hydra_utils import SRC_DIR, compose_cfg


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


# ------------------------------------------------------------------ evaluate.py
def eval_cfg(tmp_path: Path, *overrides: str):
    return compose_cfg(
        ["accelerator=cpu", "progress=false", *overrides], tmp_path, config_name="evaluate"
    )


RANDOMCONV = ["metrics.extractor=randomconv", "metrics.kid_subset_size=10", "metrics.isc_splits=2"]


def test_evaluate_nll_is_finite_and_independent_of_the_batch_size(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    common = [f"ckpt_path={tiny_ckpt}", "nll.num_images=6", "metrics.enabled=false"]
    metrics = evaluate(eval_cfg(tmp_path / "a", *common, "batch_size=6"))
    assert np.isfinite(metrics["test/nll_bpd"]) and metrics["test/nll_bpd"] > 0
    parts = (
        metrics["test/nll_prior_bpd"] + metrics["test/nll_decoder_bpd"] + metrics["test/nll_vb_bpd"]
    )
    assert parts == pytest.approx(metrics["test/nll_bpd"], rel=1e-5)
    assert metrics["test/nll_num_images"] == 6 and "fid" not in metrics
    on_disk = json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())
    assert on_disk["test/nll_bpd"] == pytest.approx(metrics["test/nll_bpd"])
    # image i draws its noise from seed + i: the bound does not depend on the batching
    again = evaluate(eval_cfg(tmp_path / "b", *common, "batch_size=4"))
    assert again["test/nll_bpd"] == pytest.approx(metrics["test/nll_bpd"], rel=1e-6)
    assert "test/nll_ode_bpd" not in metrics  # the ODE's only where asked, beside a bound


def test_evaluate_reports_the_pf_ode_likelihood_beside_the_bound(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    """nll.ode.enabled=true: both numbers for a DDPM network; the ODE's is dequantised, so it
    bounds the same discrete NLL in the same units (finite, positive)."""
    ode = ["nll.ode.enabled=true", "nll.ode.rtol=1e-3", "nll.ode.atol=1e-3"]
    common = [f"ckpt_path={tiny_ckpt}", "nll.num_images=2", "metrics.enabled=false", *ode]
    metrics = evaluate(eval_cfg(tmp_path / "a", *common, "batch_size=2"))
    assert np.isfinite(metrics["test/nll_bpd"]) and metrics["test/nll_bpd"] > 0
    assert np.isfinite(metrics["test/nll_ode_bpd"]) and metrics["test/nll_ode_bpd"] > 0
    assert metrics["test/nll_ode_nfe"] > 0


def test_evaluate_scores_a_sample_file_like_the_checkpoint_it_came_from(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    npz = sample(
        sample_cfg(tmp_path / "s", tiny_ckpt, "sampler=ddim", "sampler.steps=3", "num_samples=24")
    )
    cache = f"metrics.cache_dir={tmp_path / 'cache'}"
    from_file = evaluate(
        eval_cfg(tmp_path / "f", f"samples={npz}", "ref=digits-train", cache, *RANDOMCONV)
    )
    assert from_file["num_samples"] == 24 and from_file["num_reference"] == 1617
    assert from_file["reference_features"] == "computed" and "global_step" not in from_file
    for key in ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall"):
        assert np.isfinite(from_file[key]), key
    assert from_file["fid"] > 0
    # sampled by evaluate.py itself (same seeds, same sampler): the same images, the same scores;
    # its default reference (the checkpoint's data, train split) is the cached one
    sampled = evaluate(
        eval_cfg(
            tmp_path / "c",
            f"ckpt_path={tiny_ckpt}",
            "nll.enabled=false",
            "num_samples=24",
            "batch_size=10",
            "sampler=ddim",
            "sampler.steps=3",
            cache,
            *RANDOMCONV,
        )
    )
    assert sampled["reference_features"] == "cache"
    for key in ("fid", "is", "kid", "precision", "recall"):
        assert sampled[key] == pytest.approx(from_file[key], rel=1e-6), key
    # the reference can be a sample file too (or a folder); and it must have the same resolution
    itself = evaluate(eval_cfg(tmp_path / "i", f"samples={npz}", f"ref={npz}", *RANDOMCONV))
    assert abs(itself["fid"]) < 1e-4 and itself["precision"] == itself["recall"] == 1.0
    other = tmp_path / "big.npz"
    np.savez(other, arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="8x8 images, the scored ones are 16x16"):
        evaluate(eval_cfg(tmp_path / "r", f"samples={npz}", f"ref={other}", *RANDOMCONV))


def test_evaluate_bad_input_errors(tmp_path: Path) -> None:
    from ddpm.errors import ConfigError

    with pytest.raises(ConfigError, match="samples=PATH.npz"):
        evaluate(eval_cfg(tmp_path))
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((4, 16, 16, 1), np.uint8))
    with pytest.raises(ConfigError, match="needs a reference.*ref=cifar10-train"):
        evaluate(eval_cfg(tmp_path, f"samples={npz}", *RANDOMCONV))
    with pytest.raises(ConfigError, match="ref=nope-train: no such file.*cifar10, digits"):
        evaluate(eval_cfg(tmp_path, f"samples={npz}", "ref=nope-train", *RANDOMCONV))


def test_evaluate_offline_without_inception_weights(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    from ddpm.metrics import WeightsUnavailableError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights
    monkeypatch.setattr(tf_inception, "URL_INCEPTION_V3", "http://127.0.0.1:9/inception.pth")
    npz = tmp_path / "s.npz"
    np.savez(npz, arr_0=np.zeros((4, 16, 16, 1), np.uint8))
    # nothing else to report: the error names the file, where it goes and evaluate.py's setting
    with pytest.raises(WeightsUnavailableError, match="metrics.weights_path=/path/to/weights"):
        evaluate(eval_cfg(tmp_path / "a", f"samples={npz}", "ref=digits-train"))
    # next to the NLL: skipped, and metrics.json says what and why
    with pytest.warns(UserWarning, match="evaluate.py skips fid, is, kid, precision/recall"):
        metrics = evaluate(
            eval_cfg(tmp_path / "b", f"ckpt_path={tiny_ckpt}", "nll.num_images=2", "batch_size=2")
        )
    assert np.isfinite(metrics["test/nll_bpd"]) and "fid" not in metrics
    on_disk = json.loads((tmp_path / "b" / "run" / "metrics.json").read_text())
    assert set(on_disk["skipped"]) == {"fid", "is", "kid", "precision/recall"}
    assert all("metrics.weights_path=" in why for why in on_disk["skipped"].values())
    assert "callbacks.fid" not in on_disk["skipped"]["fid"]


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
    metrics = evaluate(
        eval_cfg(tmp_path / "e", f"ckpt_path={ckpt}", "num_samples=200", "batch_size=200")
    )
    assert np.isfinite(metrics["test/energy_distance"]) and "test/nll_bpd" not in metrics


@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_sample_and_evaluate_like_one(tiny_ckpt: Path, tmp_path: Path) -> None:
    """sample.py devices=2 writes the same file as one process, evaluate.py scores it without a
    checkpoint, and evaluate.py devices=2 (sampling, NLL, reference features) equals 1 process."""
    sampling = ["sampler=ddim", "sampler.steps=3", "num_samples=21", "batch_size=4"]
    one = sample(sample_cfg(tmp_path / "s1", tiny_ckpt, *sampling))
    res = run_cli(
        [
            f"ckpt_path={tiny_ckpt}",
            *sampling,
            "accelerator=cpu",
            "devices=2",
            "progress=false",
            f"run_dir={tmp_path / 's2'}",
        ],
        tmp_path,
        script=str(SRC_DIR / "sample.py"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    two = tmp_path / "s2" / "samples.npz"
    np.testing.assert_array_equal(np.load(two)["arr_0"], np.load(one)["arr_0"])
    scored = evaluate(eval_cfg(tmp_path / "f", f"samples={two}", "ref=digits-train", *RANDOMCONV))

    args = [
        f"ckpt_path={tiny_ckpt}",
        *sampling,
        "nll.num_images=5",
        *RANDOMCONV,
        "metrics.batch_size=100",
    ]
    single = evaluate(eval_cfg(tmp_path / "e1", *args, f"metrics.cache_dir={tmp_path / 'c1'}"))
    res = run_cli(
        [
            *args,
            "accelerator=cpu",
            "devices=2",
            "progress=false",
            f"run_dir={tmp_path / 'e2'}",
            f"metrics.cache_dir={tmp_path / 'c2'}",
        ],
        tmp_path,
        script=str(SRC_DIR / "evaluate.py"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    double = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert double["reference_features"] == single["reference_features"] == "computed"
    keys = ["test/nll_bpd", "test/nll_vb_bpd", "fid", "is", "kid", "precision", "recall"]
    for key in keys:
        assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    for key in keys[2:]:
        assert scored[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
