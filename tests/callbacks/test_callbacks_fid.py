"""The in-training FID / IS callback (ddpm.metrics underneath) with the test-sized extractor on the
digits: identical and different sets, the reference cache, IS, 1 vs 2 DDP processes, and the
missing-Inception-weights path."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from ddpm.callbacks.fid import FIDCallback, FIDUnavailableWarning
from ddpm.data import ImageDataModule
from ddpm.metrics import DatasetImages, SampleMetrics
from fit_utils import TinyEpsNet, digits, fit, make_module

NUM_REF = 128


class ReplaySampler:
    """Returns reference image ``seed % n`` for each per-sample seed (times ``gain``): with gain 1
    and ``num_samples = n`` the generated set IS the reference set."""

    def __init__(self, gain: float = 1.0) -> None:
        dm = digits()
        self.images = dm.normalizer(dm.dataset("train").data[:NUM_REF])
        self.gain = gain

    def __call__(self, model, diffusion, shape, *, generator=None, device=None, **kw) -> Tensor:
        idx = torch.tensor(generator.seeds) % len(self.images)
        assert tuple(shape) == (len(idx), *self.images.shape[1:])
        return (self.images[idx] * self.gain).to(device)


def fid_callback(cache_dir: Path | None, gain: float = 1.0, **kw) -> FIDCallback:
    opts = dict(
        every_n_steps=2,
        num_samples=NUM_REF,
        batch_size=32,
        num_reference=NUM_REF,
        metrics=dict(
            extractor="randomconv", isc_splits=2, cache_dir=str(cache_dir) if cache_dir else None
        ),
    )
    opts.update(kw)
    return FIDCallback(ReplaySampler(gain), **opts)


def test_fid_zero_for_identical_sets_positive_otherwise_and_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    same = fid_callback(cache)
    t = fit(make_module(seed=0, lr=1e-3), digits(), [same], steps=2)
    ((step, metrics),) = same.history
    assert step == 2 and set(metrics) == {"val/fid", "val/is", "val/is_std"}
    assert abs(metrics["val/fid"]) < 1e-4
    assert float(t.callback_metrics["val/fid"]) == pytest.approx(metrics["val/fid"])
    assert 1.0 < metrics["val/is"] < 10.0  # 1 <= IS <= number of classes
    assert same.metrics.reference_source == "computed" and same.reference_computations == 1
    path = same.metrics.reference_path
    assert path is not None and path.is_file() and path.parent == cache / "fid_reference"
    assert (
        path.name.startswith("digits-train-16px-1ch-minus_one_one") and f"n{NUM_REF}" in path.name
    )
    # the cached features are those of the un-augmented reference images
    dm = digits()
    expected = SampleMetrics("randomconv")
    expected.load()
    ref = DatasetImages(dm.dataset("train"), key="", limit=NUM_REF)
    torch.testing.assert_close(
        same.scores.reference.features, expected.extract_source(ref).features
    )

    # a different set of images: clearly > 0; the reference comes from the cache
    darker = fid_callback(
        cache, gain=0.5, metrics=dict(extractor="randomconv", cache_dir=str(cache), isc=False)
    )
    fit(make_module(seed=0, lr=1e-3), digits(), [darker], steps=2)
    assert set(darker.history[0][1]) == {"val/fid"}
    assert darker.history[0][1]["val/fid"] > 1e3 * max(abs(metrics["val/fid"]), 1e-6)
    assert darker.metrics.reference_source == "cache" and darker.reference_computations == 0
    assert darker.metrics.reference_path == path


class DumpMetrics(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        cb = next(cb for cb in trainer.callbacks if isinstance(cb, FIDCallback))
        torch.save(
            {"fid": cb.history, "source": cb.metrics.reference_source},
            Path(self.out) / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_same_scores_on_one_and_two_processes(tmp_path: Path) -> None:
    kw = dict(
        num_samples=63,
        batch_size=8,
        metrics=dict(extractor="randomconv", isc_splits=3, kid=True, kid_subset_size=30, prc=True),
    )
    single = fid_callback(None, gain=0.7, **kw)
    fit(make_module(seed=0, lr=1e-3), digits(), [single], steps=2)
    one = single.history[0][1]
    assert one["val/fid"] > 0.01 and {"val/kid", "val/precision", "val/recall"} <= set(one)

    double = fid_callback(None, gain=0.7, **kw)
    fit(
        make_module(seed=0, lr=1e-3),
        digits(),
        [double, DumpMetrics(str(tmp_path))],
        steps=2,
        devices=2,
        strategy="ddp_spawn",
    )
    for r in (0, 1):
        dump = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert dump["source"] == "computed"  # each rank extracted its block of the reference
        two = dump["fid"][0][1]
        assert set(two) == set(one)
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), k


def test_missing_inception_weights_warn_once_naming_the_callback_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights
    monkeypatch.setattr(tf_inception, "URL_INCEPTION_V3", "http://127.0.0.1:9/inception.pth")
    cb = FIDCallback(
        ReplaySampler(),
        every_n_steps=1,
        num_samples=8,
        batch_size=8,
        metrics=dict(cache_dir=str(tmp_path / "cache"), download_timeout=2.0),
        at_train_end=True,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = fit(make_module(seed=0, lr=1e-3), digits(), [cb], steps=3)
    assert t.global_step == 3
    msgs = [str(w.message) for w in record if issubclass(w.category, FIDUnavailableWarning)]
    assert len(msgs) == 1, msgs
    assert "callbacks.fid.metrics.weights_path=/path/to/weights-inception" in msgs[0]
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msgs[0]
    assert cb.disabled and cb.history == [] and "val/fid" not in t.callback_metrics
    assert not (tmp_path / "cache").exists()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        FIDCallback(num_samples=1)
    with pytest.raises(ValueError, match="metrics must be"):
        FIDCallback(metrics="inception")
    with pytest.raises(ValueError, match="extractor must be one of"):
        FIDCallback(metrics=dict(extractor="vgg"))


def test_config_composes_the_shared_metric_options(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from hydra_utils import compose_cfg

    cfg = compose_cfg(
        ["callbacks=[default,fid]", "callbacks.fid.metrics.extractor=randomconv"], tmp_path
    )
    cb = instantiate(cfg.callbacks.fid)
    m = cb.metrics
    assert isinstance(m, SampleMetrics) and m.extractor == "randomconv"
    assert (m.fid, m.isc, m.kid, m.prc) == (True, True, False, False)
    assert m.cache_dir == cfg.paths.cache_dir


class CondTinyEpsNet(TinyEpsNet):
    """A class-conditional stand-in (10 classes, null class 10) that ignores its labels."""

    null_class = 10

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return super().forward(x, t)


class LabelRecorder(ReplaySampler):
    """:class:`ReplaySampler` that records the (seeds, class_labels) of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, model, diffusion, shape, *, generator=None, device=None, **kw) -> Tensor:
        self.calls.append((list(generator.seeds), kw["class_labels"].tolist()))
        return super().__call__(model, diffusion, shape, generator=generator, device=device)


def test_conditional_model_samples_balanced_classes(tmp_path: Path) -> None:
    """Sample i of the FID set is drawn for class i mod K (a conditional network)."""
    sampler = LabelRecorder()
    cb = FIDCallback(
        sampler,
        every_n_steps=2,
        num_samples=40,
        batch_size=16,
        seed=5,
        num_reference=NUM_REF,
        metrics=dict(extractor="randomconv", isc=False, cache_dir=None),
    )
    module = make_module(CondTinyEpsNet(), lr=1e-3)
    dm = ImageDataModule(name="digits", batch_size=32, num_workers=0, conditional=True)
    pl.Trainer(
        max_steps=2,
        callbacks=[cb],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, datamodule=dm)
    seeds = [s for call in sampler.calls for s in call[0]]
    labels = [y for call in sampler.calls for y in call[1]]
    assert seeds == list(range(5, 45)) and labels == [i % 10 for i in range(40)]
