"""Exact likelihood by the probability-flow ODE (Song et al. 2021 §4.3, App. D.2; FFJORD).

Along dx/dt = u(x, t), integrated from data (t_min) to noise (t_max), the log-density changes by
the instantaneous change of variables (Chen et al. 2018, Thm. 1):

    log p_{t_min}(x(t_min)) = log p_{t_max}(x(t_max)) + ∫_{t_min}^{t_max} ∇·u(x(t), t) dt.

The divergence is exact (the sum of D vector-Jacobian products, the default for D ≤
``EXACT_DIVERGENCE_MAX_DIM``, e.g. 2-D data) or Hutchinson's estimate ∇·u ≈ εᵀ(∂u/∂x)ε (one VJP
per probe; Rademacher or Gaussian ε with E[εεᵀ] = I, drawn once per sample and fixed for the whole
integration as in Song et al.; ``num_probes`` averages several). The estimate of log p is unbiased:
the trajectory does not depend on ε and the integral is linear in εεᵀ.

Contract (plain callables, so any process can be wired in one line):

* ``u(x, t) -> Tensor``: the velocity, x (B, *shape) and t a float tensor (B,) (one time per
  sample: the adaptive solver steps each sample on its own), output shaped like x. It must be
  differentiable in x and treat samples independently (network in eval mode).
* ``prior_log_prob(x) -> Tensor``: log p_{t_max}(x) per sample (B,) in nats, e.g.
  ``partial(normal_log_prob, std=sigma_max)`` for N(0, σ_max² I) (VE) or the standard normal.
* For a Gaussian path x_t = α(t) x₀ + σ(t) ε, :func:`pf_ode_velocity` builds ``u`` from a
  denoiser ``denoise(x, t) -> x̂₀`` and ``coefficients(t) -> (α, σ, α̇, σ̇)`` (each (B,)):

      u = α̇ x̂₀ + σ̇ ε̂,   ε̂ = (x − α x̂₀) / σ

  the PF-ODE of the process (and flow matching's target in expectation). ε̂ needs σ(t_min) > 0:
  the ODE then gives log p_{t_min}(x₀), the density of α x₀ + σ ε at t_min evaluated at the data
  (Song et al. start VP at t_min = 1e-5; the tests use 2e-3 for VE and 1e-3 for flow matching).

DDPM's discrete chain (:func:`process_velocity`) is read at fractional t as a continuous process
of its own: λ = log(α/σ) a monotone cubic through the timesteps (C¹: the velocity is continuous),
every conversion (ε, x₀, v -> x̂₀, ε̂), α̇, σ̇ and the network's time input taken at that t. For
the optimal network of that process the ODE then gives the exact density of √ᾱ₀ x₀ + √β₁ ε (the
chain's t = 0) whatever T, to the solver's tolerance: 1e-5 bits/dim in < 100 NFE at T = 100 and
1000 on 4-D Gaussian data (measured). Two readings that are not exact, measured on the same
data: λ linear between timesteps makes the velocity jump at each one (3-5e-4 bits/dim in 500-650
NFE at T = 100, rtol = atol = 1e-5), and an ε-network's x̂₀ taken at the timestep below t (the β
tables) is off by O(1/T) (5e-3 bits/dim at T = 100, 5e-4 at T = 1000). A trained network, unlike
the oracle, has seen only integer t: between them it answers with its time embedding's
interpolation.

Bits/dim (:func:`pf_ode_nll`). For 8-bit images x = 2k/255 − 1, k ∈ {0..255}, uniform
dequantisation (Song et al. 2021, Table 2; the units of Ho et al. 2020, Table 1):
y = 2(k + u)/256 − 1, u ~ U[0, 1)^D, whose Jacobian |dy/d(k+u)| = (1/128)^D gives

    bpd = −log p(y) / (D ln 2) + 7    (7 = log₂ 128),

an estimate of an upper bound on the discrete NLL (Jensen: −log P(k) ≤ E_u[−log p(k + u)]), in
the units of DDPM's variational bound (which bins x at width 2/255 instead, a 0.006 bits/dim
difference in the bin volume). Several dequantisation draws average the bound. Continuous data (2-D
toy sets): bpd = −log p(x) / (D ln 2), the density's bits per dimension (may be negative).

Solvers: ``"rk45"`` (default), adaptive Dormand-Prince 5(4) with the error of each sample
controlled on its own (rtol = atol = 1e-5 as Song et al.), so a sample's result and NFE do not
depend on the batch it is in (one shared step size, as scipy's solver on the flattened batch,
would); ``"rk4"``, classic RK4 on ``steps`` uniform steps in t: a fixed, predictable cost (4 NFE a
step) for monitoring during training, accurate only where the velocity is smooth in t (VP, flow
matching; not VE's σ ∈ [0.002, 80]).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ddpm.diffusion.process import Process
from ddpm.utils.seeding import PerSampleGenerator, randn

VelocityFn = Callable[[Tensor, Tensor], Tensor]
LogDensityFn = Callable[[Tensor], Tensor]
Generator = torch.Generator | PerSampleGenerator | None

DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
SOLVERS = ("rk45", "rk4")
EXACT_DIVERGENCE_MAX_DIM = 4  # "auto": the exact trace up to this many dimensions (2-D data)
DEQUANTIZATION_BITS = math.log2(128.0)  # log₂ |d(k + u)/dy| per dim: 256 bins of width 2/256
_LN2 = math.log(2.0)

# Dormand-Prince 5(4) (Hairer, Nørsett & Wanner, Table II.5.2): nodes c, stages a, 5th-order
# weights b (= the last stage, first-same-as-last) and b - b̂ (the embedded error estimate)
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


# -- the velocity of a Gaussian path and the prior ----------------------------------------------


def _per_sample(c: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x (B, *shape)."""
    return c.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_path_velocity(
    x: Tensor, x0_hat: Tensor, alpha: Tensor, sigma: Tensor, d_alpha: Tensor, d_sigma: Tensor
) -> Tensor:
    """u = α̇ x̂₀ + σ̇ (x − α x̂₀)/σ: the PF-ODE velocity of x_t = α x₀ + σ ε (coefficients (B,))."""
    alpha, sigma, d_alpha, d_sigma = (_per_sample(c, x) for c in (alpha, sigma, d_alpha, d_sigma))
    return d_alpha * x0_hat + d_sigma * (x - alpha * x0_hat) / sigma


def pf_ode_velocity(
    denoise: Callable[[Tensor, Tensor], Tensor],
    coefficients: Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]],
) -> VelocityFn:
    """``u(x, t)`` from a denoiser ``denoise(x, t) -> x̂₀`` and ``coefficients(t) -> (α, σ, α̇,
    σ̇)`` of the process at times t (B,) (:func:`gaussian_path_velocity`)."""

    def u(x: Tensor, t: Tensor) -> Tensor:
        return gaussian_path_velocity(x, denoise(x, t), *coefficients(t))

    return u


def normal_log_prob(x: Tensor, std: float | Tensor = 1.0) -> Tensor:
    """log N(x; 0, std² I) per sample (B,) in nats: the prior p_{t_max} (std = σ_max for VE)."""
    d = x[0].numel()
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    sq = x.reshape(x.shape[0], -1).square().sum(1)
    return -0.5 * sq / std**2 - d * (0.5 * math.log(2 * math.pi) + std.log())


# -- the ODE of (x, Δlog p) -----------------------------------------------------------------


def _probes(shape: tuple[int, ...], num_probes: int, probe: str, generator: Generator, device):
    """(B, num_probes, *shape) Hutchinson probes with E[εεᵀ] = I; a Rademacher probe is the sign
    of a Gaussian draw, so both come from the same per-sample streams."""
    z = randn((shape[0], num_probes, *shape[1:]), generator, device)
    return z if probe == "gaussian" else torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _ode(u: VelocityFn, shape: tuple[int, ...], probes: Tensor | None) -> Callable:
    """f(t, z, idx) for the state z = (x flattened, ∫∇·u) of samples ``idx``: (n, D + 1)."""

    def f(t: Tensor, z: Tensor, idx: Tensor) -> Tensor:
        n, d = z.shape[0], z.shape[1] - 1
        with torch.enable_grad():
            x = z[:, :d].reshape(n, *shape[1:]).detach().requires_grad_(True)
            v = u(x, t.to(z.dtype))
            if probes is None:  # exact: D VJPs with the unit vectors
                vf, div = v.reshape(n, d), torch.zeros(n, dtype=z.dtype, device=z.device)
                for i in range(d):
                    (g,) = torch.autograd.grad(
                        vf[:, i].sum(), x, retain_graph=i < d - 1, materialize_grads=True
                    )
                    div = div + g.reshape(n, d)[:, i]
            else:  # Hutchinson: εᵀ(∂u/∂x)ε, one VJP per probe, averaged
                eps, k = probes[idx], probes.shape[1]
                div = torch.zeros(n, dtype=z.dtype, device=z.device)
                for j in range(k):
                    (g,) = torch.autograd.grad(
                        v, x, eps[:, j], retain_graph=j < k - 1, materialize_grads=True
                    )
                    div = div + (g * eps[:, j]).reshape(n, d).sum(1) / k
        return torch.cat([v.detach().reshape(n, d), div.detach()[:, None]], dim=1)

    return f


def _error_norm(e: Tensor, z0: Tensor, z1: Tensor, rtol: float, atol: float) -> Tensor:
    """Per sample: max(RMS over x, |Δlog p|) of e / (atol + rtol max(|z0|, |z1|)), (n,)."""
    r = e / (atol + rtol * torch.maximum(z0.abs(), z1.abs()))
    return torch.maximum(r[:, :-1].square().mean(1).sqrt(), r[:, -1].abs())


def _rk45(f: Callable, z: Tensor, t0: float, t1: float, rtol: float, atol: float):
    """Integrate each sample from t0 to t1 with its own adaptive Dormand-Prince steps.

    Returns (z(t1), NFE per sample). The first step size is Hairer's (II.4, one extra NFE)."""
    b, dev = z.shape[0], z.device
    idx_all = torch.arange(b, device=dev)
    t = torch.full((b,), t0, dtype=torch.float64, device=dev)
    k1 = f(t, z, idx_all)
    # initial step: h0 = 0.01 ‖z‖/‖f‖, then (0.01 / max(‖f‖, ‖f'‖))^(1/5)
    zero = torch.zeros_like(z)
    d0, d1 = _error_norm(z, z, zero, rtol, atol), _error_norm(k1, z, zero, rtol, atol)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1).double()
    k2 = f(t + h0, z + h0.to(z.dtype)[:, None] * k1, idx_all)
    d2 = _error_norm(k2 - k1, z, zero, rtol, atol).double() / h0
    dm = torch.maximum(d1.double(), d2)
    h1 = torch.where(dm <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dm) ** 0.2)
    h = torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, t1 - t0))
    nfe = torch.full((b,), 2, dtype=torch.long, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    while active.any():
        idx = active.nonzero().squeeze(1)
        ta, za, rest = t[idx], z[idx], t1 - t[idx]
        ha = torch.minimum(h[idx], rest)
        hz = ha.to(z.dtype)[:, None]
        ks = [k1[idx]]
        for c, a in zip(_C[1:], _A[1:], strict=True):
            zi = za + hz * sum(aj * kj for aj, kj in zip(a, ks, strict=True) if aj != 0.0)
            ks.append(f(ta + c * ha, zi, idx))
        z5 = zi  # the last stage's input is the 5th-order solution (first same as last)
        err = _error_norm(
            hz * sum(e * k for e, k in zip(_E, ks, strict=True) if e), za, z5, rtol, atol
        )
        if not torch.isfinite(err).all():
            raise FloatingPointError(f"non-finite velocity or divergence near t={ta.min():.4g}")
        nfe[idx] += 6
        ok = err <= 1.0
        acc = idx[ok]
        z[acc], k1[acc] = z5[ok], ks[-1][ok]
        t[acc] = torch.where(ha[ok] >= rest[ok], t1, ta[ok] + ha[ok])
        factor = (0.9 * err.double().clamp(min=1e-10) ** -0.2).clamp(0.2, 10.0)
        h[idx] = ha * torch.where(ok, factor, factor.clamp(max=1.0))
        if (h[idx] <= 1e-12 * max(abs(t1), 1.0)).any():
            raise FloatingPointError(f"step size underflow near t={ta.min():.4g}")
        active = t < t1
    return z, nfe


def _rk4(f: Callable, z: Tensor, t0: float, t1: float, steps: int):
    """Classic RK4 on ``steps`` uniform steps; returns (z(t1), NFE per sample)."""
    b = z.shape[0]
    idx = torch.arange(b, device=z.device)
    h = (t1 - t0) / steps
    for i in range(steps):
        t = torch.full((b,), t0 + i * h, dtype=torch.float64, device=z.device)
        k1 = f(t, z, idx)
        k2 = f(t + h / 2, z + h / 2 * k1, idx)
        k3 = f(t + h / 2, z + h / 2 * k2, idx)
        k4 = f(t + h, z + h * k3, idx)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z, torch.full((b,), 4 * steps, dtype=torch.long, device=z.device)


# -- log-likelihood, dequantisation and bits/dim -------------------------------------------------


def _check_options(divergence, probe, num_probes, solver, rtol, atol, steps, t_span):
    for name, value, allowed in (
        ("divergence", divergence, DIVERGENCES),
        ("probe", probe, PROBES),
        ("solver", solver, SOLVERS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    for name, value in (("num_probes", num_probes), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    if not (len(t_span) == 2 and float(t_span[0]) < float(t_span[1])):
        raise ValueError(f"t_span must be (t_min, t_max) with t_min < t_max, got {t_span!r}")


@torch.no_grad()
def ode_log_likelihood(
    u: VelocityFn,
    x: Tensor,
    *,
    t_span: tuple[float, float],
    prior_log_prob: LogDensityFn,
    divergence: str = "auto",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "rk45",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 100,
    generator: Generator = None,
) -> dict[str, Tensor]:
    """log p_{t_min}(x) by the instantaneous change of variables along dx/dt = u(x, t).

    ``t_span = (t_min, t_max)`` with x at t_min (data) and ``prior_log_prob`` the density at
    t_max. Hutchinson probes come from ``generator`` (a
    :class:`~ddpm.utils.seeding.PerSampleGenerator` makes each sample's result independent of
    the batch). ``steps`` is for ``solver="rk4"`` only. Returns per-sample (B,) tensors:
    ``log_prob`` (nats), ``prior_log_prob`` (log p_{t_max}(x(t_max))), ``delta_log_prob``
    (∫∇·u dt), ``nfe`` (velocity evaluations, each followed by D or ``num_probes`` VJPs) and
    ``latent`` x(t_max) (B, *shape).
    """
    _check_options(divergence, probe, num_probes, solver, rtol, atol, steps, t_span)
    shape, d = tuple(x.shape), x[0].numel()
    exact = divergence == "exact" or (divergence == "auto" and d <= EXACT_DIVERGENCE_MAX_DIM)
    probes = None if exact else _probes(shape, num_probes, probe, generator, x.device)
    f = _ode(u, shape, None if probes is None else probes.to(x.dtype))
    z = torch.cat([x.reshape(shape[0], d), x.new_zeros(shape[0], 1)], dim=1)
    t0, t1 = float(t_span[0]), float(t_span[1])
    if solver == "rk45":
        z, nfe = _rk45(f, z, t0, t1, rtol, atol)
    else:
        z, nfe = _rk4(f, z, t0, t1, steps)
    latent, delta = z[:, :d].reshape(shape), z[:, d]
    prior = prior_log_prob(latent)
    return {
        "log_prob": prior + delta,
        "prior_log_prob": prior,
        "delta_log_prob": delta,
        "nfe": nfe,
        "latent": latent,
    }


def uniform_dequantize(x: Tensor, generator: Generator = None) -> Tensor:
    """8-bit images x = 2k/255 − 1 in [-1, 1] -> y = 2(k + u)/256 − 1, u ~ U[0, 1)^D (u = Φ(z) of
    a draw z from ``generator``, so per-sample streams make it batch-independent)."""
    k = (x.double() + 1.0) * 127.5
    if (k - k.round()).abs().max() > 1e-3 or k.min() < -1e-3 or k.max() > 255 + 1e-3:
        raise ValueError("dequantize=True needs 8-bit images x = 2k/255 - 1, k in 0..255")
    u = torch.special.ndtr(randn(x.shape, generator, x.device).double())
    return (2.0 * (k.round() + u) / 256.0 - 1.0).to(x.dtype)


def pf_ode_nll(
    u: VelocityFn,
    x: Tensor,
    *,
    t_span: tuple[float, float],
    prior_log_prob: LogDensityFn,
    dequantize: bool,
    num_draws: int = 1,
    generator: Generator = None,
    **options,
) -> dict[str, Tensor]:
    """Negative log-likelihood of ``x`` under the PF-ODE model, per sample.

    ``dequantize``: x are 8-bit images in [-1, 1]; each of ``num_draws`` draws dequantises
    them (:func:`uniform_dequantize`) and bpd = −log p(y)/(D ln 2) + 7 is averaged over draws (the bound
    of the module docstring). Otherwise x are continuous data: bpd = −log p(x)/(D ln 2)
    (``num_draws`` then only repeats the Hutchinson estimate). ``options`` go to
    :func:`ode_log_likelihood` (divergence, num_probes, probe, solver, rtol, atol, steps).
    Returns (B,) tensors: ``bpd``, ``nll`` = bpd·D·ln 2 (nats per sample) and ``nfe`` (summed
    over draws).
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
    d = x[0].numel()
    bpd = x.new_zeros(x.shape[0], dtype=torch.float64)
    nfe = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(num_draws):
        y = uniform_dequantize(x, generator) if dequantize else x
        out = ode_log_likelihood(
            u, y, t_span=t_span, prior_log_prob=prior_log_prob, generator=generator, **options
        )
        draw = -out["log_prob"].double() / (d * _LN2)
        bpd += (draw + DEQUANTIZATION_BITS if dequantize else draw) / num_draws
        nfe += out["nfe"]
    return {"bpd": bpd, "nll": bpd * d * _LN2, "nfe": nfe}


# -- a network on a process of the family -------------------------------------------------


def process_velocity(net: Callable[..., Tensor], process: Process) -> VelocityFn:
    """``u(x, t)`` of a trained network on ``process``: x̂₀ from its output by the
    parameterisation (unclipped: the ODE needs a smooth field), then u = α̇ x̂₀ + σ̇ ε̂
    (:meth:`~ddpm.diffusion.process.Process.velocity`). DDPM's discrete process is read at
    fractional t (λ interpolated between its timesteps, module docstring), as Song et al. 2021
    treat it as VP."""

    def u(x: Tensor, t: Tensor) -> Tensor:
        out = process.network_output(net, x, t)
        x0_hat, _ = process.model_predictions(out, x, t, clip_denoised=False)
        return process.velocity(x, t, x0_hat).to(x.dtype)

    return u


def process_nll(
    net: Callable[..., Tensor],
    process: Process,
    x: Tensor,
    *,
    dequantize: bool,
    num_draws: int = 1,
    generator: Generator = None,
    **options,
) -> dict[str, Tensor]:
    """:func:`pf_ode_nll` of ``net`` on ``process`` over its whole time range [t_min, t_max],
    the prior N(0, s² I) with s² = α(t_max)² + σ(t_max)² (:meth:`Process.prior_std`)."""
    std = process.prior_std(process.t_max)
    return pf_ode_nll(
        process_velocity(net, process),
        x,
        t_span=(float(process.t_min), float(process.t_max)),
        prior_log_prob=lambda z: normal_log_prob(z, std),
        dequantize=dequantize,
        num_draws=num_draws,
        generator=generator,
        **options,
    )
