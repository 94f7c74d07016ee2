"""The probability-flow ODE likelihood against closed forms.

For Gaussian data x₀ ~ N(μ, Σ) on a path x_t = α x₀ + σ ε the marginal is p_t = N(αμ, C(t)),
C = α²Σ + σ²I, the optimal denoiser is x̂₀ = μ + αΣC⁻¹(x − αμ), and its PF-ODE velocity is
affine in x with Jacobian J(t) = d/dt ½ log C(t) (in Σ's eigenbasis j_i = (αα̇λ_i + σσ̇)/c_i).
So the ODE must return log p_{t_min} exactly, and Hutchinson's estimate along the path is
εᵀMε with M = ∫J dt = ½ (log C(t_max) − log C(t_min)): mean tr M, variance 2‖M‖²_F (Gaussian
probes) or 2 Σ_{i≠j} M_ij² (Rademacher), whatever the solver. For data uniform on a box the
denoiser is a truncated-normal mean and p_t a difference of normal CDFs, which gives the
dequantised bits/dim of a uniform discrete distribution in closed form.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import Tensor

from ddpm.diffusion import EDMProcess, GaussianDiffusion, RectifiedFlow
from ddpm.diffusion.likelihood import (
    DEQUANTIZATION_BITS,
    normal_log_prob,
    ode_log_likelihood,
    pf_ode_nll,
    pf_ode_velocity,
    process_nll,
    uniform_dequantize,
)
from ddpm.utils.seeding import PerSampleGenerator
from oracles import ProcessGaussianOracle

F64 = torch.float64
LN2 = math.log(2.0)


# -- paths: t (B,) -> (α, σ, α̇, σ̇), and the time span used for each ------------------------


def vp(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Song et al.'s VP SDE (DDPM's β in continuous time): β(t) = 0.1 + 19.9 t."""
    b0, b1 = 0.1, 20.0
    log_alpha = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    alpha = log_alpha.exp()
    sigma = (-torch.expm1(2 * log_alpha)).sqrt()
    beta = b0 + t * (b1 - b0)
    return alpha, sigma, -0.5 * beta * alpha, 0.5 * beta * alpha**2 / sigma


def ve(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's VE: α = 1, σ = t."""
    return torch.ones_like(t), t, torch.zeros_like(t), torch.ones_like(t)


def rectified_flow(t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """α = 1 − t, σ = t."""
    return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)


PATHS = {
    "vp": (vp, (1e-5, 1.0)),
    "ve": (ve, (2e-3, 80.0)),
    "rectified_flow": (rectified_flow, (1e-3, 1.0)),
}


def _coef(path, t: float) -> tuple[float, float]:
    alpha, sigma, _, _ = path(torch.tensor([t], dtype=F64))
    return alpha.item(), sigma.item()


# -- Gaussian data ------------------------------------------------------------------------------


class GaussianData:
    """x₀ ~ N(μ, Σ) with a full covariance (so Rademacher probes have variance), D = 3."""

    def __init__(self) -> None:
        self.mu = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
        q, _ = torch.linalg.qr(
            torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 1.0], [2.0, 0.1, -0.7]], dtype=F64)
        )
        self.q, self.lam = q, torch.tensor([1.0, 0.3, 0.05], dtype=F64)
        self.cov = q @ torch.diag(self.lam) @ q.T

    def sample(self, n: int, seed: int = 0) -> Tensor:
        z = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
        return self.mu + (z * self.lam.sqrt()) @ self.q.T

    def denoiser(self, path):
        def denoise(x: Tensor, t: Tensor) -> Tensor:
            alpha, sigma, _, _ = path(t)
            a, s = alpha[:, None], sigma[:, None]
            gain = a * self.lam / (a**2 * self.lam + s**2)  # (B, D) in the eigenbasis
            return self.mu + (((x - a * self.mu) @ self.q) * gain) @ self.q.T

        return denoise

    def log_prob(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """log p_t(x) = log N(x; αμ, α²Σ + σ²I), (B,)."""
        c = alpha**2 * self.lam + sigma**2
        y = (x - alpha * self.mu) @ self.q
        return -0.5 * (y**2 / c + torch.log(2 * math.pi * c)).sum(1)

    def entropy_bits(self, alpha: float, sigma: float) -> float:
        """Differential entropy of p_t in bits/dim (the data's at t = 0)."""
        c = alpha**2 * self.lam + sigma**2
        return (0.5 * torch.log(2 * math.pi * math.e * c)).mean().item() / LN2

    def hutchinson_variance(self, path, t_span, probe: str) -> float:
        """Variance of εᵀMε, M = ½ (log C(t_max) − log C(t_min)) in the standard basis."""
        (a0, s0), (a1, s1) = (_coef(path, t) for t in t_span)
        m = 0.5 * torch.log((a1**2 * self.lam + s1**2) / (a0**2 * self.lam + s0**2))
        big_m = self.q @ torch.diag(m) @ self.q.T
        if probe == "gaussian":
            return 2 * big_m.square().sum().item()
        return 2 * (big_m.square().sum() - big_m.diagonal().square().sum()).item()


GAUSS = GaussianData()


def _gaussian_case(name: str):
    path, t_span = PATHS[name]
    u = pf_ode_velocity(GAUSS.denoiser(path), path)
    prior = partial(
        GAUSS.log_prob, alpha=_coef(path, t_span[1])[0], sigma=_coef(path, t_span[1])[1]
    )
    return path, t_span, u, prior


@pytest.mark.parametrize("name", PATHS)
def test_exact_divergence_gives_the_true_log_density_and_the_entropy(name: str) -> None:
    path, t_span, u, prior = _gaussian_case(name)
    n = 300
    x0 = GAUSS.sample(n)
    out = pf_ode_nll(u, x0, t_span=t_span, prior_log_prob=prior, dequantize=False)
    a0, s0 = _coef(path, t_span[0])
    true = GAUSS.log_prob(x0, a0, s0)
    # the ODE is log p_{t_min} to the solver's tolerance, per sample
    torch.testing.assert_close(out["nll"], -true, rtol=0, atol=2e-4)
    torch.testing.assert_close(out["bpd"], -true / (3 * LN2), rtol=0, atol=1e-4)
    # its mean estimates the entropy of the data: ±4 standard errors (Var[log p] = D/2 nats²)
    se = math.sqrt(3 / 2 / n) / (3 * LN2)
    assert abs(out["bpd"].mean().item() - GAUSS.entropy_bits(1.0, 0.0)) < 4 * se
    assert (out["nfe"] > 20).all() and (out["nfe"] < 1000).all()


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("name", PATHS)
def test_hutchinson_is_unbiased_with_the_closed_form_variance(name: str, probe: str) -> None:
    path, t_span, u, prior = _gaussian_case(name)
    n, k = 400, 2
    x0 = GAUSS.sample(n, seed=1)
    out = ode_log_likelihood(
        u,
        x0,
        t_span=t_span,
        prior_log_prob=prior,
        divergence="hutchinson",
        probe=probe,
        num_probes=k,
        generator=torch.Generator().manual_seed(2),
    )
    a0, s0 = _coef(path, t_span[0])
    err = out["log_prob"] - GAUSS.log_prob(x0, a0, s0)
    var = GAUSS.hutchinson_variance(path, t_span, probe) / k
    assert var > 0.01
    assert abs(err.mean().item()) < 4 * math.sqrt(var / n)  # unbiased
    # sample variance of a quadratic form of Gaussians (kurtosis ≤ 15): within ~4 of its sds
    assert 0.6 < err.var().item() / var < 1.5


def test_the_solvers_on_a_closed_form_linear_ode() -> None:
    """dx/dt = t A x: x(t1) = exp(A (t1² − t0²)/2) x(t0), ∫∇·u dt = tr A (t1² − t0²)/2."""
    a = torch.tensor([[-0.3, 2.0], [-1.5, 0.1]], dtype=F64)
    t0, t1 = 0.5, 2.0
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    s = (t1**2 - t0**2) / 2
    x1 = x0 @ torch.linalg.matrix_exp(a * s).T
    log_prob = normal_log_prob(x1) + a.trace() * s

    def u(x: Tensor, t: Tensor) -> Tensor:
        return t[:, None] * x @ a.T

    def run(**options) -> tuple[float, dict[str, Tensor]]:
        out = ode_log_likelihood(u, x0, t_span=(t0, t1), prior_log_prob=normal_log_prob, **options)
        error = max(
            (out["latent"] - x1).abs().max().item(), (out["log_prob"] - log_prob).abs().max().item()
        )
        return error, out

    errors = {tol: run(rtol=tol, atol=tol)[0] for tol in (1e-5, 1e-8)}
    assert errors[1e-5] < 1e-4 and errors[1e-8] < 1e-7
    assert errors[1e-8] < errors[1e-5] / 30
    # RK4 converges at order 4: halving the step divides the error by ~16
    (e20, out), (e40, _) = (run(solver="rk4", steps=n) for n in (20, 40))
    assert 12 < e20 / e40 < 20
    assert (out["nfe"] == 80).all()


# -- uniform data: dequantised bits/dim in closed form ----------------------------------------


class UniformBox:
    """x₀ uniform on [lo, hi]^D: the optimal denoiser is a truncated-normal mean."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def _mass(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(Φ(b) − Φ(a), a, b), a, b the box in units of the posterior N(x/α, σ²/α²)."""
        a, b = (alpha * self.lo - x) / sigma, (alpha * self.hi - x) / sigma
        nd = torch.special.ndtr
        return torch.where(a > 0, nd(-a) - nd(-b), nd(b) - nd(a)), a, b

    def denoiser(self, path):
        def denoise(x: Tensor, t: Tensor) -> Tensor:
            alpha, sigma, _, _ = (c.reshape(-1, *([1] * (x.ndim - 1))) for c in path(t))
            mass, a, b = self._mass(x, alpha, sigma)
            pdf = lambda z: torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)  # noqa: E731
            return x / alpha + sigma / alpha * (pdf(a) - pdf(b)) / mass

        return denoise

    def log_prob(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """log p_t(x) = Σ log[(Φ(b) − Φ(a)) / (α (hi − lo))], (B,)."""
        mass, _, _ = self._mass(x, torch.tensor(alpha, dtype=F64), torch.tensor(sigma, dtype=F64))
        return (mass / (alpha * (self.hi - self.lo))).log().reshape(x.shape[0], -1).sum(1)


def _levels(first: int, count: int, n: int, seed: int = 0) -> tuple[Tensor, UniformBox]:
    """8-bit images (n, 1, 2, 2) uniform over levels first..first+count-1, in [-1, 1]."""
    k = torch.randint(
        first, first + count, (n, 1, 2, 2), generator=torch.Generator().manual_seed(seed)
    )
    box = UniformBox(2 * first / 256 - 1, 2 * (first + count) / 256 - 1)
    return (2 * k / 255 - 1).to(F64), box


@pytest.mark.parametrize(("first", "count"), [(120, 16), (0, 256)])
def test_dequantised_bits_per_dim_of_a_uniform_discrete_distribution(
    first: int, count: int
) -> None:
    """Each dequantised image has density (128/count)^D under the optimal model, so bpd =
    −log₂(128/count) + 7 = log₂ count, the discrete entropy (no Jensen gap for a uniform)."""
    path, t_span = PATHS["vp"]
    x, box = _levels(first, count, n=64)
    (a0, s0), (a1, s1) = (_coef(path, t) for t in t_span)
    seeds = range(64)
    out = pf_ode_nll(
        pf_ode_velocity(box.denoiser(path), path),
        x,
        t_span=t_span,
        prior_log_prob=partial(box.log_prob, alpha=a1, sigma=s1),
        dequantize=True,
        generator=PerSampleGenerator(seeds),
        rtol=1e-6,  # the box's sharp edges: at 1e-5 an edge sample is off by 3e-3 bits/dim
        atol=1e-6,
    )
    y = uniform_dequantize(x, PerSampleGenerator(seeds))  # the same draws (exact divergence: D = 4)
    expected = -box.log_prob(y, a0, s0) / (4 * LN2) + DEQUANTIZATION_BITS
    torch.testing.assert_close(out["bpd"], expected, rtol=0, atol=1e-4)
    # the discrete entropy, up to the blur of σ(t_min) ≈ 1e-3 at the box's edges: it adds
    # ≈ (2σ/w) ∫₀^∞ −log₂Φ(z) dz ≈ 0.01 bits/dim for the 16 levels (width w = 1/8)
    assert 0 < out["bpd"].mean().item() - math.log2(count) < 0.05


def test_results_do_not_depend_on_the_batch_with_per_sample_seeds() -> None:
    path, t_span = PATHS["vp"]
    x, box = _levels(120, 16, n=6)
    (a1, s1) = _coef(path, t_span[1])
    nll = partial(
        pf_ode_nll,
        pf_ode_velocity(box.denoiser(path), path),
        t_span=t_span,
        prior_log_prob=partial(box.log_prob, alpha=a1, sigma=s1),
        dequantize=True,
        num_draws=2,
        divergence="hutchinson",
        rtol=1e-4,
        atol=1e-4,
    )
    seeds = [10, 11, 12, 13, 14, 15]
    whole = nll(x, generator=PerSampleGenerator(seeds))
    parts = [
        nll(x[i:j], generator=PerSampleGenerator(seeds[i:j])) for i, j in ((0, 1), (1, 3), (3, 6))
    ]
    for key in ("bpd", "nfe"):
        torch.testing.assert_close(
            torch.cat([p[key] for p in parts]), whole[key], rtol=1e-10, atol=0
        )
    # the seeds matter: other seeds, other dequantisation and probes
    other = nll(x, generator=PerSampleGenerator([s + 100 for s in seeds]))
    assert (other["bpd"] - whole["bpd"]).abs().min() > 1e-6


def test_normal_log_prob_is_the_isotropic_gaussian_density() -> None:
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = torch.distributions.Normal(0.0, 3.0).log_prob(x).sum((1, 2))
    torch.testing.assert_close(normal_log_prob(x, std=3.0), expected)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"divergence": "trace"}, "divergence must be one of"),
        ({"probe": "sphere"}, "probe must be one of"),
        ({"solver": "euler"}, "solver must be one of"),
        ({"num_probes": 0}, "num_probes must be a positive integer"),
        ({"rtol": 0.0}, "rtol and atol must be positive"),
        ({"t_span": (1.0, 0.0)}, "t_span must be"),
        ({"num_draws": 0}, "num_draws must be a positive integer"),
    ],
)
def test_bad_options_are_named(options: dict, match: str) -> None:
    kwargs = {
        "t_span": (1e-3, 1.0),
        "prior_log_prob": normal_log_prob,
        "dequantize": False,
    } | options
    with pytest.raises(ValueError, match=match):
        pf_ode_nll(lambda x, t: -x, torch.zeros(2, 2), **kwargs)


def test_dequantize_refuses_data_off_the_8_bit_grid() -> None:
    with pytest.raises(ValueError, match="8-bit images"):
        uniform_dequantize(torch.full((2, 3), 0.1234))


# -- a network on a process of the family (process_nll) --------------------------------------


def _optimal_network_error(process, t_of_tau, **options) -> tuple[float, int]:
    """(bits/dim of the optimal denoiser for x₀ ~ N(0.3, 0.25 I) through ``process_nll`` minus
    the exact density of x_{t_min}, NFE), one 4-D sample (the oracle answers at one t)."""
    mu, s = 0.3, 0.5
    oracle = ProcessGaussianOracle(process, mu, s, t_of_tau)
    x = torch.tensor([[0.9, -0.4, 0.2, 0.5]])
    out = process_nll(oracle, process, x, dequantize=False, divergence="exact", **options)
    (alpha,), (sigma,) = process.alpha_sigma_np([process.t_min])
    std = math.sqrt(alpha**2 * s**2 + sigma**2)
    expected = -normal_log_prob((x - alpha * mu).double(), std) / (4 * LN2)
    return out["bpd"].item() - expected.item(), int(out["nfe"].item())


@pytest.mark.parametrize("name", ["ddpm", "edm", "edm_vp", "rf"])
def test_process_nll_of_the_optimal_network_is_the_marginal_density(name: str) -> None:
    """The PF-ODE of the optimal denoiser for x₀ ~ N(μ, s²I), wired through the process (its
    parameterisation, network time and velocity), returns log N(x; α μ, (α² s² + σ²) I) at
    t_min: the exact density of x_{t_min}, for DDPM's discrete chain (read at fractional t),
    EDM's VE and VP forms and rectified flow. Measured: 1e-5, 5e-6, 2e-5, 6e-7 bits/dim."""
    if name == "ddpm":
        process, t_of_tau = GaussianDiffusion(schedule="linear", num_timesteps=1000), float
    elif name == "rf":
        process, t_of_tau = RectifiedFlow(prediction_type="velocity"), lambda tau: tau / 1000.0
    else:
        process = EDMProcess(prediction_type="edm", variance_preserving=name == "edm_vp")
        t_of_tau = lambda tau: math.exp(4 * tau)  # noqa: E731 - c_noise = ¼ ln σ
    error, nfe = _optimal_network_error(process, t_of_tau)
    assert abs(error) < 1e-4
    assert nfe > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_process_nll_on_a_coarse_ddpm_chain_is_exact_up_to_the_solver(prediction_type) -> None:
    """T = 100: the chain read at fractional t is a continuous process of its own (λ a monotone
    cubic through the timesteps; the optimal network of that process is the oracle), so the ODE
    gives its exact density whatever T, to the solver's tolerance: 1e-5 bits/dim in < 100 NFE
    (measured). A piecewise-linear λ made the velocity jump at every timestep (3-5e-4 bits/dim
    in 500-650 NFE); an ε-network's x̂₀ taken at the timestep below t was off by 5e-3."""
    process = GaussianDiffusion(
        schedule="linear", num_timesteps=100, prediction_type=prediction_type
    )
    error, nfe = _optimal_network_error(process, float)
    assert abs(error) < 1e-4
    assert nfe < 200
