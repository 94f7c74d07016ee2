"""Where images come from: scikit-learn's bundled digits, torchvision datasets, a folder of files.

Every source yields uint8 tensors (N, C, H, W) or per-file uint8 (C, H, W) at the requested
resolution and channel count, so normalisation and augmentation happen once, batched, in
:mod:`ddpm.data.transforms`. Failures name the file or directory and say what to do.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are missing and could not be downloaded."""


class BadImageError(ValueError):
    """One or more image files cannot be decoded."""


# -- tensor helpers ------------------------------------------------------------------------------


def resize_center_crop(x: Tensor, size: int) -> Tensor:
    """Resize uint8 images (N, C, H, W) so the shorter side is ``size`` (bilinear, antialiased
    when shrinking), then crop the centre ``size`` x ``size``. A no-op at the right size."""
    if x.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if min(h, w) != size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        y = F.interpolate(
            x.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1
        )
        x = y.round_().clamp_(0, 255).to(torch.uint8)
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size].contiguous()


def to_channels(x: Tensor, channels: int) -> Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} to ``channels``: RGB->L uses PIL's ITU-R 601 luma."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        w = torch.tensor([19595, 38470, 7471], dtype=torch.int64).view(1, 3, 1, 1)
        return (
            ((x.to(torch.int64) * w).sum(1, keepdim=True) + 32768)
            .div(65536, rounding_mode="floor")
            .to(torch.uint8)
        )
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def prepare(x: Tensor, image_size: int, channels: int) -> Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, channels, image_size, image_size)."""
    return resize_center_crop(to_channels(x, channels), image_size)


# -- class labels ----------------------------------------------------------------------------------

# class names of the labelled built-in sets, index = label (torchvision's ``classes`` order)
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "digits": tuple(str(d) for d in range(10)),
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}


def check_labels(labels: Tensor, num_classes: int, what: str) -> Tensor:
    """``labels`` as int64, or a ValueError naming ``what`` when one lies outside [0, K)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        values = sorted(set(labels[bad].tolist()))[:10]
        raise ValueError(
            f"{what}: {int(bad.sum())} label(s) outside [0, {num_classes}) (e.g. {values}); "
            "class-conditional training needs every example labelled with a class index"
        )
    return labels


def folder_classes(root: Path) -> list[str]:
    """torchvision ``ImageFolder``'s classes: the sorted names of ``root``'s sub-folders (hidden
    ones skipped); label k is the k-th name."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def folder_labels(root: Path, files: Sequence[Path], classes: Sequence[str]) -> Tensor:
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
        raise ValueError(
            f"data.conditional=true reads the class of an image from its sub-folder "
            f"(root/<class>/<image>, torchvision's ImageFolder convention), but "
            f"{len(outside)} image(s) under {root} are in no class folder, e.g. {outside[0]}; "
            "move them into a class folder or set data.conditional=false"
        )
    return torch.tensor(labels, dtype=torch.long)


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


# -- torchvision -----------------------------------------------------------------------------------

# name -> (torchvision class, files expected under root, where they come from)
TORCHVISION = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/"),
    "mnist": ("MNIST", "MNIST/raw", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion_mnist": (
        "FashionMNIST",
        "FashionMNIST/raw",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    "celeba": (
        "CelebA",
        "celeba/img_align_celeba",
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive)",
    ),
}


def _unavailable(name: str, root: Path, download: bool, exc: BaseException) -> Exception:
    cls, files, url = TORCHVISION[name]
    where = root / files
    if download:
        what = (
            f"download failed ({type(exc).__name__}: {exc}). If this machine is offline, "
            f"fetch the files on a machine with network access (from {url}, or with "
            f"torchvision.datasets.{cls}(root, download=True)) and copy them to {where}"
        )
    else:
        what = (
            f"files not found under {where} ({type(exc).__name__}: {exc}). Set "
            f"data.download=true to fetch them, or point data.root at a directory that holds "
            f"them (offline machines: copy them from one with network access, {url})"
        )
    return DatasetUnavailableError(f"dataset {name!r} at root {root}: {what}")


def torchvision_dataset(name: str, root: Path, train: bool, download: bool) -> Any:
    """The torchvision dataset object, with a clear :class:`DatasetUnavailableError` offline."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[name][0])
    try:
        if name == "celeba":
            return cls(str(root), split="train" if train else "test", download=download)
        return cls(str(root), train=train, download=download)
    except Exception as exc:  # noqa: BLE001 - missing files, no network (urllib, gdown, ...)
        raise _unavailable(name, root, download, exc) from exc


def torchvision_uint8(ds: Any) -> Tensor:
    """``.data`` of CIFAR (numpy N,H,W,C) or MNIST-like (tensor N,H,W) as uint8 (N, C, H, W)."""
    data = ds.data
    data = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    data = data.to(torch.uint8)
    if data.ndim == 3:
        return data.unsqueeze(1)
    return data.permute(0, 3, 1, 2).contiguous()


def torchvision_labels(ds: Any) -> Tensor:
    """``.targets`` of a torchvision classification dataset as int64 (N,)."""
    return torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


def celeba_files(ds: Any) -> list[Path]:
    """Image paths of a torchvision CelebA split (decoded lazily like an image folder)."""
    base = Path(ds.root) / ds.base_folder / "img_align_celeba"
    return [base / f for f in ds.filename]


# -- image folders ---------------------------------------------------------------------------------


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, hidden files and directories skipped)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / f)
    return sorted(files)


def folder_fingerprint(files: Sequence[Path]) -> str:
    """Short hash of the file list with sizes and modification times: changes with the content."""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:10]


def decode_image(path: Path, channels: int) -> Tensor:
    """Decode one file to uint8 (channels, H, W): any PIL mode (palette, alpha composited on
    white, 16-bit scaled to 8-bit). Raises :class:`BadImageError` naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img).astype(np.float64)
                hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                img = Image.fromarray(np.round(arr.clip(0, hi) * (255.0 / hi)).astype(np.uint8))
            elif img.mode == "F":
                arr = np.asarray(img)
                img = Image.fromarray(np.round(arr.clip(0, 1) * 255).astype(np.uint8))
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode in ("RGBA", "LA", "PA"):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, rgba)
            img = img.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"unreadable image file {path}: {exc}") from exc
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def find_bad_images(files: Sequence[Path], workers: int = 4) -> list[tuple[Path, str]]:
    """Fully decode every file (threads: PIL releases the GIL); return (path, reason) of failures."""

    def check(path: Path) -> tuple[Path, str] | None:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure makes the file bad
            return path, f"{type(exc).__name__}: {exc}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [r for r in pool.map(check, files, chunksize=64) if r is not None]


def bad_images_message(bad: Iterable[tuple[Path, str]], root: Path, limit: int = 20) -> str:
    bad = list(bad)
    lines = [f"  {p}: {why}" for p, why in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return f"{len(bad)} unreadable image file(s) under {root}:\n" + "\n".join(lines)


def warn_skipped(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)
