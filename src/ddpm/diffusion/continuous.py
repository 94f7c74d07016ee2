"""Continuous-time processes of the family (:mod:`ddpm.diffusion.process`): EDM's (Karras et al.
2022) and rectified flow (Liu et al. 2023; flow matching, Lipman et al. 2023)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion.parameterisation import SIGMA_DATA
from ddpm.diffusion.process import Process


def _log(x: Any) -> Any:
    return torch.log(x) if isinstance(x, Tensor) else np.log(x)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


class EDMProcess(Process):
    """EDM's process with time t = σ̃, the noise level of x/α (Karras et al. 2022, Table 1
    "Ours": σ(t) = t, s(t) = 1).

    ``variance_preserving=False`` (VE): x = x₀ + σ ε, α = 1, σ = t.
    ``variance_preserving=True`` (VP): α = 1/√(1 + t²), σ = t/√(1 + t²), the same σ̃ = t in
    variance-preserving form (ᾱ = 1/(1 + σ̃²), DDPM's relation, Karras et al. 2022, eq. 4-6 with
    s(t) = 1/√(1 + σ(t)²)). Both have λ = log(α/σ) = -ln t, the same probability-flow ODE in x/α,
    the same network inputs c_in·x and c_noise = ¼ ln t: a deterministic sampler gives the same
    samples on either, and the VP one starts from N(0, I).

    Time range [σ_min, σ_max] = [0.002, 80] (sampling starts at σ_max); training draws σ from the
    objective's timestep sampler, unbounded (ln σ ~ N(-1.2, 1.2²), Karras et al. 2022, §5).
    """

    # Karras's ρ = 7 grid for the step samplers (Heun: EDM's 18 steps); λ-uniform for DPM-Solver++
    # and UniPC, Lu et al. 2022's choice for low-resolution images (on the digits, DPM-Solver++(2M)
    # at 10 steps on Karras's grid is worse than at 5: bench/README.md "Per objective")
    natural_spacing: ClassVar[str | None] = "karras"
    natural_solver_spacing: ClassVar[str | None] = "logSNR"
    time_domain: ClassVar[str] = "sigma"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = SIGMA_DATA,
        variance_preserving: bool = False,
        prediction_type: str = "edm",
        variance_type: str = "fixed_small",
    ) -> None:
        super().__init__(prediction_type, variance_type, sigma_data)
        self.t_min = _positive("sigma_min", sigma_min)
        self.t_max = _positive("sigma_max", sigma_max)
        if self.t_max <= self.t_min:
            raise ValueError(f"sigma_max={sigma_max} must exceed sigma_min={sigma_min}")
        if not isinstance(variance_preserving, bool):
            raise ValueError(
                f"variance_preserving must be true or false, got {variance_preserving!r}"
            )
        self.variance_preserving = variance_preserving
        self.schedule = "edm_vp" if variance_preserving else "edm"

    @property
    def sigma_min(self) -> float:
        return self.t_min

    @property
    def sigma_max(self) -> float:
        return self.t_max

    def extra_repr(self) -> str:
        kind = "VP" if self.variance_preserving else "VE"
        return f"{kind}, σ ∈ [{self.t_min:g}, {self.t_max:g}], σ_data={self.sigma_data:g}, " + (
            super().extra_repr()
        )

    def _alpha_sigma(self, t: Any) -> tuple[Any, Any]:
        if not self.variance_preserving:
            return 1.0, t
        alpha = (1.0 + t * t) ** -0.5
        return alpha, t * alpha

    def _alpha_sigma_dot(self, t: Any) -> tuple[Any, Any]:
        if not self.variance_preserving:
            return 0.0, 1.0
        cube = (1.0 + t * t) ** -1.5
        return -t * cube, cube

    def _net_time(self, t: Any) -> Any:
        return 0.25 * _log(t)  # c_noise(σ) = ¼ ln σ (Table 1)

    def time_of_log_snr(self, lam: np.ndarray) -> np.ndarray:
        return np.exp(-np.asarray(lam, dtype=np.float64))

    def noise_quartile(self, t: Tensor) -> Tensor:
        """Quarter of [ln σ_min, ln σ_max] holding ln σ (0: least noise)."""
        lo, hi = math.log(self.t_min), math.log(self.t_max)
        frac = (torch.log(t.float()) - lo) / (hi - lo)
        return (frac * 4.0).floor().long().clamp(0, 3)


class RectifiedFlow(Process):
    """Rectified flow / flow matching's straight path x_t = (1 - t) x₀ + t ε, t ∈ [0, 1]
    (Liu et al. 2023; Lipman et al. 2023 with σ_min = 0): α = 1 - t, σ = t, α̇ = -1, σ̇ = 1,
    λ = ln((1 - t)/t), t(λ) = 1/(1 + e^λ). Its network predicts the velocity u = ε - x₀
    (``prediction_type="velocity"``) and sees τ = T·t with T = ``num_timesteps`` (diffusers'
    ``FlowMatchEulerDiscreteScheduler`` timesteps, σ·num_train_timesteps).

    Sampling starts at t = 1 (x = ε exactly: α = 0) and the grids end at t_min = 1/T before the
    clean end t = 0 (diffusers' σ_min = 1/num_train_timesteps).
    """

    natural_spacing: ClassVar[str | None] = "uniform"
    time_domain: ClassVar[str] = "unit"

    def __init__(
        self,
        num_timesteps: int = 1000,
        prediction_type: str = "velocity",
        variance_type: str = "fixed_small",
        sigma_data: float = SIGMA_DATA,
    ) -> None:
        super().__init__(prediction_type, variance_type, sigma_data)
        if (
            isinstance(num_timesteps, bool)
            or not isinstance(num_timesteps, (int, np.integer))
            or num_timesteps < 1
        ):
            raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
        if prediction_type == "epsilon":
            raise ValueError(
                "prediction_type 'epsilon' cannot recover x₀ at t = 1 where α = 0 (sampling "
                "starts there): use 'velocity' (flow matching), 'v_prediction', 'sample' or 'edm'"
            )
        self.num_timesteps = int(num_timesteps)
        self.schedule = "rectified_flow"
        self.t_min = 1.0 / self.num_timesteps
        self.t_max = 1.0

    def extra_repr(self) -> str:
        return f"T={self.num_timesteps} (τ = T·t), " + super().extra_repr()

    def _alpha_sigma(self, t: Any) -> tuple[Any, Any]:
        return 1.0 - t, t

    def _alpha_sigma_dot(self, t: Any) -> tuple[Any, Any]:
        return -1.0, 1.0

    def _net_time(self, t: Any) -> Any:
        return t * float(self.num_timesteps)

    def time_of_log_snr(self, lam: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(np.asarray(lam, dtype=np.float64)))
