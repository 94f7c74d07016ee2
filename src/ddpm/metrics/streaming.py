"""The scores as torchmetrics ``Metric``s: the state of each (the sums of FID, the feature rows of
KID and precision/recall, the logits of IS) is accumulated batch by batch and reduced across
processes by torchmetrics; the numbers are computed from it with torch-fidelity's own formulas
and random draws (``rng_seed``), so they are torch-fidelity's, on one process or many.

They take feature rows, not images: :class:`ddpm.metrics.SampleMetrics` runs the extractor once
per batch (features and logits together) and feeds them. The reference set is added on one rank
(``real=True``; the reduction adds it up) and kept across :meth:`reset` (``reset_real_features``
is off), so an in-training evaluation extracts it once.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import (
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    isc_features_to_metric,
)
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)
from torch_fidelity.metric_prc import (
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)
from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

log = logging.getLogger(__name__)


class Rows(nn.Module):
    """The "extractor" of rows extracted already: the identity, with their width."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


def _clamp(name: str, value: int, n: int) -> int:
    if value > n:
        log.warning("%s=%d is more than the %d samples: using %d", name, value, n, n)
        return n
    return value


def _gather_in_rank_order(metric: Any, state: str) -> None:
    """Make a list state (torchmetrics' KID and IS keep theirs with no reduction, gathered batch
    by batch: interleaved across ranks, and stuck when ranks hold different numbers of batches)
    concatenated per rank before the gather: every row once, in rank order, so global order."""
    metric.add_state(state, [], dist_reduce_fx="cat")


def _quiet(cls: type, *args: Any, **kwargs: Any) -> Any:
    """Build a torchmetrics metric without its warning that it keeps every row (it is meant to)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        return cls(*args, **kwargs)


class FrechetDistance(FrechetInceptionDistance):
    """FID (Heusel et al. 2017) of feature rows: torchmetrics' float64 sums of the rows and of
    their outer products (summed across processes), torch-fidelity's distance of the two
    Gaussians."""

    def __init__(self, num_features: int) -> None:
        super().__init__(feature=Rows(num_features), reset_real_features=False)

    def compute(self) -> Tensor:
        stats = []
        for side in ("real", "fake"):
            n = getattr(self, f"{side}_features_num_samples")
            if n < 2:
                raise ValueError("FID needs at least 2 images in each set")
            total = getattr(self, f"{side}_features_sum")
            mu = total / n
            sigma = (getattr(self, f"{side}_features_cov_sum") - n * torch.outer(mu, mu)) / (n - 1)
            stats.append({"mu": mu.cpu().numpy(), "sigma": sigma.cpu().numpy()})
        fid = fid_statistics_to_metric(stats[1], stats[0], verbose=False)[KEY_METRIC_FID]
        return torch.tensor(fid, dtype=torch.float64)


class KernelDistance(KernelInceptionDistance):
    """KID (Bińkowski et al. 2018) and, from the same rows, precision/recall (Kynkäänniemi et
    al. 2019; torchmetrics has none): the rows gathered from every process by torchmetrics,
    the scores by torch-fidelity with its subsets drawn from ``rng_seed``."""

    def __init__(
        self,
        num_features: int,
        subsets: int,
        subset_size: int,
        kid: bool = True,
        prc_neighborhood: int | None = None,
        rng_seed: int = 2020,
    ) -> None:
        super().__init__(
            feature=Rows(num_features),
            subsets=subsets,
            subset_size=subset_size,
            reset_real_features=False,
        )
        self.kid, self.prc_neighborhood, self.rng_seed = kid, prc_neighborhood, rng_seed
        self.skipped: dict[str, str] = {}
        for name in ("real_features", "fake_features"):
            _gather_in_rank_order(self, name)

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        real = dim_zero_cat(self.real_features).float().cpu()
        fake = dim_zero_cat(self.fake_features).float().cpu()
        out: dict[str, float] = {}
        self.skipped = {}
        if min(len(real), len(fake)) < 2:
            raise ValueError("KID and precision/recall need at least 2 images in each set")
        if self.kid:
            subset = _clamp("kid_subset_size", self.subset_size, min(len(real), len(fake)))
            r = kid_features_to_metric(
                fake,
                real,
                kid_subsets=self.subsets,
                kid_subset_size=subset,
                kid_degree=self.degree,
                kid_gamma=self.gamma,
                kid_coef0=self.coef,
                rng_seed=self.rng_seed,
                verbose=False,
            )
            out.update(kid=r[KEY_METRIC_KID_MEAN], kid_std=r[KEY_METRIC_KID_STD])
            out["kid_subset_size"] = float(subset)
        k = self.prc_neighborhood
        if k is not None and min(len(real), len(fake)) <= k:
            self.skipped["precision/recall"] = (
                f"needs more than prc_neighborhood={k} images per set"
            )
        elif k is not None:
            r = prc_features_to_metric(
                fake, real, prc_neighborhood=k, save_cpu_ram=True, verbose=False
            )
            out.update(precision=r[KEY_METRIC_PRECISION], recall=r[KEY_METRIC_RECALL])
        return out


class InceptionScoreOfLogits(InceptionScore):
    """IS (Salimans et al. 2016) of class logits: the logits gathered from every process by
    torchmetrics, the score (mean ± std over ``splits``) by torch-fidelity, shuffled with
    ``rng_seed``."""

    def __init__(self, num_classes: int, splits: int, rng_seed: int = 2020) -> None:
        super().__init__(feature=Rows(num_classes), splits=splits)
        self.rng_seed = rng_seed
        _gather_in_rank_order(self, "features")

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        logits = dim_zero_cat(self.features).float().cpu()
        splits = _clamp("isc_splits", self.splits, len(logits))
        r = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=self.rng_seed)
        return {"is": r[KEY_METRIC_ISC_MEAN], "is_std": r[KEY_METRIC_ISC_STD]}


def frechet(num_features: int) -> FrechetDistance:
    return _quiet(FrechetDistance, num_features)


def kernel(num_features: int, **kwargs: Any) -> KernelDistance:
    return _quiet(KernelDistance, num_features, **kwargs)


def inception_score(num_classes: int, **kwargs: Any) -> InceptionScoreOfLogits:
    return _quiet(InceptionScoreOfLogits, num_classes, **kwargs)
