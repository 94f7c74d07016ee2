"""Few-step solvers (DPM-Solver++ 3M and SDE, UniPC, EDM's Heun) against diffusers' schedulers
(DPM-Solver++ also on EDM's process and rectified flow: ``EDMDPMSolverMultistepScheduler`` and
the flow-sigma ``DPMSolverMultistepScheduler``), the closed-form probability-flow ODE of Gaussian
data, and the exact oracles of tests/oracles.py.

Where diffusers 0.42.1 disagrees with the math, the test checks the math: its SDE-DPM-Solver++
third-order step has the wrong sign on the 1/2 of its D2 coefficient (the variance of Gaussian
data comes out 7-37x too large, measured), and UniPC ``bh1`` with ``final_sigmas_type="zero"``
returns NaN (B(h) = h is infinite at σ = 0); there the comparison stops before the last step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import (
    DPMSolverSampler,
    EDMProcess,
    GaussianDiffusion,
    HeunSampler,
    RectifiedFlow,
    UniPCSampler,
    ddim_sample,
    dpm_solver_sample,
    dpm_solver_timesteps,
    heun_sample,
    karras_timesteps,
    step_timesteps,
    unipc_sample,
)
from ddpm.diffusion.samplers import dpm_solver_coefficients
from oracles import GaussianOracle, MixtureOracle, ProcessGaussianOracle, gen

MEANS = [[[-0.5, -0.5]], [[0.5, 0.4]]]  # (1, 2) data: diffusers' thresholding wants (B, C, ...)
WIDE = [0.1, 0.4]  # wide enough that clipping acts
WEIGHTS = [0.3, 0.7]
DIFFUSERS_NUMPY2_WARNING = "ignore:__array__ implementation:DeprecationWarning"
pytestmark = pytest.mark.filterwarnings(DIFFUSERS_NUMPY2_WARNING)


def setup(prediction_type: str = "epsilon", T: int = 1000):
    d = GaussianDiffusion(num_timesteps=T, prediction_type=prediction_type)
    x_t = torch.randn(256, 1, 2, generator=gen(0))
    return d, MixtureOracle(d, MEANS, WIDE, WEIGHTS), x_t


def diffusers_loop(scheduler, model, x, steps: int | None = None, **step_kwargs) -> torch.Tensor:
    for t in scheduler.timesteps[:steps]:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


def sigma_of(d: GaussianDiffusion, ts: list[int]) -> np.ndarray:
    ac = d.alphas_cumprod_f64.numpy()[ts]
    return np.sqrt((1.0 - ac) / ac)


# ------------------------------------------------------------------------ grids
@pytest.mark.parametrize(("T", "n"), [(1000, 10), (1000, 25), (200, 7)])
def test_solver_grids_are_diffusers_timesteps(T, n) -> None:
    """One ``spacing`` vocabulary (ddpm.diffusion.samplers.timesteps) == diffusers' schedulers."""
    pytest.importorskip("diffusers")
    from diffusers import (
        DPMSolverMultistepScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    d = GaussianDiffusion(num_timesteps=T)
    betas = d.betas.double().numpy()
    table = [
        ("uniform", {"timestep_spacing": "linspace"}),
        ("leading", {"timestep_spacing": "leading"}),
        ("trailing", {"timestep_spacing": "trailing"}),
        ("karras", {"use_karras_sigmas": True}),
    ]
    for ours, theirs in table:
        for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
            s = cls(num_train_timesteps=T, trained_betas=betas, **theirs)
            s.set_timesteps(n)
            assert dpm_solver_timesteps(d, n, ours) == s.timesteps.tolist(), (cls, ours)
        s = HeunDiscreteScheduler(num_train_timesteps=T, trained_betas=betas, **theirs)
        s.set_timesteps(n)
        # diffusers' Heun keeps fractional timesteps (linspace, Karras); ours are the nearest
        theirs_t = torch.unique_consecutive(s.timesteps).round().long().tolist()
        assert step_timesteps(d, n, ours) == theirs_t, ours


def test_karras_grid_is_rounded_in_log_sigma_and_used_as_rounded() -> None:
    d = GaussianDiffusion(num_timesteps=1000)
    ts = karras_timesteps(d, 10)
    assert ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    all_sigma = sigma_of(d, list(range(1000)))
    ramp = np.linspace(0, 1, 10)
    rho = 7.0
    karras = (
        all_sigma[-1] ** (1 / rho) + ramp * (all_sigma[0] ** (1 / rho) - all_sigma[-1] ** (1 / rho))
    ) ** rho
    nearest = np.abs(np.log(all_sigma)[None] - np.log(karras)[:, None]).argmin(1)
    assert ts == nearest.tolist()
    with pytest.raises(ValueError, match="distinct timesteps"):  # ρ = 7 crowds σ_min
        karras_timesteps(d, 80)


# ------------------------------------------------------------------------ DPM-Solver++
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_sde_matches_diffusers(order, clip) -> None:
    """DPM-Solver++(2M) SDE == diffusers' ``algorithm_type="sde-dpmsolver++"``, same noise."""
    pytest.importorskip("diffusers")
    from diffusers import DPMSolverMultistepScheduler

    d, o, x_t = setup()
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=d.betas.double().numpy(),
        solver_order=order,
        algorithm_type="sde-dpmsolver++",
        thresholding=clip,
        sample_max_value=1.0,
    )
    s.set_timesteps(12)
    theirs = diffusers_loop(s, o, x_t, generator=gen(3))
    ours = dpm_solver_sample(
        o,
        d,
        None,
        steps=12,
        order=order,
        algorithm_type="sde-dpmsolver++",
        noise=x_t,
        clip_denoised=clip,
        generator=gen(3),
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_on_karras_grid_matches_diffusers(order) -> None:
    """Karras grid: the solver runs on the σ of the rounded timesteps (diffusers with the same
    timesteps); it differs from diffusers' own Karras run only by that rounding of σ."""
    pytest.importorskip("diffusers")
    from diffusers import DPMSolverMultistepScheduler

    d, o, x_t = setup()
    kwargs = {"trained_betas": d.betas.double().numpy(), "solver_order": order}
    s = DPMSolverMultistepScheduler(num_train_timesteps=1000, **kwargs)
    s.set_timesteps(timesteps=karras_timesteps(d, 15))
    ours = dpm_solver_sample(
        o, d, None, steps=15, order=order, spacing="karras", noise=x_t, clip_denoised=False
    )
    torch.testing.assert_close(ours, diffusers_loop(s, o, x_t), rtol=1e-4, atol=2e-5)
    s = DPMSolverMultistepScheduler(num_train_timesteps=1000, use_karras_sigmas=True, **kwargs)
    s.set_timesteps(15)
    assert (ours - diffusers_loop(s, o, x_t)).abs().max() < 0.05


# ------------------------------------------------------------------------ DPM-Solver++, continuous
class RandomNet(torch.nn.Module):
    """A fixed random network F(x_in, τ) (tanh MLP on (x, τ/250)): x̂₀ is nonlinear in x and τ,
    so every history term of a multistep solver shows in the result."""

    def __init__(self, dim: int = 2, width: int = 32) -> None:
        super().__init__()
        g = gen(11)
        self.w1 = torch.randn(dim + 1, width, generator=g) / math.sqrt(dim + 1)
        self.b1 = torch.randn(width, generator=g)
        self.w2 = torch.randn(width, dim, generator=g) / math.sqrt(width)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        tau = tau.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))).expand(*x.shape[:-1], 1)
        h = torch.tanh(torch.cat([x, tau / 250.0], -1) @ self.w1.to(x.dtype) + self.b1.to(x.dtype))
        return h @ self.w2.to(x.dtype)


def edm_loop(scheduler, net, x, generator) -> torch.Tensor:
    """diffusers' EDM pipeline loop: net(c_in x, c_noise), x̂₀ = c_skip x + c_out F in step."""
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = net(x_in, t.reshape(1).expand(x.shape[0]))
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


DPM_CONTINUOUS_RUNS = [
    # (order, algorithm_type, steps, clip): < 15 steps exercises lower_order_final
    (2, "dpmsolver++", 10, False),
    (2, "dpmsolver++", 25, True),
    (3, "dpmsolver++", 10, True),
    (3, "dpmsolver++", 25, False),
    (1, "sde-dpmsolver++", 10, False),
    (2, "sde-dpmsolver++", 12, True),
    (2, "sde-dpmsolver++", 25, False),
]


def assert_same_and_clipped(ours: torch.Tensor, theirs: torch.Tensor, clip: bool) -> None:
    """Ours equals diffusers' sample, and thresholding acted exactly when it was asked for."""
    assert theirs.abs().max() == 1.0 if clip else theirs.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance_preserving", [False, True])
@pytest.mark.parametrize(("order", "algorithm_type", "steps", "clip"), DPM_CONTINUOUS_RUNS)
def test_dpm_solver_on_edm_matches_diffusers_edm_dpm_solver(
    variance_preserving, order, algorithm_type, steps, clip
) -> None:
    """DPM-Solver++ (2M, 3M, 2M SDE) on EDM's process == diffusers'
    ``EDMDPMSolverMultistepScheduler`` (Karras σ, ρ = 7, σ ∈ [0.002, 80], then σ = 0;
    ``final_sigmas_type="zero"``, its "epsilon" output is EDM's F): same network, same x_T, same
    SDE noise. diffusers works on the VE variable; on the VP process x = α·x_VE at every step and
    α = 1 at σ = 0, so the samples are the same. (diffusers' EDM scheduler has no third-order SDE
    step.)"""
    pytest.importorskip("diffusers")
    from diffusers import EDMDPMSolverMultistepScheduler

    process = EDMProcess(variance_preserving=variance_preserving)
    net = RandomNet()
    solver = {"order": order, "algorithm_type": algorithm_type, "clip_denoised": clip}
    noise = torch.randn(256, 1, 2, generator=gen(4))
    s = EDMDPMSolverMultistepScheduler(
        solver_order=order, algorithm_type=algorithm_type, thresholding=clip, sample_max_value=1.0
    )
    s.set_timesteps(steps)
    np.testing.assert_allclose(s.sigmas[:-1].numpy(), karras_timesteps(process, steps), rtol=1e-5)
    theirs = edm_loop(s, net, noise * s.init_noise_sigma, gen(7))
    ours = dpm_solver_sample(
        net, process, None, steps=steps, spacing="karras", noise=noise, generator=gen(7), **solver
    )
    assert_same_and_clipped(ours, theirs, clip)


@pytest.mark.parametrize("spacing", ["karras", "logSNR"])
@pytest.mark.parametrize(("order", "algorithm_type", "steps", "clip"), DPM_CONTINUOUS_RUNS)
def test_dpm_solver_on_rectified_flow_matches_diffusers_flow_sigmas(
    spacing, order, algorithm_type, steps, clip
) -> None:
    """DPM-Solver++ on rectified flow == diffusers' ``DPMSolverMultistepScheduler(
    use_flow_sigmas=True, prediction_type="flow_prediction")`` (α = 1 - σ, x̂₀ = x - σ·u) run on
    our grid: diffusers' step reads only its ``sigmas``, which are set to our times then 0.

    Two documented differences of diffusers' own run, hence the shared grid: (1) its flow grid is
    ours shifted by -1/T, linspace(1 - 1/T, 0, n+1) without the 0 (ours: linspace(1, 1/T, n+1)
    without the last, so that x_T = ε exactly at t = 1); (2) at t = 1 itself (α = 0: our
    ``uniform`` grid's first point) diffusers takes λ = -∞, which zeroes the next step's
    divided difference D1, while ours uses α² = 2⁻²⁴ (``ZERO_SNR_ALPHA_CUMPROD``, diffusers'
    own convention for zero-terminal-SNR schedules): the samples then differ by ~1e-3 with this
    network. The ``karras`` and ``logSNR`` grids start at α = 2⁻¹² > 0 and compare exactly."""
    pytest.importorskip("diffusers")
    from diffusers import DPMSolverMultistepScheduler

    process, T = RectifiedFlow(num_timesteps=1000), 1000
    kwargs = {"solver_order": order, "algorithm_type": algorithm_type, "thresholding": clip}
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        sample_max_value=1.0,
        **kwargs,
    )
    s.set_timesteps(steps)
    np.testing.assert_allclose(  # (1): diffusers' grid is our uniform one minus 1/T
        s.sigmas[:-1].numpy() + 1.0 / T, dpm_solver_timesteps(process, steps, "uniform"), 1e-6
    )
    ts = dpm_solver_timesteps(process, steps, spacing)
    assert ts[0] < 1.0 and 1.0 - ts[0] == pytest.approx(2.0**-12, rel=1e-3)
    s.sigmas = torch.tensor([*ts, 0.0], dtype=torch.float32)
    s.timesteps = torch.tensor(ts, dtype=torch.float64) * T
    net = RandomNet()
    solver = {"order": order, "algorithm_type": algorithm_type, "clip_denoised": clip}
    noise = torch.randn(256, 1, 2, generator=gen(4))
    theirs = diffusers_loop(s, net, noise * process.prior_std(ts[0]), generator=gen(7))
    ours = dpm_solver_sample(
        net, process, None, steps=steps, spacing=spacing, noise=noise, generator=gen(7), **solver
    )
    assert_same_and_clipped(ours, theirs, clip)


def _local_error(order: int, sde: bool, scale: float) -> float:
    """|x̂₀-part of one step - its exact value| for a smooth x̂₀(λ) (the third step of a grid)."""
    from scipy.integrate import quad

    lam = -0.5 + scale * np.array([-0.5, -0.2, 0.0, 0.3])  # λ at s_2, s_1, s_0 and t
    ac = 1.0 / (1.0 + np.exp(-2.0 * lam))  # λ = log(α/σ), α² = ᾱ
    ac = np.append(ac, 0.5)
    c = dpm_solver_coefficients(np.sqrt(ac), np.sqrt(1 - ac), order, False, sde)[2]

    def x0(lm: float) -> float:
        return math.sin(2.0 * lm) + 0.3 * lm**3

    h, alpha_t = lam[3] - lam[2], math.sqrt(ac[3])
    k = 2.0 if sde else 1.0  # x_t = ... + k α_t ∫ e^{-k(λ_t - λ)} x̂₀(λ) dλ
    exact = alpha_t * quad(lambda u: k * math.exp(-k * u) * x0(lam[3] - u), 0.0, h)[0]
    ours = c[1] * x0(lam[2]) + c[2] * x0(lam[1]) + c[3] * x0(lam[0])
    return abs(ours - exact)


@pytest.mark.parametrize("sde", [False, True])
def test_dpm_solver_multistep_local_order(sde) -> None:
    """The 3M step integrates x̂₀(λ) with local error O(h³) or better, 2M with O(h³) at most
    (ODE, and the SDE's mean with e^{-2h} weights): halving the steps divides the error by
    >= 6 for order 3. diffusers' SDE third-order coefficient (sign of the 1/2 in D2) gives 4."""
    for order, min_ratio in ((3, 6.0), (2, 3.0)):
        errors = [_local_error(order, sde, s) for s in (0.5, 0.25, 0.125)]
        assert errors[0] / errors[1] > min_ratio and errors[1] / errors[2] > min_ratio, errors
    assert _local_error(3, sde, 0.125) < _local_error(2, sde, 0.125)
    # the noise and the x coefficient of the SDE step: σ_t √(1 - e^{-2h}) and (σ_t/σ_s) e^{-h}
    ac = np.array([0.3, 0.6])
    a, _, _, _, s = dpm_solver_coefficients(np.sqrt(ac), np.sqrt(1 - ac), 2, True, sde)[0]
    h = 0.5 * (math.log(0.6 / 0.4) - math.log(0.3 / 0.7))
    ratio = math.sqrt(0.4 / 0.7)
    assert math.isclose(a, ratio * (math.exp(-h) if sde else 1.0), rel_tol=1e-12)
    assert math.isclose(s, math.sqrt(0.4) * math.sqrt(1 - math.exp(-2 * h)) if sde else 0.0)


# ------------------------------------------------------------------------ UniPC
@pytest.mark.parametrize(
    ("order", "solver_type", "spacing", "clip"),
    [
        (1, "bh2", "uniform", False),
        (2, "bh2", "uniform", True),
        (3, "bh2", "trailing", False),
        (2, "bh1", "leading", False),
        (3, "bh1", "uniform", True),
    ],
)
def test_unipc_matches_diffusers(order, solver_type, spacing, clip) -> None:
    pytest.importorskip("diffusers")
    from diffusers import UniPCMultistepScheduler

    d, o, x_t = setup()
    theirs_spacing = "linspace" if spacing == "uniform" else spacing
    s = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=d.betas.double().numpy(),
        solver_order=order,
        solver_type=solver_type,
        timestep_spacing=theirs_spacing,
        thresholding=clip,
        sample_max_value=1.0,
    )
    s.set_timesteps(10)
    kwargs = {"order": order, "solver_type": solver_type, "spacing": spacing}
    ours, inter = unipc_sample(
        o, d, None, steps=10, noise=x_t, clip_denoised=clip, return_intermediates=True, **kwargs
    )
    # the state before the last step: the network input at the last timestep
    torch.testing.assert_close(
        inter["x_t"][-1], diffusers_loop(s, o, x_t, steps=9), rtol=1e-4, atol=2e-5
    )
    torch.testing.assert_close(ours, inter["pred_xstart"][-1])  # the last step returns x̂₀
    if solver_type == "bh2":
        s.set_timesteps(10)
        torch.testing.assert_close(ours, diffusers_loop(s, o, x_t), rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------------ Heun
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(("spacing", "clip"), [("karras", False), ("trailing", True)])
def test_heun_matches_diffusers(prediction_type, spacing, clip) -> None:
    """EDM Heun (s_churn = 0) == HeunDiscreteScheduler on our integer timesteps; diffusers works
    on x_σ = x_t/√ᾱ and scales the network input back."""
    pytest.importorskip("diffusers")
    from diffusers import HeunDiscreteScheduler

    d, o, x_t = setup(prediction_type)
    ts = step_timesteps(d, 8, spacing)
    s = HeunDiscreteScheduler(
        num_train_timesteps=1000,
        trained_betas=d.betas.double().numpy(),
        prediction_type=prediction_type,
        clip_sample=clip,
    )
    s.set_timesteps(timesteps=[float(t) for t in ts])
    x = x_t * math.sqrt(1.0 + sigma_of(d, ts[:1])[0] ** 2)
    calls = 0
    for t in s.timesteps:
        inp = s.scale_model_input(x, t)
        x = s.step(o(inp, t.round().long().expand(x.shape[0])), t, x).prev_sample
        calls += 1
    ours = heun_sample(o, d, None, steps=8, spacing=spacing, noise=x_t, clip_denoised=clip)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=2e-5)
    assert calls == 2 * 8 - 1


def test_heun_churn_is_edm_algorithm_2() -> None:
    """S_churn > 0 raises σ_i to the discrete σ nearest (1+γ) σ_i and adds noise of variance
    σ̂² - σ²: the samples change, the distribution (Gaussian data) stays right up to the
    discretisation bias (variance +6.5% at 40 steps, +25% at 20: measured)."""
    d = GaussianDiffusion(num_timesteps=1000)
    o = GaussianOracle(d, [0.2, -0.3], 0.5)
    x_t = torch.randn(16000, 2, generator=gen(1))
    plain = heun_sample(o, d, None, steps=40, noise=x_t, clip_denoised=False)
    o.calls = 0
    churn, inter = heun_sample(
        o,
        d,
        None,
        steps=40,
        s_churn=10.0,
        s_tmin=0.05,
        s_tmax=50.0,
        noise=x_t,
        generator=gen(2),
        clip_denoised=False,
        return_intermediates=True,
    )
    assert o.calls == 2 * 40 - 1
    assert (churn - plain).abs().mean() > 0.05
    sig = sigma_of(d, list(range(1000)))
    grid = step_timesteps(d, 40, "karras")
    gamma = min(10.0 / 40, math.sqrt(2) - 1)
    expected = [
        int(np.abs(sig - (1 + gamma) * sig[t]).argmin()) if 0.05 <= sig[t] <= 50 else t
        for t in grid
    ]
    assert inter["timesteps"].tolist() == expected and expected != grid
    torch.testing.assert_close(churn.mean(0), torch.tensor([0.2, -0.3]), rtol=0, atol=0.02)
    assert abs(churn.var(0).mean().item() / 0.25 - 1) < 0.1  # s.e. 0.8%


# ------------------------------------------------------------------------ closed-form ODE
def _pf_ode_error(run, steps: int) -> float:
    """Mean |x - exact| for N(μ, I) data, where the probability-flow ODE is solved in closed
    form: (x_σ - μ)/√(1 + σ²) is constant along it, x_σ = x_t/√ᾱ (so x₀ = μ + (x_σ - μ)/√(1+σ²)
    from the first timestep, t = T-1 for every grid used here)."""
    d = GaussianDiffusion(num_timesteps=1000)
    mu = torch.tensor([0.2, -0.3])
    x_t = torch.randn(2000, 2, generator=gen(0))
    sigma = sigma_of(d, [999])[0]
    x_sigma = x_t * math.sqrt(1.0 + sigma**2)
    exact = mu + (x_sigma - mu) / math.sqrt(1.0 + sigma**2)
    x = run(GaussianOracle(d, mu, 1.0), d, x_t, steps)
    return (x - exact).abs().mean().item()


ODE_SOLVERS = {
    # name: (run, min and max error ratio from N = 20 to 40 steps)
    "ddim": (
        lambda o, d, x, n: ddim_sample(o, d, None, steps=n, noise=x, clip_denoised=False),
        1.8,
        2.2,
    ),
    "dpm_solver_2m": (
        lambda o, d, x, n: dpm_solver_sample(
            o, d, None, steps=n, spacing="karras", noise=x, clip_denoised=False
        ),
        3.5,
        math.inf,
    ),
    "dpm_solver_3m": (
        lambda o, d, x, n: dpm_solver_sample(
            o, d, None, steps=n, order=3, spacing="karras", noise=x, clip_denoised=False
        ),
        5.0,
        math.inf,
    ),
    "unipc_bh1_2": (
        lambda o, d, x, n: unipc_sample(
            o, d, None, steps=n, solver_type="bh1", spacing="karras", noise=x, clip_denoised=False
        ),
        3.5,
        math.inf,
    ),
    "unipc_bh2_3": (
        lambda o, d, x, n: unipc_sample(
            o, d, None, steps=n, order=3, spacing="karras", noise=x, clip_denoised=False
        ),
        5.0,
        math.inf,
    ),
    "heun": (
        lambda o, d, x, n: heun_sample(o, d, None, steps=n, noise=x, clip_denoised=False),
        3.5,
        math.inf,
    ),
}


@pytest.mark.parametrize("name", list(ODE_SOLVERS))
def test_ode_solvers_converge_to_the_exact_flow(name) -> None:
    """Against the closed-form solution: DDIM is first order (error halves with twice the
    steps), the others converge at second order or better on the Karras grid (whose last step,
    σ(0) = 0.01 -> 0, adds only O(σ_min²)); measured ratios 2.0 / 4.7 / 6.2 / 12 / 26 / 4.5."""
    run, low, high = ODE_SOLVERS[name]
    e20, e40 = _pf_ode_error(run, 20), _pf_ode_error(run, 40)
    assert low < e20 / e40 < high, (e20, e40)
    assert e40 < (0.04 if name == "ddim" else 0.01)


# ------------------------------------------------------------------------ distribution
MOMENT_RUNS = {
    # name: (schedule, sampler keyword arguments, variance tolerance = measured bias + 4 s.e.)
    "dpm_solver_3m": ("cosine", dpm_solver_sample, {"steps": 15, "order": 3}, 0.08),
    "dpm_solver_sde_2m": (
        "cosine",
        dpm_solver_sample,
        {"steps": 40, "algorithm_type": "sde-dpmsolver++"},
        0.09,
    ),
    "dpm_solver_sde_3m": (
        "cosine",
        dpm_solver_sample,
        {"steps": 40, "order": 3, "algorithm_type": "sde-dpmsolver++"},
        0.07,
    ),
    "unipc": ("cosine", unipc_sample, {"steps": 15}, 0.06),
    "heun": ("linear", heun_sample, {"steps": 20, "spacing": "uniform"}, 0.08),
}


@pytest.mark.parametrize("name", list(MOMENT_RUNS))
def test_solvers_reproduce_gaussian_moments(name) -> None:
    """Data N(μ, 0.5² I), 16000 samples: mean and variance (s.e. 0.004 and 0.8%). Measured
    variance bias: 3M -4.2%, SDE 2M +5.1%, SDE 3M +2.6%, UniPC -1.9%, Heun +4.4%. (Heun on the
    cosine schedule, σ(T-1) = 2·10⁴, takes one huge first step: 5.8x the variance at 20 steps, measured.)"""
    schedule, fn, kwargs, var_tol = MOMENT_RUNS[name]
    d = GaussianDiffusion(num_timesteps=1000, schedule=schedule)
    o = GaussianOracle(d, [0.2, -0.3], 0.5)
    x = fn(o, d, (16000, 2), generator=gen(3), clip_denoised=False, **kwargs)
    torch.testing.assert_close(x.mean(0), torch.tensor([0.2, -0.3]), rtol=0, atol=0.02)
    assert abs(x.var(0).mean().item() / 0.25 - 1.0) < var_tol


def test_solver_configs_validate_once() -> None:
    with pytest.raises(ValueError, match="algorithm_type must be one of"):
        DPMSolverSampler(algorithm_type="sde-dpmsolver")
    with pytest.raises(ValueError, match="solver_type must be one of"):
        UniPCSampler(solver_type="bh3")
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        UniPCSampler(order=4)
    with pytest.raises(ValueError, match="spacing must be one of"):
        UniPCSampler(spacing="quadratic")
    with pytest.raises(ValueError, match="spacing must be one of"):
        HeunSampler(spacing="lognormal")
    with pytest.raises(ValueError, match="s_churn must be"):
        HeunSampler(s_churn=-1.0)
    with pytest.raises(ValueError, match="s_tmax must be >= s_tmin"):
        HeunSampler(s_tmin=2.0, s_tmax=1.0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        HeunSampler(guidance_scale=float("nan"))
    d = GaussianDiffusion(num_timesteps=100)
    with pytest.raises(ValueError, match="karras"):
        heun_sample(GaussianOracle(d, [0.0, 0.0], 1.0), d, (2, 2), steps=60)


def test_auto_spacing_on_edm_is_log_snr_for_the_solvers_and_karras_for_heun() -> None:
    """EDM's process: DPM-Solver++ and UniPC take λ-uniform grids (Lu et al. 2022's choice for
    low-resolution images), the step samplers Karras's ρ = 7 grid (EDM's Heun). With the exact
    denoiser of N(μ, s²) data (μ, s: the digits' pixel mean and std), 10 DPM-Solver++(2M) steps
    on the auto grid land closer to the exact ODE endpoint than on Karras's grid."""
    process = EDMProcess()
    assert dpm_solver_timesteps(process, 10) == dpm_solver_timesteps(process, 10, "logSNR")
    assert step_timesteps(process, 18) == step_timesteps(process, 18, "karras")
    mu, s = -0.39, 0.64
    oracle = ProcessGaussianOracle(process, mu, s, lambda tau: math.exp(4 * tau))
    z = torch.randn(4000, 4, generator=gen(0), dtype=torch.float64)
    x_max = process.sigma_max * z
    exact = mu + s * (x_max - mu) / math.sqrt(s**2 + process.sigma_max**2)  # the linear PF-ODE map
    errors = {
        spacing: (dpm_solver_sample(oracle, process, None, steps=10, spacing=spacing, noise=z,
                                    clip_denoised=False) - exact).abs().max().item()
        for spacing in ("auto", "karras")
    }  # fmt: skip
    assert errors["auto"] < 0.5 * errors["karras"], errors
