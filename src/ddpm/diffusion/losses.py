"""Training objectives: L_simple, L_vlb and L_hybrid, with min-SNR-γ weighting and timestep samplers.

* L_simple (DDPM eq. 14): ‖target - f_θ(x_t, t)‖² for the configured target (ε, x₀ or v).
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

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ddpm.diffusion.gaussian import GaussianDiffusion, extract
from ddpm.diffusion.respace import model_timesteps

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


def min_snr_weight(diffusion: GaussianDiffusion, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-γ weight (Hang et al. 2023) for the MSE on the configured target.

    ε target: min(SNR, γ)/SNR; x₀ target: min(SNR, γ); v target: min(SNR, γ)/(SNR + 1).
    """
    snr = diffusion.snr(t)
    clipped = torch.clamp(snr, max=gamma)
    if diffusion.prediction_type == "epsilon":
        return clipped / snr.clamp(min=1e-20)
    if diffusion.prediction_type == "sample":
        return clipped
    return clipped / (snr + 1.0)


class DiffusionLoss:
    """Callable training objective: ``loss(diffusion, model, x_start, t, noise) -> dict``.

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

    def check(self, diffusion: GaussianDiffusion) -> None:
        """Reject combinations that would leave part of the network untrained."""
        if diffusion.learned_variance and self.loss_type == "simple":
            raise ValueError(
                f"variance_type={diffusion.variance_type!r} is learned only through the bound: "
                "use loss_type 'hybrid' (improved DDPM) or 'vlb', not 'simple'"
            )

    def __call__(
        self,
        diffusion: GaussianDiffusion,
        model: Callable[[Tensor, Tensor], Tensor],
        x_start: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        self.check(diffusion)
        x_start = x_start.float()
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = diffusion.q_sample(x_start, t, noise)
        # a respaced diffusion's index t is the network's timestep timestep_map[t]
        model_output = model(x_t, model_timesteps(diffusion, t)).float()
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


# ---------------------------------------------------------------------- timestep samplers
# (which t a training step uses; not to be confused with the image samplers of
# ddpm.diffusion.samplers)
class UniformTimestepSampler:
    """t ~ U{0..T-1} with unit weights (DDPM)."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return timesteps (B,) and importance weights (B,) so that E[w·L_t] is unbiased."""
        w = self.weights()
        if np.all(w == w[0]):
            t = torch.randint(
                0,
                self.num_timesteps,
                (batch_size,),
                generator=generator,
                device="cpu" if generator is None else generator.device,
            )
            return t.to(device), torch.ones(batch_size, device=device)
        p = torch.as_tensor(
            w / w.sum(),
            dtype=torch.float32,
            device="cpu" if generator is None else generator.device,
        )
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:  # noqa: B027 - optional hook
        """Record per-sample losses (used by importance samplers)."""


class LossSecondMomentTimestepSampler(UniformTimestepSampler):
    """Importance sampling p_t ∝ √E[L_t²] over the last ``history`` losses (improved DDPM §3.3).

    Uniform until every t has ``history`` recorded losses; ``uniform_prob`` of uniform mixing.
    Under DDP, losses from every rank are gathered so all ranks keep the same statistics.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self._hist = np.zeros((num_timesteps, history), dtype=np.float64)
        self._count = np.zeros(num_timesteps, dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not np.all(self._count == self.history):
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._hist**2, axis=-1))
        w /= w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / len(w)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample ``losses`` at timesteps ``t``; non-finite losses are dropped.

        Under DDP every rank's pairs are gathered (collective: every rank calls it each step).
        Ranks may hold different counts (a NaN dropped on one rank only), so the counts are
        gathered first and every rank pads to the largest, as improved-diffusion's
        ``LossAwareSampler.update_with_local_losses`` does.
        """
        t, losses = t.detach().long().flatten(), losses.detach().float().flatten()
        if t.numel() != losses.numel():
            raise ValueError(f"got {t.numel()} timesteps but {losses.numel()} losses")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            count = torch.tensor([t.numel()], device=t.device)
            counts = [torch.zeros_like(count) for _ in range(world)]
            dist.all_gather(counts, count)
            sizes = [int(c) for c in counts]
            pad = max(sizes) - t.numel()
            t = torch.cat([t, t.new_zeros(pad)])
            losses = torch.cat([losses, losses.new_zeros(pad)])
            ts = [torch.zeros_like(t) for _ in range(world)]
            ls = [torch.zeros_like(losses) for _ in range(world)]
            dist.all_gather(ts, t)
            dist.all_gather(ls, losses)
            t = torch.cat([x[:n] for x, n in zip(ts, sizes, strict=True)])
            losses = torch.cat([x[:n] for x, n in zip(ls, sizes, strict=True)])
        finite = torch.isfinite(losses)
        t, losses = t[finite], losses[finite]
        for ti, li in zip(t.cpu().tolist(), losses.cpu().tolist(), strict=True):
            if self._count[ti] == self.history:
                self._hist[ti, :-1] = self._hist[ti, 1:]
                self._hist[ti, -1] = li
            else:
                self._hist[ti, self._count[ti]] = li
                self._count[ti] += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"hist": self._hist.copy(), "count": self._count.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._hist = np.asarray(state["hist"], dtype=np.float64)
        self._count = np.asarray(state["count"], dtype=np.int64)


# The names before the rename (public API): the same classes.
UniformSampler = UniformTimestepSampler
LossSecondMomentSampler = LossSecondMomentTimestepSampler

__all__ = [
    "DiffusionLoss",
    "LossSecondMomentSampler",
    "LossSecondMomentTimestepSampler",
    "UniformSampler",
    "UniformTimestepSampler",
    "discretized_gaussian_log_likelihood",
    "extract",
    "mean_flat",
    "min_snr_weight",
    "normal_kl",
    "vb_terms_bpd",
]
