"""Classifier-free guidance in every sampler, against the closed-form class-conditional oracle.

For classes y with x₀ | y ~ N(μ_y, s_y² I), E[ε | x_t, y] is one Gaussian's and E[ε | x_t] the
mixture's (tests/oracles.py), so the guided ε̃ = ε_∅ + s (ε_y - ε_∅) is known in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ddpm.diffusion import (
    DDIMSampler,
    GaussianDiffusion,
    HeunSampler,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    heun_sample,
    unipc_sample,
)
from hydra_utils import compose_group
from oracles import ClassConditionalOracle, gen

MEANS = [[-0.4, -0.3], [0.4, 0.3], [0.3, -0.5]]  # overlapping classes: guidance matters
STDS = [0.25, 0.25, 0.2]
WEIGHTS = [0.3, 0.4, 0.3]
N = 6000


def class_posterior(x0: Tensor) -> Tensor:
    """p(y | x₀) of the data (N, K), written out independently of the oracle."""
    logp = torch.stack(
        [
            math.log(w) - ((x0 - torch.tensor(m)) ** 2).sum(1) / (2 * s * s) - 2 * math.log(s)
            for m, s, w in zip(MEANS, STDS, WEIGHTS, strict=True)
        ],
        1,
    )
    return logp.softmax(1)


def test_oracle_conditional_and_unconditional_eps_are_analytic() -> None:
    """ε_y = √(1-ᾱ)(x_t - √ᾱ μ_y)/(ᾱ s_y² + 1 - ᾱ); ε_∅ = Σ_y p(y | x_t) ε_y with
    p(y | x_t) ∝ w_y N(x_t; √ᾱ μ_y, (ᾱ s_y² + 1 - ᾱ) I); None and the null label agree."""
    d = GaussianDiffusion(num_timesteps=100)
    o = ClassConditionalOracle(d, MEANS, STDS, WEIGHTS)
    x = torch.randn(300, 2, generator=gen(0))
    for t in (0, 30, 99):
        tt = torch.full((300,), t)
        ac = float(d.alphas_cumprod_f64[t])
        eps_y, logp = [], []
        for m, s, w in zip(MEANS, STDS, WEIGHTS, strict=True):
            v = ac * s * s + 1 - ac
            diff = x.double() - math.sqrt(ac) * torch.tensor(m, dtype=torch.float64)
            eps_y.append(math.sqrt(1 - ac) * diff / v)
            logp.append(math.log(w) - math.log(v) - (diff**2).sum(1) / (2 * v))
        resp = torch.stack(logp, 1).softmax(1)
        uncond = sum(resp[:, k : k + 1] * eps_y[k] for k in range(3))
        for y in range(3):
            out = o(x, tt, torch.full((300,), y)).double()
            torch.testing.assert_close(out, eps_y[y], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            o(x, tt, torch.full((300,), 3)).double(), uncond, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(o(x, tt).double(), uncond, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_guided_prediction_is_the_cfg_formula(prediction_type, scale) -> None:
    """Every step's x̂₀ comes from ε̃ = ε_∅ + s (ε_y - ε_∅), with one network call per step:
    labels only (s = 1), null only (s = 0), or one batch [labels; null]. A v-network guided in
    v gives the same x̂₀ (v is affine in ε at fixed x_t)."""
    d = GaussianDiffusion(num_timesteps=100, prediction_type=prediction_type)
    o = ClassConditionalOracle(d, MEANS, STDS, WEIGHTS)
    labels = torch.tensor([0, 1, 2, 0, 2, 1, 1, 0])
    _, inter = ddim_sample(
        o,
        d,
        (8, 2),
        steps=10,
        generator=gen(1),
        clip_denoised=False,
        class_labels=labels,
        guidance_scale=scale,
        return_intermediates=True,
    )
    for t, x, x0 in zip(inter["timesteps"], inter["x_t"], inter["pred_xstart"], strict=True):
        tt = t.expand(8)
        eps_y, eps_null = o.predictions(x, tt, labels)[1], o.predictions(x, tt)[1]
        guided = eps_null + scale * (eps_y - eps_null)
        ac = float(d.alphas_cumprod_f64[t])
        expected = (x.double() - math.sqrt(1 - ac) * guided) / math.sqrt(ac)
        torch.testing.assert_close(x0.double(), expected, rtol=1e-4, atol=1e-4)
    assert o.calls == 10
    null = torch.full_like(labels, 3)
    want = {0.0: null, 1.0: labels, 2.5: torch.cat([labels, null])}[scale]
    assert all(torch.equal(seen, want) for seen in o.label_log)


def test_learned_variance_guides_the_mean_only() -> None:
    """With a learned variance the mean channels are guided and the conditional variance kept:
    DDPM's chain equals Algorithm 2 run on [guided ε; conditional variance values]."""
    d = GaussianDiffusion(num_timesteps=50, variance_type="learned_range")
    o = ClassConditionalOracle(d, MEANS, STDS, WEIGHTS, var_output=[-0.8, -0.2, 0.4, 0.9])
    labels = torch.tensor([0, 1, 2, 1] * 64)
    x_t = torch.randn(256, 2, generator=gen(0))
    ours = ddpm_sample(
        o, d, None, noise=x_t, generator=gen(1), class_labels=labels, guidance_scale=3.0
    )
    g, x = gen(1), x_t
    for t in reversed(range(50)):
        tt = torch.full((256,), t)
        cond, uncond = o(x, tt, labels), o(x, tt, torch.full_like(labels, 3))
        out = torch.cat([uncond[:, :2] + 3.0 * (cond[:, :2] - uncond[:, :2]), cond[:, 2:]], 1)
        step = d.p_mean_variance(out, x, tt, clip_denoised=True)
        x = step["mean"]
        if t > 0:
            x = x + step["variance"].sqrt() * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def _mixture_total_variance() -> float:
    m = torch.tensor(WEIGHTS) @ torch.tensor(MEANS)
    return sum(
        w * (2 * s * s + float(((torch.tensor(mu) - m) ** 2).sum()))
        for mu, s, w in zip(MEANS, STDS, WEIGHTS, strict=True)
    )


# name: (schedule, sampler). Cosine schedule except for Heun (its first step from cosine's
# σ(T-1) = 2·10⁴ is inaccurate); steps where the class-conditional variance bias is <= 15%.
CFG_SAMPLERS = {
    "ddpm": ("cosine", lambda *a, **k: ddpm_sample(*a, steps=100, **k)),
    "ddim": ("cosine", lambda *a, **k: ddim_sample(*a, steps=50, **k)),
    "dpm_solver_2m": ("cosine", lambda *a, **k: dpm_solver_sample(*a, steps=20, **k)),
    "dpm_solver_3m": ("cosine", lambda *a, **k: dpm_solver_sample(*a, steps=20, order=3, **k)),
    "dpm_solver_sde": (
        "cosine",
        lambda *a, **k: dpm_solver_sample(*a, steps=50, algorithm_type="sde-dpmsolver++", **k),
    ),
    "unipc": ("cosine", lambda *a, **k: unipc_sample(*a, steps=20, **k)),
    "heun": ("linear", lambda *a, **k: heun_sample(*a, steps=20, **k)),
}


@pytest.mark.parametrize("name", list(CFG_SAMPLERS))
def test_guidance_scales_give_conditional_marginal_and_sharper_samples(name) -> None:
    """All samples asked for class 0. s = 1: class 0's moments (mean s.e. 0.003; measured
    variance bias -9% to +14%, all discretisation). s = 0: the marginal's (mean, total
    variance, and E_x[p(0 | x)] = w_0). s = 3: samples move toward class 0: p(0 | x) rises and
    the spread falls (with overlapping classes the mean also moves away from the others)."""
    schedule, run = CFG_SAMPLERS[name]
    d = GaussianDiffusion(num_timesteps=1000, schedule=schedule, variance_type="fixed_small")
    o = ClassConditionalOracle(d, MEANS, STDS, WEIGHTS)
    labels = torch.zeros(N, dtype=torch.long)
    out = {
        s: run(
            o,
            d,
            (N, 2),
            generator=gen(1),
            clip_denoised=False,
            class_labels=labels,
            guidance_scale=s,
        )
        for s in (0.0, 1.0, 3.0)
    }
    x = out[1.0]
    torch.testing.assert_close(x.mean(0), torch.tensor(MEANS[0]), rtol=0, atol=0.015)
    assert abs(x.var(0).mean().item() / STDS[0] ** 2 - 1) < 0.2
    x = out[0.0]
    mixture_mean = torch.tensor(WEIGHTS) @ torch.tensor(MEANS)
    torch.testing.assert_close(x.mean(0), mixture_mean, rtol=0, atol=0.02)
    total = ((x - x.mean(0)) ** 2).sum(1).mean().item()
    assert abs(total / _mixture_total_variance() - 1) < 0.15
    assert abs(class_posterior(x)[:, 0].mean().item() - WEIGHTS[0]) < 0.03
    p1 = class_posterior(out[1.0])[:, 0].mean().item()
    p3 = class_posterior(out[3.0])[:, 0].mean().item()
    assert p1 > 0.8 and p3 > p1 + 0.02 and p3 > 0.98, (p1, p3)
    assert out[3.0].var(0).mean() < 0.85 * out[1.0].var(0).mean()


def test_guidance_needs_labels_and_a_null_class() -> None:
    d = GaussianDiffusion(num_timesteps=50)
    o = ClassConditionalOracle(d, MEANS, STDS, WEIGHTS)
    with pytest.raises(ValueError, match="guidance_scale=2 needs class_labels"):
        ddim_sample(o, d, (4, 2), steps=5, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"class_labels must be an integer tensor of shape \(4,\)"):
        ddim_sample(o, d, (4, 2), steps=5, class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class_labels must be an integer tensor"):
        ddim_sample(o, d, (4, 2), steps=5, class_labels=torch.zeros(4))

    def no_null(x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return x

    with pytest.raises(ValueError, match="null_class"):
        ddim_sample(
            no_null,
            d,
            (4, 2),
            steps=5,
            class_labels=torch.zeros(4, dtype=torch.long),
            guidance_scale=2.0,
        )
    # unconditional networks take (x_t, t) only: called without the keyword when no labels
    x = HeunSampler(steps=3)(lambda x, t: torch.zeros_like(x), d, (4, 2), generator=gen(0))
    assert x.shape == (4, 2) and torch.isfinite(x).all()


def test_config_sampler_passes_labels_and_its_guidance_scale() -> None:
    from hydra.utils import instantiate

    cfg = compose_group("sampler", "ddim")
    sampler = instantiate(cfg, steps=10, guidance_scale=2.0, clip_denoised=False)
    assert isinstance(sampler, DDIMSampler)
    d = GaussianDiffusion(num_timesteps=50)
    labels = torch.tensor([2, 0, 1, 1])
    kwargs = {"generator": gen(0), "class_labels": labels}
    a = sampler(ClassConditionalOracle(d, MEANS, STDS, WEIGHTS), d, (4, 2), **kwargs)
    b = ddim_sample(
        ClassConditionalOracle(d, MEANS, STDS, WEIGHTS),
        d,
        (4, 2),
        steps=10,
        guidance_scale=2.0,
        clip_denoised=False,
        **{**kwargs, "generator": gen(0)},
    )
    assert torch.equal(a, b)
