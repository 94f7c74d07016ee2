"""Exact (Bayes-optimal) denoisers for data with a closed-form posterior, for sampler tests.

For data x₀ ~ Σ_k w_k N(μ_k, s_k² I) the noisy marginal is x_t ~ Σ_k w_k N(√ᾱ μ_k, v_k I) with
v_k = ᾱ s_k² + 1 - ᾱ, and the optimal predictions are the posterior means

    E[ε | x_t]  = Σ_k r_k(x_t) √(1-ᾱ) (x_t - √ᾱ μ_k) / v_k,
    E[x₀ | x_t] = Σ_k r_k(x_t) (μ_k + √ᾱ s_k² (x_t - √ᾱ μ_k) / v_k),

with responsibilities r_k ∝ w_k N(x_t; √ᾱ μ_k, v_k I). One component is the Gaussian case
E[ε | x_t] = √(1-ᾱ) (x_t - √ᾱ μ) / (ᾱ σ² + 1 - ᾱ). A model trained to convergence on such data
would output exactly these; a sampler fed with them must reproduce the data distribution up to
its own discretisation error.

Usage: ``net = GaussianOracle(diffusion, mean=0.3, std=0.2, dim=2)``, then
``net(x_t, t)`` (``t`` LongTensor (B,) of training timesteps) returns the prediction of
``diffusion.prediction_type`` (ε, x₀ or v; for learned variances ``var_output`` is appended as
the variance channels). Math in float64, output in the dtype of ``x_t``.
``ClassConditionalOracle`` adds class labels and the null class of classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddpm.diffusion import GaussianDiffusion


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class MixtureOracle:
    """Optimal denoiser for x₀ ~ Σ_k w_k N(μ_k, s_k² I) in shape ``(B, *data_shape)``."""

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        means: Sequence[Sequence[float]] | Tensor,
        stds: Sequence[float] | Tensor,
        weights: Sequence[float] | Tensor | None = None,
        *,
        var_output: float = 0.0,
    ) -> None:
        self.diffusion = diffusion
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, *data_shape)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(k)
        w = (
            torch.ones(k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        self.weights = w / w.sum()
        self.var_output = var_output
        self.calls = 0

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def predictions(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(E[x₀ | x_t], E[ε | x_t]) in float64."""
        x = x_t.detach().double().cpu()
        b = x.shape[0]
        xf = x.reshape(b, -1)  # (B, D)
        d = xf.shape[1]
        ac = self.diffusion.alphas_cumprod_f64.cpu()[t.long().cpu()].reshape(b, 1)
        sqrt_ac, sqrt_1m_ac = ac.sqrt(), (1.0 - ac).sqrt()
        ones = torch.ones(d, 1, dtype=torch.float64)  # sums over D as matmuls (fast on CPU)
        diffs, logps, vs = [], [], []
        for mu, s, w in zip(
            self.means.reshape(len(self.stds), -1), self.stds, self.weights, strict=True
        ):
            v = ac * s**2 + (1.0 - ac)  # (B, 1)
            diff = xf - sqrt_ac * mu  # (B, D)
            logps.append(w.log() - 0.5 * d * v.log() - 0.5 * ((diff * diff) @ ones) / v)
            diffs.append(diff)
            vs.append(v)
        top = logps[0]
        for lp in logps[1:]:
            top = torch.maximum(top, lp)
        rs = [torch.exp(lp - top) for lp in logps]  # responsibilities, unnormalised (B, 1)
        total = sum(rs[1:], rs[0])
        eps = torch.zeros_like(xf)
        x0 = torch.zeros_like(xf)
        for r, diff, v, mu, s in zip(
            rs, diffs, vs, self.means.reshape(len(vs), -1), self.stds, strict=True
        ):
            rk = r / total
            eps += (rk * sqrt_1m_ac / v) * diff
            x0 += rk * mu + (rk * sqrt_ac * s**2 / v) * diff
        return x0.reshape(x.shape), eps.reshape(x.shape)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.output(*self.predictions(x_t, t), x_t, t)

    def output(
        self,
        x0: Tensor,
        eps: Tensor,
        x_t: Tensor,
        t: Tensor,
        var_output: float | Tensor | None = None,
    ) -> Tensor:
        """The network output of ``diffusion.prediction_type`` for these predictions."""
        kind = self.diffusion.prediction_type
        if kind == "epsilon":
            out = eps
        elif kind == "sample":
            out = x0
        else:  # v = √ᾱ ε - √(1-ᾱ) x₀
            ac = self.diffusion.alphas_cumprod_f64.cpu()[t.long().cpu()]
            ac = ac.reshape(-1, *([1] * (x0.ndim - 1)))
            out = ac.sqrt() * eps - (1.0 - ac).sqrt() * x0
        if self.diffusion.learned_variance:
            var = self.var_output if var_output is None else var_output
            var = torch.as_tensor(var, dtype=out.dtype).reshape(-1, *([1] * (out.ndim - 1)))
            out = torch.cat([out, var.expand_as(out)], dim=1)
        return out.to(device=x_t.device, dtype=x_t.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples of x₀ (float32)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.data_shape), generator=generator, dtype=torch.float64)
        std = self.stds[comp].reshape(n, *([1] * len(self.data_shape)))
        return (self.means[comp] + std * z).float()


class GaussianOracle(MixtureOracle):
    """Optimal denoiser for x₀ ~ N(mean, std² I) of shape ``data_shape`` (or ``(dim,)``)."""

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        mean: float | Sequence[float] | Tensor = 0.0,
        std: float = 1.0,
        *,
        dim: int | None = None,
        data_shape: Sequence[int] | None = None,
        var_output: float = 0.0,
    ) -> None:
        shape = tuple(data_shape) if data_shape is not None else (dim,) if dim else None
        mean = torch.as_tensor(mean, dtype=torch.float64)
        if shape is not None:
            mean = mean.expand(shape).clone()
        super().__init__(diffusion, mean.unsqueeze(0), [std], var_output=var_output)
        self.mean, self.std = mean, float(std)


class ClassConditionalOracle(MixtureOracle):
    """Optimal class-conditional denoiser for classes y = 0..K-1, p(y) = w_y and
    x₀ | y ~ N(μ_y, s_y² I), with the null class K of classifier-free guidance.

    ``net(x_t, t, class_labels)``: label y gives the conditional E[ε | x_t, y] (one Gaussian:
    √(1-ᾱ) (x_t - √ᾱ μ_y) / v_y), the null label K or ``class_labels=None`` the unconditional
    E[ε | x_t] of the mixture Σ_y w_y N(μ_y, s_y² I) (the responsibilities p(y | x_t) weigh the
    conditional ones). ``var_output`` may hold one variance value per label (K + 1 of them).
    ``label_log`` keeps the labels of every call (None for calls without labels).
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        means: Sequence[Sequence[float]] | Tensor,
        stds: Sequence[float] | Tensor,
        weights: Sequence[float] | Tensor | None = None,
        *,
        var_output: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__(diffusion, means, stds, weights)
        self.num_classes = self.null_class = len(self.stds)
        self.classes = [
            MixtureOracle(diffusion, m[None], [s])
            for m, s in zip(self.means, self.stds, strict=True)
        ]
        values = torch.as_tensor(var_output, dtype=torch.float64)
        self.var_values = values.expand(self.num_classes + 1).clone()
        self.label_log: list[Tensor | None] = []

    def predictions(
        self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(E[x₀ | x_t, y], E[ε | x_t, y]) in float64; the null class / None: unconditional."""
        x0, eps = super().predictions(x_t, t)
        if class_labels is None:
            return x0, eps
        labels = class_labels.cpu()
        if labels.min() < 0 or labels.max() > self.null_class:
            raise ValueError(f"class_labels must lie in [0, {self.null_class}]")
        for y, oracle in enumerate(self.classes):
            rows = labels == y
            if rows.any():
                x0[rows], eps[rows] = oracle.predictions(
                    x_t[rows.to(x_t.device)], t[rows.to(t.device)]
                )
        return x0, eps

    def __call__(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self.calls += 1
        self.label_log.append(None if class_labels is None else class_labels.cpu().clone())
        var = None
        if self.diffusion.learned_variance:
            labels = (
                torch.full((x_t.shape[0],), self.null_class)
                if class_labels is None
                else class_labels.cpu()
            )
            var = self.var_values[labels]
        return self.output(*self.predictions(x_t, t, class_labels), x_t, t, var)

    def sample_data(
        self, n: int, generator: torch.Generator | None = None, label: int | None = None
    ) -> Tensor:
        """n exact samples of x₀: of class ``label``, or of the mixture."""
        if label is None:
            return super().sample_data(n, generator)
        return self.classes[label].sample_data(n, generator)


class ProcessGaussianOracle:
    """The optimal network for x₀ ~ N(μ, s² I) on any process of the family, in its own
    parameterisation: called as the samplers call a network, ``net(c_in·x, τ)``, it recovers t
    from τ (``t_of_tau``), x from c_in·x, and returns F = (E[x₀ | x] - c_skip x)/c_out with
    E[x₀ | x] = μ + α s² (x - α μ)/(α² s² + σ²). Float64 inside, all rows at one t."""

    def __init__(self, process, mean: float, std: float, t_of_tau) -> None:
        self.process, self.mean, self.std, self.t_of_tau = process, mean, std, t_of_tau
        self.calls = 0

    def posterior_mean(self, x: Tensor, t: float) -> Tensor:
        (alpha,), (sigma,) = self.process.alpha_sigma_np([t])
        v = alpha**2 * self.std**2 + sigma**2
        return self.mean + alpha * self.std**2 * (x - alpha * self.mean) / v

    def __call__(self, x_in: Tensor, tau: Tensor) -> Tensor:
        self.calls += 1
        t = float(self.t_of_tau(float(tau.reshape(-1)[0])))
        p = self.process.preconditioning_np([t])
        c_in, c_skip, c_out = (float(c if not hasattr(c, "shape") else c[0]) for c in p[:3])
        x = x_in.double() / c_in
        return ((self.posterior_mean(x, t) - c_skip * x) / c_out).to(x_in.dtype)
