"""Hugging Face ``datasets`` as image data: ``data=hf data.path=<hub name or local dir>``.

The rows' images are decoded, converted and resized per item (in DataLoader workers) exactly as
image files are, and everything after that (validation split, normalisation, flips, the global
batch split and DDP sharding, FID reference loaders) is :class:`ImageDataModule`'s.
Needs the optional extra: ``pip install 'ddpm[hf]'`` (the ``datasets`` package).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.data.datamodule import ImageDataModule, _Spec
from ddpm.data.sources import DatasetUnavailableError, prepare

# what save_to_disk writes: a Dataset (state.json) or a DatasetDict (dataset_dict.json)
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "data=hf needs the Hugging Face `datasets` package: pip install 'ddpm[hf]' "
            "(or pip install datasets)"
        ) from e
    return datasets


def load_hf_split(path: str, split: str, name: str | None = None) -> Any:
    """One split of a data set saved with ``save_to_disk`` (a local directory holding
    state.json / dataset_dict.json: ``datasets.load_from_disk``), else ``datasets.load_dataset``
    (a hub name, or a local folder of image files / data files)."""
    datasets = _datasets()
    local = Path(path).expanduser()
    try:
        if local.is_dir() and any((local / m).is_file() for m in _SAVED_MARKERS):
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(path, name)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise DatasetUnavailableError(
            f"cannot load the Hugging Face data set data.path={path!r}: {type(e).__name__}: {e}. "
            "Give a hub name this machine can download, or a local directory (written by "
            "Dataset.save_to_disk, or a folder of images)."
        ) from e
    if isinstance(ds, datasets.DatasetDict):
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


class HFImageDataModule(ImageDataModule):
    """Images from a Hugging Face data set, with :class:`ImageDataModule`'s splits,
    normalisation, flips and DDP sharding.

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
        **kwargs: :class:`ImageDataModule`'s (image_size, channels, batch_size, random_flip, ...).
    """

    def __init__(
        self,
        path: str,
        image_column: str = "image",
        label_column: str | None = None,
        split: str = "train",
        test_split: str | None = None,
        config_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not path:
            raise ValueError("data=hf needs data.path=<hub name or local directory>")
        self.path, self.split, self.test_split = str(path), split, test_split
        self.image_column, self.label_column, self.config_name = (
            image_column,
            label_column,
            config_name,
        )
        kwargs.pop("name", None)
        kwargs.pop("root", None)
        super().__init__(name="hf", root=None, **kwargs)
        self._hf_train: Any = None

    def _has_test_split(self, spec: _Spec) -> bool:
        return self.test_split is not None

    def _source_key(self) -> str:
        raw = f"{self.path}|{self.config_name}|{self.split}|{self.test_split}|{self.image_column}"
        return f"hf_{hashlib.sha1(raw.encode()).hexdigest()[:12]}"

    def _train_rows(self) -> Any:
        if self._hf_train is None:
            self._hf_train = load_hf_split(self.path, self.split, self.config_name)
        return self._hf_train

    def _class_names(self) -> list[str] | None:
        """A ``ClassLabel`` column's names, else ``0..max`` of an integer column."""
        if self.label_column is None:
            if self.conditional:
                raise ValueError(
                    f"data.conditional=true needs the class-label column of {self.path!r}: "
                    "set data.label_column=<column>"
                )
            return None
        ds = self._train_rows()
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

    def _hf_split(self, split: str) -> HFImages:
        ds = (
            self._train_rows()
            if split == self.split
            else load_hf_split(self.path, split, self.config_name)
        )
        _check_column(ds, self.image_column, "data.image_column", self.path)
        if self.label_column is not None and split == self.split:
            _check_column(ds, self.label_column, "data.label_column", self.path)
        return HFImages(ds, self.image_column, self.image_size, self.channels)

    def _sources(self) -> tuple[Dataset, Dataset | None]:
        train = self._hf_split(self.split)
        test = None if self.test_split is None else self._hf_split(self.test_split)
        return train, test

    def _source_labels(self, train_all: Dataset, test: Dataset | None) -> tuple[Tensor, Any]:
        def labels(images: Dataset) -> Tensor:
            assert isinstance(images, HFImages)
            _check_column(images.rows, str(self.label_column), "data.label_column", self.path)
            return torch.as_tensor(images.rows[str(self.label_column)], dtype=torch.long)

        return labels(train_all), None if test is None else labels(test)
