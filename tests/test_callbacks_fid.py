"""FID / IS callback with a small offline feature extractor: identical and different sets, the
reference-statistics cache, 1 vs 2 DDP processes, and the missing-Inception-weights path."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ddpm.callbacks.fid import FIDCallback, FIDUnavailableWarning
from ddpm.diffusion import DiffusionLoss, GaussianDiffusion
from ddpm.metrics import FeatureStats, RandomConvFeatures, feature_sums
from ddpm.module import DiffusionModule


# ----------------------------------------------------------------------------------- fixtures
class TinyEpsNet(nn.Module):
    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.conv(x)


def make_module() -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(
        net=TinyEpsNet(),
        diffusion=GaussianDiffusion(num_timesteps=50),
        loss=DiffusionLoss("simple"),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
    )


def smooth_images(n: int, seed: int, size: int = 8) -> Tensor:
    """uint8 (n, 1, size, size): blurred noise, so images have some structure."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 1, size + 2, size + 2, generator=g), 3, stride=1)
    return (x * 255).round().to(torch.uint8)


class SyntheticImages(pl.LightningDataModule):
    """The datamodule API the FID callback uses: ``reference_dataloader``, ``dataset_id``,
    ``denormalize``, ``sample_shape``."""

    def __init__(self, n: int = 64, seed: int = 0, dataset_id: str | None = None) -> None:
        super().__init__()
        self.uint8 = smooth_images(n, seed)
        self.images = self.uint8.float() / 127.5 - 1.0
        self.sample_shape = tuple(self.images.shape[1:])
        self.dataset_id = dataset_id or f"synthetic-seed{seed}-n{n}"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images), batch_size=8)

    def reference_dataloader(
        self,
        split: str = "train",
        batch_size: int | None = None,
        max_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> DataLoader:
        n = len(self.images) if max_samples is None else min(max_samples, len(self.images))
        return DataLoader(
            TensorDataset(self.images[:n][rank::world_size]), batch_size=batch_size or 16
        )

    def denormalize(self, x: Tensor) -> Tensor:
        return ((x + 1) / 2).clamp(0, 1)


class ReplaySampler:
    """Returns training image ``seed % n`` for each per-sample seed (times ``gain``): with
    gain 1 the generated set IS the reference set."""

    def __init__(self, images: Tensor, gain: float = 1.0) -> None:
        self.images, self.gain = images, gain

    def __call__(self, model, diffusion, shape, *, generator=None, device=None, **kw) -> Tensor:
        idx = torch.tensor(generator.seeds) % len(self.images)
        assert tuple(shape) == (len(idx), *self.images.shape[1:])
        return (self.images[idx] * self.gain).to(device)


class LogitFeatures(RandomConvFeatures):
    """Random-conv features plus fixed random "class logits" (so IS can be computed)."""

    provides_logits = True

    def __init__(self) -> None:
        super().__init__(num_features=16, seed=3)
        g = torch.Generator().manual_seed(5)
        self.register_buffer("proj", torch.randn(16, 10, generator=g))
        self.extractor_id = "logit-features-test"

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = super().forward(images)
        return f, 3 * f @ self.proj


def fit(dm: SyntheticImages, callbacks: list, steps: int = 2, **kw) -> pl.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    opts.update(kw)
    t = pl.Trainer(max_steps=steps, callbacks=callbacks, **opts)
    t.fit(make_module(), datamodule=dm)
    return t


def fid_callback(dm: SyntheticImages, cache_dir: Path, gain: float = 1.0, **kw) -> FIDCallback:
    opts = dict(
        every_n_steps=2,
        num_samples=64,
        batch_size=16,
        feature_extractor=RandomConvFeatures(),
        cache_dir=str(cache_dir),
    )
    opts.update(kw)
    return FIDCallback(ReplaySampler(dm.images, gain), **opts)


# ----------------------------------------------------------------------------------- tests
def test_random_conv_features_are_deterministic() -> None:
    x = smooth_images(4, 0).expand(-1, 3, -1, -1)
    a, b = RandomConvFeatures(seed=1)(x), RandomConvFeatures(seed=1)(x)
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert not torch.equal(a, RandomConvFeatures(seed=2)(x))


def test_feature_stats_round_trip() -> None:
    f = torch.randn(50, 6, dtype=torch.float64)
    stats = FeatureStats.from_sums(f.sum(0), f.T @ f, 50)
    torch.testing.assert_close(stats.mean, f.mean(0))
    torch.testing.assert_close(stats.cov, torch.cov(f.T))
    total, outer, n = stats.sums()
    torch.testing.assert_close(outer, f.T @ f)


def test_fid_zero_for_identical_sets_positive_otherwise_and_cache(tmp_path: Path) -> None:
    dm = SyntheticImages()
    cache = tmp_path / "cache"

    same = fid_callback(dm, cache)
    t = fit(dm, [same])
    ((step, metrics),) = same.history
    assert step == 2 and set(metrics) == {"val/fid"}  # no logits -> no IS
    assert abs(metrics["val/fid"]) < 1e-4
    assert float(t.callback_metrics["val/fid"]) == pytest.approx(metrics["val/fid"])
    assert same.reference_source == "computed" and same.reference_computations == 1
    path = same.reference_path
    assert path.is_file() and path.parent == cache / "fid_reference"
    mtime = os.stat(path).st_mtime_ns
    # the cached statistics are those of the reference images
    ref = feature_sums(RandomConvFeatures(), dm.reference_dataloader(), dm.denormalize, "cpu", 64)
    expected = FeatureStats.from_sums(*ref)
    torch.testing.assert_close(same.reference.mean, expected.mean)
    torch.testing.assert_close(same.reference.cov, expected.cov)

    # a different set of images: clearly > 0; the reference comes from the cache, untouched
    darker = fid_callback(dm, cache, gain=0.5)
    fit(dm, [darker])
    assert darker.history[0][1]["val/fid"] > 1e3 * max(abs(metrics["val/fid"]), 1e-6)
    assert darker.history[0][1]["val/fid"] > 0.01
    assert darker.reference_source == "cache" and darker.reference_computations == 0
    assert darker.reference_path == path and os.stat(path).st_mtime_ns == mtime

    # another dataset: another cache entry
    dm2 = SyntheticImages(seed=1)
    other = fid_callback(dm2, cache)
    fit(dm2, [other])
    assert other.reference_source == "computed" and other.reference_path != path
    assert len(list((cache / "fid_reference").glob("*.pt"))) == 2

    # same dataset id, changed content: the cache entry is recomputed, not reused
    dm3 = SyntheticImages(seed=2, dataset_id=dm.dataset_id)
    changed = fid_callback(dm3, cache)
    fit(dm3, [changed])
    assert changed.reference_path == path and changed.reference_source == "computed"
    assert abs(changed.history[0][1]["val/fid"]) < 1e-4

    # another number of reference images or another extractor: other keys
    fewer = fid_callback(dm, cache, num_reference=32)
    fit(dm, [fewer])
    assert fewer.reference_source == "computed" and fewer.reference_path != path
    assert fewer.history[0][1]["val/fid"] > 0


def test_inception_score_with_an_extractor_that_has_logits(tmp_path: Path) -> None:
    dm = SyntheticImages()
    cb = fid_callback(dm, tmp_path, feature_extractor=LogitFeatures(), is_splits=2)
    fit(dm, [cb])
    metrics = cb.history[0][1]
    assert set(metrics) == {"val/fid", "val/is", "val/is_std"}
    assert 1.0 <= metrics["val/is"] <= 10.0  # 1 <= IS <= number of classes
    assert abs(metrics["val/fid"]) < 1e-4


class DumpMetrics(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        fid_cb = next(cb for cb in trainer.callbacks if isinstance(cb, FIDCallback))
        torch.save(
            {"fid": fid_cb.history, "source": fid_cb.reference_source},
            Path(self.out) / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_same_fid_on_one_and_two_processes(tmp_path: Path) -> None:
    dm = SyntheticImages()
    single = fid_callback(dm, tmp_path / "c1", gain=0.7, num_samples=63, batch_size=8)
    fit(dm, [single])
    fid1 = single.history[0][1]["val/fid"]
    assert fid1 > 0.01

    dm = SyntheticImages()  # a fresh one: the first is attached to the first trainer
    double = fid_callback(dm, tmp_path / "c2", gain=0.7, num_samples=63, batch_size=8)
    fit(dm, [double, DumpMetrics(str(tmp_path))], devices=2, strategy="ddp_spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["source"] == r1["source"] == "computed"  # sharded over both ranks, then reduced
    fid2_rank0, fid2_rank1 = r0["fid"][0][1]["val/fid"], r1["fid"][0][1]["val/fid"]
    assert fid2_rank0 == pytest.approx(fid1, rel=1e-5)
    assert fid2_rank1 == pytest.approx(fid1, rel=1e-5)
    # the reference statistics computed on 2 ranks equal the single-process ones
    p1 = next((tmp_path / "c1" / "fid_reference").glob("*.pt"))
    p2 = next((tmp_path / "c2" / "fid_reference").glob("*.pt"))
    assert p1.name == p2.name
    s1, s2 = torch.load(p1, weights_only=True), torch.load(p2, weights_only=True)
    assert s1["n"] == s2["n"] == 64
    torch.testing.assert_close(s1["mean"], s2["mean"])
    torch.testing.assert_close(s1["cov"], s2["cov"])


def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No cached weights (empty torch hub dir), and a download URL that refuses at once, so the
    test never downloads even on a machine with network."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(tf_inception, "URL_INCEPTION_V3", "http://127.0.0.1:9/inception.pth")


def _fid_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FIDUnavailableWarning)]


def test_missing_inception_weights_warn_once_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch, tmp_path)
    dm = SyntheticImages()
    cb = FIDCallback(
        ReplaySampler(dm.images),
        every_n_steps=1,
        num_samples=8,
        batch_size=8,
        cache_dir=str(tmp_path / "cache"),
        download_timeout=2.0,
        at_train_end=True,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = fit(dm, [cb], steps=3)
    assert t.global_step == 3
    msgs = _fid_warnings(record)
    assert len(msgs) == 1, msgs
    assert "feature_extractor_weights_path" in msgs[0] and "weights-inception" in msgs[0]
    assert cb.disabled and cb.history == [] and "val/fid" not in t.callback_metrics
    assert not (tmp_path / "cache").exists()


def test_missing_local_weights_file_warns_once(tmp_path: Path) -> None:
    dm = SyntheticImages()
    missing = tmp_path / "nope" / "weights-inception-2015-12-05-6726825d.pth"
    cb = FIDCallback(
        ReplaySampler(dm.images),
        every_n_steps=1,
        num_samples=8,
        cache_dir=str(tmp_path),
        feature_extractor_weights_path=str(missing),
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(dm, [cb], steps=2)
    msgs = _fid_warnings(record)
    assert len(msgs) == 1 and str(missing) in msgs[0]
    assert cb.disabled


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        FIDCallback(num_samples=1)
    with pytest.raises(ValueError, match="feature_extractor"):
        FIDCallback(feature_extractor="inception")


def test_with_the_digits_datamodule(tmp_path: Path) -> None:
    from ddpm.data import ImageDataModule

    dm = ImageDataModule(name="digits", batch_size=32, num_workers=0)
    dm.setup("fit")
    first = torch.cat(list(dm.reference_dataloader("train", max_samples=256)))
    cb = FIDCallback(
        ReplaySampler(first),
        every_n_steps=2,
        num_samples=256,
        batch_size=64,
        num_reference=256,
        feature_extractor=RandomConvFeatures(),
        cache_dir=str(tmp_path),
    )
    fit(dm, [cb])
    assert abs(cb.history[0][1]["val/fid"]) < 1e-4
    name = cb.reference_path.name
    assert name.startswith("digits-train-16px-1ch-minus_one_one") and "n256" in name
