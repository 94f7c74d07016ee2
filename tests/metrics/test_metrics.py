"""ddpm.metrics: FID / IS / KID / precision-recall equal torch-fidelity's own ``calculate_metrics``
and the standard formulas computed here; sample files, folders, the reference cache, extractors
loaded from local files and the offline errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_fidelity
import torchmetrics.image
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.metrics import (
    DatasetImages,
    DinoV2Features,
    Features,
    FolderImages,
    NpzImages,
    RandomConvFeatures,
    SampleMetrics,
    WeightsUnavailableError,
    build_extractor,
    open_images,
    save_npz,
)
from ddpm.utils.distributed import shard


def smooth_images(n: int, seed: int, size: int = 12, gain: float = 1.0) -> Tensor:
    """uint8 (n, 3, size, size): blurred noise, brightness scaled by ``gain``."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 3, size + 2, size + 2, generator=g), 3, stride=1)
    return (x * 255 * gain).round().clamp(0, 255).to(torch.uint8)


def to_nhwc(x: Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


class Images(Dataset):
    def __init__(self, x: Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


OPTIONS = dict(isc_splits=3, kid_subsets=8, kid_subset_size=25, prc_neighborhood=3)


# ------------------------------------------------------------------ the standard formulas
def fid_formula(f1: np.ndarray, f2: np.ndarray) -> float:
    """Heusel et al. 2017, with scipy's matrix square root."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def is_formula(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    """Salimans et al. 2016 over ``splits`` splits of a seeded shuffle (torch-fidelity's)."""
    x = logits[np.random.RandomState(seed).permutation(len(logits))]
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def kid_formula(f1: np.ndarray, f2: np.ndarray, subsets: int, m: int, seed: int) -> float:
    """Bińkowski et al. 2018: unbiased MMD² with k(x, y) = (x·y/D + 1)³, mean over subsets."""
    rng = np.random.RandomState(seed)
    d, out = f1.shape[1], []
    for _ in range(subsets):
        a = f1[rng.choice(len(f1), m, replace=False)]
        b = f2[rng.choice(len(f2), m, replace=False)]
        kaa, kbb, kab = ((a @ a.T / d + 1) ** 3), ((b @ b.T / d + 1) ** 3), ((a @ b.T / d + 1) ** 3)
        off = (kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1))
        out.append(off - 2 * kab.mean())
    return float(np.mean(out))


def prc_formula(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: a sample is inside the other set's manifold when it is within
    some point's distance to that point's k-th nearest neighbour (itself excluded)."""

    def radii(x: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    d_gr = np.linalg.norm(gen[:, None] - real[None], axis=-1)
    precision = (d_gr <= radii(real)[None, :]).any(1).mean()
    recall = (d_gr.T <= radii(gen)[None, :]).any(1).mean()
    return float(precision), float(recall)


# ------------------------------------------------------------------ tests
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # a few all-zero features
def test_scores_equal_torch_fidelity_and_the_formulas(tmp_path: Path) -> None:
    gen = smooth_images(90, seed=1, gain=0.9)
    real = smooth_images(70, seed=2)
    save_npz(tmp_path / "gen.npz", to_nhwc(gen))
    save_npz(tmp_path / "real.npz", to_nhwc(real))

    metrics = SampleMetrics("randomconv", batch_size=32, **OPTIONS)
    metrics.load("cpu")
    ref = metrics.reference(NpzImages(tmp_path / "real.npz"))
    ours = metrics.score(metrics.extract_source(NpzImages(tmp_path / "gen.npz")), ref)

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(gen),
        input2=Images(real),
        feature_extractor=RandomConvFeatures.NAME,  # run by name, as torch-fidelity runs its own
        fid=True,
        isc=True,
        kid=True,
        prc=True,
        cuda=False,
        verbose=False,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        **OPTIONS,
    )
    expected = {
        "fid": theirs[torch_fidelity.KEY_METRIC_FID],
        "is": theirs[torch_fidelity.KEY_METRIC_ISC_MEAN],
        "is_std": theirs[torch_fidelity.KEY_METRIC_ISC_STD],
        "kid": theirs[torch_fidelity.KEY_METRIC_KID_MEAN],
        "kid_std": theirs[torch_fidelity.KEY_METRIC_KID_STD],
        "precision": theirs[torch_fidelity.KEY_METRIC_PRECISION],
        "recall": theirs[torch_fidelity.KEY_METRIC_RECALL],
    }
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    # the formulas, on the extractor's features in float64
    net = RandomConvFeatures()
    fg, lg = (t.double().numpy() for t in net(gen))
    fr = net(real)[0].double().numpy()
    assert ours["fid"] == pytest.approx(fid_formula(fg, fr), rel=1e-6)
    is_mean, is_std = is_formula(lg, OPTIONS["isc_splits"], seed=2020)
    assert ours["is"] == pytest.approx(is_mean, rel=1e-6)
    assert ours["is_std"] == pytest.approx(is_std, rel=1e-5)
    kid = kid_formula(fg, fr, OPTIONS["kid_subsets"], OPTIONS["kid_subset_size"], seed=2020)
    assert ours["kid"] == pytest.approx(kid, abs=1e-6)  # torch-fidelity's kernels are float32
    precision, recall = prc_formula(fg, fr, k=3)
    assert (ours["precision"], ours["recall"]) == pytest.approx((precision, recall), abs=1e-6)
    # a non-degenerate check: the sets differ, and neither manifold holds all of the other
    assert ours["fid"] > 0.01 and 1.5 < ours["is"] and 0 < ours["precision"] < 1
    assert 0 < ours["recall"] < 1


def test_identical_sets_score_zero_and_grayscale_is_repeated_to_rgb() -> None:
    x = smooth_images(40, seed=3)[:, :1]  # grayscale
    metrics = SampleMetrics("randomconv", isc=False, prc=False, kid_subset_size=20)
    metrics.load()
    f = metrics.extract(x)
    assert torch.equal(f.features, metrics.extract(x.expand(-1, 3, -1, -1)).features)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. sampling under bf16-mixed
        assert torch.equal(f.features, metrics.extract(x).features)
    scores = metrics.score(f, f)
    assert abs(scores["fid"]) < 1e-4 and abs(scores["kid"]) < 1e-3
    assert scores["kid_subset_size"] == 20


def test_sample_files_and_folders(tmp_path: Path) -> None:
    from PIL import Image

    x = smooth_images(7, seed=4, size=6)
    labels = np.array([3, 3, 7, 0, 1, 2, 9])
    path = save_npz(tmp_path / "s.npz", to_nhwc(x), labels=labels)
    with np.load(path) as data:  # improved-diffusion's layout
        assert data["arr_0"].shape == (7, 6, 6, 3) and data["arr_0"].dtype == np.uint8
        assert list(data["arr_1"]) == list(labels)
    src = open_images(path)
    assert isinstance(src, NpzImages) and len(src) == 7 and src.image_shape == (3, 6, 6)
    assert list(src.labels) == list(labels)
    blocks = [
        torch.cat(list(src.batches(r.start, r.stop, 2))) for r in (shard(7, 0, 2), shard(7, 1, 2))
    ]
    assert [len(b) for b in blocks] == [3, 4] and torch.equal(torch.cat(blocks), x)

    folder = tmp_path / "pngs" / "sub"
    folder.mkdir(parents=True)
    for i, img in enumerate(to_nhwc(x)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    src = open_images(tmp_path / "pngs")
    assert isinstance(src, FolderImages) and src.image_shape == (3, 6, 6)
    assert torch.equal(torch.cat(list(src.batches(0, 7, 3))), x)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(folder / "999.png")
    with pytest.raises(ValueError, match="999.png is .* same size"):
        list(FolderImages(tmp_path / "pngs").batches(0, 8, 8))

    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        NpzImages(tmp_path / "float.npz")
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        NpzImages(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="folder of images"):
        open_images(tmp_path / "missing.npz")


def test_reference_features_are_cached_by_content_and_extractor(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    metrics = SampleMetrics("randomconv", cache_dir=str(cache), batch_size=16)
    metrics.load()
    data = smooth_images(30, seed=5)
    first = metrics.reference(DatasetImages(data, key="toy-train"))
    assert metrics.reference_source == "computed"
    path = metrics.reference_path
    assert path is not None and path.is_file() and path.parent == cache / "fid_reference"
    assert torch.equal(first.features, metrics.extract(data).features)
    mtime = os.stat(path).st_mtime_ns

    again = metrics.reference(DatasetImages(data, key="toy-train"))
    assert metrics.reference_source == "cache" and metrics.reference_path == path
    assert torch.equal(again.features, first.features) and os.stat(path).st_mtime_ns == mtime

    # the same key over other images (a data set changed on disk): recomputed, not reused
    changed = smooth_images(30, seed=6)
    metrics.reference(DatasetImages(changed, key="toy-train"))
    assert metrics.reference_source == "computed" and metrics.reference_path == path

    # fewer images, or another extractor: other entries
    metrics.reference(DatasetImages(changed, key="toy-train", limit=20))
    assert metrics.reference_path != path
    other = SampleMetrics("randomconv", cache_dir=str(cache))
    other.load()
    other.net = RandomConvFeatures(seed=1)  # other weights
    other.reference(DatasetImages(changed, key="toy-train"))
    assert other.reference_source == "computed" and other.reference_path != path
    assert len(list((cache / "fid_reference").glob("*.pt"))) == 3


def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty torch hub cache, and a download URL that refuses at once (never downloads even
    on a machine with network)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(tf_inception, "URL_INCEPTION_V3", "http://127.0.0.1:9/inception.pth")


def test_offline_inception_error_names_the_file_the_place_and_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offline(monkeypatch, tmp_path)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    file = "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(WeightsUnavailableError) as e:
        SampleMetrics("inception", download_timeout=2.0).load()
    msg = str(e.value)
    assert str(hub / file) in msg and "metrics.weights_path=/path/to/" + file in msg
    assert "github.com/toshas/torch-fidelity" in msg
    assert "callbacks.fid.metrics.weights_path=" in str(
        e.value.for_setting("callbacks.fid.metrics.weights_path")
    )
    missing = tmp_path / file
    with pytest.raises(WeightsUnavailableError, match=f"{missing} does not exist"):
        build_extractor("inception", str(missing))
    with pytest.raises(ValueError, match="must be one of"):
        SampleMetrics("vgg")


def _random_inception_weights(path: Path) -> None:
    """torch-fidelity's Inception-v3 with its random initial weights, saved like the real file."""

    class Untrained(torch_fidelity.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    torch.save({}, path.with_suffix(".empty"))
    net = Untrained(
        "inception-v3-compat",
        ["2048"],
        feature_extractor_weights_path=str(path.with_suffix(".empty")),
    )
    torch.save(net.state_dict(), path)


def test_inception_loads_from_a_local_weights_file(tmp_path: Path) -> None:
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    _random_inception_weights(weights)
    metrics = SampleMetrics("inception", weights_path=str(weights), batch_size=2)
    metrics.load()
    f = metrics.extract(smooth_images(2, seed=7, size=8))
    assert f.features.shape == (2, 2048) and f.logits is not None and f.logits.shape == (2, 1008)
    assert metrics.extractor_id.startswith("inception-v3-compat-")


class _TinyViT(torch.nn.Module):
    """Stands in for DINOv2's ViT-L/14 (same call: normalised (N, 3, 224, 224) -> (N, D))."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.mean(dim=(2, 3)))


def test_dinov2_loads_only_from_local_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsUnavailableError, match="facebookresearch_dinov2_main"):
        build_extractor("dinov2")
    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        "from test_metrics import _TinyViT\n\n"
        "def dinov2_vitl14(pretrained=True):\n"
        "    assert not pretrained\n"
        "    return _TinyViT()\n"
    )
    weights = tmp_path / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(WeightsUnavailableError, match="dinov2_vitl14_pretrain.pth") as e:
        build_extractor("dinov2", str(weights), dinov2_repo=str(repo))
    assert "metrics.weights_path=" in str(e.value)
    vit = _TinyViT()
    torch.save(vit.state_dict(), weights)
    net = build_extractor("dinov2", str(weights), dinov2_repo=str(repo))
    assert isinstance(net, DinoV2Features)
    x = smooth_images(2, seed=8, size=10)
    # EDM2's preprocessing: bicubic antialiased resize to 224, ImageNet mean and std
    y = F.interpolate(x.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    y = (y - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(net(x)[0], vit(y))
    metrics = SampleMetrics(
        "dinov2", weights_path=str(weights), dinov2_repo=str(repo), kid_subset_size=2
    )
    metrics.load()
    scores = metrics.score(metrics.extract(x), metrics.extract(x))
    assert "is" not in scores and "Inception Score needs class logits" in metrics.skipped["is"]


def test_shards_cover_the_range_in_order() -> None:
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            blocks = [shard(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="kid_subset_size"):
        SampleMetrics(kid_subset_size=0)
    with pytest.raises(ValueError, match="no metric selected"):
        SampleMetrics(fid=False, isc=False, kid=False, prc=False)
    with pytest.raises(ValueError, match="has no weights"):
        build_extractor("randomconv", "/some/file.pth")


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # a few all-zero features
def test_scores_are_torchmetrics_states_fed_batch_by_batch() -> None:
    """The training loop's way (reference once, generated batches one by one, reset between
    evaluations) gives the numbers of the one-shot score, which equal torch-fidelity's."""
    metrics = SampleMetrics("randomconv", batch_size=32, **OPTIONS)
    metrics.load("cpu")
    gen = metrics.extract(smooth_images(90, seed=1, gain=0.9))
    ref = metrics.extract(smooth_images(70, seed=2))
    whole = metrics.score(gen, ref)
    scores = metrics.scores()
    scores.add_reference(ref)
    for _ in range(2):  # a second evaluation: the reference is kept, the samples are not
        for rows, logits in zip(gen.features.split(16), gen.logits.split(16)):
            scores.add(Features(rows, logits))
        assert scores.compute() == pytest.approx(whole, rel=1e-9)
        scores.reset()
    assert {type(m).__mro__[1] for m in scores.metrics.values()} == {
        torchmetrics.image.FrechetInceptionDistance,
        torchmetrics.image.KernelInceptionDistance,
        torchmetrics.image.InceptionScore,
    }
