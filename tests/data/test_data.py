"""ddpm.data: datamodules, datasets, configs. No network: torchvision downloads are blocked."""

from __future__ import annotations

import inspect
import socket
import time
import warnings
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

from ddpm.data import (
    SOURCES,
    BadImageError,
    BatchTransform,
    DatasetUnavailableError,
    ImageDataModule,
    Normalization,
    ToyDataModule,
    per_device_batch_size,
)
from ddpm.data.transforms import random_flip, resize_center_crop, to_channels
from ddpm.errors import DataError
from hydra_utils import REPO_DIR

CONF_DIR = REPO_DIR / "conf" / "data"


def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def digits() -> ImageDataModule:
    dm = ImageDataModule("digits", batch_size=64)
    dm.setup()
    return dm


# -- digits -----------------------------------------------------------------------------------


def test_digits_shapes_range_and_splits(digits: ImageDataModule) -> None:
    assert digits.sample_shape == (1, 16, 16)
    sizes = {s: len(digits.dataset(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 1617, "val": 180, "test": 180}
    for loader in (digits.train_dataloader(), digits.val_dataloader(), digits.test_dataloader()):
        x = next(iter(loader))
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 16, 16)
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert x.min() == -1.0 and x.max() == 1.0  # background and full strokes
    assert len(digits.train_dataloader()) == 1617 // 64  # drop_last
    assert sum(len(b) for b in digits.val_dataloader()) == 180  # every val sample


def test_digits_val_split_deterministic(digits: ImageDataModule) -> None:
    again = ImageDataModule("digits", batch_size=32)
    val = torch.cat(list(digits.val_dataloader()))
    assert torch.equal(val, torch.cat(list(again.val_dataloader())))
    assert torch.equal(val, torch.cat(list(digits.val_dataloader())))  # same order each epoch
    other_seed = ImageDataModule("digits", seed=1)
    assert not torch.equal(val, torch.cat(list(other_seed.val_dataloader())))
    # train and val are disjoint and together are the whole dataset
    train = digits.dataset("train").data.flatten(1)
    both = torch.cat([train, digits.dataset("val").data.flatten(1)])
    assert torch.unique(both, dim=0).shape[0] == torch.unique(train, dim=0).shape[0] + len(val)


def test_denormalize_inverts_normalization(digits: ImageDataModule) -> None:
    raw = digits.dataset("val").data[:16]
    x = next(iter(digits.reference_dataloader("val", batch_size=16)))
    torch.testing.assert_close(digits.denormalize(x), raw.float() / 255.0)
    std = ImageDataModule("digits", normalization="standardize")
    x = torch.cat(list(std.reference_dataloader("train")))
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1.0) < 1e-2
    raw = std.dataset("train").data
    torch.testing.assert_close(std.denormalize(x), raw.float() / 255.0, atol=1e-5, rtol=0)
    assert std.data_key_for("train") != digits.data_key_for("train")


def test_random_flip_per_sample() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 4, 5), dtype=torch.uint8)
    ref = BatchTransform(Normalization())(x)
    out = random_flip(ref.clone(), torch.Generator().manual_seed(0))
    same = (out == ref).flatten(1).all(1)
    flipped = (out == ref.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and 10 < int(flipped.sum()) < 54
    # the datamodule flips training batches only
    dm = ImageDataModule("digits", random_flip=True, batch_size=1617)
    assert dm.train_dataloader().augment is random_flip
    assert not hasattr(dm.val_dataloader(), "augment")
    assert not hasattr(dm.reference_dataloader(), "augment")


def test_flipped_batches_are_the_same_with_workers_and_after_a_resume(tmp_path: Path) -> None:
    """An image folder loads with workers by default: its flipped batches equal those of a
    loader without workers, and a loader resumed mid-epoch continues them exactly."""
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    kw = dict(root=tmp_path, image_size=8, batch_size=4, val_split=0.1)

    def batches(num_workers: int | None, skip: int = 0, flip: bool = True) -> list[torch.Tensor]:
        dm = ImageDataModule("image_folder", num_workers=num_workers, random_flip=flip, **kw)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert (loader.num_workers > 0) if num_workers is None else loader.num_workers == 0
        loader.load_state_dict({"seed": loader.sampler.seed, "epoch": 1, "batches": skip})
        return list(loader)

    alone, workers, resumed = batches(0), batches(None), batches(None, skip=2)
    plain = torch.cat(batches(0, flip=False))
    flipped = (torch.cat(alone) != plain).flatten(1).any(1)
    assert torch.equal(torch.cat(alone)[flipped], plain[flipped].flip(-1)) and flipped.any()
    assert len(alone) == 5
    for a, b in zip(alone, workers, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(alone[2:], resumed, strict=True):
        assert torch.equal(a, b)


def test_reference_dataloader_deterministic_and_sharded(digits: ImageDataModule) -> None:
    full = torch.cat(list(digits.reference_dataloader()))
    assert full.shape == (1617, 1, 16, 16)
    assert torch.equal(full, torch.cat(list(digits.reference_dataloader(batch_size=100))))
    shards = [torch.cat(list(digits.reference_dataloader(rank=r, world_size=3))) for r in range(3)]
    assert sum(len(s) for s in shards) == 1617
    assert torch.equal(shards[1][0], full[1])
    assert len(torch.cat(list(digits.reference_dataloader(max_samples=100)))) == 100


def test_per_device_batch_size() -> None:
    assert per_device_batch_size(128, 1) == 128
    assert per_device_batch_size(128, 4) == 32
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by the 4 devices"):
        per_device_batch_size(10, 4)
    # a real Trainer with 4 CPU processes configured (none launched: no fit)
    dm = ImageDataModule("digits", batch_size=10)
    dm.trainer = _trainer(devices=4, strategy="ddp")
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by the 4 devices"):
        dm.setup("fit")
    dm = ImageDataModule("digits", batch_size=128, val_batch_size=200)
    dm.trainer = _trainer(devices=4, strategy="ddp")
    dm.setup("fit")
    assert (dm.per_device_batch_size, dm.per_device_val_batch_size) == (32, 50)
    assert dm.train_dataloader().batch_size == 32


class _TinyModule(pl.LightningModule):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = torch.nn.Linear(dim, dim)
        self.shapes: list[tuple[int, ...]] = []

    def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return (self.net(x.flatten(1)) - x.flatten(1)).square().mean()

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", (self.net(x.flatten(1)) - x.flatten(1)).square().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    "dm",
    [
        lambda: ImageDataModule("digits", batch_size=32, random_flip=True),
        lambda: ToyDataModule("two_moons", n_train=500, n_val=100, batch_size=50),
    ],
    ids=["digits", "two_moons"],
)
def test_real_trainer_fit(dm) -> None:
    dm = dm()
    model = _TinyModule(int(np.prod(dm.sample_shape)))
    trainer = _trainer(devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, datamodule=dm)
    assert dm.world_size == 1 and dm.per_device_batch_size == dm.batch_size
    assert model.shapes == [(dm.batch_size, *dm.sample_shape)] * 3
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="name must be one of"):
        ImageDataModule("imagenet")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ImageDataModule("digits", channels=2)
    with pytest.raises(ValueError, match="normalization must be one of"):
        ImageDataModule("digits", normalization="zero_one")
    with pytest.raises(ValueError, match="val_split"):
        ImageDataModule("digits", val_split=1.5)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ImageDataModule("digits", batch_size=0)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        ImageDataModule("digits", batch_size=4096).train_dataloader()
    with pytest.raises(ValueError, match="name must be one of"):
        ToyDataModule("spiral")


def test_each_kind_of_data_takes_only_its_own_settings(tmp_path: Path) -> None:
    """``data.name`` picks a source; the settings it takes are ImageDataModule parameters (so
    config validation knows them), and one it does not take is an error naming its own."""
    own = set(inspect.signature(ImageDataModule).parameters)
    for name, source in SOURCES.items():
        assert name in CONFIGS + ["hf"]
        assert set(inspect.signature(source).parameters) <= own, name
    with pytest.raises(ValueError, match="data.path is not a setting of data 'digits'.* root"):
        ImageDataModule("digits", path="somewhere")
    with pytest.raises(ValueError, match="data.download is not a setting of data 'image_folder'"):
        ImageDataModule("image_folder", root=tmp_path, download=True)
    with pytest.raises(ValueError, match="data=hf needs data.path"):
        ImageDataModule("hf")
    assert ImageDataModule("cifar10", root=tmp_path, download=True).source.download


def test_tensor_resize_and_channels() -> None:
    x = torch.randint(0, 256, (5, 3, 28, 40), dtype=torch.uint8)
    y = resize_center_crop(x, 14)
    assert y.shape == (5, 3, 14, 14) and y.dtype == torch.uint8
    assert torch.equal(resize_center_crop(x[:, :, :, :28], 28), x[:, :, :, :28])  # no-op
    gray = to_channels(x, 1)
    pil = np.asarray(Image.fromarray(x[0].permute(1, 2, 0).numpy()).convert("L"))
    assert np.abs(gray[0, 0].numpy().astype(int) - pil).max() <= 1  # PIL's luma
    assert torch.equal(to_channels(gray, 3)[:, 2], gray[:, 0])
    dm = ImageDataModule("digits", channels=3, image_size=8)
    assert next(iter(dm.val_dataloader())).shape[1:] == (3, 8, 8)


# -- image folder -----------------------------------------------------------------------------


def _write_images(root: Path) -> int:
    """Mixed modes, sizes and formats, nested; returns the number of valid images."""
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "rgb.jpg", quality=90)
    Image.fromarray(rgb).save(root / "sub" / "rgb_upper.JPEG")
    Image.fromarray(rng.integers(0, 256, (50, 20), dtype=np.uint8), "L").save(root / "gray.png")
    rgba = rng.integers(0, 256, (33, 33, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "sub" / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "sub" / "p.png")
    Image.fromarray(rgb).convert("P").save(root / "sub" / "deeper" / "p.gif", transparency=0)
    Image.fromarray(rng.integers(0, 65536, (16, 24), dtype=np.uint16)).save(root / "i16.png")
    Image.fromarray(rgb).save(root / "sub" / "small.webp")
    Image.fromarray(rgb[:8, :9]).save(root / "tiny.bmp")
    (root / "notes.txt").write_text("not an image, wrong extension: ignored")
    (root / ".hidden.png").write_text("hidden files are ignored")
    return 9


def _write_bad(root: Path) -> tuple[Path, Path]:
    buf = root / "tmp.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, quality=95)
    data = buf.read_bytes()
    buf.unlink()
    truncated = root / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    fake = root / "fake.png"
    fake.write_bytes(b"<html>this is not a png</html>")
    return truncated, fake


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_mixed_modes(tmp_path: Path, channels: int) -> None:
    n = _write_images(tmp_path)
    dm = ImageDataModule(
        "image_folder", root=tmp_path, image_size=12, channels=channels, batch_size=4
    )
    dm.setup()
    assert dm.sample_shape == (channels, 12, 12)
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == n
    assert len(dm.dataset("test")) == len(dm.dataset("val"))
    x = torch.cat(list(dm.reference_dataloader()) + list(dm.val_dataloader()))
    assert x.shape == (n, channels, 12, 12)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    assert next(iter(dm.train_dataloader())).shape == (4, channels, 12, 12)
    assert not dm.in_memory
    std = ImageDataModule(
        "image_folder", root=tmp_path, image_size=12, channels=channels, normalization="standardize"
    )
    x = torch.cat(list(std.reference_dataloader()))  # statistics of all (< 1000) train images
    assert x.mean((0, 2, 3)).abs().max() < 1e-4 and (x.std((0, 2, 3)) - 1).abs().max() < 1e-2


def test_image_folder_workers(tmp_path: Path) -> None:
    n = _write_images(tmp_path)
    dm = ImageDataModule("image_folder", root=tmp_path, image_size=8, batch_size=2, val_split=0.5)
    assert dm.num_workers >= 1 and dm.persistent_workers
    loader = dm.reference_dataloader()
    assert loader.num_workers == dm.num_workers and not loader.persistent_workers
    assert len(torch.cat(list(loader))) == n - round(0.5 * n)


def test_image_folder_key_tracks_content(tmp_path: Path) -> None:
    _write_images(tmp_path)
    key = ImageDataModule("image_folder", root=tmp_path).data_key_for("train")
    assert key.startswith("image_folder_") and "-train-64px-3ch-minus_one_one" in key
    assert ImageDataModule("image_folder", root=tmp_path).data_key_for("train") == key
    Image.new("RGB", (9, 9)).save(tmp_path / "new.png")
    assert ImageDataModule("image_folder", root=tmp_path).data_key_for("train") != key


def test_image_folder_bad_files_error(tmp_path: Path) -> None:
    _write_images(tmp_path)
    truncated, fake = _write_bad(tmp_path)
    dm = ImageDataModule("image_folder", root=tmp_path, on_bad_image="error")
    with pytest.raises(BadImageError) as info:
        dm.setup()
    assert str(fake) in str(info.value) and str(truncated) in str(info.value)
    assert "2 unreadable" in str(info.value) and "on_bad_image='skip'" in str(info.value)


def test_image_folder_bad_files_skip(tmp_path: Path) -> None:
    n = _write_images(tmp_path)
    truncated, fake = _write_bad(tmp_path)
    dm = ImageDataModule("image_folder", root=tmp_path, on_bad_image="skip", image_size=8)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image file") as record:
        dm.setup()
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    assert str(fake) in str(record[0].message) and str(truncated) in str(record[0].message)
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == n


def test_image_folder_check_decodes_each_file_once_and_remembers_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The check of every file runs with progress lines and keeps its verdicts in cache_dir by
    (path, size, modification time): a second run decodes nothing and skips the same files; a
    file that changed is checked again."""
    root, cache = tmp_path / "images", tmp_path / "cache"
    root.mkdir()
    n = _write_images(root)
    truncated, fake = _write_bad(root)
    caplog.set_level("INFO", logger="ddpm")

    def setup(expect_skipped: int) -> list[str]:
        caplog.clear()
        dm = ImageDataModule(
            "image_folder", root=root, on_bad_image="skip", cache_dir=cache, image_size=8
        )
        with pytest.warns(UserWarning, match=f"skipped {expect_skipped} unreadable"):
            dm.setup()
        return [r.getMessage() for r in caplog.records]

    log = setup(2)
    assert f"checking images: {n + 2}/{n + 2} images (100%)" in "\n".join(log), log
    assert len(list((cache / "checked_images").glob("*.tsv"))) == 1
    log = setup(2)
    assert any(f"checking 0 image files under {root} ({n + 2} checked before" in m for m in log)
    assert not any(m.startswith("checking images:") for m in log), log
    Image.new("RGB", (9, 9), "red").save(fake, format="PNG")  # repaired: checked again
    log = setup(1)
    assert any(f"checking 1 image files under {root} ({n + 1} checked before" in m for m in log)
    with pytest.raises(BadImageError, match="truncated.jpg"):  # the verdict holds for `error`
        ImageDataModule("image_folder", root=root, cache_dir=cache).setup()


def test_image_folder_lazy_bad_file(tmp_path: Path) -> None:
    """verify_images=False: the bad file is found while loading, still named."""
    _, fake = _write_bad(tmp_path)
    Image.new("RGB", (9, 9), "red").save(tmp_path / "ok.png")
    dm = ImageDataModule(
        "image_folder", root=tmp_path, verify_images=False, val_split=0.5, num_workers=0
    )
    dm.setup()
    with pytest.raises(BadImageError, match="fake.png"):
        [dm.dataset(s)[0] for s in ("train", "val")]
    dm = ImageDataModule(
        "image_folder", root=tmp_path, verify_images=False, on_bad_image="skip", num_workers=0
    )
    with pytest.warns(UserWarning, match="skipped unreadable image file"):
        items = [dm.dataset("train")[i] for i in range(len(dm.dataset("train")))]
    assert all(x.shape == (3, 64, 64) for x in items)


def test_image_folder_missing_file_or_empty_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        ImageDataModule("image_folder", root=missing)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(DataError, match=str(a_file)):
        ImageDataModule("image_folder", root=a_file)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    dm = ImageDataModule("image_folder", root=empty)
    with pytest.raises(DataError, match=f"no image files found .*{empty}"):
        dm.setup()


# -- torchvision datasets, offline -----------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No name resolution: every download fails at once, as on a machine without network."""

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)


@pytest.mark.parametrize(
    "name, expected",
    [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST/raw"), ("celeba", "img_align_celeba")],
)
def test_torchvision_offline_error(tmp_path: Path, offline: None, name: str, expected: str) -> None:
    root = tmp_path / "data"
    dm = ImageDataModule(name, root=root, download=True)
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError) as info:
        dm.setup()
    assert time.perf_counter() - start < 20
    msg = str(info.value)
    assert repr(name) in msg and str(root) in msg and expected in msg
    assert "download failed" in msg and "offline" in msg
    assert isinstance(info.value, DataError)
    with pytest.raises(DatasetUnavailableError, match=expected):  # same via prepare_data()
        ImageDataModule(name, root=root, download=True).prepare_data()


def test_torchvision_missing_without_download(tmp_path: Path, offline: None) -> None:
    dm = ImageDataModule("fashion_mnist", root=tmp_path, download=False)
    with pytest.raises(DatasetUnavailableError, match="FashionMNIST/raw") as info:
        dm.setup()
    assert "'fashion_mnist'" in str(info.value) and "files not found" in str(info.value)
    assert dm.sample_shape == (1, 32, 32)  # known before any data is loaded
    assert dm.data_key_for("train") == "fashion_mnist-train-32px-1ch-minus_one_one"


class _FakeTorchvision:
    """Stands in for torchvision's CIFAR10/MNIST classes (their checksums rule out fake files):
    exercises our conversion of ``.data`` without the real, downloaded dataset."""

    def __init__(self, root: str, train: bool = True, download: bool = False, *, hwc: bool) -> None:
        g = torch.Generator().manual_seed(int(train))
        n = 50 if train else 20
        shape = (n, 32, 32, 3) if hwc else (n, 28, 28)
        data = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        self.data = data.numpy() if hwc else data  # CIFAR: numpy HWC; MNIST: tensor


def test_torchvision_tensor_pipeline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd, "CIFAR10", lambda *a, **k: _FakeTorchvision(*a, **k, hwc=True))
    monkeypatch.setattr(tvd, "MNIST", lambda *a, **k: _FakeTorchvision(*a, **k, hwc=False))
    cifar = ImageDataModule("cifar10", root=tmp_path, download=False, batch_size=10)
    cifar.setup()
    assert cifar.in_memory and cifar.num_workers == 0
    assert [len(cifar.dataset(s)) for s in ("train", "val", "test")] == [50, 20, 20]
    raw = tvd.CIFAR10(str(tmp_path), train=False, download=False).data
    x = next(iter(cifar.val_dataloader()))
    torch.testing.assert_close(
        cifar.denormalize(x), torch.from_numpy(raw[:10]).permute(0, 3, 1, 2) / 255
    )
    gray = ImageDataModule(
        "cifar10", root=tmp_path, channels=1, image_size=16, val_split=0.2, batch_size=40
    )
    assert [len(gray.dataset(s)) for s in ("train", "val", "test")] == [40, 10, 20]
    assert next(iter(gray.train_dataloader())).shape == (40, 1, 16, 16)
    assert gray.data_key_for("val") == "cifar10-val-16px-1ch-minus_one_one-val0.2_seed0"
    assert gray.data_key_for("test") == "cifar10-test-16px-1ch-minus_one_one"
    mnist = ImageDataModule("mnist", root=tmp_path, channels=3, max_val_samples=7, batch_size=5)
    assert next(iter(mnist.train_dataloader())).shape == (5, 3, 32, 32)
    assert len(mnist.dataset("val")) == 7 and len(mnist.dataset("test")) == 20
    assert mnist.data_key_for("val").endswith("-first7")


# -- toy data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["swiss_roll", "two_moons", "eight_gaussians"])
def test_toy_datasets(name: str) -> None:
    dm = ToyDataModule(name, n_train=4000, n_val=1000, batch_size=100)
    dm.setup()
    assert dm.sample_shape == (2,)
    x = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 2) and x.dtype == torch.float32
    train = dm.dataset("train").data
    val = torch.cat(list(dm.val_dataloader()))
    assert val.shape == (1000, 2) and torch.isfinite(train).all() and torch.isfinite(val).all()
    assert train.mean(0).abs().max() < 1e-4 and abs(train.square().mean().item() - 1) < 1e-3
    assert val.mean(0).abs().max() < 0.15 and train.abs().max() < 6
    assert not torch.equal(train[:1000], val)
    again = ToyDataModule(name, n_train=4000, n_val=1000)
    assert torch.equal(again.dataset("train").data, train)
    assert torch.equal(dm.denormalize(x), x)
    assert dm.data_key_for("train") == f"{name}-train-n4000-seed0"


# -- Hydra configs ----------------------------------------------------------------------------

# data=hf needs a data set on disk: tests/data/test_hf_data.py builds one
CONFIGS = sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem != "hf")


def test_all_configs_present() -> None:
    expected = {"digits", "cifar10", "mnist", "fashion_mnist", "celeba", "image_folder"}
    assert set(CONFIGS) == expected | {"swiss_roll", "two_moons", "eight_gaussians"}
    assert (CONF_DIR / "hf.yaml").is_file()


@pytest.mark.parametrize("name", CONFIGS)
def test_config_instantiates(name: str, tmp_path: Path) -> None:
    node = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    assert node.name == name
    paths = {"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")}
    cfg = OmegaConf.create({"paths": paths, "data": node})
    if name == "image_folder":
        assert OmegaConf.is_missing(cfg.data, "root")
        cfg.data.root = str(tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, pl.LightningDataModule)
    assert dm.batch_size == node.batch_size and dm.name == name
    if isinstance(dm, ImageDataModule):
        assert dm.sample_shape == (node.channels, node.image_size, node.image_size)
        assert dm.random_flip == (name in ("cifar10", "celeba", "image_folder"))
        if name not in ("image_folder", "digits"):  # the digits ship with scikit-learn
            assert dm.source.root == tmp_path / "data"
    else:
        assert dm.sample_shape == (2,)
    if name in ("digits", "swiss_roll", "two_moons", "eight_gaussians"):  # no files needed
        dm.setup("fit")
        assert next(iter(dm.train_dataloader())).shape[1:] == dm.sample_shape
