"""Reference (real-image) feature statistics for FID, cached on disk (PITFALLS 3).

Statistics come from the un-augmented training split (``datamodule.reference_dataloader``) at the
model's resolution. The cache file is named after, and stores, the key: dataset id + split +
sample shape + number of reference images + feature-extractor id; inside it also stores a hash of
the first reference images, so a dataset whose content changed under the same id is recomputed
rather than silently reused.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpm.metrics.features import split_output
from ddpm.utils.images import to_rgb_uint8

CACHE_VERSION = 1
PROBE_IMAGES = 64


@dataclass
class FeatureStats:
    """Mean, covariance (float64) and count of a set of feature vectors."""

    mean: Tensor
    cov: Tensor
    n: int

    @classmethod
    def from_sums(cls, total: Tensor, outer: Tensor, n: int) -> FeatureStats:
        """From Σf (D,), Σff^T (D, D) and n (torchmetrics FID's state); unbiased covariance."""
        if n < 2:
            raise ValueError(f"at least 2 feature vectors are needed, got {n}")
        mean = total.double() / n
        cov = (outer.double() - n * torch.outer(mean, mean)) / (n - 1)
        return cls(mean, cov, int(n))

    def sums(self) -> tuple[Tensor, Tensor, int]:
        """Inverse of :meth:`from_sums`: (Σf, Σff^T, n)."""
        total = self.mean * self.n
        outer = self.cov * (self.n - 1) + self.n * torch.outer(self.mean, self.mean)
        return total, outer, self.n


def cache_key(
    dataset_id: str, split: str, sample_shape: Iterable[int], num_images: int, extractor_id: str
) -> str:
    shape = "x".join(str(int(s)) for s in sample_shape)
    return f"{dataset_id}|{split}|{shape}|n{num_images}|{extractor_id}"


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    """``<cache_dir>/fid_reference/<readable key>-<hash>.pt``."""
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", key)[:150]
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / "fid_reference" / f"{slug}-{digest}.pt"


def content_probe(images_uint8: Tensor) -> str:
    """Hash of a few uint8 reference images (detects changed data under an unchanged id)."""
    return hashlib.sha1(images_uint8.cpu().contiguous().numpy().tobytes()).hexdigest()


def load_cached(path: str | os.PathLike, key: str, probe: str | None) -> FeatureStats | None:
    """The cached statistics if ``path`` exists and matches ``key`` (and ``probe``), else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or foreign file: recompute
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return None
    if data.get("key") != key or (probe is not None and data.get("probe") != probe):
        return None
    return FeatureStats(data["mean"].double(), data["cov"].double(), int(data["n"]))


def save_cached(path: str | os.PathLike, key: str, probe: str | None, stats: FeatureStats) -> Path:
    """Write the statistics atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(
        {
            "version": CACHE_VERSION,
            "key": key,
            "probe": probe,
            "mean": stats.mean.cpu(),
            "cov": stats.cov.cpu(),
            "n": stats.n,
            "created": time.time(),
        },
        tmp,
    )
    os.replace(tmp, path)
    return path


@torch.no_grad()
def feature_sums(
    extractor: nn.Module,
    batches: Iterable[Any],
    denormalize: Callable[[Tensor], Tensor] | None,
    device: torch.device | str,
    num_features: int,
) -> tuple[Tensor, Tensor, int]:
    """(Σf, Σff^T, n) in float64 over model-space image batches (un-augmented reference data)."""
    total = torch.zeros(num_features, dtype=torch.float64, device=device)
    outer = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)
    n = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        u8 = to_rgb_uint8(x.to(device), denormalize)
        f, _ = split_output(extractor(u8))
        f = f.double()
        total += f.sum(0)
        outer += f.T @ f
        n += f.shape[0]
    return total, outer, n
