"""``ImageDataModule``: normalised images for training, validation, FID reference statistics.

One class for every image source (scikit-learn digits, torchvision datasets, a folder of files).
Images are kept as uint8 at the model's resolution; normalisation and random flips run batched in
the collate function. ``data.batch_size`` is the *global* batch size, split across devices.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ddpm.data.datasets import (
    ImageFiles,
    LabeledCollate,
    LabeledDataset,
    TensorImages,
    train_loader,
)
from ddpm.data.sources import (
    CLASS_NAMES,
    TORCHVISION,
    BadImageError,
    bad_images_message,
    celeba_files,
    check_labels,
    find_bad_images,
    folder_classes,
    folder_fingerprint,
    folder_labels,
    list_images,
    load_digits_labels,
    load_digits_uint8,
    prepare,
    torchvision_dataset,
    torchvision_labels,
    torchvision_uint8,
    warn_skipped,
)
from ddpm.data.transforms import NORMALIZATIONS, BatchTransform, Normalization
from ddpm.utils.checks import check_positive_int

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class _Spec:
    channels: int
    image_size: int
    has_test_split: bool  # an official test split (else val/test are carved from the data)
    in_memory: bool


DATASETS = {
    "digits": _Spec(1, 16, False, True),
    "mnist": _Spec(1, 32, True, True),
    "fashion_mnist": _Spec(1, 32, True, True),
    "cifar10": _Spec(3, 32, True, True),
    "celeba": _Spec(3, 64, True, False),
    "image_folder": _Spec(3, 64, False, False),
    "hf": _Spec(3, 64, False, False),  # ddpm.data.hf.HFImageDataModule
}
STATS_SAMPLES = 1000  # images used for 'standardize' statistics when decoding from files


def per_device_batch_size(batch_size: int, world_size: int) -> int:
    """The global ``batch_size`` split evenly over ``world_size`` devices."""
    if batch_size % world_size:
        lo = max(world_size, batch_size // world_size * world_size)
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {world_size} devices: "
            f"data.batch_size is the global batch size; use e.g. data.batch_size={lo}"
        )
    return batch_size // world_size


def world_size_of(trainer: Any) -> int:
    """Processes a Trainer will run (devices x nodes), known before they are launched."""
    return 1 if trainer is None else int(trainer.num_devices) * int(trainer.num_nodes)


def split_indices(n: int, val_split: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) indices, each sorted: ``round(val_split * n)`` (at least 1, at most n - 1)
    items held out by a permutation seeded with ``seed``."""
    n_val = min(n - 1, max(1, round(val_split * n)))
    if n_val < 1:
        raise ValueError(f"{n} item(s): too few to hold out validation data")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class ClassLabels:
    """Class-conditional data (mixed into the image and toy datamodules): ``conditional=True``
    makes the loaders yield ``(x, labels)`` with int64 labels in [0, num_classes).

    ``num_classes`` and ``class_names`` come from the data (:meth:`_class_names`); the training
    task records them in the run config (``data.num_classes``, which the model configs read, and
    ``data.class_names``), and a datamodule built from a recorded config checks that the data
    still has those classes.
    """

    name: str
    conditional: bool
    _recorded: tuple[int | None, list[str] | None]
    _names: list[str] | None

    def _init_classes(
        self, conditional: bool, num_classes: int | None, class_names: Any | None
    ) -> None:
        self.conditional = bool(conditional)
        names = None if class_names is None else [str(c) for c in class_names]
        self._recorded = (None if num_classes is None else int(num_classes), names)
        self._names = None

    def _class_names(self) -> list[str] | None:
        """The data's class names (label k = name k), None when it has no labels."""
        return list(CLASS_NAMES[self.name]) if self.name in CLASS_NAMES else None

    @property
    def class_names(self) -> list[str] | None:
        """The classes of the data (None when it has no labels); checked against the recorded
        ones, and a conditional run on unlabelled data is an error."""
        if self._names is None:
            names = self._class_names()
            if names is None and self.conditional:
                raise ValueError(
                    f"data.conditional=true, but data {self.name!r} has no class labels; "
                    "labelled data: digits, mnist, fashion_mnist, cifar10, image_folder (one "
                    "sub-folder per class), hf with data.label_column, eight_gaussians, two_moons"
                )
            if names is not None and not names:
                raise ValueError(f"data {self.name!r} has no classes (data.conditional=true)")
            recorded_k, recorded_names = self._recorded
            if names is not None and (
                (recorded_k is not None and recorded_k != len(names))
                or (recorded_names is not None and recorded_names != names)
            ):
                raise ValueError(
                    f"the run was recorded with {recorded_k} classes {recorded_names}, but data "
                    f"{self.name!r} now has {len(names)}: {names}; point the run at the data it "
                    "was trained on"
                )
            self._names = names
        return self._names

    @property
    def num_classes(self) -> int | None:
        """Number of classes of the data (None when it has no labels)."""
        names = self.class_names
        return None if names is None else len(names)


class ImageDataModule(ClassLabels, pl.LightningDataModule):
    """Images scaled to [-1, 1] (or standardised) at ``image_size`` with ``channels`` channels.

    Args:
        name: one of ``digits`` (scikit-learn's bundled 8x8 digits, offline), ``mnist``,
            ``fashion_mnist``, ``cifar10``, ``celeba`` (torchvision) or ``image_folder``.
        root: dataset directory (torchvision root, or the folder of images).
        image_size, channels: target resolution and 1 (L) or 3 (RGB); default per dataset.
        batch_size: global training batch size; ``val_batch_size`` defaults to it.
        val_split: fraction of the training data held out for validation. Default: the
            official test split for datasets that have one, else 0.1.
        max_val_samples: keep only the first N validation images (faster validation).
        normalization: ``minus_one_one`` (DDPM) or ``standardize`` (per-channel mean/std).
        random_flip: random left-right flips of training batches.
        download: let torchvision download missing files (rank 0, in ``prepare_data``).
        num_workers: DataLoader workers; default 0 for in-memory data, else min(4, CPUs).
        seed: seed of the validation split.
        on_bad_image: ``error`` (default: fail naming every bad file) or ``skip`` (warn, count).
        verify_images: decode every file at set-up to find bad ones before training starts.
        conditional: yield ``(images, labels)`` (:class:`ClassLabels`); ``image_folder`` takes
            the class of an image from its sub-folder (torchvision's ``ImageFolder``).
        num_classes, class_names: the classes recorded in a run config, checked against the
            data (leave unset: they are read from the data).
    """

    def __init__(
        self,
        name: str = "digits",
        root: str | os.PathLike | None = "data",
        image_size: int | None = None,
        channels: int | None = None,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        val_split: float | None = None,
        max_val_samples: int | None = None,
        normalization: str = "minus_one_one",
        random_flip: bool = False,
        download: bool = False,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        seed: int = 0,
        on_bad_image: str = "error",
        verify_images: bool = True,
        conditional: bool = False,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self._init_classes(conditional, num_classes, class_names)
        if name not in DATASETS:
            raise ValueError(f"data name must be one of {sorted(DATASETS)}, got {name!r}")
        spec = DATASETS[name]
        self.name = name
        self.channels = spec.channels if channels is None else channels
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.image_size = check_positive_int(
            "image_size", spec.image_size if image_size is None else image_size
        )
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.val_batch_size = check_positive_int(
            "val_batch_size", batch_size if val_batch_size is None else val_batch_size
        )
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
            )
        if val_split is not None and not 0.0 <= float(val_split) < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_split!r}")
        has_test_split = self._has_test_split(spec)
        if val_split is None and not has_test_split:
            val_split = 0.1
        if val_split == 0 and not has_test_split:
            raise ValueError(f"val_split=0 leaves {name!r} (no test split) without validation data")
        if max_val_samples is not None:
            check_positive_int("max_val_samples", max_val_samples)
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.root = None if root is None else Path(root).expanduser()
        if name == "image_folder":
            if self.root is None:
                raise ValueError("data=image_folder needs data.root=/path/to/images")
            if not self.root.exists():
                raise FileNotFoundError(f"image folder not found: {self.root} (data.root)")
            if not self.root.is_dir():
                raise NotADirectoryError(f"data.root is not a directory: {self.root}")
        self.val_split = None if not val_split else float(val_split)
        self.max_val_samples = max_val_samples
        self.normalization = normalization
        self.random_flip = bool(random_flip)
        self.download = bool(download)
        self.in_memory = spec.in_memory
        self.num_workers = (
            (0 if self.in_memory else min(4, os.cpu_count() or 1))
            if num_workers is None
            else int(num_workers)
        )
        self.persistent_workers = self.num_workers > 0
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.seed = int(seed)
        self.on_bad_image, self.verify_images = on_bad_image, bool(verify_images)
        self.world_size = 1
        self.per_device_batch_size = self.batch_size
        self.per_device_val_batch_size = self.val_batch_size
        self._splits: dict[str, Dataset] | None = None
        self._labels: dict[str, Tensor] | None = None
        self._files: list[Path] | None = None
        self._normalizer: Normalization | None = (
            Normalization() if normalization == "minus_one_one" else None
        )

    def _has_test_split(self, spec: _Spec) -> bool:
        """Whether the source has its own test split (else val/test are held out of training)."""
        return spec.has_test_split

    # -- identity ---------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _class_names(self) -> list[str] | None:
        if self.name == "image_folder":
            assert self.root is not None
            return folder_classes(self.root) or None
        return super()._class_names()

    def _folder_files(self) -> list[Path]:
        if self._files is None:
            assert self.root is not None
            self._files = list_images(self.root)
        return self._files

    def data_key_for(self, split: str) -> str:
        """Identifies the exact images of ``split`` as the model sees them (cache key for FID
        statistics): dataset (for folders a fingerprint of the files), split, resolution,
        channels, normalisation and the validation split."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        key = f"{self._source_key()}-{split}-{self.image_size}px-{self.channels}ch-{self.normalization}"
        if self.val_split and split in ("train", "val"):
            key += f"-val{self.val_split}_seed{self.seed}"
        if split == "val" and self.max_val_samples:
            key += f"-first{self.max_val_samples}"
        return key

    def _source_key(self) -> str:
        """The data set's part of :meth:`data_key_for` (for folders a fingerprint of the files)."""
        if self.name == "image_folder":
            return f"image_folder_{folder_fingerprint(self._folder_files())}"
        return self.name

    @property
    def data_key(self) -> str:
        return self.data_key_for("train")

    @property
    def dataset_id(self) -> str:
        return self.data_key

    # -- loading ----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download torchvision datasets when ``download=true`` (Lightning: local rank 0 only)."""
        if self.name in TORCHVISION and self.download:
            assert self.root is not None
            for train in (True, False):
                torchvision_dataset(self.name, self.root, train, download=True)

    def setup(self, stage: str | None = None) -> None:
        self.world_size = world_size_of(getattr(self, "trainer", None))
        self.per_device_batch_size = per_device_batch_size(self.batch_size, self.world_size)
        self.per_device_val_batch_size = max(1, self.val_batch_size // self.world_size)
        self._load()

    def dataset(self, split: str) -> Dataset:
        """The uint8 dataset of ``split`` (loaded on first use)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._load()[split]

    def labels(self, split: str) -> Tensor:
        """The int64 class labels of ``split`` (a conditional datamodule only)."""
        if not self.conditional:
            raise ValueError("class labels are loaded with data.conditional=true only")
        self.dataset(split)
        assert self._labels is not None
        return self._labels[split]

    def _load(self) -> dict[str, Dataset]:
        if self._splits is not None:
            return self._splits
        k = self.num_classes if self.conditional else None  # errors for unlabelled data first
        train_all, test = self._sources()
        train, val = self._split(train_all, test)
        idx_val = range(len(val))
        if self.max_val_samples is not None and len(val) > self.max_val_samples:
            idx_val = range(self.max_val_samples)
            val = self._subset(val, idx_val)
        self._splits = {"train": train, "val": val, "test": test if test is not None else val}
        if k is not None:
            y_all, y_test = self._source_labels(train_all, test)
            what = f"data {self.name!r} ({self.num_classes} classes)"
            y_all = check_labels(y_all, k, what)
            if self.val_split:
                train_idx, val_idx = split_indices(len(train_all), self.val_split, self.seed)
                y_train, y_val = y_all[train_idx], y_all[val_idx]
            else:
                assert y_test is not None
                y_train, y_val = y_all, check_labels(y_test, k, f"the test split of {what}")
            y_val = y_val[: len(idx_val)]
            self._labels = {
                "train": y_train,
                "val": y_val,
                "test": y_val if test is None else check_labels(y_test, k, what),
            }
        if self._normalizer is None:
            self._normalizer = self._standardizer(train)
        return self._splits

    def _source_labels(self, train_all: Dataset, test: Dataset | None) -> tuple[Tensor, Any]:
        """Labels of :meth:`_sources`' two datasets (the second None when ``test`` is)."""
        if self.name == "digits":
            return load_digits_labels(), None
        if self.name in TORCHVISION:
            sets = self._torchvision_sets
            return torchvision_labels(sets[0]), torchvision_labels(sets[1])
        if self.name == "image_folder":
            assert self.root is not None and isinstance(train_all, ImageFiles)
            return folder_labels(self.root, train_all.files, self.class_names or []), None
        raise ValueError(f"data {self.name!r} has no class labels")

    def _sources(self) -> tuple[Dataset, Dataset | None]:
        """The uint8 training data and the official test split (None when there is none)."""
        if self.name == "digits":
            data = prepare(load_digits_uint8(), self.image_size, self.channels)
            train_all, test = TensorImages(data), None
        elif self.name in ("mnist", "fashion_mnist", "cifar10"):
            assert self.root is not None
            sets = [torchvision_dataset(self.name, self.root, t, self.download) for t in (1, 0)]
            self._torchvision_sets = sets  # their labels: _source_labels
            train_all, test = (
                TensorImages(prepare(torchvision_uint8(s), self.image_size, self.channels))
                for s in sets
            )
        elif self.name == "celeba":
            assert self.root is not None
            sets = [torchvision_dataset(self.name, self.root, t, self.download) for t in (1, 0)]
            train_all, test = (self._files_dataset(celeba_files(s)) for s in sets)
        elif self.name == "image_folder":
            train_all, test = self._files_dataset(self._checked_folder_files()), None
        else:
            raise ValueError(f"{type(self).__name__} cannot load data name {self.name!r}")
        return train_all, test

    def _files_dataset(self, files: list[Path]) -> ImageFiles:
        return ImageFiles(files, self.image_size, self.channels, self.on_bad_image)

    def _checked_folder_files(self) -> list[Path]:
        assert self.root is not None
        files = self._folder_files()
        if not files:
            raise FileNotFoundError(
                f"no image files found under {self.root} (searched recursively for "
                ".jpg/.jpeg/.png/.gif/.bmp/.webp/.tif); check data.root"
            )
        if self.verify_images:
            bad = find_bad_images(files, workers=max(4, self.num_workers))
            if bad and self.on_bad_image == "error":
                raise BadImageError(
                    bad_images_message(bad, self.root)
                    + "\nfix or remove them, or set data.on_bad_image='skip' to skip them"
                )
            if bad:
                warn_skipped(f"skipped {bad_images_message(bad, self.root)}")
                drop = {p for p, _ in bad}
                files = [f for f in files if f not in drop]
                if not files:
                    raise BadImageError(f"every image file under {self.root} is unreadable")
        return files

    @staticmethod
    def _subset(ds: Dataset, indices: Any) -> Dataset:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if isinstance(ds, TensorImages):
            return TensorImages(ds.data[idx])
        if isinstance(ds, ImageFiles):
            return ImageFiles(
                [ds.files[i] for i in idx.tolist()], ds.image_size, ds.channels, ds.on_bad_image
            )
        return Subset(ds, idx.tolist())

    def _split(self, train_all: Dataset, test: Dataset | None) -> tuple[Dataset, Dataset]:
        """Hold out ``val_split`` of the training data (seeded, kept in file order), else use the
        official test split for validation."""
        if not self.val_split:
            assert test is not None
            return train_all, test
        n = len(train_all)
        if n < 2:
            raise ValueError(f"{self.name!r} has {n} image(s): too few to hold out validation data")
        train_idx, val_idx = split_indices(n, self.val_split, self.seed)
        return self._subset(train_all, train_idx), self._subset(train_all, val_idx)

    def _standardizer(self, train: Dataset) -> Normalization:
        """Per-channel mean and std (in [0, 1] units) of the training split."""
        if isinstance(train, TensorImages):
            x = train.data
        else:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(train), generator=g)[:STATS_SAMPLES].sort().values
            x = torch.stack([train[i] for i in idx.tolist()])
        u = x.to(torch.float64) / 255.0
        mean = u.mean(dim=(0, 2, 3))
        std = u.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return Normalization("standardize", mean.tolist(), std.tolist())

    # -- normalisation ----------------------------------------------------------------------------
    @property
    def normalizer(self) -> Normalization:
        if self._normalizer is None:
            self._load()
        assert self._normalizer is not None
        return self._normalizer

    def denormalize(self, x: Tensor) -> Tensor:
        """Model space -> [0, 1]."""
        return self.normalizer.denormalize(x)

    # -- loaders ----------------------------------------------------------------------------------
    def _labeled(self, split: str, ds: Dataset, collate: Any) -> tuple[Dataset, Any]:
        """``(ds, collate)``, or with ``conditional`` the labelled dataset and its collate."""
        if not self.conditional:
            return ds, collate
        return LabeledDataset(ds, self.labels(split)), LabeledCollate(collate)

    def _loader(
        self,
        split: str,
        batch_size: int,
        *,
        train: bool = False,
        ds: Dataset | None = None,
        persistent: bool = True,
    ) -> DataLoader:
        collate: Any = BatchTransform(self.normalizer, random_flip=train and self.random_flip)
        if ds is None:
            ds, collate = self._labeled(split, self.dataset(split), collate)
        workers = self.num_workers
        kwargs: dict[str, Any] = dict(
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            pin_memory=self.pin_memory,
        )
        if train:
            trainer = getattr(self, "trainer", None)
            return train_loader(ds, batch_size, self.world_size, trainer, **kwargs)
        return DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False, **kwargs)

    def train_dataloader(self) -> DataLoader:
        n, bs = len(self.dataset("train")), self.per_device_batch_size
        if n < bs:
            raise ValueError(
                f"the training split of {self.name!r} has {n} images, fewer than batch_size {bs} "
                "(per device): lower data.batch_size"
            )
        return self._loader("train", bs, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.per_device_val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.per_device_val_batch_size)

    def reference_dataloader(
        self,
        split: str = "train",
        batch_size: int | None = None,
        max_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> DataLoader:
        """Un-augmented, unshuffled images of ``split`` (first ``max_samples``), this rank's share
        (every ``world_size``-th image from ``rank``): the FID reference set."""
        ds = self.dataset(split)
        n = len(ds) if max_samples is None else min(int(max_samples), len(ds))
        ds = self._subset(ds, range(rank, n, world_size))
        bs = batch_size or self.per_device_val_batch_size
        return self._loader(split, bs, ds=ds, persistent=False)
