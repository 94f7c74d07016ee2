"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, sec. 3 and App. C): power-function EMA profiles, their snapshots, and the
least-squares reconstruction of an EMA of any length after training.

A power-function EMA with exponent γ averages the weights θ_1 .. θ_t of the first t updates with
weights growing as τ^γ (EDM2 eq. 2); its width relative to its length is

    σ_rel² = (γ + 1) / ((γ + 2)² (γ + 3))                                     (EDM2 eq. 3)

and it is tracked update by update with ema_t = β_t ema_{t-1} + (1 - β_t) θ_t,

    β_γ(t) = (1 - 1/t)^(γ + 1)                                                 (EDM2 eq. 4)

(t = 1 copies the weights). The β's telescope, Π_{u=s+1..t} β_u = (s/t)^(γ+1), so the weight of
θ_s in ema_t is exactly

    w_{γ,t}(s) = (s^(γ+1) - (s-1)^(γ+1)) / t^(γ+1),   s = 1 .. t   (they sum to 1).

Reconstruction (EDM2 sec. 3.2, App. C.2): every snapshot (γ_i, t_i) of a run is the known linear
combination Σ_s w_{γ_i,t_i}(s) θ_s of the same weights, so the EMA of another profile (γ*, t*)
is approximated by Σ_i c_i snapshot_i with the c minimising ‖Σ_i c_i w_i - w*‖ over the steps
s. EDM2 solves this with the continuous-time inner products of the profiles (its App. C.2);
here the discrete weights above are used, which is the exact problem: a target in the span of
the snapshots (e.g. one of the tracked profiles at a snapshot step) is reconstructed exactly.

Snapshot files (:func:`write_snapshot`) are safetensors holding every profile's weights at one
step, with the step, the number of updates and the σ_rel values as metadata. A run's record of
them (what :class:`~ddpm.callbacks.posthoc_ema.PostHocEMA` stores in its checkpoints, read by
:func:`reconstruct`) is a dict::

    sigma_rels     the tracked profiles' σ_rel
    num_updates    updates so far (the t of the live profiles)
    profiles       the live profiles' weights at the checkpoint, one state dict per σ_rel
    dirpath        where the snapshot files are written
    snapshots      [{"file", "step", "num_updates"}] of the files written up to the checkpoint
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "MAX_SIGMA_REL",
    "Profile",
    "check_sigma_rel",
    "combine",
    "gamma_to_sigma_rel",
    "power_ema_beta",
    "power_ema_weights",
    "read_snapshot",
    "reconstruct",
    "sigma_rel_to_gamma",
    "solve_coefficients",
    "write_snapshot",
]

# σ_rel of γ = 0 (a uniform average of every step so far): the longest power-function EMA.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)
_CHUNK = 1 << 16  # steps per block when summing the weights' inner products

Profile = tuple[float, int]  # (γ, t): a power-function EMA with exponent γ after t updates


def check_sigma_rel(sigma_rel: float, name: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float in (0, MAX_SIGMA_REL]; ValueError naming ``name`` otherwise."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise ValueError(f"{name} must be a number in (0, {MAX_SIGMA_REL:.4f}], got {sigma_rel!r}")
    if not 0.0 < float(sigma_rel) <= MAX_SIGMA_REL:
        raise ValueError(
            f"{name} must be in (0, {MAX_SIGMA_REL:.4f}] (EDM2's relative EMA length; "
            f"{MAX_SIGMA_REL:.4f} averages every step equally), got {sigma_rel!r}"
        )
    return float(sigma_rel)


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the power-function EMA with exponent γ >= 0 (EDM2 eq. 3)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ >= 0 whose profile has relative width ``sigma_rel`` (EDM2 eq. 3 solved for
    γ: the largest real root of γ³ + 7γ² + (16 - σ⁻²)γ + 12 - σ⁻² = 0). σ_rel decreases with γ
    on [0, ∞), so bisection on that interval finds it to float64 precision."""
    sigma_rel = check_sigma_rel(sigma_rel)
    lo, hi = 0.0, 1.0
    while gamma_to_sigma_rel(hi) > sigma_rel:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gamma_to_sigma_rel(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def power_ema_beta(gamma: float, t: int) -> float:
    """β_γ(t) = (1 - 1/t)^(γ+1) of the t-th update (t >= 1; t = 1 copies: β = 0), EDM2 eq. 4."""
    if t < 1:
        raise ValueError(f"t counts updates from 1, got {t}")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_ema_weights(gamma: float, t: int, length: int | None = None, start: int = 1) -> Tensor:
    """w_{γ,t}(s) for s = start .. start + length - 1 (default: 1 .. t), float64; zero for s > t
    (see the module docstring: the exact weight of the s-th update's weights in ema_t)."""
    length = t - start + 1 if length is None else length
    s = torch.arange(start, start + length, dtype=torch.float64)
    e = gamma + 1.0
    w = (s / t).pow(e) - ((s - 1.0) / t).pow(e)  # divided first: s^e overflows for large γ
    return torch.where(s <= t, w, torch.zeros_like(w))


def _gram(profiles: Sequence[Profile], target: Profile) -> tuple[Tensor, Tensor, Tensor]:
    """(G, b, ‖w*‖²): G_ij = <w_i, w_j>, b_i = <w_i, w*> over the steps, summed in blocks."""
    n = len(profiles)
    total = max(t for _, t in [*profiles, target])
    G = torch.zeros(n, n, dtype=torch.float64)
    b = torch.zeros(n, dtype=torch.float64)
    norm2 = torch.zeros((), dtype=torch.float64)
    for start in range(1, total + 1, _CHUNK):
        length = min(_CHUNK, total - start + 1)
        W = torch.stack([power_ema_weights(g, t, length, start) for g, t in profiles])
        w_star = power_ema_weights(*target, length, start)
        G += W @ W.T
        b += W @ w_star
        norm2 += w_star @ w_star
    return G, b, norm2


def solve_coefficients(profiles: Sequence[Profile], target: Profile) -> tuple[Tensor, float]:
    """The least-squares coefficients c (float64, one per profile) with Σ c_i w_i closest to the
    target's weights, and the relative error ‖Σ c_i w_i - w*‖ / ‖w*‖ of that fit (0 for a target
    in the span). EDM2 App. C.2 with the exact discrete weights."""
    if not profiles:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    G, b, norm2 = _gram(profiles, target)
    # SVD-based solve of the normal equations: snapshots close in time are nearly collinear.
    c = torch.linalg.lstsq(G, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    residual2 = norm2 - 2.0 * (c @ b) + c @ G @ c
    return c, math.sqrt(max(float(residual2), 0.0) / float(norm2))


def combine(
    states: Sequence[Mapping[str, Tensor]],
    coefficients: Tensor,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Σ_i c_i states_i for floating tensors, accumulated in float64 on the CPU and returned in
    ``dtype`` (default: the first state's dtypes); other tensors (integer buffers) from the last
    state."""
    if len(states) != len(coefficients):
        raise ValueError(f"{len(states)} states but {len(coefficients)} coefficients")
    out: dict[str, Tensor] = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            out[key] = states[-1][key].clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, c in zip(states, coefficients.tolist(), strict=True):
            acc += c * state[key].to(device="cpu", dtype=torch.float64)
        out[key] = acc.to(dtype or ref.dtype)
    return out


def write_snapshot(
    path: str | os.PathLike,
    profiles: Sequence[Mapping[str, Tensor]],
    sigma_rels: Sequence[float],
    step: int,
    num_updates: int,
) -> None:
    """Write every profile's weights (``profiles[j]`` has relative width ``sigma_rels[j]``) at
    optimizer step ``step`` after ``num_updates`` updates, atomically (temporary file, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{j}/{key}": value.detach().to("cpu").contiguous()
        for j, profile in enumerate(profiles)
        for key, value in profile.items()
    }
    meta = {
        "step": str(int(step)),
        "num_updates": str(int(num_updates)),
        "sigma_rels": json.dumps([float(s) for s in sigma_rels]),
    }
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_snapshot(path: str | os.PathLike) -> tuple[list[dict[str, Tensor]], dict[str, object]]:
    """(one state dict per profile, {"step", "num_updates", "sigma_rels"}) of a snapshot file."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        sigma_rels = [float(s) for s in json.loads(meta["sigma_rels"])]
        profiles: list[dict[str, Tensor]] = [{} for _ in sigma_rels]
        for name in f.keys():  # noqa: SIM118 - not a dict
            j, key = name.split("/", 1)
            profiles[int(j)][key] = f.get_tensor(name)
    info = {
        "step": int(meta["step"]),
        "num_updates": int(meta["num_updates"]),
        "sigma_rels": sigma_rels,
    }
    return profiles, info


def reconstruct(
    record: Mapping[str, object], snapshot_dir: str | os.PathLike, sigma_rel: float
) -> tuple[dict[str, Tensor], float]:
    """The EMA of relative width ``sigma_rel`` at the record's step, as the least-squares
    combination of its snapshots (files in ``snapshot_dir``) and of its live profiles; returns
    the weights and the relative error of the fit (:func:`solve_coefficients`). Snapshots are
    read one at a time."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    gammas = [sigma_rel_to_gamma(s) for s in record["sigma_rels"]]  # type: ignore[union-attr]
    t_end = int(record["num_updates"])  # type: ignore[arg-type]
    if t_end < 1:
        raise ValueError("post-hoc EMA: the record holds no update yet")
    files = [
        (Path(snapshot_dir) / str(e["file"]), int(e["num_updates"]))
        for e in record["snapshots"]  # type: ignore[union-attr]
        if int(e["num_updates"]) < t_end  # the live profiles are the snapshot at t_end
    ]
    profiles = [(g, t) for _, t in files for g in gammas] + [(g, t_end) for g in gammas]
    c, error = solve_coefficients(profiles, (gamma, t_end))
    out: dict[str, Tensor] = {}
    k = 0
    for path, t in files:
        states, info = read_snapshot(path)
        if info["num_updates"] != t:
            raise ValueError(f"{path} holds update {info['num_updates']}, its record says {t}")
        out = _accumulate(out, states, c[k : k + len(gammas)])
        k += len(gammas)
    out = _accumulate(out, record["profiles"], c[k:])  # type: ignore[arg-type]
    live = record["profiles"][0]  # type: ignore[index]
    return {key: v.to(live[key].dtype) for key, v in out.items()}, error


def _accumulate(
    acc: dict[str, Tensor], states: Sequence[Mapping[str, Tensor]], coefficients: Tensor
) -> dict[str, Tensor]:
    """acc + Σ_j c_j states_j in float64 (integer tensors: the latest state's)."""
    part = combine(states, coefficients, dtype=torch.float64)
    for key, value in part.items():
        if key in acc and value.is_floating_point():
            acc[key] = acc[key] + value
        else:
            acc[key] = value
    return acc
