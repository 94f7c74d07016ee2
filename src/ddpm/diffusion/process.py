"""One description of every Gaussian diffusion process: x_t = α(t) x₀ + σ(t) ε, ε ~ N(0, I).

DDPM's discrete process (:class:`~ddpm.diffusion.gaussian.GaussianDiffusion`: β tables, integer
t in 0..T-1), EDM's continuous ones (:class:`~ddpm.diffusion.continuous.EDMProcess`: α = 1 and
σ = t ∈ [0.002, 80], or its variance-preserving variant) and rectified flow
(:class:`~ddpm.diffusion.continuous.RectifiedFlow`: α = 1 - t, σ = t) all answer the questions of
:class:`Process`, so that a loss or a sampler is written once against it:

* α(t), σ(t) (float32 tensors for training; float64 arrays for the samplers' grids), their time
  derivatives α̇, σ̇ (the probability-flow ODE velocity u = α̇ x̂₀ + σ̇ ε̂, :meth:`Process.velocity`),
  the log-SNR λ = log(α/σ) (half of log SNR: the λ of DPM-Solver and UniPC, Lu et al. 2022) and
  its inverse t(λ), and σ̃ = σ/α = e^{-λ} (EDM's σ of the scaled variable x/α).
* the time range [t_min, t_max]: sampling starts at t_max from x ~ N(0, s² I) with
  s² = α(t_max)² + σ(t_max)² (the marginal variance for data of unit variance: 1 for DDPM, VP
  and rectified flow, σ_max² + 1 for EDM's VE process as diffusers' ``init_noise_sigma``; exact
  where α(t_max) = 0, else the data term α x₀ is neglected) and ends at the clean end σ = 0 after
  a grid whose last point is t_min.
* τ(t), the network's time input (:meth:`Process.net_time`): DDPM's integer timestep, EDM's
  c_noise = ¼ ln σ̃, rectified flow's T·t (diffusers' flow-matching timesteps).
* the parameterisation (:mod:`ddpm.diffusion.parameterisation`): ``prediction_type`` and the
  conversions between the network output and x̂₀, ε̂ at any t.

Learned variances (improved DDPM) and the variational bound exist only for the discrete process.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ddpm.diffusion.parameterisation import (
    PREDICTION_TYPES,
    SIGMA_DATA,
    Preconditioning,
    check_prediction_type,
    preconditioning,
    target,
)

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")
LEARNED_VARIANCE_TYPES = ("learned_range", "learned")
# α = 0 (zero terminal SNR, rectified flow at t = 1) has σ̃ = ∞ and λ = -∞: the σ/λ-space
# solvers use α² = 2⁻²⁴ there, as diffusers' DPM-Solver/UniPC schedulers do with
# ``rescale_betas_zero_snr``.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def model_output_channels(data_channels: int, variance_type: str) -> int:
    """Channels a network outputs for ``data_channels`` of data: 2C when the variance is learned
    (improved DDPM, Nichol & Dhariwal 2021, sec. 3.1: v is output next to ε), else C."""
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    return int(data_channels) * (2 if variance_type in LEARNED_VARIANCE_TYPES else 1)


def no_autocast(x: Tensor) -> Any:
    """Process math runs in float32 under any autocast (fp16/bf16 round α near 1)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def require_discrete(process: Process, what: str) -> None:
    """A ValueError unless ``process`` is DDPM's discrete one (``what`` needs its β tables)."""
    if not process.discrete:
        raise ValueError(
            f"{what} is defined on DDPM's discrete process only; {type(process).__name__} is "
            "continuous"
        )


def _as_column(v: Tensor, ndim: int) -> Tensor:
    return v.float().reshape(v.shape[0], *([1] * (ndim - 1)))


class Process(nn.Module):
    """x_t = α(t) x₀ + σ(t) ε with the network parameterised by ``prediction_type``.

    A subclass gives the schedule in :meth:`_alpha_sigma` and :meth:`_alpha_sigma_dot` (formulas
    that work on float64 NumPy arrays and on tensors alike), :meth:`time_of_log_snr`,
    :meth:`_net_time` and the range ``t_min`` / ``t_max``; everything else follows.

    Args:
        prediction_type: what the network predicts (:mod:`ddpm.diffusion.parameterisation`).
        variance_type: the ancestral sampler's variance: ``fixed_small`` (the posterior's) or
            ``fixed_large`` (the forward step's, σ²_{t|s}; DDPM's β); learned variances are
            discrete-only.
        sigma_data: σ_d of the ``edm`` preconditioning (0.5 for images in [-1, 1]).
    """

    discrete: ClassVar[bool] = False
    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES
    variance_types: ClassVar[tuple[str, ...]] = ("fixed_small", "fixed_large")
    # spacing=auto: the process's natural sampling grid (None: each sampler's own default), and
    # that of the λ-space multistep solvers (DPM-Solver++, UniPC) where it differs (None: the same)
    natural_spacing: ClassVar[str | None] = None
    natural_solver_spacing: ClassVar[str | None] = None
    # what t is: "index" (DDPM's 0..T-1), "sigma" (EDM's σ > 0) or "unit" (t ∈ [0, 1]); the
    # objective's timestep sampler draws in one of them
    time_domain: ClassVar[str]
    t_min: float
    t_max: float
    num_timesteps: int | None = None
    schedule: str  # its name (the `schedule` config option)

    def __init__(
        self,
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        sigma_data: float = SIGMA_DATA,
    ) -> None:
        super().__init__()
        if prediction_type not in self.prediction_types:
            check_prediction_type(prediction_type)  # an unknown name: the full list
            raise ValueError(
                f"prediction_type={prediction_type!r} is not available on {type(self).__name__} "
                f"(one of {self.prediction_types})"
                + (
                    ": it needs a continuous process (schedule=edm | edm_vp | rectified_flow)"
                    if self.discrete
                    else ""
                )
            )
        if variance_type not in self.variance_types:
            extra = (
                " (learned variances need DDPM's discrete process)"
                if variance_type in LEARNED_VARIANCE_TYPES
                else ""
            )
            raise ValueError(
                f"variance_type must be one of {self.variance_types} on {type(self).__name__}, "
                f"got {variance_type!r}{extra}"
            )
        if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data)) or not (
            sigma_data > 0
        ):
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
        self.prediction_type = prediction_type
        self.variance_type = variance_type
        self.sigma_data = float(sigma_data)

    # ------------------------------------------------------------------ the schedule (subclass)
    def _alpha_sigma(self, t: Any) -> tuple[Any, Any]:
        """(α(t), σ(t)) for float64 arrays or float tensors."""
        raise NotImplementedError

    def _alpha_sigma_dot(self, t: Any) -> tuple[Any, Any]:
        """(dα/dt, dσ/dt) for float64 arrays or float tensors."""
        raise NotImplementedError

    def _net_time(self, t: Any) -> Any:
        """τ(t), the network's time input, for float64 arrays or float tensors."""
        raise NotImplementedError

    def time_of_log_snr(self, lam: np.ndarray) -> np.ndarray:
        """t(λ), the inverse of λ(t) = log(α/σ) (float64)."""
        raise NotImplementedError

    @property
    def learned_variance(self) -> bool:
        return self.variance_type in LEARNED_VARIANCE_TYPES

    def model_output_channels(self, data_channels: int) -> int:
        """How many channels the network must output for ``data_channels`` of data."""
        return model_output_channels(data_channels, self.variance_type)

    def extra_repr(self) -> str:
        return f"prediction_type={self.prediction_type}, variance_type={self.variance_type}"

    # ------------------------------------------------------------------ float64 grids
    def alpha_sigma_np(self, t: Any, floor: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(α, σ) at the times ``t`` in float64; ``floor``: α = 0 replaced by √(2⁻²⁴) (the σ/λ-space
        solvers, :data:`ZERO_SNR_ALPHA_CUMPROD`)."""
        t = np.asarray(t, dtype=np.float64)
        alpha, sigma = self._alpha_sigma(t)
        alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), t.shape).copy()
        sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), t.shape).copy()
        if floor:
            alpha = np.where(alpha > 0.0, alpha, math.sqrt(ZERO_SNR_ALPHA_CUMPROD))
        return alpha, sigma

    def alpha_sigma_dot_np(self, t: Any) -> tuple[np.ndarray, np.ndarray]:
        """(dα/dt, dσ/dt) at the times ``t`` in float64."""
        t = np.asarray(t, dtype=np.float64)
        a, s = self._alpha_sigma_dot(t)
        return (
            np.broadcast_to(np.asarray(a, dtype=np.float64), t.shape).copy(),
            np.broadcast_to(np.asarray(s, dtype=np.float64), t.shape).copy(),
        )

    def sigma_tilde_np(self, t: Any, floor: bool = False) -> np.ndarray:
        """σ̃ = σ/α = e^{-λ} (EDM's noise level of x/α) in float64."""
        alpha, sigma = self.alpha_sigma_np(t, floor)
        with np.errstate(divide="ignore"):
            return sigma / alpha

    def log_snr_np(self, t: Any, floor: bool = False) -> np.ndarray:
        """λ = log α - log σ (= ½ log SNR) in float64: -∞ where α = 0, +∞ where σ = 0."""
        alpha, sigma = self.alpha_sigma_np(t, floor)
        with np.errstate(divide="ignore"):
            return np.log(alpha) - np.log(sigma)

    def net_time_np(self, t: Any) -> list[float]:
        """τ at the times ``t``, the network's time input of a sampler's grid."""
        return np.asarray(self._net_time(np.asarray(t, dtype=np.float64)), np.float64).tolist()

    def preconditioning_np(self, t: Any, floor: bool = False) -> Preconditioning:
        """The parameterisation's coefficients at the times ``t`` (float64 arrays)."""
        alpha, sigma = self.alpha_sigma_np(t, floor)
        dot = self.alpha_sigma_dot_np(t) if self.prediction_type == "velocity" else (None, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            return preconditioning(self.prediction_type, alpha, sigma, *dot, self.sigma_data)

    def langevin_alpha(self, t: float) -> float:
        """α_i of the Langevin corrector's step size at time ``t`` (1: Song et al.'s VE)."""
        return 1.0

    def prior_std(self, t: float) -> float:
        """The std of x at the first sampling time ``t`` (module docstring)."""
        alpha, sigma = self.alpha_sigma_np([t])
        return float(math.sqrt(alpha[0] ** 2 + sigma[0] ** 2))

    # ------------------------------------------------------------------ tensors (training)
    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """(α_t, σ_t) float32, shaped (B, 1, ..., 1) with ``ndim`` dims."""
        alpha, sigma = self._alpha_sigma(t.float())
        alpha = alpha if isinstance(alpha, Tensor) else torch.full_like(t.float(), alpha)
        return _as_column(alpha, ndim), _as_column(sigma, ndim)

    def alpha_sigma_dot(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """(dα/dt, dσ/dt) float32, shaped (B, 1, ..., 1)."""
        a, s = self._alpha_sigma_dot(t.float())
        ref = t.float()
        a = a if isinstance(a, Tensor) else torch.full_like(ref, a)
        s = s if isinstance(s, Tensor) else torch.full_like(ref, s)
        return _as_column(a, ndim), _as_column(s, ndim)

    def net_time(self, t: Tensor) -> Tensor:
        """τ(t), what the network is called with at the times ``t`` (B,)."""
        return self._net_time(t.float())

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = α²/σ², float32, shape like ``t``."""
        alpha, sigma = self.alpha_sigma(t, 1)
        return (alpha**2 / sigma**2).reshape(t.shape)

    def noise_quartile(self, t: Tensor) -> Tensor:
        """Which quarter of the time range [0, t_max] holds t (0: least noise), LongTensor."""
        return (t.float() * (4.0 / self.t_max)).long().clamp(0, 3)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = α(t) x₀ + σ(t) ε, in float32 under any autocast."""
        with no_autocast(x_start):
            x_start = x_start.float()
            noise = torch.randn_like(x_start) if noise is None else noise.float()
            if noise.shape != x_start.shape:
                raise ValueError(
                    f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}"
                )
            alpha, sigma = self.alpha_sigma(t, x_start.ndim)
            return alpha * x_start + sigma * noise

    def preconditioning(self, t: Tensor, ndim: int) -> Preconditioning:
        """The parameterisation's coefficients at ``t`` as (B, 1, ..., 1) float32 tensors."""
        alpha, sigma = self.alpha_sigma(t, ndim)
        dot = self.alpha_sigma_dot(t, ndim) if self.prediction_type == "velocity" else (None, None)
        return preconditioning(self.prediction_type, alpha, sigma, *dot, self.sigma_data)

    def network_output(self, net: Any, x_t: Tensor, t: Tensor) -> Tensor:
        """F = net(c_in x_t, τ(t)), float32: the raw output the parameterisation converts."""
        c_in = self.preconditioning(t, x_t.ndim).c_in
        x_in = x_t if isinstance(c_in, float) and c_in == 1.0 else x_t * c_in
        return net(x_in, self.net_time(t)).float()

    def split_model_output(
        self, model_output: Tensor, channels: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(prediction, None): no learned variance on this process; the channels are checked."""
        model_output = model_output.float()
        if channels is not None and model_output.shape[1] != channels:
            raise ValueError(
                f"variance_type={self.variance_type!r} needs {channels} output channels, got "
                f"{model_output.shape[1]}"
            )
        return model_output, None

    def model_predictions(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(x̂₀, ε̂) from a network output (the parameterisation's affine maps); with
        ``clip_denoised`` x̂₀ is clipped to [-1, 1] and ε̂ = (x_t - α x̂₀)/σ recomputed."""
        with no_autocast(x_t):
            x_t = x_t.float()
            pred, _ = self.split_model_output(model_output, x_t.shape[1])
            p = self.preconditioning(t, x_t.ndim)
            x0 = p.c_skip * x_t + p.c_out * pred
            if not clip_denoised:
                return x0, p.e_skip * x_t + p.e_out * pred
            x0 = x0.clamp(-1.0, 1.0)
            alpha, sigma = self.alpha_sigma(t, x_t.ndim)
            return x0, (x_t - alpha * x0) / sigma

    def training_target(self, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """F* = (x₀ - c_skip x_t)/c_out, the regression target of the network output."""
        nd = x_start.ndim
        alpha, sigma = self.alpha_sigma(t, nd)
        dot = self.alpha_sigma_dot(t, nd) if self.prediction_type == "velocity" else (None, None)
        return target(
            self.prediction_type, x_start, noise, alpha, sigma, *dot, sigma_data=self.sigma_data
        )

    def velocity(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """The probability-flow ODE's dx/dt = α̇ x̂₀ + σ̇ ε̂ with ε̂ = (x_t - α x̂₀)/σ: the marginal
        velocity of x_t = α x₀ + σ ε given x̂₀ = E[x₀ | x_t] (flow matching's target in
        expectation; Song et al. 2021's PF-ODE written in α, σ)."""
        nd = x_t.ndim
        alpha, sigma = self.alpha_sigma(t, nd)
        alpha_dot, sigma_dot = self.alpha_sigma_dot(t, nd)
        eps = (x_t.float() - alpha * pred_xstart) / sigma
        return alpha_dot * pred_xstart + sigma_dot * eps
