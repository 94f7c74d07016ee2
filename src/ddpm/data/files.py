"""Image files: listed, fingerprinted, decoded to uint8 and checked, and :class:`ImageFiles`, the
dataset that decodes them on access (in DataLoader workers). Failures name the file.

The check of a folder (:func:`readable_files`) decodes every file once, on global rank 0 with
progress lines, and remembers the verdict of each file by (path, size, modification time) in a
cache file, so a later run (or a resumed one) decodes only new or changed files; the other ranks
get rank 0's verdicts."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.data.transforms import resize_center_crop
from ddpm.errors import DataError
from ddpm.utils.distributed import broadcast_object, rank_and_world
from ddpm.utils.progress import Progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
ON_BAD_IMAGE = ("error", "skip")  # fail naming every bad file, or warn and train on the rest


class BadImageError(DataError):
    """One or more image files cannot be decoded."""


def check_on_bad_image(on_bad_image: str) -> str:
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    return on_bad_image


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


def _check(path: Path) -> tuple[Path, str] | None:
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the file bad
        return path, f"{type(exc).__name__}: {exc}"
    return None


def find_bad_images(
    files: Sequence[Path], workers: int = 4, progress: bool = False
) -> list[tuple[Path, str]]:
    """Fully decode every file (threads: PIL releases the GIL); return (path, reason) of failures.
    ``progress``: a bar on a terminal, plain lines in log files."""
    bad = []
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        Progress(len(files), "checking images", "images", enabled=progress) as shown,
    ):
        for result in pool.map(_check, files, chunksize=64):
            shown.advance(1)
            if result is not None:
                bad.append(result)
    return bad


class VerdictCache:
    """The verdicts of earlier checks of a folder's files, by (path, size, modification time):
    a text file ``<cache_dir>/checked_images/<folder hash>.tsv`` of ``size, mtime_ns, reason
    (empty: readable), path`` lines; None ``cache_dir``: nothing remembered."""

    def __init__(self, root: Path, cache_dir: str | os.PathLike | None) -> None:
        self.path = None
        if cache_dir is not None:
            digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
            self.path = Path(cache_dir) / "checked_images" / f"{digest}.tsv"

    def load(self) -> dict[tuple[str, int, int], str]:
        known: dict[tuple[str, int, int], str] = {}
        if self.path is None or not self.path.is_file():
            return known
        for line in self.path.read_text().splitlines():
            size, mtime, reason, name = line.split("\t", 3)
            known[(name, int(size), int(mtime))] = reason
        return known

    def save(self, verdicts: dict[tuple[str, int, int], str]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        lines = (f"{s}\t{m}\t{r}\t{n}" for (n, s, m), r in sorted(verdicts.items()))
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.path)


def check_files(
    files: Sequence[Path], root: Path, cache_dir: str | os.PathLike | None, workers: int = 4
) -> list[tuple[Path, str]]:
    """(path, reason) of the unreadable ``files``: decoded on global rank 0, except the files
    whose (path, size, modification time) the cache has a verdict for; the other ranks receive
    rank 0's answer (collective)."""
    bad: list[tuple[Path, str]] | None = None
    if rank_and_world()[0] == 0:
        cache = VerdictCache(root, cache_dir)
        known = cache.load()
        keys = {}
        for f in files:
            st = f.stat()
            keys[f] = (str(f), st.st_size, st.st_mtime_ns)
        todo = [f for f in files if keys[f] not in known]
        if len(todo) < len(files):
            log.info(
                "checking %d image files under %s (%d checked before: %s)",
                len(todo),
                root,
                len(files) - len(todo),
                cache.path,
            )
        found = dict(find_bad_images(todo, workers, progress=len(todo) > 0))
        verdicts = {keys[f]: known.get(keys[f], found.get(f, "")) for f in files}
        if todo:
            cache.save(verdicts)
        bad = [(f, verdicts[keys[f]]) for f in files if verdicts[keys[f]]]
    return broadcast_object(bad)


def bad_images_message(bad: Iterable[tuple[Path, str]], root: Path, limit: int = 20) -> str:
    bad = list(bad)
    lines = [f"  {p}: {why}" for p, why in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return f"{len(bad)} unreadable image file(s) under {root}:\n" + "\n".join(lines)


def warn_skipped(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def readable_files(
    files: list[Path],
    root: Path,
    on_bad_image: str,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 4,
) -> list[Path]:
    """``files`` after decoding every one (:func:`check_files`: once, on rank 0, remembered in
    ``cache_dir``): a :class:`BadImageError` naming each unreadable file
    (``on_bad_image='error'``), or the readable ones with a warning naming the rest (``'skip'``)."""
    bad = check_files(files, root, cache_dir, workers)
    if bad and on_bad_image == "error":
        raise BadImageError(
            bad_images_message(bad, root)
            + "\nfix or remove them, or set data.on_bad_image='skip' to skip them"
        )
    if bad:
        warn_skipped(f"skipped {bad_images_message(bad, root)}")
        drop = {p for p, _ in bad}
        files = [f for f in files if f not in drop]
        if not files:
            raise BadImageError(f"every image file under {root} is unreadable")
    return files


class ImageFiles(Dataset):
    """Image files decoded, converted and resized on access (in DataLoader workers).

    A file that fails to decode raises :class:`BadImageError` naming it (``on_bad_image='error'``)
    or is replaced by the next readable file with a warning (``'skip'``).
    """

    def __init__(
        self, files: Sequence[Path], image_size: int, channels: int, on_bad_image: str = "error"
    ) -> None:
        self.files = list(files)
        self.image_size, self.channels, self.on_bad_image = image_size, channels, on_bad_image

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        return ImageFiles(
            [self.files[i] for i in indices], self.image_size, self.channels, self.on_bad_image
        )

    def load(self, index: int) -> Tensor:
        x = decode_image(self.files[index], self.channels)
        return resize_center_crop(x.unsqueeze(0), self.image_size)[0]

    def __getitem__(self, index: int) -> Tensor:
        try:
            return self.load(index)
        except BadImageError as exc:
            if self.on_bad_image != "skip":
                raise
            warn_skipped(f"skipped unreadable image file {self.files[index]}: {exc.__cause__}")
        for k in range(1, len(self.files)):
            try:
                return self.load((index + k) % len(self.files))
            except BadImageError:
                continue
        raise BadImageError(f"no readable image among the {len(self.files)} files of this split")
