"""Sets of uint8 images to score: sample files, image folders and data sets, read in row blocks.

The sample-file format is improved-diffusion's (also guided-diffusion's evaluator, ours from
``sample.py``): an ``.npz`` with ``arr_0`` uint8 (N, H, W, C) and optionally ``arr_1`` the class
labels (N,). Every source yields uint8 (B, C, H, W) batches of the rows ``[start, stop)``, so each
process reads only its own block (:func:`ddpm.utils.distributed.shard`).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ddpm.data.files import decode_image, folder_fingerprint, list_images

PROBE_IMAGES = 64


class ImageSource(Protocol):
    """A fixed, ordered set of uint8 images."""

    #: identifies the content (cache key of its features); "" = do not cache
    key: str

    def __len__(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        ...

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Tensor]:
        """uint8 (B, C, H, W) batches of the images ``start .. stop-1``, in order."""
        ...


def content_probe(source: ImageSource) -> str:
    """Hash of the first images (detects changed content under an unchanged key)."""
    h = hashlib.sha1()
    for x in source.batches(0, min(PROBE_IMAGES, len(source)), PROBE_IMAGES):
        h.update(x.contiguous().numpy().tobytes())
    return h.hexdigest()


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class NpzImages:
    """``arr_0`` of an ``.npz`` (uint8 (N, H, W, C), C = 1 or 3), read lazily in row blocks;
    ``labels`` is ``arr_1`` when present."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such sample file: {self.path}")
        try:
            with zipfile.ZipFile(self.path) as z, z.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran_order, dtype = read_header(f)
                self._offset = f.tell()
        except (zipfile.BadZipFile, KeyError, ValueError) as e:
            raise ValueError(
                f"{self.path} is not a sample file: expected an .npz holding arr_0, uint8 images "
                f"(N, H, W, C) as improved-diffusion and sample.py write ({type(e).__name__}: {e})"
            ) from e
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or fortran_order:
            raise ValueError(
                f"{self.path}: arr_0 must be uint8 images (N, H, W, C) with C = 1 or 3 (C order), "
                f"got {dtype} {tuple(shape)}"
            )
        self.num_images = int(shape[0])
        self._hwc = tuple(int(s) for s in shape[1:])
        self.key = f"npz:{_file_key(self.path)}"
        with np.load(self.path) as data:
            self.labels = np.asarray(data["arr_1"]) if "arr_1" in data.files else None
        if self.labels is not None and (
            self.labels.shape != (self.num_images,)
            or not np.issubdtype(self.labels.dtype, np.integer)
        ):
            raise ValueError(
                f"{self.path}: arr_1 must hold one integer class label per image of arr_0 "
                f"({self.num_images} images), got {self.labels.dtype} {self.labels.shape}; "
                "write the file again (sample.py writes both), or drop arr_1"
            )

    def __len__(self) -> int:
        return self.num_images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self._hwc
        return (c, h, w)

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Tensor]:
        row = int(np.prod(self._hwc))
        with zipfile.ZipFile(self.path) as z, z.open("arr_0.npy") as f:
            f.seek(self._offset + start * row)
            for i in range(start, stop, batch_size):
                n = min(batch_size, stop - i)
                buf = f.read(n * row)
                x = np.frombuffer(buf, dtype=np.uint8).reshape(n, *self._hwc)
                yield torch.from_numpy(x.copy()).permute(0, 3, 1, 2).contiguous()


class FolderImages:
    """Every image file under a folder (recursive, sorted by path), decoded to RGB uint8 at its own
    size; all files must have the same size."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"no such image folder: {self.root}")
        self.files = list_images(self.root)
        if not self.files:
            raise FileNotFoundError(f"no image files under {self.root}")
        self.key = f"folder:{self.root.resolve()}|{folder_fingerprint(self.files)}"
        self._shape = tuple(self._decode(0).shape)

    def _decode(self, i: int) -> Tensor:
        return decode_image(self.files[i], 3)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Tensor]:
        for i in range(start, stop, batch_size):
            imgs = [self._decode(j) for j in range(i, min(i + batch_size, stop))]
            for j, img in zip(range(i, stop), imgs):
                if tuple(img.shape) != self._shape:
                    raise ValueError(
                        f"{self.files[j]} is {tuple(img.shape[1:])} pixels, the folder's first "
                        f"image {tuple(self._shape[1:])}: every image of a scored set must have "
                        "the same size"
                    )
            yield torch.stack(imgs)


def _stack(batch: Tensor | list[Tensor]) -> Tensor:
    return batch if isinstance(batch, Tensor) else torch.stack(batch)


class DatasetImages:
    """The first ``limit`` images of a uint8 (C, H, W) dataset (e.g. ``ImageDataModule.dataset``,
    un-augmented), identified by ``key``."""

    def __init__(
        self, dataset: Dataset, key: str, limit: int | None = None, num_workers: int = 0
    ) -> None:
        self.dataset = dataset
        n = len(dataset)  # type: ignore[arg-type]
        self.num_images = n if limit is None else min(int(limit), n)
        self.key = key
        self.num_workers = int(num_workers)
        self._shape = tuple(int(s) for s in dataset[0].shape)
        if len(self._shape) != 3:
            raise ValueError(f"expected images (C, H, W), the dataset yields {self._shape}")

    def __len__(self) -> int:
        return self.num_images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Tensor]:
        if stop <= start:
            return
        loader = DataLoader(
            Subset(self.dataset, range(start, stop)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_stack,
        )
        yield from loader


def open_images(path: str | os.PathLike) -> NpzImages | FolderImages:
    """A sample ``.npz`` file or a folder of images."""
    p = Path(path)
    if p.is_dir():
        return FolderImages(p)
    if p.is_file() and p.suffix == ".npz":
        return NpzImages(p)
    raise FileNotFoundError(
        f"{path}: expected a .npz sample file (arr_0 uint8 (N, H, W, C)) or a folder of images"
    )


def save_npz(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    indices: np.ndarray | None = None,
) -> Path:
    """Write improved-diffusion's sample file atomically: ``arr_0`` = images (uint8 (N, H, W, C)
    or float (N, D) points), ``arr_1`` = labels when given, ``indices`` = which samples they are
    (of an interrupted ``sample.py``) when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images}
    if labels is not None:
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        arrays["arr_1"] = np.asarray(labels)
    if indices is not None:
        arrays["indices"] = np.asarray(indices, dtype=np.int64)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path
