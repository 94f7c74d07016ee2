"""Training objectives: L_simple, L_vlb and L_hybrid, with min-SNR-γ weighting.

* L_simple (DDPM eq. 14): ‖F* - F_θ‖², the network output F against its target F* of the
  process's parameterisation (:mod:`ddpm.diffusion.parameterisation`): ε, x₀, v, the flow
  velocity ε - x₀ (flow matching, Lipman et al. 2023 / Liu et al. 2023) or EDM's preconditioned
  target, for which this is EDM's loss λ(σ)‖D - x₀‖² (Karras et al. 2022, eq. 8 with
  λ(σ) c_out(σ)² = 1), up to EDM's sum over pixels where this takes the mean.
* L_vlb: the term L_{t-1} = KL(q(x_{t-1}|x_t,x₀) ‖ p_θ(x_{t-1}|x_t)) in bits/dim, and the
  discretized-Gaussian decoder NLL L_0 at t = 0 (DDPM eq. 5, 13).
* L_hybrid = L_simple + λ·L_vlb, λ = 0.001, with a stop-gradient on the mean in L_vlb so the
  vlb term trains only the variance (improved DDPM §3.1). As in improved-diffusion, the
  single-term estimate of L_vlb is T·L_t, so λ·L_vlb = 0.001·T·L_t.

L_vlb = Σ_t L_t is estimated from one uniformly drawn t as T·L_t, so ``vlb`` trains on T·L_t
(improved-diffusion's ``RESCALED_KL``): the gradient has the size the bound has, which gradient
clipping and Adam's ε are tuned for; L_t alone would be T times smaller. The per-sample ``vb``
(logged as ``train/vb``) stays L_t in bits/dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.process import Process

LOSS_TYPES = ("simple", "hybrid", "vlb")
LN2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    # (logvar2 - logvar1) first: exactly 0 for identical Gaussians
    return 0.5 * (
        (logvar2 - logvar1)
        + torch.exp(logvar1 - logvar2)
        - 1.0
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: Tensor, means: Tensor, log_scales: Tensor, *, bins: int = 256
) -> Tensor:
    """log p(x) under a Gaussian discretised to ``bins`` bins of [-1, 1] (DDPM eq. 13), nats.

    ``x`` holds bin centres in [-1, 1]; the end bins extend to ±∞. ``log_scales`` is log σ.
    """
    half = 1.0 / (bins - 1)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + half)
    min_in = inv_stdv * (centered - half)
    # Bin masses from upper tails Q(z) = 1 - Φ(z) = erfc(z/√2)/2 on the side away from the mean:
    # 1 - Φ(z) and Φ(b) - Φ(a) in float32 cancel to 0 beyond ~5σ (log-likelihood stuck at the
    # 1e-12 floor for bins whose true mass is 1e-7..1e-12).
    cdf_plus, sf_plus = _upper_tail(-plus_in), _upper_tail(plus_in)  # Φ(plus_in), 1 - Φ(plus_in)
    cdf_min, sf_min = _upper_tail(-min_in), _upper_tail(min_in)
    cdf_delta = torch.where(centered > 0, sf_min - sf_plus, cdf_plus - cdf_min)
    edge = 1.0 - half  # between the outermost bin centre and its neighbour
    probs = torch.where(x < -edge, cdf_plus, torch.where(x > edge, sf_min, cdf_delta))
    return torch.log(probs.clamp(min=1e-12))


def _upper_tail(z: Tensor) -> Tensor:
    """Q(z) = 1 - Φ(z), accurate in float32 far into the upper tail."""
    return 0.5 * torch.erfc(z / math.sqrt(2.0))


def vb_terms_bpd(
    diffusion: GaussianDiffusion,
    model_output: Tensor,
    x_start: Tensor,
    x_t: Tensor,
    t: Tensor,
    clip_denoised: bool = False,
) -> dict[str, Tensor]:
    """One term of the bound per sample, in bits/dim: L_{t-1} for t>0, decoder NLL L_0 at t=0.

    Returns ``output`` (B,) and ``pred_xstart``.
    """
    x_start = x_start.float()
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / LN2
    decoder_nll = (
        -mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        )
        / LN2
    )
    return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}


def min_snr_weight(diffusion: Process, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ weight (Hang et al. 2023) for the MSE on the configured target.

    The x₀-space weight min(SNR, γ) moved to the network's output F (x̂₀ error = c_out·(F error),
    so the weight is min(SNR, γ) c_out²): ε target: min(SNR, γ)/SNR; x₀ target: min(SNR, γ);
    v target: min(SNR, γ)/(SNR + 1) (variance preserving); otherwise min(SNR, γ) c_out².
    """
    snr = diffusion.snr(t)
    clipped = torch.clamp(snr, max=gamma)
    if diffusion.prediction_type == "epsilon":
        return clipped / snr.clamp(min=1e-20)
    if diffusion.prediction_type == "sample":
        return clipped
    if diffusion.prediction_type == "v_prediction" and diffusion.discrete:
        return clipped / (snr + 1.0)
    return clipped * diffusion.preconditioning(t, 1).c_out.reshape(t.shape) ** 2


class DiffusionLoss:
    """Callable training objective: ``loss(net, diffusion, x_start, t, noise) -> dict``.

    Args:
        loss_type: ``simple`` (MSE on the target), ``hybrid`` (L_simple + λ·L_vlb, improved
            DDPM) or ``vlb`` (the bound alone, T·L_t with L_t in bits/dim).
        lambda_vlb: λ of the hybrid loss (0.001 in improved DDPM).
        min_snr_gamma: if set, weight the MSE by min-SNR-γ (e.g. 5.0).

    The returned dict holds per-sample tensors: ``loss`` (what to minimise), ``mse`` and,
    when computed, ``vb``.
    """

    def __init__(
        self,
        loss_type: str = "simple",
        lambda_vlb: float = 0.001,
        min_snr_gamma: float | None = None,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or null, got {min_snr_gamma!r}")
        if not lambda_vlb >= 0:
            raise ValueError(f"lambda_vlb must be >= 0, got {lambda_vlb!r}")
        self.loss_type = loss_type
        self.lambda_vlb = float(lambda_vlb)
        self.min_snr_gamma = min_snr_gamma

    def check(self, diffusion: Process) -> None:
        """Reject combinations that would leave part of the network untrained, or a bound the
        process does not have."""
        if self.loss_type != "simple" and not diffusion.discrete:
            raise ValueError(
                f"loss_type={self.loss_type!r} trains on DDPM's variational bound, which only the "
                f"discrete process has; {type(diffusion).__name__} trains with loss_type 'simple'"
            )
        if diffusion.learned_variance and self.loss_type == "simple":
            raise ValueError(
                f"variance_type={diffusion.variance_type!r} is learned only through the bound: "
                "use loss_type 'hybrid' (improved DDPM) or 'vlb', not 'simple'"
            )

    def __call__(
        self,
        net: Callable[[Tensor, Tensor], Tensor],
        diffusion: Process,
        x_start: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The terms at x_t = q_sample(x_start, t, noise) for the network ``net(x_t, τ)``
        (called as the process says: ``diffusion.network_output``, e.g. at ``timestep_map[t]``
        on a respaced diffusion, or at EDM's c_in·x_t and c_noise)."""
        self.check(diffusion)
        x_start = x_start.float()
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = diffusion.q_sample(x_start, t, noise)
        model_output = diffusion.network_output(net, x_t, t)
        pred, var_values = diffusion.split_model_output(model_output, x_start.shape[1])
        terms: dict[str, Tensor] = {}
        target = diffusion.training_target(x_start, noise, t)
        mse = mean_flat((target - pred) ** 2)
        terms["mse"] = mse
        if self.min_snr_gamma is not None:
            mse = mse * min_snr_weight(diffusion, t, self.min_snr_gamma)
        if self.loss_type == "simple":
            terms["loss"] = mse
            return terms
        if self.loss_type == "hybrid":
            # stop-gradient on the mean: the bound trains only the variance (iDDPM §3.1).
            frozen = (
                pred.detach()
                if var_values is None
                else torch.cat([pred.detach(), var_values], dim=1)
            )
            vb = vb_terms_bpd(diffusion, frozen, x_start, x_t, t)["output"]
            terms["vb"] = vb
            terms["loss"] = mse + self.lambda_vlb * diffusion.num_timesteps * vb
        else:
            vb = vb_terms_bpd(diffusion, model_output, x_start, x_t, t)["output"]
            terms["vb"] = vb
            terms["loss"] = diffusion.num_timesteps * vb  # RESCALED_KL: L_vlb ≈ T·L_t
        return terms
