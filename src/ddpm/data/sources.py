"""Where images come from: one :class:`ImageSource` per kind of data (scikit-learn's digits, the
torchvision sets, CelebA, a folder of files; Hugging Face data sets in :mod:`ddpm.data.hf`).

A source answers what differs between kinds of data: its uint8 images at the model's resolution
(training data and, where there is one, the official test split), their class labels and names,
a key naming its content, and downloading. :class:`ddpm.data.ImageDataModule` does the rest the
same way for every source (validation split, normalisation, loaders). Failures name the file or
directory and say what to do.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.data.datasets import TensorImages
from ddpm.data.files import (
    ImageFiles,
    check_on_bad_image,
    folder_fingerprint,
    list_images,
    readable_files,
)
from ddpm.data.transforms import prepare
from ddpm.errors import DataError


class DatasetUnavailableError(DataError):
    """A dataset's files are missing and could not be downloaded."""


class ImageSource(ABC):
    """One kind of image data, named by ``data.name``; the arguments of a subclass's ``__init__``
    are its own ``data.*`` settings.

    :meth:`load` returns uint8 datasets of (channels, image_size, image_size) images;
    :meth:`labels` the labels of what :meth:`load` returned last.
    """

    name: ClassVar[str]
    channels: ClassVar[int] = 3  # default of data.channels
    image_size: ClassVar[int] = 64  # default of data.image_size
    in_memory: ClassVar[bool] = False  # decoded at load (else per item, in DataLoader workers)
    has_test_split: bool = False  # an official test split (else val/test are held out of training)

    def key(self) -> str:
        """The source's part of the data key (FID statistics cache): changes with its content."""
        return self.name

    def prepare(self) -> None:  # noqa: B027 - most sources have nothing to download
        """Download what is missing (Lightning: local rank 0 only, before :meth:`load`)."""

    def class_names(self) -> list[str] | None:
        """The classes (label k is name k); None when the data has no labels."""
        return None

    @abstractmethod
    def load(self, image_size: int, channels: int) -> tuple[Dataset, Dataset | None]:
        """The training data and the official test split (None when there is none)."""

    def labels(self) -> tuple[Tensor, Tensor | None]:
        """int64 labels of :meth:`load`'s two datasets (the second None when the test split is)."""
        raise ValueError(f"data {self.name!r} has no class labels")


# -- scikit-learn digits ---------------------------------------------------------------------------


def load_digits_labels() -> Tensor:
    """The digit (0..9) of each of :func:`load_digits_uint8`'s images."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().target.astype(np.int64))


def load_digits_uint8() -> Tensor:
    """scikit-learn's bundled 1797 8x8 digits (values 0..16) as uint8 (1797, 1, 8, 8) in 0..255.
    Ships with scikit-learn, so it works offline."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # float64 in [0, 16]
    return torch.from_numpy(np.round(images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)


class Digits(ImageSource):
    """scikit-learn's bundled 1797 8x8 digits (works offline), classes 0..9; no test split.

    Args:
        root: not read (the digits ship with scikit-learn).
    """

    name = "digits"
    channels, image_size, in_memory = 1, 16, True

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        """``root`` is taken and not read: ``data_root=`` re-points any stored image config."""

    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def load(self, image_size: int, channels: int) -> tuple[Dataset, None]:
        return TensorImages(prepare(load_digits_uint8(), image_size, channels)), None

    def labels(self) -> tuple[Tensor, None]:
        return load_digits_labels(), None


# -- torchvision -----------------------------------------------------------------------------------


class TorchvisionSet(ImageSource):
    """A torchvision dataset with an official test split, downloaded by torchvision
    (``download=true``) or found under ``root``.

    Args:
        root: the torchvision root directory.
        download: let torchvision download missing files (rank 0, in ``prepare_data``).
    """

    torchvision_class: ClassVar[str]  # torchvision.datasets.<class>
    files: ClassVar[str]  # what torchvision reads under root
    url: ClassVar[str]  # where the files come from
    has_test_split = True

    def __init__(self, root: str | os.PathLike = "data", download: bool = False) -> None:
        self.root, self.download = Path(root).expanduser(), bool(download)

    def prepare(self) -> None:
        if self.download:
            for train in (True, False):
                self.open(train, download=True)

    def open(self, train: bool, download: bool) -> Any:
        """The torchvision dataset object, with a clear :class:`DatasetUnavailableError` offline."""
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.torchvision_class)
        try:
            return self._construct(cls, train, download)
        except Exception as exc:  # noqa: BLE001 - missing files, no network (urllib, gdown, ...)
            raise self._unavailable(download, exc) from exc

    def _construct(self, cls: Any, train: bool, download: bool) -> Any:
        return cls(str(self.root), train=train, download=download)

    def _unavailable(self, download: bool, exc: BaseException) -> Exception:
        where = self.root / self.files
        if download:
            what = (
                f"download failed ({type(exc).__name__}: {exc}). If this machine is offline, "
                f"fetch the files on a machine with network access (from {self.url}, or with "
                f"torchvision.datasets.{self.torchvision_class}(root, download=True)) and copy "
                f"them to {where}"
            )
        else:
            what = (
                f"files not found under {where} ({type(exc).__name__}: {exc}). Set "
                f"data.download=true to fetch them, or point data.root at a directory that holds "
                f"them (offline machines: copy them from one with network access, {self.url})"
            )
        return DatasetUnavailableError(f"dataset {self.name!r} at root {self.root}: {what}")


def torchvision_uint8(ds: Any) -> Tensor:
    """``.data`` of CIFAR (numpy N,H,W,C) or MNIST-like (tensor N,H,W) as uint8 (N, C, H, W)."""
    data = ds.data
    data = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    data = data.to(torch.uint8)
    if data.ndim == 3:
        return data.unsqueeze(1)
    return data.permute(0, 3, 1, 2).contiguous()


class ClassificationSet(TorchvisionSet):
    """A torchvision classification set (``.data``, ``.targets``), held in memory as uint8."""

    classes: ClassVar[tuple[str, ...]]  # index = label (torchvision's ``classes`` order)
    in_memory = True

    def __init__(self, root: str | os.PathLike = "data", download: bool = False) -> None:
        super().__init__(root, download)
        self._sets: list[Any] = []

    def class_names(self) -> list[str]:
        return list(self.classes)

    def load(self, image_size: int, channels: int) -> tuple[Dataset, Dataset]:
        self._sets = [self.open(train, self.download) for train in (True, False)]
        train, test = (
            TensorImages(prepare(torchvision_uint8(s), image_size, channels)) for s in self._sets
        )
        return train, test

    def labels(self) -> tuple[Tensor, Tensor]:
        train, test = (torch.as_tensor(np.asarray(s.targets), dtype=torch.long) for s in self._sets)
        return train, test


class MNIST(ClassificationSet):
    """MNIST: 60k train / 10k test 28x28 grayscale digits."""

    name, torchvision_class, files = "mnist", "MNIST", "MNIST/raw"
    url = "https://ossci-datasets.s3.amazonaws.com/mnist/"
    channels, image_size = 1, 32
    classes = tuple(str(d) for d in range(10))


class FashionMNIST(ClassificationSet):
    """Fashion-MNIST: 60k train / 10k test 28x28 grayscale clothes."""

    name, torchvision_class, files = "fashion_mnist", "FashionMNIST", "FashionMNIST/raw"
    url = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    channels, image_size = 1, 32
    classes = tuple(
        "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")
    )


class CIFAR10(ClassificationSet):
    """CIFAR-10: 50k train / 10k test 32x32 RGB."""

    name, torchvision_class, files = "cifar10", "CIFAR10", "cifar-10-batches-py"
    url = "https://www.cs.toronto.edu/~kriz/"
    channels, image_size = 3, 32
    classes = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())


class CelebA(TorchvisionSet):
    """CelebA aligned faces (torchvision's train/test split), decoded from files on access; no
    labels.

    Args:
        root, download: :class:`TorchvisionSet`'s.
        on_bad_image: ``error`` (fail naming the file) or ``skip`` (warn, use the next one).
    """

    name, torchvision_class, files = "celeba", "CelebA", "celeba/img_align_celeba"
    url = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive)"

    def __init__(
        self, root: str | os.PathLike = "data", download: bool = False, on_bad_image: str = "error"
    ) -> None:
        super().__init__(root, download)
        self.on_bad_image = check_on_bad_image(on_bad_image)

    def _construct(self, cls: Any, train: bool, download: bool) -> Any:
        return cls(str(self.root), split="train" if train else "test", download=download)

    def load(self, image_size: int, channels: int) -> tuple[Dataset, Dataset]:
        train, test = (
            ImageFiles(self._files(train), image_size, channels, self.on_bad_image)
            for train in (True, False)
        )
        return train, test

    def _files(self, train: bool) -> list[Path]:
        """Image paths of a split (decoded lazily like an image folder)."""
        ds = self.open(train, self.download)
        base = Path(ds.root) / ds.base_folder / "img_align_celeba"
        return [base / f for f in ds.filename]


# -- image folders ---------------------------------------------------------------------------------


def folder_classes(root: Path, files: list[Path]) -> list[str]:
    """torchvision ``ImageFolder``'s classes: the sorted names of ``root``'s sub-folders (hidden
    ones skipped); label k is the k-th name. A class folder without image ``files`` is an error
    (as torchvision's): it would be a class the network is conditioned on but never sees."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    seen = {f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1}
    empty = [c for c in classes if c not in seen]
    if empty:
        raise DataError(
            f"data.conditional=true takes the classes from the sub-folders of data.root={root}, "
            f"but {len(empty)} of them hold no image files: {', '.join(empty[:10])}. Put images "
            "in them, remove them, or set data.conditional=false"
        )
    return classes


def folder_labels(root: Path, files: list[Path], classes: list[str]) -> Tensor:
    """Label of each file: the index of the class folder (``root/<class>/...``) it lies under."""
    index = {c: i for i, c in enumerate(classes)}
    labels, outside = [], []
    for f in files:
        parts = f.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in index:
            outside.append(f)
            labels.append(-1)
        else:
            labels.append(index[parts[0]])
    if outside:
        raise DataError(
            f"data.conditional=true reads the class of an image from its sub-folder "
            f"(root/<class>/<image>, torchvision's ImageFolder convention), but "
            f"{len(outside)} image(s) under {root} are in no class folder, e.g. {outside[0]}; "
            "move them into a class folder or set data.conditional=false"
        )
    return torch.tensor(labels, dtype=torch.long)


class ImageFolder(ImageSource):
    """Any folder of images (searched recursively; jpg/png/gif/bmp/webp/tif), decoded on access;
    the classes are its sub-folders (torchvision's ``ImageFolder``); no test split.

    Args:
        root: the folder.
        on_bad_image: ``error`` (fail naming every bad file) or ``skip`` (warn, train on the rest).
        verify_images: decode every file at set-up to find bad ones before training starts (on
            rank 0, once per file: the verdicts are kept in ``cache_dir``).
        cache_dir: where the verdicts of the check are kept (None: not kept).
    """

    name = "image_folder"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        on_bad_image: str = "error",
        verify_images: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if root is None:
            raise DataError("data=image_folder needs data.root=/path/to/images")
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise DataError(f"image folder not found: {self.root} (data.root)")
        if not self.root.is_dir():
            raise DataError(f"data.root is not a directory: {self.root}")
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.verify_images = bool(verify_images)
        self.cache_dir = cache_dir
        self._files: list[Path] | None = None
        self._loaded: ImageFiles | None = None

    def files(self) -> list[Path]:
        """Every image file under ``root`` (listed once)."""
        if self._files is None:
            self._files = list_images(self.root)
        return self._files

    def key(self) -> str:
        return f"image_folder_{folder_fingerprint(self.files())}"

    def class_names(self) -> list[str] | None:
        return folder_classes(self.root, self.files()) or None

    def load(self, image_size: int, channels: int) -> tuple[Dataset, None]:
        files = self.files()
        if not files:
            raise DataError(
                f"no image files found under {self.root} (searched recursively for "
                ".jpg/.jpeg/.png/.gif/.bmp/.webp/.tif); check data.root"
            )
        if self.verify_images:
            files = readable_files(files, self.root, self.on_bad_image, self.cache_dir)
        self._loaded = ImageFiles(files, image_size, channels, self.on_bad_image)
        return self._loaded, None

    def labels(self) -> tuple[Tensor, None]:
        assert self._loaded is not None, "load() first"
        return folder_labels(self.root, self._loaded.files, self.class_names() or []), None
