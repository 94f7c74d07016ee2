"""``ImageDataModule``: normalised images for training, validation, FID reference statistics.

One data module for every kind of image data. What differs between kinds (where the images,
labels and classes come from, what to download) is the :class:`~ddpm.data.sources.ImageSource`
that ``name`` selects in :data:`SOURCES`; the module splits, normalises and loads them the same way
for all. Images are kept as uint8 at the model's resolution; normalisation and random flips run
batched in the collate function. ``data.batch_size`` is the *global* batch size, split across
devices.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ddpm.data.datasets import LabeledCollate, LabeledDataset, TensorImages, check_labels
from ddpm.data.files import ImageFiles
from ddpm.data.hf import HuggingFace
from ddpm.data.order import train_loader
from ddpm.data.pairs import CoupledPairs, collate_pairs, load_pairs
from ddpm.data.sources import (
    CIFAR10,
    MNIST,
    CelebA,
    Digits,
    FashionMNIST,
    ImageFolder,
    ImageSource,
)
from ddpm.data.transforms import NORMALIZATIONS, BatchTransform, Normalization, random_flip
from ddpm.errors import ConfigError, DataError
from ddpm.utils.checks import check_positive_int

# data.name -> the kind of image data
SOURCES: dict[str, type[ImageSource]] = {
    source.name: source
    for source in (Digits, MNIST, FashionMNIST, CIFAR10, CelebA, ImageFolder, HuggingFace)
}
SPLITS = ("train", "val", "test")
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


def subset(ds: Dataset, indices: Any) -> Dataset:
    """The examples ``indices`` of ``ds`` (in memory or files: the same kind of dataset)."""
    idx = indices.tolist() if isinstance(indices, Tensor) else list(indices)
    if isinstance(ds, (TensorImages, ImageFiles)):
        return ds.subset(idx)
    return Subset(ds, idx)


def make_source(name: str, **settings: Any) -> ImageSource:
    """The source of image data ``name`` (:data:`SOURCES`) built from the ``settings`` given
    (None: not given, the source's default). A setting the source does not take is an error."""
    if name not in SOURCES:
        raise ConfigError(f"data name must be one of {sorted(SOURCES)}, got {name!r}")
    source = SOURCES[name]
    accepted = list(inspect.signature(source).parameters)
    given = {k: v for k, v in settings.items() if v is not None}
    for key in given:
        if key not in accepted:
            raise ConfigError(
                f"data.{key} is not a setting of data {name!r}; its own settings are "
                f"{', '.join(accepted) or 'none'}"
            )
    return source(**given)


class ClassLabels:
    """Class-conditional data (part of every :class:`DataModule`): ``conditional=True``
    makes the loaders yield ``(x, labels)`` with int64 labels in [0, num_classes).

    ``num_classes`` and ``class_names`` come from the data (:meth:`_class_names`); the training
    task records them in the run config (``data.num_classes``, which the model configs read, and
    ``data.class_names``), and a datamodule built from a recorded config checks that the data
    still has those classes. :meth:`dataset` fills ``_labels`` when it loads the data.
    """

    name: str
    conditional: bool
    _recorded: tuple[int | None, list[str] | None]
    _names: list[str] | None
    _labels: dict[str, Tensor]

    def _init_classes(
        self, conditional: bool, num_classes: int | None, class_names: Any | None
    ) -> None:
        self.conditional = bool(conditional)
        names = None if class_names is None else [str(c) for c in class_names]
        self._recorded = (None if num_classes is None else int(num_classes), names)
        self._names = None

    def _class_names(self) -> list[str] | None:
        """The data's class names (label k = name k), None when it has no labels."""
        raise NotImplementedError

    def dataset(self, split: str) -> Any:
        raise NotImplementedError

    @property
    def class_names(self) -> list[str] | None:
        """The classes of the data (None when it has no labels); checked against the recorded
        ones, and a conditional run on unlabelled data is an error."""
        if self._names is None:
            names = self._class_names()
            if names is None and self.conditional:
                raise DataError(
                    f"data.conditional=true, but data {self.name!r} has no class labels; "
                    "labelled data: digits, mnist, fashion_mnist, cifar10, image_folder (one "
                    "sub-folder per class), hf (set data.label_column=<column>), "
                    "eight_gaussians, two_moons"
                )
            if names is not None and not names:
                raise DataError(f"data {self.name!r} has no classes (data.conditional=true)")
            recorded_k, recorded_names = self._recorded
            if names is not None and (
                (recorded_k is not None and recorded_k != len(names))
                or (recorded_names is not None and recorded_names != names)
            ):
                raise DataError(
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

    def labels(self, split: str) -> Tensor:
        """The int64 class labels of ``split`` (a conditional datamodule only)."""
        if not self.conditional:
            raise ValueError("class labels are loaded with data.conditional=true only")
        self.dataset(split)
        return self._labels[split]


class DataModule(ClassLabels, pl.LightningDataModule):
    """What the image and toy data modules share: the loaders of the splits of :meth:`dataset`
    (``(x, labels)`` batches when ``conditional``), the training one over this device's share of
    the global batch (:func:`~ddpm.data.order.train_loader`: resumable mid-epoch). A subclass
    gives :meth:`dataset` and :meth:`_collate` and sets the batch sizes in ``setup``."""

    batch_size: int  # global
    per_device_batch_size: int
    per_device_val_batch_size: int
    world_size: int = 1
    num_workers: int = 0
    pin_memory: bool = False
    # a file of coupled (x₀, z) training pairs (ddpm.data.pairs: reflow), or None
    pairs: str | None = None

    def _init_pairs(self, pairs: str | os.PathLike | None) -> None:
        """``pairs``: train on the coupled (x₀, z) pairs of that file (:mod:`ddpm.data.pairs`)
        instead of the training split with fresh noise (labelled pairs when ``conditional``);
        validation stays on the data."""
        self.pairs = None if pairs is None else os.fspath(pairs)

    def _collate(self, train: bool) -> Callable[[Any], Tensor]:
        """The collate_fn of uint8 examples."""
        raise NotImplementedError

    def _augment(self) -> Callable[[Tensor, torch.Generator | None], Tensor] | None:
        """The augmentation of training batches (:class:`~ddpm.data.order.ResumableDataLoader`:
        drawn in the training process from the step's seeded stream), None for none."""
        return None

    def setup(self, stage: str | None = None) -> None:
        """The world size (the Trainer's, known before its processes start), this device's
        share of the global batch, and the data."""
        self.world_size = world_size_of(getattr(self, "trainer", None))
        self.per_device_batch_size = per_device_batch_size(self.batch_size, self.world_size)
        self.dataset("train")

    def _loader(
        self,
        split: str,
        batch_size: int,
        *,
        train: bool = False,
        ds: Dataset | None = None,
        persistent: bool = True,
        collate: Callable[[Any], Any] | None = None,
    ) -> DataLoader:
        collate = collate or self._collate(train)
        if ds is None:
            ds = self.dataset(split)
            if self.conditional:
                ds, collate = LabeledDataset(ds, self.labels(split)), LabeledCollate(collate)
        workers = self.num_workers
        kwargs: dict[str, Any] = dict(
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            pin_memory=self.pin_memory,
        )
        if train:
            trainer = getattr(self, "trainer", None)
            # coupled pairs are not augmented: a flip of x alone breaks its coupling x = ODE(z)
            augment = None if isinstance(ds, CoupledPairs) else self._augment()
            return train_loader(ds, batch_size, self.world_size, trainer, augment, **kwargs)
        return DataLoader(ds, batch_size=batch_size, shuffle=False, drop_last=False, **kwargs)

    def train_dataloader(self) -> DataLoader:
        bs = self.per_device_batch_size
        if self.pairs is not None:
            pairs = load_pairs(
                self.pairs, self.sample_shape, self.num_classes if self.conditional else None
            )
            if len(pairs) < bs:
                raise DataError(
                    f"data.pairs={self.pairs} holds {len(pairs)} pairs, fewer than batch_size "
                    f"{bs} (per device): lower data.batch_size or make more pairs"
                )
            return self._loader("train", bs, train=True, ds=pairs, collate=collate_pairs)
        n = len(self.dataset("train"))
        if n < bs:
            raise DataError(
                f"the training split of {self.name!r} has {n} examples, fewer than batch_size "
                f"{bs} (per device): lower data.batch_size"
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
        """Un-augmented, unshuffled examples of ``split`` (first ``max_samples``), this rank's
        share (every ``world_size``-th from ``rank``): the FID reference set."""
        ds = self.dataset(split)
        n = len(ds) if max_samples is None else min(int(max_samples), len(ds))
        ds = subset(ds, range(rank, n, world_size))
        bs = batch_size or self.per_device_val_batch_size
        return self._loader(split, bs, ds=ds, persistent=False)


class ImageDataModule(DataModule):
    """Images scaled to [-1, 1] (or standardised) at ``image_size`` with ``channels`` channels.

    Args:
        name: the kind of data (:data:`SOURCES`): ``digits`` (scikit-learn's bundled 8x8 digits,
            offline), ``mnist``, ``fashion_mnist``, ``cifar10``, ``celeba`` (torchvision),
            ``image_folder`` or ``hf`` (a Hugging Face data set).
        image_size, channels: target resolution and 1 (L) or 3 (RGB); default per source.
        batch_size: global training batch size; ``val_batch_size`` defaults to it.
        val_split: fraction of the training data held out for validation. Default: the
            official test split for data that have one, else 0.1.
        max_val_samples: keep only the first N validation images (faster validation).
        normalization: ``minus_one_one`` (DDPM) or ``standardize`` (per-channel mean/std).
        random_flip: random left-right flips of training batches.
        num_workers: DataLoader workers; default 0 for in-memory data, else min(4, CPUs).
        seed: seed of the validation split.
        conditional: yield ``(images, labels)`` (:class:`ClassLabels`); ``image_folder`` takes
            the class of an image from its sub-folder (torchvision's ``ImageFolder``).
        num_classes, class_names: the classes recorded in a run config, checked against the
            data (leave unset: they are read from the data).
        root, download, on_bad_image, verify_images, cache_dir, path, image_column, label_column,
            split, test_split, config_name, revision: the settings of the source ``name`` (documented by its
            class in :mod:`ddpm.data.sources` and :mod:`ddpm.data.hf`); None leaves the source's
            default, and one it does not take is an error. Every source's settings are listed
            here, so that config validation knows them.
        pairs: train on the coupled (x₀, z) pairs of this file (reflow; :mod:`ddpm.data.pairs`).
    """

    def __init__(
        self,
        name: str = "digits",
        root: str | os.PathLike | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        val_split: float | None = None,
        max_val_samples: int | None = None,
        normalization: str = "minus_one_one",
        random_flip: bool = False,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        seed: int = 0,
        conditional: bool = False,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        download: bool | None = None,
        on_bad_image: str | None = None,
        verify_images: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        path: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        split: str | None = None,
        test_split: str | None = None,
        config_name: str | None = None,
        revision: str | None = None,
        pairs: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self._init_classes(conditional, num_classes, class_names)
        self._init_pairs(pairs)
        self.name = name
        self.source = make_source(
            name,
            root=root,
            download=download,
            on_bad_image=on_bad_image,
            verify_images=verify_images,
            cache_dir=cache_dir,
            path=path,
            image_column=image_column,
            label_column=label_column,
            split=split,
            test_split=test_split,
            config_name=config_name,
            revision=revision,
        )
        self.channels = self.source.channels if channels is None else channels
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.image_size = check_positive_int(
            "image_size", self.source.image_size if image_size is None else image_size
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
        has_test_split = self.source.has_test_split
        if val_split is None and not has_test_split:
            val_split = 0.1
        if val_split == 0 and not has_test_split:
            raise ValueError(f"val_split=0 leaves {name!r} (no test split) without validation data")
        if max_val_samples is not None:
            check_positive_int("max_val_samples", max_val_samples)
        self.val_split = None if not val_split else float(val_split)
        self.max_val_samples = max_val_samples
        self.normalization = normalization
        self.random_flip = bool(random_flip)
        self.in_memory = self.source.in_memory
        self.num_workers = (
            (0 if self.in_memory else min(4, os.cpu_count() or 1))
            if num_workers is None
            else int(num_workers)
        )
        self.persistent_workers = self.num_workers > 0
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.seed = int(seed)
        self.per_device_batch_size = self.batch_size
        self.per_device_val_batch_size = self.val_batch_size
        self._splits: dict[str, Dataset] | None = None
        self._labels: dict[str, Tensor] = {}
        self._normalizer: Normalization | None = (
            Normalization() if normalization == "minus_one_one" else None
        )

    # -- identity ---------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _class_names(self) -> list[str] | None:
        return self.source.class_names()

    def data_key_for(self, split: str) -> str:
        """Identifies the exact images of ``split`` as the model sees them (cache key for FID
        statistics): the source's key (for folders a fingerprint of the files), split,
        resolution, channels, normalisation and the validation split."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        key = f"{self.source.key()}-{split}-{self.image_size}px-{self.channels}ch-{self.normalization}"
        if self.val_split and split in ("train", "val"):
            key += f"-val{self.val_split}_seed{self.seed}"
        if split == "val" and self.max_val_samples:
            key += f"-first{self.max_val_samples}"
        return key

    # -- loading ----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download what the source is missing (``download=true``; Lightning: local rank 0)."""
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.per_device_val_batch_size = max(1, self.val_batch_size // self.world_size)

    def dataset(self, split: str) -> Dataset:
        """The uint8 dataset of ``split`` (loaded on first use)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._load()[split]

    def _load(self) -> dict[str, Dataset]:
        if self._splits is not None:
            return self._splits
        k = self.num_classes if self.conditional else None  # errors for unlabelled data first
        train_all, test = self.source.load(self.image_size, self.channels)
        train, val = self._split(train_all, test)
        idx_val = range(len(val))
        if self.max_val_samples is not None and len(val) > self.max_val_samples:
            idx_val = range(self.max_val_samples)
            val = subset(val, idx_val)
        self._splits = {"train": train, "val": val, "test": test if test is not None else val}
        if k is not None:
            y_all, y_test = self.source.labels()
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

    def _split(self, train_all: Dataset, test: Dataset | None) -> tuple[Dataset, Dataset]:
        """Hold out ``val_split`` of the training data (seeded, kept in file order), else use the
        official test split for validation."""
        if not self.val_split:
            assert test is not None
            return train_all, test
        n = len(train_all)
        if n < 2:
            raise DataError(f"{self.name!r} has {n} image(s): too few to hold out validation data")
        train_idx, val_idx = split_indices(n, self.val_split, self.seed)
        return subset(train_all, train_idx), subset(train_all, val_idx)

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

    def _collate(self, train: bool) -> BatchTransform:
        return BatchTransform(self.normalizer)

    def _augment(self) -> Callable[[Tensor, torch.Generator | None], Tensor] | None:
        return random_flip if self.random_flip else None
