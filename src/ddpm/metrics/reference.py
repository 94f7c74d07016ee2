"""Cached reference features (the real images of FID / KID / precision-recall).

One file per reference set and extractor, named after and storing its key: the images' identity
(data set + split + resolution + channels + normalisation for a data module, path + size + mtime
for a file or folder), their number and shape, the extractor (name + hash of its weights) and the
feature layer. Inside it also stores a hash of the first images, so a data set whose content
changed under the same key is recomputed rather than silently reused. The features themselves are
stored (not only their mean and covariance): KID and precision/recall need them.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

CACHE_VERSION = 2


def cache_key(
    source_key: str,
    num_images: int,
    image_shape: Iterable[int],
    extractor_id: str,
    layer: str,
) -> str:
    shape = "x".join(str(int(s)) for s in image_shape)
    return f"{source_key}|n{num_images}|{shape}|{extractor_id}|{layer}"


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    """``<cache_dir>/fid_reference/<readable key>-<hash>.pt``."""
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", key)[-150:]
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / "fid_reference" / f"{slug}-{digest}.pt"


def load_cached(path: str | os.PathLike, key: str, probe: str) -> Tensor | None:
    """The cached features if ``path`` holds them for ``key`` and ``probe``, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or foreign file: recompute
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return None
    if data.get("key") != key or data.get("probe") != probe:
        return None
    return data["features"]


def save_cached(path: str | os.PathLike, key: str, probe: str, features: Tensor) -> Path:
    """Write the features atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(
        {
            "version": CACHE_VERSION,
            "key": key,
            "probe": probe,
            "features": features.cpu().contiguous(),
            "created": time.time(),
        },
        tmp,
    )
    os.replace(tmp, path)
    return path
