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
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import Tensor, nn

from ddpm.diffusion.schedules import make_beta_schedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")


LEARNED_VARIANCE_TYPES = ("learned_range", "learned")


def model_output_channels(data_channels: int, variance_type: str) -> int:
    """Channels a network outputs for ``data_channels`` of data: 2C when the variance is learned
    (improved DDPM, Nichol & Dhariwal 2021, sec. 3.1: v is output next to ε), else C."""
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    return int(data_channels) * (2 if variance_type in LEARNED_VARIANCE_TYPES else 1)


def _no_autocast(x: Tensor) -> AbstractContextManager:
    return torch.autocast(device_type=x.device.type, enabled=False)


def extract(arr: Tensor, t: Tensor, ndim: int) -> Tensor:
    """Gather ``arr[t]`` (float32) and reshape to (B, 1, ..., 1) with ``ndim`` dims."""
    out = arr.to(t.device)[t.long()].float()
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    """The forward process q, its posterior, and the reverse-step parameterisation p_θ.

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
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}"
            )
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
        self.prediction_type = prediction_type
        self.variance_type = variance_type
        self.schedule = schedule if schedule is not None else "custom"
        self.num_timesteps = int(betas.shape[0])

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

    # ------------------------------------------------------------------ utilities
    def extra_repr(self) -> str:
        return (
            f"T={self.num_timesteps}, schedule={self.schedule}, "
            f"prediction_type={self.prediction_type}, variance_type={self.variance_type}"
        )

    @property
    def learned_variance(self) -> bool:
        return self.variance_type in LEARNED_VARIANCE_TYPES

    def model_output_channels(self, data_channels: int) -> int:
        """How many channels the network must output for ``data_channels`` of data."""
        return model_output_channels(data_channels, self.variance_type)

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = ᾱ_t / (1 - ᾱ_t), float32, shape like ``t``."""
        t = t.long()
        return self.alphas_cumprod.to(t.device)[t] / self.one_minus_alphas_cumprod.to(t.device)[t]

    def alpha_sigma(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        """(α_t, σ_t) = (√ᾱ_t, √(1-ᾱ_t)) at the indices ``t``, float32, shaped (B, 1, ..., 1)
        with ``ndim`` dims: x_t = α_t x₀ + σ_t ε in the notation of VDM (Kingma et al. 2021) and
        DPM-Solver, not DDPM's α_t = 1 - β_t (the buffer ``alphas``)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, ndim),
            extract(self.sqrt_one_minus_alphas_cumprod, t, ndim),
        )

    def _check_t(self, t: Tensor) -> None:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}], got range "
                f"[{int(t.min())}, {int(t.max())}]"
            )

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x₀, (1-ᾱ_t) I) (eq. 4)."""
        with _no_autocast(x_start):
            x_start = x_start.float()
            nd = x_start.ndim
            alpha, _ = self.alpha_sigma(t, nd)
            mean = alpha * x_start
            var = extract(self.one_minus_alphas_cumprod, t, nd).expand_as(x_start)
            log_var = extract(self.log_one_minus_alphas_cumprod, t, nd).expand_as(x_start)
        return mean, var, log_var

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε (DDPM eq. 4), computed in float32 under any autocast."""
        with _no_autocast(x_start):
            x_start = x_start.float()
            noise = torch.randn_like(x_start) if noise is None else noise.float()
            if noise.shape != x_start.shape:
                raise ValueError(
                    f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}"
                )
            alpha, sigma = self.alpha_sigma(t, x_start.ndim)
            return alpha * x_start + sigma * noise

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean μ̃_t, variance β̃_t and clipped log β̃_t of q(x_{t-1} | x_t, x₀) (DDPM eq. 6-7)."""
        with _no_autocast(x_t):
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
        """x₀ = (x_t - √(1-ᾱ) ε)/√ᾱ = √(1/ᾱ) x_t - √(1/ᾱ - 1) ε."""
        nd = x_t.ndim
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
        with _no_autocast(x_t):
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
        with _no_autocast(x_t):
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

    def training_target(self, x_start: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target of L_simple for the configured ``prediction_type``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x_start
        return self.get_v(x_start, noise, t)
