"""data=hf: Hugging Face data sets (written to disk by the test, no network) through
ImageDataModule's splits, normalisation, flips and DDP sharding."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.data import ImageDataModule
from ddpm.data.datamodule import split_indices

datasets = pytest.importorskip("datasets", reason="the `hf` extra (datasets) is not installed")

from ddpm.checkpoint import is_loadable  # noqa: E402
from ddpm.tasks.train import train  # noqa: E402
from hydra_utils import TINY, compose_cfg  # noqa: E402

N, SIDE = 12, 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """12 random 8x8 RGB images with labels, saved as a DatasetDict (train/test)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (N, SIDE, SIDE, 3), dtype=np.uint8)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    train = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(N)]},
        features=features,
    )
    path = tmp_path_factory.mktemp("hf") / "toy"
    datasets.DatasetDict({"train": train, "test": train.select(range(4))}).save_to_disk(path)
    return path, pixels


def _model_space(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 * 2 - 1


def test_images_normalised_split_and_flipped_like_the_other_image_data(saved) -> None:
    path, pixels = saved
    dm = ImageDataModule(
        "hf", path=str(path), image_column="img", label_column="label", image_size=SIDE,
        batch_size=4, random_flip=True, num_workers=0, seed=0,
    )  # fmt: skip
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.sample_shape == (3, SIDE, SIDE)
    train_idx, val_idx = split_indices(N, 0.1, 0)  # val_split 0.1 held out, as image folders
    want = _model_space(pixels)
    val = torch.cat(list(dm.val_dataloader()))
    torch.testing.assert_close(val, want[val_idx], rtol=0, atol=1e-6)  # 2u - 1, unflipped
    train = torch.cat(list(dm.train_dataloader()))  # shuffled, drop_last, each maybe flipped
    assert train.shape == (8, 3, SIDE, SIDE)
    pool = torch.cat([want[train_idx], want[train_idx].flip(-1)])
    matches = [(pool - x).abs().flatten(1).amax(1).min() < 1e-6 for x in train]
    assert all(matches)
    flipped = [(want[train_idx].flip(-1) - x).abs().flatten(1).amax(1).min() < 1e-6 for x in train]
    assert any(flipped)  # random_flip does flip
    # DDP sharding of the reference set: ranks take disjoint, interleaved shares
    n = len(train_idx)
    shards = [
        torch.cat(list(dm.reference_dataloader("train", 16, rank=r, world_size=2))) for r in (0, 1)
    ]
    torch.testing.assert_close(
        torch.cat(shards), want[train_idx][[*range(0, n, 2), *range(1, n, 2)]]
    )


def test_test_split_and_grayscale(saved) -> None:
    path, pixels = saved
    dm = ImageDataModule(
        "hf", path=str(path), image_column="img", test_split="test", image_size=4, channels=1,
        batch_size=4, num_workers=0,
    )  # fmt: skip
    dm.setup("fit")
    assert len(dm.dataset("train")) == N and len(dm.dataset("val")) == 4
    assert next(iter(dm.val_dataloader())).shape == (4, 1, 4, 4)


def test_bad_columns_splits_and_missing_extra_are_named(saved, monkeypatch) -> None:
    path, _ = saved
    for kwargs, match in [
        (
            dict(image_column="image"),
            r"data.image_column='image' is not a column .*\['img', 'label'\]",
        ),
        (dict(image_column="img", label_column="y"), "data.label_column='y' is not a column"),
        (dict(image_column="img", split="valid"), r"data.split='valid' .* \['test', 'train'\]"),
        (dict(image_column="label"), "must hold images"),
    ]:
        dm = ImageDataModule("hf", path=str(path), image_size=SIDE, num_workers=0, **kwargs)
        with pytest.raises(ValueError, match=match):
            dm.setup("fit")
            dm.dataset("train")[0]
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'ddpm-lightning\[hf\]'"):
        ImageDataModule("hf", path=str(path), image_column="img", num_workers=0).setup("fit")


def test_training_through_the_config(saved, tmp_path: Path) -> None:
    path, _ = saved
    cfg = compose_cfg(
        [*TINY, "data=hf", f"data.path={path}", "data.image_column=img", "data.image_size=16",
         "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=2", "callbacks=none"],
        tmp_path,
    )  # fmt: skip
    assert is_loadable(cfg.data._target_)  # a checkpoint of the run can be evaluated
    assert train(cfg)["global_step"] == 2


def test_conditional_batches_carry_the_label_column(saved, tmp_path: Path) -> None:
    path, pixels = saved
    kw = dict(path=str(path), image_column="img", image_size=SIDE, batch_size=4, num_workers=0)
    dm = ImageDataModule("hf", label_column="label", conditional=True, test_split="test", **kw)
    dm.setup("fit")
    assert dm.class_names == ["a", "b", "c"]
    want = _model_space(pixels)
    for x, y in dm.train_dataloader():  # each image with its row's label (i % 3)
        rows = [int((want - img).abs().flatten(1).amax(1).argmin()) for img in x]
        assert y.tolist() == [i % 3 for i in rows]
    x, y = next(iter(dm.val_dataloader()))  # the test split: rows 0..3
    assert y.tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="set data.label_column"):
        ImageDataModule("hf", conditional=True, **kw).setup("fit")


def test_a_data_set_is_downloaded_once_into_cache_dir_at_its_revision(tmp_path: Path) -> None:
    """prepare_data (local rank 0) loads the data set into data.cache_dir; setup then reads that
    cache. A local folder of images stands in for a hub name (load_dataset caches it the same
    way); the revision is part of the data's identity (the FID statistics cache key)."""
    from PIL import Image

    folder, cache = tmp_path / "images", tmp_path / "hf_cache"
    (folder / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(
            folder / "train" / f"{i}.png"
        )
    dm = ImageDataModule("hf", path=str(folder), cache_dir=str(cache), image_size=SIDE)
    assert not cache.exists()
    dm.prepare_data()
    written = sorted(p for p in cache.rglob("*.arrow"))
    assert written, list(cache.rglob("*"))
    dm.setup("fit")
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 10
    assert sorted(p for p in cache.rglob("*.arrow")) == written  # read, not fetched again
    pinned = ImageDataModule("hf", path=str(folder), cache_dir=str(cache), revision="v1.0")
    assert pinned.data_key_for("train") != dm.data_key_for("train")
