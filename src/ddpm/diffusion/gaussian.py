"""The Gaussian diffusion process of DDPM (Ho et al. 2020) and improved DDPM (Nichol & Dhariwal 2021).

Timesteps are 0-indexed as in improved-diffusion and diffusers: code index ``t`` in
``0..T-1`` is the paper's step ``t+1``. So ``alphas_cumprod[0] = ᾱ_1 = 1 - β_1`` and the
decoder term L_0 of the bound is evaluated at code index 0.

Everything the network does not compute lives here and runs in float32 (coefficients are
computed in float64 and stored as float32 buffers), also under bf16/fp16 autocast: in half
precision ᾱ_t rounds to 1.0 for the first steps, which would give those steps no noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion.process import (
    VARIANCE_TYPES,
    ZERO_SNR_ALPHA_CUMPROD,
    Process,
    no_autocast,
)
from ddpm.diffusion.schedules import make_beta_schedule

# what a network of the discrete process may predict (the conversions of the β tables)
DISCRETE_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def extract(arr: Tensor, t: Tensor, ndim: int) -> Tensor:
    """Gather ``arr[t]`` (float32) and reshape to (B, 1, ..., 1) with ``ndim`` dims."""
    out = arr.to(t.device)[t.long()].float()
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


def monotone_slopes(y: np.ndarray) -> np.ndarray:
    """Slopes at unit-spaced knots for a monotone cubic Hermite interpolant (Fritsch & Carlson
    1980): the harmonic mean of the neighbouring differences where they agree in sign, else 0;
    one-sided differences at the ends."""
    d = np.diff(y)
    if d.size == 0:
        return np.zeros_like(y)
    m = np.empty_like(y)
    m[0], m[-1] = d[0], d[-1]
    same = d[:-1] * d[1:] > 0
    m[1:-1] = np.where(same, 2.0 * d[:-1] * d[1:] / np.where(same, d[:-1] + d[1:], 1.0), 0.0)
    return m


class GaussianDiffusion(Process):
    """DDPM's discrete process: the forward process q, its posterior, and the reverse-step
    parameterisation p_θ (:class:`~ddpm.diffusion.process.Process` with t an integer index).

    Args:
        betas: β_1..β_T; if None they come from ``make_beta_schedule(schedule, num_timesteps)``.
        schedule: schedule name (see :mod:`ddpm.diffusion.schedules`).
        num_timesteps: T.
        prediction_type: what the network predicts: ``epsilon`` (DDPM), ``sample`` (x₀) or
            ``v_prediction`` (v = √ᾱ ε - √(1-ᾱ) x₀, Salimans & Ho 2022).
        variance_type: ``fixed_large`` (σ²=β, DDPM's CIFAR-10 choice), ``fixed_small`` (σ²=β̃),
            ``learned_range`` (improved DDPM eq. 15, network outputs 2C channels), ``learned``
            (network outputs log σ² directly).
        rescale_zero_terminal_snr: rescale β so that ᾱ_T = 0 (Lin et al. 2023).
        schedule_kwargs: extra arguments for the schedule function.

    The buffers are not saved in a ``state_dict``: the schedule is rebuilt from the config.
    """

    discrete: ClassVar[bool] = True
    time_domain: ClassVar[str] = "index"
    prediction_types: ClassVar[tuple[str, ...]] = DISCRETE_PREDICTION_TYPES
    variance_types: ClassVar[tuple[str, ...]] = VARIANCE_TYPES

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray | None = None,
        *,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_large",
        rescale_zero_terminal_snr: bool = False,
        schedule_kwargs: dict | None = None,
    ) -> None:
        super().__init__(prediction_type, variance_type)
        betas = make_beta_schedule(
            schedule,
            num_timesteps,
            betas=None if betas is None else np.asarray(betas, dtype=np.float64),
            rescale_to_zero_terminal_snr=rescale_zero_terminal_snr,
            **dict(schedule_kwargs or {}),
        )
        if rescale_zero_terminal_snr and prediction_type == "epsilon":
            # x₀ = (x_T - √(1-ᾱ_T) ε)/√ᾱ_T is undefined when ᾱ_T = 0.
            raise ValueError(
                "rescale_zero_terminal_snr needs prediction_type 'v_prediction' or 'sample': "
                "an ε-prediction cannot recover x₀ at ᾱ_T = 0 (Lin et al. 2023, §3.2)"
            )
        self.schedule = schedule if schedule is not None else "custom"
        self.num_timesteps = int(betas.shape[0])
        self.t_min, self.t_max = 0.0, float(self.num_timesteps - 1)

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        ac_next = np.append(ac[1:], 0.0)
        with np.errstate(divide="ignore"):
            post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
            # β̃ at the first step is 0; its log is clipped to β̃ of the second step (eq. 7 / iDDPM).
            post_log_var = np.log(
                np.append(post_var[1], post_var[1:])
                if len(post_var) > 1
                else np.maximum(post_var, 1e-20)
            )
            buffers = {
                "betas": betas,
                "alphas": alphas,
                "alphas_cumprod": ac,
                "alphas_cumprod_prev": ac_prev,
                "alphas_cumprod_next": ac_next,
                "sqrt_alphas_cumprod": np.sqrt(ac),
                "one_minus_alphas_cumprod": 1.0 - ac,  # not 1 - float32(ᾱ): ᾱ_1 ≈ 1 - 1e-4
                "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
                "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
                "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
                "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
                "posterior_variance": post_var,
                "posterior_log_variance_clipped": post_log_var,
                # DDPM eq. 7: μ̃ = coef1·x₀ + coef2·x_t
                "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
                "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
                "log_betas": np.log(betas),
                # fixed_large: σ² = β_t, but β̃_2 at the first step so L_0's decoder is sane.
                "fixed_large_variance": np.append(
                    post_var[1] if len(post_var) > 1 else betas[0], betas[1:]
                ),
            }
        for name, value in buffers.items():
            self.register_buffer(
                name,
                torch.from_numpy(np.asarray(value, dtype=np.float64)).float(),
                persistent=False,
            )
        # float64 copies for samplers that need exact ᾱ (respacing, DPM-Solver log-SNR).
        self.register_buffer("alphas_cumprod_f64", torch.from_numpy(ac.copy()), persistent=False)
        # λ = log(α/σ) at each index (α² floored at 2⁻²⁴), for the continuous extension
        solver_ac = np.where(ac > 0.0, ac, ZERO_SNR_ALPHA_CUMPROD)
        log_snr = 0.5 * (np.log(solver_ac) - np.log1p(-solver_ac))
        self.register_buffer("log_snr_f64", torch.from_numpy(log_snr), persistent=False)
        slope = torch.from_numpy(monotone_slopes(log_snr))
        self.register_buffer("log_snr_slope_f64", slope, persistent=False)

    # ------------------------------------------------------------------ utilities
    def extra_repr(self) -> str:
        return (
            f"T={self.num_timesteps}, schedule={self.schedule}, "
            f"prediction_type={self.prediction_type}, variance_type={self.variance_type}"
        )

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = ᾱ_t / (1 - ᾱ_t), float32, shape like ``t`` (fractional t: the extension)."""
        if t.is_floating_point():
            return super().snr(t)
        t = t.long()
        return self.alphas_cumprod.to(t.device)[t] / self.one_minus_alphas_cumprod.to(t.device)[t]

    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """(α_t, σ_t) = (√ᾱ_t, √(1-ᾱ_t)) at the indices ``t``, float32, shaped (B, 1, ..., 1)
        with ``ndim`` dims: x_t = α_t x₀ + σ_t ε in the notation of VDM (Kingma et al. 2021) and
        DPM-Solver, not DDPM's α_t = 1 - β_t (the buffer ``alphas``). A floating-point ``t``
        takes the continuous extension (:meth:`_alpha_sigma`)."""
        if t.is_floating_point():
            return super().alpha_sigma(t, ndim)
        return (
            extract(self.sqrt_alphas_cumprod, t, ndim),
            extract(self.sqrt_one_minus_alphas_cumprod, t, ndim),
        )

    # ------------------------------------------------------------------ the process interface
    def _interpolate_log_snr(self, t: Any) -> tuple[Any, Any]:
        """(λ(t), dλ/dt) of the continuous extension, t ∈ [0, T-1] (the network is then
        evaluated at fractional t): the cubic Hermite interpolant of λ through the timesteps with
        :func:`monotone_slopes`, so λ stays monotone and dλ/dt continuous. (A piecewise-linear
        λ makes the probability-flow ODE's velocity jump at every timestep: the adaptive solver
        of the likelihood then takes 4-8x the steps, with 15-50x the error, measured on Gaussian
        data at T = 100 and 1000.)"""
        T = self.num_timesteps
        if isinstance(t, Tensor):
            table = self.log_snr_f64.to(device=t.device, dtype=t.dtype)
            slopes = self.log_snr_slope_f64.to(device=t.device, dtype=t.dtype)
            lo = t.floor().clamp(0, max(T - 2, 0)).long()
            hi = (lo + 1).clamp(max=T - 1)
            w = t - lo.to(t.dtype)
        else:
            table = self.log_snr_f64.cpu().numpy()
            slopes = self.log_snr_slope_f64.cpu().numpy()
            lo = np.clip(np.floor(t), 0, max(T - 2, 0)).astype(np.int64)
            hi = np.minimum(lo + 1, T - 1)
            w = t - lo
        y0, y1, m0, m1 = table[lo], table[hi], slopes[lo], slopes[hi]
        # Hermite basis on the unit interval: h00 = (1 + 2w)(1 - w)², h10 = w(1 - w)², ...
        dy, u = y1 - y0, 1.0 - w
        lam = y0 + w * w * (3.0 - 2.0 * w) * dy + w * u * (u * m0 - w * m1)
        dlam = 6.0 * w * u * dy + u * (1.0 - 3.0 * w) * m0 + w * (3.0 * w - 2.0) * m1
        return lam, dlam

    def _alpha_sigma(self, t: Any) -> tuple[Any, Any]:
        """The continuous extension: α² = sigmoid(2λ), σ² = sigmoid(-2λ) with λ interpolated."""
        lam, _ = self._interpolate_log_snr(t)
        if isinstance(lam, Tensor):
            return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()
        return np.sqrt(1.0 / (1.0 + np.exp(-2 * lam))), np.sqrt(1.0 / (1.0 + np.exp(2 * lam)))

    def _alpha_sigma_dot(self, t: Any) -> tuple[Any, Any]:
        """dα/dt = α σ² λ̇, dσ/dt = -σ α² λ̇ (variance preserving, λ piecewise linear)."""
        alpha, sigma = self._alpha_sigma(t)
        _, slope = self._interpolate_log_snr(t)
        return alpha * sigma**2 * slope, -sigma * alpha**2 * slope

    def _net_time(self, t: Any) -> Any:
        return t

    def net_time(self, t: Tensor) -> Tensor:
        """The network's timestep: ``timestep_map[t]`` on a respaced diffusion, else ``t``."""
        tmap = getattr(self, "timestep_map", None)
        return t if tmap is None else tmap.to(t.device)[t]

    def net_time_np(self, t: Any) -> list[int]:
        return self.net_time(torch.as_tensor(np.asarray(t), dtype=torch.long)).tolist()

    def _table(self, floor: bool) -> np.ndarray:
        """ᾱ of every index in float64; ``floor``: ᾱ = 0 replaced by 2⁻²⁴ (the σ/λ solvers)."""
        ac = self.alphas_cumprod_f64.detach().cpu().numpy()
        return np.where(ac > 0.0, ac, ZERO_SNR_ALPHA_CUMPROD) if floor else ac

    def _table_at(self, t: Any, floor: bool) -> np.ndarray | None:
        """ᾱ at integer ``t`` from the float64 table; None if any t is fractional (the
        continuous extension of :class:`~ddpm.diffusion.process.Process` answers then)."""
        t = np.asarray(t, dtype=np.float64)
        if not np.all(t == np.round(t)):
            return None
        return self._table(floor)[t.astype(np.int64)]

    def alpha_sigma_np(self, t: Any, floor: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(√ᾱ, √(1-ᾱ)) at integer ``t`` from the float64 table; fractional t: the extension."""
        ac = self._table_at(t, floor)
        if ac is None:
            return super().alpha_sigma_np(t, floor)
        return np.sqrt(ac), np.sqrt(1.0 - ac)

    def sigma_tilde_np(self, t: Any, floor: bool = False) -> np.ndarray:
        """σ̃ = √((1-ᾱ)/ᾱ), EDM's σ(t) of a variance-preserving schedule."""
        ac = self._table_at(t, floor)
        if ac is None:
            return super().sigma_tilde_np(t, floor)
        with np.errstate(divide="ignore"):
            return np.sqrt((1.0 - ac) / ac)

    def log_snr_np(self, t: Any, floor: bool = False) -> np.ndarray:
        """λ = ½ (log ᾱ - log(1-ᾱ)) at integer ``t`` from the float64 table."""
        ac = self._table_at(t, floor)
        if ac is None:
            return super().log_snr_np(t, floor)
        with np.errstate(divide="ignore"):
            return 0.5 * (np.log(ac) - np.log1p(-ac))

    def time_of_log_snr(self, lam: np.ndarray) -> np.ndarray:
        """The index nearest to each λ (in λ = -log σ̃, as the Karras grid rounds)."""
        table = self.log_snr_f64.cpu().numpy()
        lam = np.asarray(lam, dtype=np.float64)
        return np.argmin(np.abs(table[None, :] - lam.reshape(-1, 1)), axis=1).reshape(lam.shape)

    def langevin_alpha(self, t: float) -> float:
        """1 - β_t = ᾱ_t/ᾱ_{t-1} of the chain (Song et al. 2021's VP corrector)."""
        ac = self._table(floor=False)
        return float(ac[int(t)] / (ac[int(t) - 1] if int(t) > 0 else 1.0))

    def prior_std(self, t: float) -> float:
        """p(x_T) = N(0, I) (DDPM)."""
        return 1.0

    def noise_quartile(self, t: Tensor) -> Tensor:
        return (t * 4 // self.num_timesteps).clamp(max=3)

    def network_output(self, net: Any, x_t: Tensor, t: Tensor) -> Tensor:
        """The network at x_t and its timesteps (``timestep_map[t]`` on a respaced diffusion)."""
        return net(x_t, self.net_time(t)).float()

    def _check_t(self, t: Tensor) -> None:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}], got range "
                f"[{int(t.min())}, {int(t.max())}]"
            )

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x₀, (1-ᾱ_t) I) (eq. 4)."""
        with no_autocast(x_start):
            x_start = x_start.float()
            nd = x_start.ndim
            alpha, _ = self.alpha_sigma(t, nd)
            mean = alpha * x_start
            var = extract(self.one_minus_alphas_cumprod, t, nd).expand_as(x_start)
            log_var = extract(self.log_one_minus_alphas_cumprod, t, nd).expand_as(x_start)
        return mean, var, log_var

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean μ̃_t, variance β̃_t and clipped log β̃_t of q(x_{t-1} | x_t, x₀) (DDPM eq. 6-7)."""
        with no_autocast(x_t):
            nd = x_t.ndim
            mean = (
                extract(self.posterior_mean_coef1, t, nd) * x_start.float()
                + extract(self.posterior_mean_coef2, t, nd) * x_t.float()
            )
            var = extract(self.posterior_variance, t, nd).expand_as(mean)
            log_var = extract(self.posterior_log_variance_clipped, t, nd).expand_as(mean)
        return mean, var, log_var

    # ------------------------------------------------------------------ ε / x₀ / v conversions
    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x₀ = (x_t - √(1-ᾱ) ε)/√ᾱ = √(1/ᾱ) x_t - √(1/ᾱ - 1) ε; a floating-point ``t`` takes
        the continuous extension (the probability-flow ODE reads the chain between timesteps)."""
        nd = x_t.ndim
        if t.is_floating_point():
            alpha, sigma = self.alpha_sigma(t, nd)
            return (x_t - sigma * noise) / alpha
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, nd) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, nd) * noise
        )

    def predict_noise_from_start(self, x_t: Tensor, t: Tensor, x_start: Tensor) -> Tensor:
        """ε = (x_t - √ᾱ x₀)/√(1-ᾱ)."""
        alpha, sigma = self.alpha_sigma(t, x_t.ndim)
        return (x_t - alpha * x_start) / sigma

    def get_v(self, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = √ᾱ ε - √(1-ᾱ) x₀ (Salimans & Ho 2022, eq. in §4)."""
        alpha, sigma = self.alpha_sigma(t, x_start.ndim)
        return alpha * noise - sigma * x_start

    def predict_start_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x₀ = √ᾱ x_t - √(1-ᾱ) v."""
        alpha, sigma = self.alpha_sigma(t, x_t.ndim)
        return alpha * x_t - sigma * v

    def predict_noise_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """ε = √(1-ᾱ) x_t + √ᾱ v."""
        alpha, sigma = self.alpha_sigma(t, x_t.ndim)
        return sigma * x_t + alpha * v

    def split_model_output(
        self, model_output: Tensor, channels: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Split a network output into (mean prediction, variance values or None), float32."""
        model_output = model_output.float()
        if not self.learned_variance:
            # a 2C-channel output would silently broadcast against C=1 data (x_t, the target)
            if channels is not None and model_output.shape[1] != channels:
                raise ValueError(
                    f"variance_type={self.variance_type!r} needs {channels} output channels, "
                    f"got {model_output.shape[1]}"
                )
            return model_output, None
        c = model_output.shape[1] // 2 if channels is None else channels
        if model_output.shape[1] != 2 * c:
            raise ValueError(
                f"variance_type={self.variance_type!r} needs 2×{c} output channels, got "
                f"{model_output.shape[1]}"
            )
        return model_output[:, :c], model_output[:, c:]

    def model_predictions(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(x̂₀, ε̂) from the network's prediction (any ``prediction_type``), float32.

        With ``clip_denoised`` x̂₀ is clipped to [-1, 1] and ε̂ recomputed from the clipped x̂₀,
        so both stay consistent with x_t (as DDIM and improved-diffusion do).
        """
        with no_autocast(x_t):
            x_t = x_t.float()
            pred, _ = self.split_model_output(model_output, x_t.shape[1])
            if self.prediction_type == "epsilon":
                eps = pred
                x0 = self.predict_start_from_noise(x_t, t, eps)
            elif self.prediction_type == "sample":
                x0 = pred
                eps = None
            else:
                x0 = self.predict_start_from_v(x_t, t, pred)
                eps = self.predict_noise_from_v(x_t, t, pred)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
                eps = None
            if eps is None:
                eps = self.predict_noise_from_start(x_t, t, x0)
        return x0, eps

    # ------------------------------------------------------------------ reverse process
    def p_variance(
        self, t: Tensor, shape: torch.Size | Sequence[int], var_values: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Variance and log-variance of p_θ(x_{t-1} | x_t) for the configured ``variance_type``."""
        nd = len(shape)
        if self.variance_type == "fixed_small":
            var = extract(self.posterior_variance, t, nd)
            log_var = extract(self.posterior_log_variance_clipped, t, nd)
        elif self.variance_type == "fixed_large":
            var = extract(self.fixed_large_variance, t, nd)
            log_var = torch.log(var)
        else:
            if var_values is None:
                raise ValueError(
                    f"variance_type={self.variance_type!r} needs the network's variance output"
                )
            var_values = var_values.float()
            if self.variance_type == "learned":
                log_var = var_values
            else:  # learned_range: improved DDPM eq. 15, v ∈ [-1, 1] mapped to [0, 1]
                min_log = extract(self.posterior_log_variance_clipped, t, nd)
                max_log = extract(self.log_betas, t, nd)
                frac = (var_values + 1.0) / 2.0
                log_var = frac * max_log + (1.0 - frac) * min_log
            var = torch.exp(log_var)
        return var.expand(*shape), log_var.expand(*shape)

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True
    ) -> dict[str, Tensor]:
        """Mean and variance of p_θ(x_{t-1} | x_t) from a network output.

        The mean is the posterior mean μ̃_t(x̂₀, x_t) (eq. 7) at the predicted x̂₀; for an
        ε-network without clipping this equals eq. 11, (x_t - β_t/√(1-ᾱ_t) ε̂)/√α_t.
        Returns ``mean``, ``variance``, ``log_variance``, ``pred_xstart``, ``pred_noise``.
        """
        with no_autocast(x_t):
            x_t = x_t.float()
            _, var_values = self.split_model_output(model_output, x_t.shape[1])
            x0, eps = self.model_predictions(model_output, x_t, t, clip_denoised)
            mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
            var, log_var = self.p_variance(t, x_t.shape, var_values)
        return {
            "mean": mean,
            "variance": var,
            "log_variance": log_var,
            "pred_xstart": x0,
            "pred_noise": eps,
        }
