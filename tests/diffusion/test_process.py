"""The process family in closed form: EDM's preconditioning (Karras et al. 2022, Table 1), its
ρ = 7 noise levels, exact conversions between parameterisations on every process, the flow
matching target, the training-time distributions, Euler against diffusers' EDM and flow-matching
schedulers, and the Langevin corrector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import (
    EDMProcess,
    FlowTimestepSampler,
    GaussianDiffusion,
    LogNormalTimestepSampler,
    RectifiedFlow,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    heun_sample,
    karras_timesteps,
    step_timesteps,
    unipc_sample,
)
from oracles import ProcessGaussianOracle, gen

SD = 0.5  # σ_data


def processes() -> dict[str, object]:
    return {
        "ddpm": GaussianDiffusion(schedule="cosine", num_timesteps=100, prediction_type="sample"),
        "edm": EDMProcess(),
        "edm_vp": EDMProcess(variance_preserving=True),
        "rf": RectifiedFlow(),
    }


def random_times(process, n: int, g: torch.Generator) -> torch.Tensor:
    if process.discrete:
        return torch.randint(0, process.num_timesteps, (n,), generator=g)
    if process.time_domain == "sigma":
        return torch.exp(torch.empty(n).uniform_(math.log(0.002), math.log(80.0), generator=g))
    return torch.empty(n).uniform_(0.001, 0.999, generator=g)


def test_edm_preconditioning_is_table_1() -> None:
    """c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ¼ ln σ;
    the VP form gives the same D(x̃; σ̃) of x̃ = x/α."""
    sig = np.array([0.002, 0.05, 0.5, 3.0, 80.0])
    ve, vp = EDMProcess(), EDMProcess(variance_preserving=True)
    p = ve.preconditioning_np(sig)
    root = np.sqrt(sig**2 + SD**2)
    np.testing.assert_allclose(p.c_skip, SD**2 / root**2, rtol=1e-12)
    np.testing.assert_allclose(p.c_out, sig * SD / root, rtol=1e-12)
    np.testing.assert_allclose(p.c_in, 1.0 / root, rtol=1e-12)
    np.testing.assert_allclose(ve.net_time_np(sig), 0.25 * np.log(sig), rtol=1e-12)
    q = vp.preconditioning_np(sig)
    alpha, sigma = vp.alpha_sigma_np(sig)
    np.testing.assert_allclose(sigma / alpha, sig, rtol=1e-12)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
    # x = α x̃: the network sees the same input, and x̂₀ is the same function of x̃ and F
    np.testing.assert_allclose(q.c_in * alpha, p.c_in, rtol=1e-12)
    np.testing.assert_allclose(q.c_skip * alpha, p.c_skip, rtol=1e-12)
    np.testing.assert_allclose(q.c_out, p.c_out, rtol=1e-12)


@pytest.mark.parametrize("vp", [False, True])
def test_edm_target_has_unit_variance_and_the_optimal_denoiser_minimises_the_loss(vp) -> None:
    g = gen(0)
    process = EDMProcess(variance_preserving=vp)
    n = 200_000
    for sig in (0.01, 0.3, 2.0, 50.0):
        t = torch.full((n,), sig)
        x0 = SD * torch.randn(n, 1, generator=g)  # data of std σ_d
        eps = torch.randn(n, 1, generator=g)
        target = process.training_target(x0, eps, t)
        assert abs(target.var().item() - 1.0) < 0.02, sig
        # other data: the loss of the optimal denoiser is Var[x₀|x]/c_out², and it is the minimum
        mu, s = 0.2, 0.3
        x0 = mu + s * torch.randn(n, 1, generator=g)
        x = process.q_sample(x0, t, eps)
        target = process.training_target(x0, eps, t).double()
        oracle = ProcessGaussianOracle(process, mu, s, lambda tau: math.exp(4 * tau))
        x_in = x * process.preconditioning(t[:1], 2).c_in[0]  # unit variance at every σ
        f_opt = oracle(x_in, process.net_time(t[:1]))
        (alpha,), (sigma,) = process.alpha_sigma_np([sig])
        c_out = process.preconditioning_np([sig]).c_out[0]
        post_var = s**2 * sigma**2 / (alpha**2 * s**2 + sigma**2)
        assert _mse(f_opt, target) == pytest.approx(post_var / c_out**2, rel=0.02), sig
        for f in (f_opt + 0.05, f_opt - 0.05, f_opt + 0.1 * x_in):
            assert _mse(f, target) > _mse(f_opt, target)


@pytest.mark.parametrize(("schedule", "T"), [("linear", 100), ("cosine", 1000), ("cosine", 3)])
def test_ddpm_continuous_extension_is_a_monotone_c1_log_snr(schedule, T) -> None:
    """DDPM's chain at fractional t: λ passes through every timestep's, decreases, and dλ/dt
    (the velocity's factor) is its derivative and continuous across the timesteps."""
    d = GaussianDiffusion(schedule=schedule, num_timesteps=T)
    table = d.log_snr_np(np.arange(T))
    t = np.linspace(0.0, T - 1.0, 8 * (T - 1) + 1)
    lam, dlam = d._interpolate_log_snr(t)
    np.testing.assert_allclose(lam[::8], table, rtol=0, atol=1e-12)
    assert np.all(np.diff(lam) < 0) and np.all(dlam < 0)
    h = 1e-6  # central differences, across the knots too
    numeric = (d._interpolate_log_snr(t[1:-1] + h)[0] - d._interpolate_log_snr(t[1:-1] - h)[0]) / (
        2 * h
    )
    np.testing.assert_allclose(numeric, dlam[1:-1], rtol=1e-5, atol=1e-6)
    # the tensor path is the same function
    lam_t, dlam_t = d._interpolate_log_snr(torch.from_numpy(t))
    np.testing.assert_allclose(lam_t.numpy(), lam, rtol=1e-12)
    np.testing.assert_allclose(dlam_t.numpy(), dlam, rtol=1e-12)
    # α̇, σ̇ of the extension are the derivatives of its α, σ
    tf = torch.tensor([0.25, 0.5 * (T - 1), T - 1.25], dtype=torch.float64).clamp(min=0.1)
    a_dot, s_dot = d.alpha_sigma_dot_np(tf.numpy())
    (a_p, s_p), (a_m, s_m) = (d.alpha_sigma_np(tf.numpy() + e) for e in (h, -h))
    np.testing.assert_allclose((a_p - a_m) / (2 * h), a_dot, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose((s_p - s_m) / (2 * h), s_dot, rtol=1e-4, atol=1e-6)


def _mse(f: torch.Tensor, target: torch.Tensor) -> float:
    return ((f.double() - target) ** 2).mean().item()


def test_karras_noise_levels_rho_7() -> None:
    """EDM's 18 σ_i = (σ_max^(1/ρ) + i/17 (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, from 80 to 0.002."""
    ts = np.asarray(karras_timesteps(EDMProcess(), 18))
    i = np.arange(18)
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(ts, want, rtol=1e-12)
    assert step_timesteps(EDMProcess(), 18) == ts.tolist()  # EDM's natural grid
    # the VP form shares it; rectified flow's natural grid is uniform in t from 1 to 1/T
    assert step_timesteps(EDMProcess(variance_preserving=True), 18) == ts.tolist()
    np.testing.assert_allclose(step_timesteps(RectifiedFlow(), 5), np.linspace(1, 1e-3, 5))


@pytest.mark.parametrize("name", ["ddpm", "edm", "edm_vp", "rf"])
def test_conversions_between_parameterisations_are_exact(name) -> None:
    """F* of each parameterisation maps back to (x₀, ε) exactly; the velocity is α̇x₀ + σ̇ε.
    DDPM's chain also at fractional t (the continuous extension the PF-ODE likelihood reads:
    every conversion, ε's included, and the SNR use the interpolated α(t), σ(t), not the
    timestep below)."""
    base = processes()[name]
    g = gen(1)
    x0, eps = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    t = random_times(base, 64, g)
    times = [t]
    if base.discrete:
        frac = (t.double() + torch.rand(64, generator=g, dtype=torch.float64)).clamp(max=99.0)
        times.append(frac.float())
    for pt in base.prediction_types:
        if name == "rf" and pt == "epsilon":
            continue
        if base.discrete:
            process = GaussianDiffusion(schedule="cosine", num_timesteps=100, prediction_type=pt)
        else:
            process = type(base)(
                prediction_type=pt, **({"variance_preserving": True} if name == "edm_vp" else {})
            )
        for t in times:
            x_t = process.q_sample(x0, t, eps)
            f = process.training_target(x0, eps, t)
            x0_hat, eps_hat = process.model_predictions(f, x_t, t, clip_denoised=False)
            torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4, msg=pt)
            torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4, msg=pt)
            alpha, sigma = process.alpha_sigma(t, 1)
            torch.testing.assert_close(process.snr(t), (alpha**2 / sigma**2).reshape(t.shape))
            if base.discrete and not t.is_floating_point():
                continue
            alpha_dot, sigma_dot = process.alpha_sigma_dot(t, 2)
            torch.testing.assert_close(
                process.velocity(x_t, t, x0), alpha_dot * x0 + sigma_dot * eps, atol=1e-4, rtol=1e-4
            )


def test_flow_matching_target_and_path() -> None:
    rf = RectifiedFlow()
    g = gen(2)
    x0, eps, t = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g), torch.rand(16)
    torch.testing.assert_close(rf.q_sample(x0, t, eps), (1 - t[:, None]) * x0 + t[:, None] * eps)
    torch.testing.assert_close(rf.training_target(x0, eps, t), eps - x0)
    assert rf.net_time(torch.tensor([0.25])).item() == 250.0
    with pytest.raises(ValueError, match="epsilon"):
        RectifiedFlow(prediction_type="epsilon")


def test_training_time_distributions() -> None:
    g = gen(3)
    sigma, w = LogNormalTimestepSampler().sample(100_000, "cpu", g)
    assert torch.all(w == 1.0)
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.02)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.02)
    t, _ = FlowTimestepSampler("logit_normal").sample(100_000, "cpu", g)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.0, abs=0.02)
    assert logit.std().item() == pytest.approx(1.0, abs=0.02)
    u, _ = FlowTimestepSampler("uniform").sample(100_000, "cpu", g)
    assert 0.0 <= u.min() and u.max() <= 1.0 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="t_sampling"):
        FlowTimestepSampler("beta")
    with pytest.raises(ValueError, match="domain"):
        LogNormalTimestepSampler().check(RectifiedFlow())


def _diffusers_loop(scheduler, net, x: torch.Tensor) -> torch.Tensor:
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(net(x_in, t.reshape(1).expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [4, 12])
def test_euler_on_edm_is_diffusers_edm_euler(steps) -> None:
    from diffusers import EDMEulerScheduler

    process = EDMProcess()
    oracle = ProcessGaussianOracle(process, 0.3, 0.2, lambda tau: math.exp(4 * tau))
    noise = torch.randn(256, 2, generator=gen(4), dtype=torch.float64)
    s = EDMEulerScheduler()  # its "epsilon" output is EDM's F (c_skip x + c_out F)
    s.set_timesteps(steps)
    theirs = _diffusers_loop(s, oracle, noise * s.init_noise_sigma)
    ours = ddim_sample(oracle, process, None, steps=steps, noise=noise.float(), clip_denoised=False)
    torch.testing.assert_close(ours, theirs.float(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [3, 10])
def test_euler_on_rectified_flow_is_diffusers_flow_match_euler(steps) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    process = RectifiedFlow()
    oracle = ProcessGaussianOracle(process, 0.3, 0.2, lambda tau: tau / 1000.0)
    noise = torch.randn(256, 2, generator=gen(5), dtype=torch.float64)
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    s.set_timesteps(steps)
    theirs = _diffusers_loop(s, oracle, noise.clone())
    ours = ddim_sample(oracle, process, None, steps=steps, noise=noise.float(), clip_denoised=False)
    torch.testing.assert_close(ours, theirs.float(), atol=2e-4, rtol=1e-4)


def test_heun_on_edm_is_algorithm_1() -> None:
    """Karras et al. 2022, Alg. 1 on a 1-D Gaussian N(0, s²) written out with D(x; σ) =
    s²/(s² + σ²) x: the same numbers as heun_sample (18 steps, ρ = 7)."""
    process, s = EDMProcess(), 0.5
    oracle = ProcessGaussianOracle(process, 0.0, s, lambda tau: math.exp(4 * tau))
    sig = [*karras_timesteps(process, 18), 0.0]
    x = torch.tensor([[1.0], [-0.5]], dtype=torch.float64)
    want = x * math.sqrt(1.0 + 80.0**2)
    for k in range(18):
        d = (want - s**2 / (s**2 + sig[k] ** 2) * want) / sig[k]
        nxt = want + (sig[k + 1] - sig[k]) * d
        if sig[k + 1] > 0:
            d2 = (nxt - s**2 / (s**2 + sig[k + 1] ** 2) * nxt) / sig[k + 1]
            nxt = want + (sig[k + 1] - sig[k]) * 0.5 * (d + d2)
        want = nxt
    ours = heun_sample(oracle, process, None, steps=18, noise=x.float(), clip_denoised=False)
    assert oracle.calls == 35
    torch.testing.assert_close(ours, want.float(), rtol=1e-4, atol=1e-5)


def test_heun_from_alpha_zero_takes_an_euler_first_step() -> None:
    """Rectified flow starts at α = 0 (σ̃ = σ/α floored at 2¹²): Heun's first step there is the
    Euler / DDIM step (exact for a constant x̂₀), its trapezoid skipped: 2N - 2 network calls,
    and the state after it is DDIM's after one step on the same grid."""
    process = RectifiedFlow()
    oracle = ProcessGaussianOracle(process, 0.3, 0.5, lambda tau: tau / 1000.0)
    noise = torch.randn(64, 2, generator=gen(3))
    kw = {"noise": noise, "clip_denoised": False}
    heun_sample(oracle, process, None, steps=6, **kw)
    assert oracle.calls == 2 * 6 - 2
    edm = EDMProcess()
    edm_oracle = ProcessGaussianOracle(edm, 0.3, 0.5, lambda tau: math.exp(4 * tau))
    heun_sample(edm_oracle, edm, None, steps=6, **kw)
    assert edm_oracle.calls == 2 * 6 - 1
    # two Heun steps on a uniform grid of two: Euler to t = 1/2, then Heun to 0; DDIM's first
    # step on the same grid lands on the same point, and Heun's second step is a trapezoid
    _, ddim_rec = ddim_sample(oracle, process, None, steps=2, return_intermediates=1, **kw)
    _, heun_rec = heun_sample(oracle, process, None, steps=2, return_intermediates=1, **kw)
    torch.testing.assert_close(heun_rec["timesteps"], ddim_rec["timesteps"])
    # equal up to the floor α = 2⁻¹² the σ̃-space step starts from (O(α·x̂₀))
    torch.testing.assert_close(heun_rec["x_t"][1], ddim_rec["x_t"][1], rtol=0, atol=2e-3)


@pytest.mark.parametrize("name", ["edm", "edm_vp", "rf"])
def test_every_sampler_reaches_the_data_on_a_continuous_process(name) -> None:
    """With the optimal network every sampler of a continuous process lands on N(μ, s²), its
    error shrinking with the steps (a Gaussian narrower than σ_d is hard for a few steps)."""
    process = processes()[name]
    t_of_tau = (lambda tau: tau / 1000.0) if name == "rf" else (lambda tau: math.exp(4 * tau))
    oracle = ProcessGaussianOracle(process, 0.3, 0.5, t_of_tau)
    noise = torch.randn(4000, 2, generator=gen(6))
    want = 0.5 * noise.std().item()
    common = {"noise": noise, "generator": gen(1), "clip_denoised": False}
    for fn, kw in [
        (ddim_sample, {"steps": 100}),
        (heun_sample, {"steps": 40}),
        (dpm_solver_sample, {"steps": 40}),
        (dpm_solver_sample, {"steps": 60, "algorithm_type": "sde-dpmsolver++"}),
        (unipc_sample, {"steps": 40}),
        (ddpm_sample, {"steps": 200}),
    ]:
        x = fn(oracle, process, None, **kw, **common)
        assert x.mean().item() == pytest.approx(0.3, abs=0.02), (fn.__name__, kw)
        assert x.std().item() == pytest.approx(want, rel=0.04), (fn.__name__, kw)


@pytest.mark.parametrize("name", ["edm", "rf"])
def test_langevin_corrector_fixes_a_coarse_predictor(name) -> None:
    """Song et al. 2021's predictor-corrector: 5 Euler steps alone shrink the data's std;
    Langevin steps with the network's score at each level bring it back, one call each."""
    process = processes()[name]
    t_of_tau = (lambda tau: tau / 1000.0) if name == "rf" else (lambda tau: math.exp(4 * tau))
    oracle = ProcessGaussianOracle(process, 0.0, 0.2, t_of_tau)
    kw = {"steps": 5, "clip_denoised": False}
    plain = ddim_sample(oracle, process, (500, 64), generator=gen(7), **kw)
    calls = oracle.calls
    pc = ddim_sample(
        oracle, process, (500, 64), generator=gen(7), corrector="langevin", corrector_steps=10, **kw
    )
    assert oracle.calls - calls == 5 + 5 * 10
    err_plain, err_pc = abs(plain.std().item() - 0.2), abs(pc.std().item() - 0.2)
    assert err_pc < 0.25 * err_plain, (err_plain, err_pc)
    with pytest.raises(ValueError, match="corrector"):
        ddim_sample(oracle, process, (4, 2), corrector="annealed")


def test_continuous_processes_do_not_export_to_a_ddpm_scheduler() -> None:
    from ddpm.interop.diffusers.errors import InteropError
    from ddpm.interop.diffusers.scheduler import scheduler_config

    for process in (EDMProcess(), RectifiedFlow()):
        with pytest.raises(InteropError, match="continuous process"):
            scheduler_config(process)
