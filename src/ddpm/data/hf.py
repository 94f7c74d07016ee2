"""Hugging Face ``datasets`` as image data: ``data=hf data.path=<hub name or local dir>``.

The rows' images are decoded, converted and resized per item (in DataLoader workers) exactly as
image files are, and everything after that (validation split, normalisation, flips, the global
batch split and DDP sharding, FID reference loaders) is :class:`ddpm.data.ImageDataModule`'s.
A hub data set is downloaded once, by local rank 0 in ``prepare_data``, into ``cache_dir``
(``datasets``' own cache when null), at ``revision`` (a branch, tag or commit: pin one to train
on the same data again); every process then reads that cache.
Needs the optional extra: ``pip install 'ddpm-lightning[hf]'`` (the ``datasets`` package).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.data.sources import DatasetUnavailableError, ImageSource
from ddpm.data.transforms import prepare

# what save_to_disk writes: a Dataset (state.json) or a DatasetDict (dataset_dict.json)
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "data=hf needs the Hugging Face `datasets` package: pip install 'ddpm-lightning[hf]' "
            "(or pip install datasets)"
        ) from e
    return datasets


def is_saved_to_disk(path: str) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk``."""
    local = Path(path).expanduser()
    return local.is_dir() and any((local / m).is_file() for m in _SAVED_MARKERS)


def load_hf_split(
    path: str,
    split: str | None,
    name: str | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> Any:
    """One split of a data set saved with ``save_to_disk`` (a local directory holding
    state.json / dataset_dict.json: ``datasets.load_from_disk``), else ``datasets.load_dataset``
    (a hub name, or a local folder of image files / data files; downloaded into ``cache_dir`` at
    ``revision`` the first time); ``split`` None: every split (what a download fetches)."""
    datasets = _datasets()
    local = Path(path).expanduser()
    try:
        if is_saved_to_disk(path):
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(path, name, cache_dir=cache_dir, revision=revision)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise DatasetUnavailableError(
            f"cannot load the Hugging Face data set data.path={path!r}: {type(e).__name__}: {e}. "
            "Give a hub name this machine can download, or a local directory (written by "
            "Dataset.save_to_disk, or a folder of images)."
        ) from e
    if isinstance(ds, datasets.DatasetDict) and split is not None:
        if split not in ds:
            raise ValueError(
                f"data.split={split!r} is not a split of {path!r}; its splits are {sorted(ds)}"
            )
        ds = ds[split]
    return ds


def _check_column(ds: Any, column: str, setting: str, path: str) -> None:
    if column not in ds.column_names:
        raise ValueError(
            f"{setting}={column!r} is not a column of {path!r}; its columns are {ds.column_names}"
        )


class HFImages(Dataset):
    """The ``column`` of a Hugging Face ``Dataset`` as uint8 (channels, image_size, image_size):
    PIL images (the ``Image`` feature) or arrays (H, W[, C]), resized on the shorter side and
    centre-cropped like image files."""

    def __init__(self, ds: Any, column: str, image_size: int, channels: int) -> None:
        self.rows = ds  # every column (the labels' too)
        self.ds = ds.select_columns([column])
        self.column, self.image_size, self.channels = column, image_size, channels

    def __len__(self) -> int:
        return len(self.ds)

    def _convert(self, value: Any) -> Tensor:
        if hasattr(value, "convert"):  # PIL image
            value = value.convert("RGB" if self.channels == 3 else "L")
        arr = np.asarray(value)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(
                f"data.image_column={self.column!r} must hold images (PIL, or uint8 arrays "
                f"(H, W[, C])), got {arr.dtype} with shape {arr.shape}"
            )
        x = torch.from_numpy(arr.copy())
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return prepare(x[None], self.image_size, self.channels)[0]

    def __getitem__(self, index: int) -> Tensor:
        return self._convert(self.ds[int(index)][self.column])

    def __getitems__(self, indices: Sequence[int]) -> list[Tensor]:
        rows = self.ds[[int(i) for i in indices]][self.column]  # one batched read
        return [self._convert(v) for v in rows]


class HuggingFace(ImageSource):
    """Images (and optionally class labels) from a Hugging Face data set.

    Args:
        path: hub name (``datasets.load_dataset``) or local directory (``load_from_disk`` when
            written by ``save_to_disk``, else ``load_dataset``, e.g. a folder of images).
        image_column: the column holding the images.
        label_column: the class-label column (``data.conditional=true`` needs it): a
            ``ClassLabel`` feature (its names are the classes) or integers 0..K-1.
        split: the training split.
        test_split: a split to validate and test on; None holds out ``val_split`` (0.1) of
            ``split``.
        config_name: the data set's configuration (``load_dataset(path, name)``).
        cache_dir: where a hub data set is downloaded (None: ``datasets``' own cache,
            ``HF_DATASETS_CACHE``).
        revision: the hub data set's branch, tag or commit (None: the default branch).
    """

    name = "hf"

    def __init__(
        self,
        path: str | None = None,
        image_column: str = "image",
        label_column: str | None = None,
        split: str = "train",
        test_split: str | None = None,
        config_name: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
    ) -> None:
        if not path:
            raise ValueError("data=hf needs data.path=<hub name or local directory>")
        self.path, self.split, self.test_split = str(path), split, test_split
        self.image_column, self.label_column = image_column, label_column
        self.config_name = config_name
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.revision = None if revision is None else str(revision)
        self._train_rows: Any = None
        self._loaded: tuple[HFImages, HFImages | None] | None = None

    @property
    def has_test_split(self) -> bool:  # type: ignore[override]
        return self.test_split is not None

    def key(self) -> str:
        raw = f"{self.path}|{self.config_name}|{self.split}|{self.test_split}|{self.image_column}"
        if self.revision is not None:
            raw += f"|{self.revision}"
        return f"hf_{hashlib.sha1(raw.encode()).hexdigest()[:12]}"

    def prepare(self) -> None:
        """Download a hub data set (every split) into the cache, once (Lightning: local rank 0,
        before any process loads it)."""
        if not is_saved_to_disk(self.path):
            load_hf_split(self.path, None, self.config_name, self.cache_dir, self.revision)

    def _rows(self, split: str) -> Any:
        load = (self.path, split, self.config_name, self.cache_dir, self.revision)
        if split != self.split:
            return load_hf_split(*load)
        if self._train_rows is None:
            self._train_rows = load_hf_split(*load)
        return self._train_rows

    def class_names(self) -> list[str] | None:
        """A ``ClassLabel`` column's names, else ``0..max`` of an integer column."""
        if self.label_column is None:
            return None
        ds = self._rows(self.split)
        _check_column(ds, self.label_column, "data.label_column", self.path)
        names = getattr(ds.features[self.label_column], "names", None)
        if names:
            return [str(n) for n in names]
        values = ds[self.label_column]
        if not all(isinstance(v, (int, np.integer)) for v in values):
            raise ValueError(
                f"data.label_column={self.label_column!r} must hold integer class indices or be "
                "a ClassLabel feature"
            )
        return [str(i) for i in range(int(max(values)) + 1)] if values else []

    def _images(self, split: str, image_size: int, channels: int) -> HFImages:
        ds = self._rows(split)
        _check_column(ds, self.image_column, "data.image_column", self.path)
        if self.label_column is not None and split == self.split:
            _check_column(ds, self.label_column, "data.label_column", self.path)
        return HFImages(ds, self.image_column, image_size, channels)

    def load(self, image_size: int, channels: int) -> tuple[Dataset, Dataset | None]:
        train = self._images(self.split, image_size, channels)
        test = (
            None if self.test_split is None else self._images(self.test_split, image_size, channels)
        )
        self._loaded = (train, test)
        return train, test

    def labels(self) -> tuple[Tensor, Tensor | None]:
        assert self._loaded is not None, "load() first"
        column = str(self.label_column)

        def labels(images: HFImages) -> Tensor:
            _check_column(images.rows, column, "data.label_column", self.path)
            return torch.as_tensor(images.rows[column], dtype=torch.long)

        train, test = self._loaded
        return labels(train), None if test is None else labels(test)
