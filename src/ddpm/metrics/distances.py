"""Distances between two samples of a low-dimensional distribution (the 2-D playground's quality
number): energy distance and kernel MMD. Both are 0 iff the distributions are equal and are
estimated without bias from samples x (N, D) and y (M, D) with pairwise distances (O(N·M)
memory: meant for a few thousand points, not for images).

* Energy distance (Székely & Rizzo 2013): E(X, Y) = 2 E‖X-Y‖ - E‖X-X'‖ - E‖Y-Y'‖ (squared-distance
  units of the data's scale, parameter free).
* MMD² with a sum of Gaussian kernels k(a, b) = Σ_σ exp(-‖a-b‖² / (2σ²)) (Gretton et al. 2012).

The within-sample terms leave out the diagonal (U-statistics), so two independent samples of the
same distribution give ≈ 0 (either sign) rather than a positive bias of order 1/N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_BANDWIDTHS = (0.1, 0.3, 1.0)


def _check(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    y = torch.as_tensor(y).detach().to("cpu", torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (N, D) and (M, D) with the same D, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"need >= 2 points in x and y, got {x.shape[0]} and {y.shape[0]}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x and y must be finite (a sampler diverged?)")
    return x, y


def _mean_off_diagonal(m: Tensor) -> Tensor:
    n = m.shape[0]
    return (m.sum() - m.diagonal().sum()) / (n * (n - 1))


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Unbiased energy distance 2 E‖X-Y‖ - E‖X-X'‖ - E‖Y-Y'‖ between samples x (N, D), y (M, D)."""
    x, y = _check(x, y)
    xy = torch.cdist(x, y).mean()
    xx = _mean_off_diagonal(torch.cdist(x, x))
    yy = _mean_off_diagonal(torch.cdist(y, y))
    return float(2.0 * xy - xx - yy)


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> float:
    """Unbiased MMD² with the kernel Σ_σ exp(-‖a-b‖²/(2σ²)) over ``bandwidths`` σ."""
    x, y = _check(x, y)
    if not bandwidths or any(float(s) <= 0 for s in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty list of numbers > 0, got {bandwidths!r}")

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).square_()
        out = torch.zeros_like(d2)
        for s in bandwidths:
            out += torch.exp(d2 * (-0.5 / float(s) ** 2))
        return out

    return float(
        _mean_off_diagonal(kernel(x, x))
        + _mean_off_diagonal(kernel(y, y))
        - 2.0 * kernel(x, y).mean()
    )


def distribution_distances(x: Tensor, y: Tensor) -> dict[str, float]:
    """``{"energy_distance": ..., "mmd": ...}`` between generated x and reference y."""
    return {"energy_distance": energy_distance(x, y), "mmd": mmd(x, y)}
