"""Samplers (DDPM, DDIM + inversion, DPM-Solver++) against exact oracles and diffusers.

The oracle denoisers (tests/oracles.py) are Bayes-optimal for Gaussian / Gaussian-mixture data,
so whatever gap remains between samples and data is the sampler's own discretisation error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerSampler,
    GaussianDiffusion,
    HeunSampler,
    UniPCSampler,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    dpm_solver_timesteps,
    heun_sample,
    respace,
    space_timesteps,
    unipc_sample,
)
from ddpm.diffusion.samplers import sample_batches
from ddpm.utils.seeding import PerSampleGenerator
from hydra_utils import compose_group
from oracles import GaussianOracle, MixtureOracle, gen

MU = [0.2, -0.3]
MEANS = [[-0.5, -0.5], [0.5, 0.4]]
STDS = [0.1, 0.15]
WEIGHTS = [0.3, 0.7]


def toy_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An arbitrary smooth network stand-in (outputs beyond [-1, 1] exercise clipping)."""
    tt = t.float().reshape(-1, *([1] * (x.ndim - 1)))
    return 1.5 * torch.sin(2.0 * x + 0.01 * tt) + 0.1 * x


# ------------------------------------------------------------------------ timestep subsets
def test_space_timesteps_match_diffusers_ddim() -> None:
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    for T, n in [(1000, 50), (1000, 7), (100, 100), (10, 3)]:
        for ours, theirs in [
            ("uniform", "linspace"),
            ("leading", "leading"),
            ("trailing", "trailing"),
        ]:
            s = DDIMScheduler(num_train_timesteps=T, timestep_spacing=theirs)
            s.set_timesteps(n)
            assert space_timesteps(T, n, ours) == sorted(s.timesteps.tolist()), (T, n, ours)


def test_space_timesteps_properties() -> None:
    T = 1000
    assert space_timesteps(T, T) == list(range(T))
    assert space_timesteps(T, 1) == [T - 1]
    u = space_timesteps(T, 10)
    assert u[0] == 0 and u[-1] == T - 1 and len(u) == 10
    assert space_timesteps(T, 10, "trailing")[-1] == T - 1
    # DDIM paper's quadratic: int(linspace(0, √(0.8 T), n)²), repeats near 0 made distinct
    q = space_timesteps(T, 50, "quadratic")
    ref = (np.linspace(0, np.sqrt(0.8 * T), 50) ** 2).astype(int)
    assert len(set(q)) == 50 and q == sorted(q) and q[-1] == ref[-1] == 800
    assert q[10:] == ref[10:].tolist()
    for spacing in ("uniform", "quadratic", "trailing", "leading"):
        for n in (1, 2, 3, 17, 99, 100):
            ts = space_timesteps(100, n, spacing)
            assert len(ts) == n and ts == sorted(set(ts)) and 0 <= ts[0] and ts[-1] < 100


def test_space_timesteps_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="T=100"):
        space_timesteps(100, 101)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        space_timesteps(100, 0)
    with pytest.raises(ValueError, match="integer"):
        space_timesteps(100, 2.5)
    with pytest.raises(ValueError, match="spacing must be one of"):
        space_timesteps(100, 10, "linear")


def test_respace_keeps_alphas_cumprod_and_types() -> None:
    d = GaussianDiffusion(
        num_timesteps=200,
        schedule="cosine",
        prediction_type="v_prediction",
        variance_type="learned_range",
    )
    kept = space_timesteps(200, 20)
    r = respace(d, kept)
    assert r.num_timesteps == 20
    assert (r.prediction_type, r.variance_type) == ("v_prediction", "learned_range")
    assert r.timestep_map.tolist() == kept and r.timestep_map.dtype == torch.long
    torch.testing.assert_close(r.alphas_cumprod_f64, d.alphas_cumprod_f64[kept], rtol=1e-9, atol=0)
    betas = 1 - d.alphas_cumprod_f64[kept] / torch.cat(
        [torch.ones(1, dtype=torch.float64), d.alphas_cumprod_f64[kept][:-1]]
    )
    torch.testing.assert_close(r.betas, betas.float())
    # respacing a respaced diffusion composes the maps
    rr = respace(r, [0, 5, 19])
    assert rr.timestep_map.tolist() == [kept[0], kept[5], kept[19]]
    torch.testing.assert_close(rr.alphas_cumprod_f64, d.alphas_cumprod_f64[rr.timestep_map])
    # all timesteps: the same chain
    full = respace(d, range(200))
    torch.testing.assert_close(full.betas, d.betas)
    with pytest.raises(ValueError, match=r"\[0, 199\]"):
        respace(d, [0, 200])


def test_respace_zero_terminal_snr() -> None:
    d = GaussianDiffusion(
        num_timesteps=100, prediction_type="v_prediction", rescale_zero_terminal_snr=True
    )
    r = respace(d, space_timesteps(100, 10))
    assert float(r.alphas_cumprod_f64[-1]) == 0.0
    torch.testing.assert_close(r.alphas_cumprod_f64, d.alphas_cumprod_f64[r.timestep_map])


# ------------------------------------------------------------------------ diffusers cross-checks
def test_q_sample_matches_diffusers_add_noise() -> None:
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    d = GaussianDiffusion(num_timesteps=1000, schedule="cosine")
    s = DDPMScheduler(num_train_timesteps=1000, trained_betas=d.betas.double().numpy())
    x0 = torch.rand(64, 3, 4, 4, generator=gen(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen(1))
    t = torch.randint(0, 1000, (64,), generator=gen(2))
    torch.testing.assert_close(
        d.q_sample(x0, t, noise), s.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
def test_one_ddpm_step_matches_diffusers(prediction_type, variance_type, clip) -> None:
    """One ancestral step t -> t-1 (run as a 2-step respaced chain) == DDPMScheduler.step."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    T = 1000
    d = GaussianDiffusion(
        num_timesteps=T, prediction_type=prediction_type, variance_type=variance_type
    )
    s = DDPMScheduler(
        num_train_timesteps=T,
        trained_betas=d.betas.double().numpy(),
        variance_type=variance_type,
        clip_sample=clip,
        prediction_type=prediction_type,
    )
    s = _float64_schedule(s, d)
    for t in (999, 500, 20, 1):
        x_t = torch.randn(8, 3, 4, 4, generator=gen(t))
        _, inter = ddpm_sample(
            toy_net,
            respace(d, [t - 1, t]),
            None,
            noise=x_t,
            generator=gen(7),
            clip_denoised=clip,
            return_intermediates=True,
        )
        assert inter["timesteps"].tolist() == [t, t - 1]
        out = s.step(toy_net(x_t, torch.full((8,), t)), t, x_t, generator=gen(7))
        torch.testing.assert_close(inter["x_t"][1], out.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            inter["pred_xstart"][0], out.pred_original_sample, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_one_ddim_step_matches_diffusers(prediction_type, eta, clip) -> None:
    """One DDIM step t -> t - T/50 == DDIMScheduler.step (ε̂ re-derived from the clipped x̂₀)."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    T = 1000
    d = GaussianDiffusion(num_timesteps=T, prediction_type=prediction_type)
    s = DDIMScheduler(
        num_train_timesteps=T,
        trained_betas=d.betas.double().numpy(),
        clip_sample=clip,
        set_alpha_to_one=True,
        prediction_type=prediction_type,
    )
    s = _float64_schedule(s, d)
    s.set_timesteps(50)  # leading spacing: t - 20 is the previous timestep
    for t in (980, 500, 20):
        x_t = torch.randn(8, 3, 4, 4, generator=gen(t))
        _, inter = ddim_sample(
            toy_net,
            respace(d, [t - 20, t]),
            None,
            steps=2,
            eta=eta,
            noise=x_t,
            generator=gen(7),
            clip_denoised=clip,
            return_intermediates=True,
        )
        out = s.step(
            toy_net(x_t, torch.full((8,), t)),
            t,
            x_t,
            eta=eta,
            use_clipped_model_output=True,
            generator=gen(7),
        )
        torch.testing.assert_close(inter["x_t"][1], out.prev_sample, rtol=1e-5, atol=1e-5)
    # the last step goes to ᾱ = 1 (set_alpha_to_one): x₀ = x̂₀
    x_t = torch.randn(8, 3, 4, 4, generator=gen(0))
    ours = ddim_sample(toy_net, respace(d, [0]), None, steps=1, noise=x_t, clip_denoised=clip)
    out = s.step(
        toy_net(x_t, torch.zeros(8, dtype=torch.long)),
        0,
        x_t,
        eta=eta,
        use_clipped_model_output=True,
        generator=gen(7),
    )
    torch.testing.assert_close(ours, out.prev_sample, rtol=1e-5, atol=1e-5)


def _float64_schedule(scheduler, d: GaussianDiffusion):
    """diffusers keeps ᾱ in float32; at t = 1 the cancellation in 1 - ᾱ then costs ~2e-4 in a DDPM
    step (ours, with coefficients from float64 ᾱ, is 2e-7 from a float64 reference). Giving it
    the float64 ᾱ makes the comparison test the step logic, not schedule rounding."""
    scheduler.alphas_cumprod = d.alphas_cumprod_f64.clone()
    return scheduler


def _diffusers_loop(scheduler, model, x, **step_kwargs) -> torch.Tensor:
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


def test_full_ddpm_and_ddim_loops_match_diffusers() -> None:
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, DDPMScheduler

    d = GaussianDiffusion(num_timesteps=200, variance_type="fixed_large")
    betas = d.betas.double().numpy()
    o = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    x_t = torch.randn(256, 2, generator=gen(0))
    # DDPM respaced to 50 steps == DDPMScheduler on the same custom timesteps
    ours = ddpm_sample(o, d, None, steps=50, noise=x_t, generator=gen(1))
    s = DDPMScheduler(num_train_timesteps=200, trained_betas=betas, variance_type="fixed_large")
    s.set_timesteps(timesteps=space_timesteps(200, 50)[::-1])
    torch.testing.assert_close(
        ours, _diffusers_loop(s, o, x_t, generator=gen(1)), rtol=1e-4, atol=1e-4
    )
    # DDIM, 20 leading steps, η = 0.5
    ours = ddim_sample(
        o, d, None, steps=20, eta=0.5, spacing="leading", noise=x_t, generator=gen(2)
    )
    s = DDIMScheduler(num_train_timesteps=200, trained_betas=betas, set_alpha_to_one=True)
    s.set_timesteps(20)
    theirs = _diffusers_loop(s, o, x_t, eta=0.5, use_clipped_model_output=True, generator=gen(2))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_ddim_inversion_matches_diffusers_inverse_scheduler() -> None:
    pytest.importorskip("diffusers")
    from diffusers import DDIMInverseScheduler

    d = GaussianDiffusion(num_timesteps=200)
    o = GaussianOracle(d, MU, 0.3)
    x0 = o.sample_data(256, gen(0))
    s = DDIMInverseScheduler(
        num_train_timesteps=200,
        trained_betas=d.betas.double().numpy(),
        set_alpha_to_one=True,
        clip_sample=False,
    )
    s.set_timesteps(20)
    theirs = _diffusers_loop(s, o, x0)
    ours = ddim_invert(o, d, x0, steps=20, spacing="leading")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


DIFFUSERS_NUMPY2_WARNING = "ignore:__array__ implementation:DeprecationWarning"


@pytest.mark.filterwarnings(DIFFUSERS_NUMPY2_WARNING)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_loop_matches_diffusers(order, steps, clip) -> None:
    """Full DPM-Solver++ loop == DPMSolverMultistepScheduler (linspace, lower_order_final)."""
    pytest.importorskip("diffusers")
    from diffusers import DPMSolverMultistepScheduler

    d = GaussianDiffusion(num_timesteps=1000)
    # data shape (1, 2): diffusers' thresholding wants (B, C, ...); wide modes so clipping acts
    o = MixtureOracle(d, [[m] for m in MEANS], [0.1, 0.4], WEIGHTS)
    x_t = torch.randn(512, 1, 2, generator=gen(0))
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=d.betas.double().numpy(),
        solver_order=order,
        algorithm_type="dpmsolver++",
        thresholding=clip,
        sample_max_value=1.0,
    )
    s.set_timesteps(steps)
    assert s.timesteps.tolist() == dpm_solver_timesteps(d, steps)
    theirs = _diffusers_loop(s, o, x_t)
    ours = dpm_solver_sample(o, d, None, steps=steps, order=order, noise=x_t, clip_denoised=clip)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5)
    if clip:
        assert ours.abs().max() <= 1.0


@pytest.mark.filterwarnings(DIFFUSERS_NUMPY2_WARNING)
def test_dpm_solver_trailing_matches_diffusers() -> None:
    pytest.importorskip("diffusers")
    from diffusers import DPMSolverMultistepScheduler

    # (linear: with the cosine schedule's ᾱ_T = 2e-9, x̂₀ at T-1 carries ~1e-3 of float32
    # rounding in any implementation, which then differs between the two)
    d = GaussianDiffusion(num_timesteps=1000)
    o = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    x_t = torch.randn(512, 2, generator=gen(0))
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=d.betas.double().numpy(),
        timestep_spacing="trailing",
    )
    s.set_timesteps(15)
    assert s.timesteps.tolist() == dpm_solver_timesteps(d, 15, "trailing")
    ours = dpm_solver_sample(
        o, d, None, steps=15, spacing="trailing", noise=x_t, clip_denoised=False
    )
    torch.testing.assert_close(ours, _diffusers_loop(s, o, x_t), rtol=1e-4, atol=2e-5)


# ------------------------------------------------------------------------ fast path == reference
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_matches_p_mean_variance_loop(prediction_type, variance_type, clip) -> None:
    """The float-coefficient fast path == Algorithm 2 written with GaussianDiffusion."""
    d = GaussianDiffusion(
        num_timesteps=50,
        schedule="cosine",
        prediction_type=prediction_type,
        variance_type=variance_type,
    )
    o = MixtureOracle(d, MEANS, [0.2, 0.5], WEIGHTS, var_output=0.3)
    x_t = torch.randn(256, 2, generator=gen(0))
    ours = ddpm_sample(o, d, None, noise=x_t, generator=gen(1), clip_denoised=clip)
    g, x = gen(1), x_t
    for t in reversed(range(50)):
        tt = torch.full((256,), t)
        out = d.p_mean_variance(o(x, tt), x, tt, clip_denoised=clip)
        x = out["mean"]
        if t > 0:
            x = x + out["variance"].sqrt() * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip", [False, True])
def test_prediction_types_agree(clip) -> None:
    """An exact oracle predicting ε, x₀ or v gives the same samples (same noise)."""
    outs = {}
    x_t = torch.randn(512, 2, generator=gen(0))
    for kind in ("epsilon", "sample", "v_prediction"):
        d = GaussianDiffusion(num_timesteps=100, prediction_type=kind)
        o = MixtureOracle(d, MEANS, [0.2, 0.5], WEIGHTS)
        outs[kind] = (
            ddpm_sample(o, d, None, noise=x_t, generator=gen(1), clip_denoised=clip),
            ddim_sample(
                o, d, None, steps=20, eta=0.5, noise=x_t, generator=gen(1), clip_denoised=clip
            ),
            dpm_solver_sample(o, d, None, steps=10, noise=x_t, clip_denoised=clip),
        )
    for kind in ("sample", "v_prediction"):
        for a, b in zip(outs["epsilon"], outs[kind], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)


def test_learned_range_endpoints_are_fixed_variances() -> None:
    """improved DDPM eq. 15: v = -1 gives β̃ (fixed_small), v = +1 gives β (fixed_large)."""
    x_t = torch.randn(512, 2, generator=gen(0))
    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        dl = GaussianDiffusion(num_timesteps=100, variance_type="learned_range")
        df = GaussianDiffusion(num_timesteps=100, variance_type=fixed)
        for steps in (None, 25):
            a = ddpm_sample(
                MixtureOracle(dl, MEANS, STDS, WEIGHTS, var_output=v),
                dl,
                None,
                steps=steps,
                noise=x_t,
                generator=gen(1),
            )
            b = ddpm_sample(
                MixtureOracle(df, MEANS, STDS, WEIGHTS),
                df,
                None,
                steps=steps,
                noise=x_t,
                generator=gen(1),
            )
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ the data distribution
def _moments_gap(x: torch.Tensor, std: float) -> tuple[float, float]:
    """(max |mean - μ|, |mean variance / σ² - 1|)."""
    mean_err = (x.mean(0) - torch.tensor(MU)).abs().max().item()
    return mean_err, abs(x.var(0).mean().item() / std**2 - 1.0)


@pytest.fixture(scope="module")
def gaussian_setup():
    """Cosine schedule, T = 1000, data N(μ, 0.5² I) in 2-D (unclipped: 5% of it lies outside
    [-1, 1]). 16000 samples: standard error 0.004 on the mean and 0.8% on the variance."""
    d = {
        vt: GaussianDiffusion(num_timesteps=1000, schedule="cosine", variance_type=vt)
        for vt in ("fixed_small", "fixed_large")
    }
    return d, (16000, 2), 0.5


# (sampler, kwargs, variance tolerance). Measured discretisation bias of the variance for this
# data: DDPM β̃ -0.4%, DDPM β -1.2%, DDIM T steps -1%, DDIM 50 uniform steps -6% (the last
# steps near t = 0 are long in log-SNR; it falls with more steps, see the next test), DPM-Solver++
# 20 steps -0.7%. Tolerances: bias + 4 standard errors.
MOMENT_CASES = [
    ("ddpm", "fixed_small", {}, 0.045),
    ("ddpm", "fixed_large", {}, 0.045),
    ("ddim", "fixed_small", {"steps": 1000}, 0.045),
    ("ddim", "fixed_small", {"steps": 50}, 0.095),
    ("dpm_solver", "fixed_small", {"steps": 20}, 0.045),
]


@pytest.mark.parametrize(("sampler", "variance_type", "kwargs", "var_tol"), MOMENT_CASES)
def test_full_step_samplers_reproduce_gaussian_moments(
    gaussian_setup, sampler, variance_type, kwargs, var_tol
) -> None:
    ds, shape, std = gaussian_setup
    d = ds[variance_type]
    fn = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpm_solver": dpm_solver_sample}[sampler]
    x = fn(GaussianOracle(d, MU, std), d, shape, generator=gen(3), clip_denoised=False, **kwargs)
    mean_err, var_err = _moments_gap(x, std)
    assert mean_err < 0.02, mean_err
    assert var_err < var_tol, var_err


def test_ddim_variance_bias_shrinks_with_steps() -> None:
    """The DDIM variance deficit is discretisation error: it falls as the step count grows."""
    d = GaussianDiffusion(num_timesteps=1000, schedule="cosine")
    o = GaussianOracle(d, MU, 0.5)
    x_t = torch.randn(16000, 2, generator=gen(4))  # same noise: the bias is what differs
    gaps = [
        _moments_gap(ddim_sample(o, d, None, steps=n, noise=x_t, clip_denoised=False), 0.5)[1]
        for n in (10, 50, 250)
    ]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.03, gaps


@pytest.mark.parametrize(
    ("name", "run"),
    [
        ("ddpm", lambda o, d, g: ddpm_sample(o, d, (8000, 2), generator=g)),
        ("ddim50", lambda o, d, g: ddim_sample(o, d, (8000, 2), steps=50, generator=g)),
        ("dpm20", lambda o, d, g: dpm_solver_sample(o, d, (8000, 2), steps=20, generator=g)),
    ],
)
def test_mixture_modes_reproduced(name, run) -> None:
    """Two-mode 2-D mixture, T = 200: mode weights and means come out right (clipping on)."""
    d = GaussianDiffusion(num_timesteps=200, variance_type="fixed_small")
    x = run(MixtureOracle(d, MEANS, STDS, WEIGHTS), d, gen(5))
    means = torch.tensor(MEANS)
    mode = ((x[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    w0 = (mode == 0).float().mean().item()
    assert abs(w0 - WEIGHTS[0]) < 0.025, w0  # standard error 0.005
    for k in range(2):
        torch.testing.assert_close(x[mode == k].mean(0), means[k], rtol=0, atol=0.015)
        assert 0.6 * STDS[k] < x[mode == k].std(0).mean() < 1.1 * STDS[k]
    assert x.abs().max() <= 1.0


# ------------------------------------------------------------------------ DDIM properties
def test_ddim_eta0_is_deterministic() -> None:
    d = GaussianDiffusion(num_timesteps=100)
    o = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    x_t = torch.randn(500, 2, generator=gen(0))
    a = ddim_sample(o, d, None, steps=20, noise=x_t, generator=gen(1))
    b = ddim_sample(o, d, None, steps=20, noise=x_t, generator=gen(2))
    assert torch.equal(a, b)
    c = ddim_sample(o, d, None, steps=20, eta=0.5, noise=x_t, generator=gen(2))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("spacing", ["uniform", "trailing"])
def test_ddim_inversion_reconstructs(spacing) -> None:
    d = GaussianDiffusion(num_timesteps=200)
    o = GaussianOracle(d, MU, 0.3)
    x0 = o.sample_data(2000, gen(0))

    def error(steps: int, iters: int) -> float:
        x_t = ddim_invert(o, d, x0, steps=steps, spacing=spacing, fixed_point_iters=iters)
        x_rec = ddim_sample(
            o, d, None, noise=x_t, steps=steps, spacing=spacing, clip_denoised=False
        )
        return (x_rec - x0).abs().mean().item()

    # plain inversion: a first-order error (mean 0.03 at 50 steps), halving when steps double
    e50, e100 = error(50, 0), error(100, 0)
    assert e50 < 0.05 and e100 < 0.6 * e50, (e50, e100)
    # fixed-point iterations converge to the exact inverse of the sampler
    assert error(50, 4) < 1e-4


def test_ddim_inversion_of_mixture_and_intermediates() -> None:
    """Two modes: plain inversion is off by ~0.035 (median, 50 steps); 4 fixed-point iterations
    make it exact except for ~1% of points near the boundary between the modes."""
    d = GaussianDiffusion(num_timesteps=200)
    o = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    x0 = o.sample_data(2000, gen(0))
    errors = []
    for iters in (0, 4):
        x_t, inter = ddim_invert(
            o, d, x0, steps=50, fixed_point_iters=iters, return_intermediates=10
        )
        x_rec = ddim_sample(o, d, None, noise=x_t, steps=50, clip_denoised=False)
        errors.append((x_rec - x0).abs().amax(1))
    assert inter["timesteps"].tolist() == [0, 41, 81, 122, 162, 199]  # steps 0, 10, ..., 49
    torch.testing.assert_close(inter["x_t"][-1], x_t)
    assert 0.01 < errors[0].median() < 0.05
    assert errors[1].median() < 1e-3 and (errors[1] < 0.01).float().mean() > 0.97


def test_ddim_eta1_all_steps_is_ddpm_fixed_small() -> None:
    """DDIM §4.1: η = 1 with all T steps is DDPM with σ² = β̃. With the same per-sample noise
    the two chains coincide; with independent noise their samples share the distribution."""
    d = GaussianDiffusion(num_timesteps=200, variance_type="fixed_small")
    o = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    seeds = range(100)
    a = ddim_sample(o, d, (100, 2), steps=200, eta=1.0, generator=PerSampleGenerator(seeds))
    b = ddpm_sample(o, d, (100, 2), generator=PerSampleGenerator(seeds))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    a = ddim_sample(o, d, (8000, 2), steps=200, eta=1.0, generator=gen(1))
    b = ddpm_sample(o, d, (8000, 2), generator=gen(2))
    assert not torch.allclose(a[:10], b[:10])
    torch.testing.assert_close(a.mean(0), b.mean(0), rtol=0, atol=0.02)  # s.e. 0.006
    torch.testing.assert_close(a.var(0), b.var(0), rtol=0.05, atol=0)  # s.e. 1.6%
    mode_a = (a.sum(1) > 0).float().mean()
    mode_b = (b.sum(1) > 0).float().mean()
    assert abs(mode_a - mode_b) < 0.025


# ------------------------------------------------------------------------ common behaviour
SAMPLERS = {
    "ddpm": lambda o, d, shape, **k: ddpm_sample(o, d, shape, **k),
    "ddim": lambda o, d, shape, **k: ddim_sample(o, d, shape, steps=20, eta=0.5, **k),
    "dpm_solver": lambda o, d, shape, **k: dpm_solver_sample(o, d, shape, steps=10, **k),
    "dpm_solver_3m_sde": lambda o, d, shape, **k: dpm_solver_sample(
        o, d, shape, steps=10, order=3, algorithm_type="sde-dpmsolver++", **k
    ),
    "unipc": lambda o, d, shape, **k: unipc_sample(o, d, shape, steps=10, order=3, **k),
    "heun": lambda o, d, shape, **k: heun_sample(o, d, shape, steps=6, s_churn=5.0, **k),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_per_sample_seeds_independent_of_batch_size(name) -> None:
    d = GaussianDiffusion(num_timesteps=50)
    o = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    run = SAMPLERS[name]
    small = run(o, d, (7, 2), generator=PerSampleGenerator(range(100, 107)))
    big = run(o, d, (64, 2), generator=PerSampleGenerator(range(100, 164)))
    assert torch.equal(small, big[:7])
    other = run(o, d, (7, 2), generator=PerSampleGenerator(range(200, 207)))
    assert not torch.allclose(small, other)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_intermediates(name) -> None:
    d = GaussianDiffusion(num_timesteps=50)
    o = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    run = SAMPLERS[name]
    x_t = torch.randn(16, 2, generator=gen(0))
    x = run(o, d, None, noise=x_t, generator=gen(1))
    assert isinstance(x, torch.Tensor)
    x_all, every = run(o, d, None, noise=x_t, generator=gen(1), return_intermediates=True)
    torch.testing.assert_close(x_all, x, rtol=0, atol=0)
    ts = every["timesteps"].tolist()
    n = len(ts)
    assert ts == sorted(ts, reverse=True) and ts[0] == 49
    assert every["x_t"].shape == every["pred_xstart"].shape == (n, 16, 2)
    assert every["x_t"].device.type == "cpu"
    torch.testing.assert_close(every["x_t"][0], x_t)
    torch.testing.assert_close(every["pred_xstart"][-1], x)  # the last step returns x̂₀
    _, strided = run(o, d, None, noise=x_t, generator=gen(1), return_intermediates=3)
    assert strided["timesteps"].tolist() == ts[::3] + ([ts[-1]] if (n - 1) % 3 else [])
    wanted = [49, 0, 30]  # each picks the step of the grid nearest to it
    _, picked = run(o, d, None, noise=x_t, generator=gen(1), return_intermediates=wanted)
    nearest = {min(ts, key=lambda s: abs(s - w)) for w in wanted}
    assert picked["timesteps"].tolist() == [s for s in ts if s in nearest]
    with pytest.raises(ValueError, match="return_intermediates"):
        run(o, d, None, noise=x_t, return_intermediates=-1)


class _HalfNet(nn.Module):
    """A module whose output is float16 (as under autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x).half()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_module_net_device_dtype_and_progress(name, capsys) -> None:
    d = GaussianDiffusion(num_timesteps=50)
    x = SAMPLERS[name](_HalfNet(), d, (4, 2), generator=gen(0), progress=True)
    assert x.dtype == torch.float32 and x.device.type == "cpu" and torch.isfinite(x).all()
    assert x.abs().max() <= 1.0  # clip_denoised


# (Heun's first step from σ = 4096, the σ of ᾱ = 2⁻²⁴, is one huge trapezoid: not covered.)
@pytest.mark.parametrize("name", [name for name in SAMPLERS if name != "heun"])
def test_zero_terminal_snr_v_prediction(name) -> None:
    d = GaussianDiffusion(
        num_timesteps=100, prediction_type="v_prediction", rescale_zero_terminal_snr=True
    )
    o = GaussianOracle(d, MU, 0.3)
    x = SAMPLERS[name](o, d, (4000, 2), generator=gen(0))
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.mean(0), torch.tensor(MU), rtol=0, atol=0.03)
    x = ddpm_sample(o, d, (1000, 2), steps=10, generator=gen(0))  # respaced: ᾱ_last = 0 kept
    assert torch.isfinite(x).all()


# ------------------------------------------------------------------------ validation
def test_steps_beyond_T_rejected() -> None:
    d = GaussianDiffusion(num_timesteps=100)
    o = GaussianOracle(d, MU, 0.3)
    x0 = torch.zeros(2, 2)
    calls = [
        lambda: ddpm_sample(o, d, (2, 2), steps=101),
        lambda: ddim_sample(o, d, (2, 2), steps=101),
        lambda: ddim_invert(o, d, x0, steps=101),
        lambda: dpm_solver_sample(o, d, (2, 2), steps=101),
        lambda: DDPMSampler(steps=101)(o, d, (2, 2)),
        lambda: DDIMSampler(steps=101)(o, d, (2, 2)),
        lambda: DPMSolverSampler(steps=101)(o, d, (2, 2)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="T=100"):
            call()
    ddim_sample(o, d, (2, 2), steps=100)  # T itself is fine
    # the solvers' uniform grid drops t = 0 from T+1 grid points: at most T-1 timesteps
    with pytest.raises(ValueError, match="99"):
        dpm_solver_sample(o, d, (2, 2), steps=100)
    dpm_solver_sample(o, d, (2, 2), steps=99)


def test_bad_arguments_rejected() -> None:
    d = GaussianDiffusion(num_timesteps=100)
    o = GaussianOracle(d, MU, 0.3)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(o, d, (2, 2), eta=-0.1)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=-1.0)
    with pytest.raises(ValueError, match="eta=3.0 is too large"):
        ddim_sample(o, d, (2, 2), eta=3.0)
    with pytest.raises(ValueError, match="spacing must be one of"):
        ddim_sample(o, d, (2, 2), spacing="cubic")
    with pytest.raises(ValueError, match="spacing must be one of"):
        DDIMSampler(spacing="cubic")
    with pytest.raises(ValueError, match="spacing must be one of"):
        DPMSolverSampler(spacing="quadratic")
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        DPMSolverSampler(order=4)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        dpm_solver_sample(o, d, (2, 2), order=0)
    with pytest.raises(ValueError, match="steps must be"):
        DDPMSampler(steps=0)
    with pytest.raises(ValueError, match="steps must be"):
        DDIMSampler(steps=None)
    with pytest.raises(ValueError, match="noise shape"):
        ddim_sample(o, d, (3, 2), noise=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shape is required"):
        ddim_sample(o, d, None)
    with pytest.raises(ValueError, match="fixed_point_iters"):
        ddim_invert(o, d, torch.zeros(2, 2), fixed_point_iters=-1)
    with pytest.raises(ValueError, match="logSNR"):  # 20 λ-uniform points hit t = 0 twice
        dpm_solver_sample(o, d, (2, 2), steps=20, spacing="logSNR")
    # the common options are one list (SampleCall): a typo is a TypeError naming the options
    with pytest.raises(TypeError, match=r"\['clip_denoise'\].*'clip_denoised'"):
        heun_sample(o, d, (2, 2), clip_denoise=False)
    with pytest.raises(ValueError, match="clip_denoised must be True or False"):
        unipc_sample(o, d, (2, 2), clip_denoised="no")
    with pytest.raises(TypeError, match=r"\['noise'\]"):  # the image is the inversion's start
        ddim_invert(o, d, x0 := torch.zeros(2, 2), noise=x0)
    with pytest.raises(TypeError, match=r"\['guidance_scale'\] are this sampler's settings"):
        DDIMSampler()(o, d, (2, 2), guidance_scale=2.0)


# ------------------------------------------------------------------------ config wrappers
@pytest.mark.parametrize(
    ("file", "cls", "fn", "fields"),
    [
        ("ddpm.yaml", DDPMSampler, ddpm_sample, {"steps": None, "clip_denoised": True}),
        (
            "ddim.yaml",
            DDIMSampler,
            ddim_sample,
            {"steps": 50, "eta": 0.0, "spacing": "auto", "clip_denoised": True},
        ),
        (
            "dpm_solver.yaml",
            DPMSolverSampler,
            dpm_solver_sample,
            {"steps": 20, "order": 2, "clip_denoised": True},
        ),
        ("dpm_solver_3m.yaml", DPMSolverSampler, dpm_solver_sample, {"steps": 20, "order": 3}),
        (
            "dpm_solver_sde.yaml",
            DPMSolverSampler,
            dpm_solver_sample,
            {"steps": 20, "order": 2, "algorithm_type": "sde-dpmsolver++"},
        ),
        ("unipc.yaml", UniPCSampler, unipc_sample, {"steps": 10, "solver_type": "bh2"}),
        ("heun.yaml", HeunSampler, heun_sample, {"steps": 18, "spacing": "auto"}),
        ("euler.yaml", EulerSampler, ddim_sample, {"steps": 20, "spacing": "auto"}),
    ],
)
def test_sampler_configs_instantiate(file, cls, fn, fields) -> None:
    from hydra.utils import instantiate

    sampler = instantiate(compose_group("sampler", file.removesuffix(".yaml")))
    assert type(sampler) is cls and file.startswith(sampler.name)
    assert sampler.guidance_scale == 1.0
    for key, value in fields.items():
        assert getattr(sampler, key) == value
    d = GaussianDiffusion(num_timesteps=100)
    o = MixtureOracle(d, MEANS, STDS, WEIGHTS)
    x = sampler(o, d, (16, 2), generator=PerSampleGenerator(range(16)))
    ref = fn(o, d, (16, 2), generator=PerSampleGenerator(range(16)), **fields)
    assert torch.equal(x, ref)
    out = sampler(o, d, (16, 2), generator=gen(0), return_intermediates=5)
    assert isinstance(out, tuple) and set(out[1]) == {"timesteps", "x_t", "pred_xstart"}


def test_oracle_is_the_posterior_mean() -> None:
    """E[ε̂ ε] = E[ε̂²] (orthogonality of the conditional expectation) at several t."""
    d = GaussianDiffusion(num_timesteps=100)
    for o in (GaussianOracle(d, MU, 0.3), MixtureOracle(d, MEANS, STDS, WEIGHTS)):
        x0 = o.sample_data(16000, gen(0))
        for t in (0, 10, 50, 99):
            eps = torch.randn(x0.shape, generator=gen(t))
            tt = torch.full((16000,), t)
            pred = o(d.q_sample(x0, tt, eps), tt).double()
            assert math.isclose(
                (pred * eps).mean(), (pred * pred).mean(), rel_tol=0.03, abs_tol=2e-3
            )


# ------------------------------------------------------------------------ seeded batches
def test_sample_batches_independent_of_batch_size() -> None:
    d = GaussianDiffusion(num_timesteps=100)
    o = GaussianOracle(d, MU, 0.3)
    sampler = DDIMSampler(steps=5)
    one = torch.cat(list(sample_batches(sampler, o, d, (2,), range(7), 7)))
    parts = list(sample_batches(sampler, o, d, (2,), range(7), 3))
    assert [len(p) for p in parts] == [3, 3, 1]
    torch.testing.assert_close(torch.cat(parts), one, rtol=0, atol=0)
    assert not torch.equal(one[0], one[1])  # each seed its own noise
    with pytest.raises(ValueError, match="2 class_labels for 7 seeds"):
        next(sample_batches(sampler, o, d, (2,), range(7), 3, class_labels=torch.zeros(2)))
