"""KL, discretized decoder, L_simple / L_hybrid / L_vlb, min-SNR-γ and timestep samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import (
    DiffusionLoss,
    GaussianDiffusion,
    LossSecondMomentTimestepSampler,
    TimestepSampler,
    UniformTimestepSampler,
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    normal_kl,
    vb_terms_bpd,
)

T = 1000
CENTRES = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 bin centres of [-1, 1]


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# ------------------------------------------------------------------ KL
def test_kl_of_identical_gaussians_is_zero() -> None:
    m, lv = torch.randn(100), torch.randn(100) * 3
    assert torch.equal(normal_kl(m, lv, m, lv), torch.zeros(100))


@pytest.mark.parametrize(
    "m1, s1, m2, s2", [(0, 1, 0, 1), (0.3, 0.5, -0.2, 2.0), (1, 0.01, 0.99, 0.02), (-2, 3, 0, 1)]
)
def test_kl_closed_form_1d(m1: float, s1: float, m2: float, s2: float) -> None:
    expect = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = normal_kl(
        torch.tensor(m1, dtype=torch.float64),
        torch.tensor(2 * math.log(s1)),
        torch.tensor(m2, dtype=torch.float64),
        torch.tensor(2 * math.log(s2)),
    )
    assert float(got) == pytest.approx(expect, rel=1e-6, abs=1e-12)
    # and torch.distributions, an independent implementation
    p = torch.distributions.Normal(m1, s1)
    q = torch.distributions.Normal(m2, s2)
    assert float(got) == pytest.approx(float(torch.distributions.kl_divergence(p, q)), rel=1e-5)


# ------------------------------------------------------------------ discretized Gaussian decoder
MEANS_SCALES = [
    (m, s) for m in (-1.0, -0.37, 0.0, 0.5, 0.999, 1.3) for s in (1e-3, 0.0074, 0.05, 0.3, 2.0)
]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_decoder_probabilities_sum_to_one(dtype: torch.dtype, tol: float) -> None:
    for m, s in MEANS_SCALES:
        lp = discretized_gaussian_log_likelihood(
            CENTRES.to(dtype), torch.tensor(m, dtype=dtype), torch.tensor(math.log(s), dtype=dtype)
        )
        assert lp.dtype == dtype and torch.all(lp <= 0)
        assert float(lp.double().exp().sum()) == pytest.approx(1.0, abs=tol), (m, s)


def test_decoder_matches_bin_masses() -> None:
    """Bin k covers [c_k - 1/255, c_k + 1/255]; the end bins extend to ±∞ (DDPM eq. 13)."""
    for m, s in MEANS_SCALES:
        probs = []
        for k, c in enumerate(CENTRES.tolist()):
            hi = 1.0 if k == 255 else _phi((c + 1 / 255 - m) / s)
            lo = 0.0 if k == 0 else _phi((c - 1 / 255 - m) / s)
            probs.append(hi - lo)
        probs = torch.tensor(probs, dtype=torch.float64)
        ok = probs > 1e-9  # where 1 - Φ in float64 math.erf is itself accurate
        lp = discretized_gaussian_log_likelihood(
            CENTRES,
            torch.tensor(m, dtype=torch.float64),
            torch.tensor(math.log(s), dtype=torch.float64),
        )
        torch.testing.assert_close(lp[ok], probs[ok].log(), rtol=0, atol=1e-5)


def test_decoder_float32_accurate_in_the_tails() -> None:
    """float32 matches float64 down to the 1e-12 floor (no 1 - Φ cancellation beyond ~5σ)."""
    for m, s in MEANS_SCALES:
        args = [
            (CENTRES.to(dt), torch.tensor(m, dtype=dt), torch.tensor(math.log(s), dtype=dt))
            for dt in (torch.float32, torch.float64)
        ]
        lp32, lp64 = (discretized_gaussian_log_likelihood(*a) for a in args)
        keep = lp64 > math.log(1e-12) + 1  # above the floor
        torch.testing.assert_close(lp32.double()[keep], lp64[keep], rtol=1e-5, atol=1e-4)


def test_vb_term_is_zero_for_the_true_noise() -> None:
    """With ε̂ = ε, x̂₀ = x₀ and p_θ = q(x_{t-1}|x_t,x₀) for fixed_small: L_{t-1} = 0 for t > 0."""
    d = GaussianDiffusion(num_timesteps=T, variance_type="fixed_small")
    g = torch.Generator().manual_seed(0)
    t = torch.arange(1, T, 7)
    x0 = torch.rand(len(t), 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    x_t = d.q_sample(x0, t, eps)
    out = vb_terms_bpd(d, eps, x0, x_t, t)["output"]
    assert out.shape == (len(t),) and torch.all(out.abs() < 1e-3)


def test_vb_term_at_t0_is_decoder_nll() -> None:
    d = GaussianDiffusion(num_timesteps=T, variance_type="fixed_large")
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (4, 3, 4, 4), generator=g).double() / 127.5 - 1).float()
    eps = torch.randn(x0.shape, generator=g)
    t = torch.zeros(4, dtype=torch.long)
    x_t = d.q_sample(x0, t, eps)
    out = vb_terms_bpd(d, eps, x0, x_t, t)["output"]
    # decoder mean = x̂₀ = x₀ here, σ² = β̃ of the second step
    bt1 = float(d.posterior_variance[1])
    p_centre = math.erf((1 / 255) / math.sqrt(2 * bt1))  # mass of ±1/255 around the mean
    p_edge = _phi((1 / 255) / math.sqrt(bt1))  # the end bins: one side only
    n_edge = (x0.abs() == 1).flatten(1).sum(1).double()
    want = -((48 - n_edge) * math.log(p_centre) + n_edge * math.log(p_edge)) / 48 / math.log(2)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ DiffusionLoss
def _net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, non-trivial 'network'."""
    return 0.7 * x_t + 0.001 * t.view(-1, *([1] * (x_t.ndim - 1))).float() - 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_simple_loss_is_mse_on_target(prediction_type: str) -> None:
    d = GaussianDiffusion(num_timesteps=T, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(16, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, T, (16,), generator=g)
    terms = DiffusionLoss("simple")(_net, d, x0, t, eps)
    # by hand, in float64
    ac = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, T)))[t].view(-1, 1, 1, 1)
    x0d, epsd = x0.double(), eps.double()
    x_t = ac.sqrt() * x0d + (1 - ac).sqrt() * epsd
    target = {
        "epsilon": epsd,
        "sample": x0d,
        "v_prediction": ac.sqrt() * epsd - (1 - ac).sqrt() * x0d,
    }[prediction_type]
    pred = 0.7 * x_t + 0.001 * t.view(-1, 1, 1, 1).double() - 0.1
    want = ((target - pred) ** 2).mean(dim=(1, 2, 3))
    assert terms["loss"].shape == (16,) and terms["loss"].dtype == torch.float32
    torch.testing.assert_close(terms["loss"].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["mse"], terms["loss"])
    assert "vb" not in terms


def test_hybrid_loss_and_stop_gradient() -> None:
    d = GaussianDiffusion(num_timesteps=T, variance_type="learned_range")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(8, 2, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 5, 100, 400, 700, 998, 999])
    out_param = torch.randn(8, 4, 4, 4, generator=g).requires_grad_(True)

    def net(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return out_param

    terms = DiffusionLoss("hybrid", lambda_vlb=0.001)(net, d, x0, t, eps)
    x_t = d.q_sample(x0, t, eps)
    vb = vb_terms_bpd(d, out_param.detach(), x0, x_t, t)["output"]
    torch.testing.assert_close(terms["vb"].detach(), vb)
    mse = ((eps - out_param[:, :2]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["loss"], mse + 0.001 * T * vb)
    # the vb term's gradient reaches only the variance channels (stop-grad on the mean)
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out_param, retain_graph=True)
    assert torch.all(grad[:, :2] == 0)
    assert torch.all(grad[:, 2:].abs().sum(dim=(1, 2, 3)) > 0)
    # ... while the full loss trains both
    (grad,) = torch.autograd.grad(terms["loss"].sum(), out_param)
    assert grad[:, :2].abs().sum() > 0 and grad[:, 2:].abs().sum() > 0
    # loss_type vlb: no stop-gradient; the one-term estimate of L_vlb is T·L_t (improved-diffusion's
    # RESCALED_KL), the very term the hybrid loss weights by λ
    hybrid_vb = terms["loss"] - mse
    terms = DiffusionLoss("vlb")(net, d, x0, t, eps)
    torch.testing.assert_close(terms["vb"], vb)
    torch.testing.assert_close(terms["loss"], T * vb)
    torch.testing.assert_close(0.001 * terms["loss"], hybrid_vb.detach())
    (grad,) = torch.autograd.grad(terms["loss"].sum(), out_param)
    assert grad[:, :2].abs().sum() > 0


def test_learned_variance_needs_the_bound() -> None:
    d = GaussianDiffusion(num_timesteps=T, variance_type="learned_range")
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="hybrid"):
        DiffusionLoss("simple")(lambda x, t: torch.zeros(2, 6, 4, 4), d, x0, torch.tensor([1, 2]))


def test_bad_loss_arguments() -> None:
    with pytest.raises(ValueError) as err:
        DiffusionLoss("l1")
    assert all(k in str(err.value) for k in ("loss_type", "simple", "hybrid", "vlb"))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionLoss(min_snr_gamma=0.0)
    with pytest.raises(ValueError, match="lambda_vlb"):
        DiffusionLoss(lambda_vlb=-1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(prediction_type: str, gamma: float) -> None:
    d = GaussianDiffusion(num_timesteps=T, prediction_type=prediction_type)
    t = torch.arange(T)
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    snr = ac / (1 - ac)
    clipped = np.minimum(snr, gamma)
    want = {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}[
        prediction_type
    ]
    np.testing.assert_allclose(min_snr_weight(d, t, gamma).double().numpy(), want, rtol=1e-5)
    # and inside the loss
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(T, 2, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    plain = DiffusionLoss("simple")(_net, d, x0, t, eps)["loss"]
    weighted = DiffusionLoss("simple", min_snr_gamma=gamma)(_net, d, x0, t, eps)
    np.testing.assert_allclose(
        weighted["loss"].double().numpy(), plain.double().numpy() * want, rtol=1e-5
    )
    torch.testing.assert_close(weighted["mse"], plain)  # "mse" stays unweighted


@pytest.mark.parametrize(
    "loss_type, variance_type",
    [
        ("simple", "fixed_large"),
        ("hybrid", "learned_range"),
        ("vlb", "learned"),
        ("hybrid", "fixed_small"),
    ],
)
def test_losses_float32_under_bf16_autocast(loss_type: str, variance_type: str) -> None:
    d = GaussianDiffusion(
        num_timesteps=T, variance_type=variance_type, prediction_type="v_prediction"
    )
    net = torch.nn.Conv2d(3, d.model_output_channels(3), 3, padding=1)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 1, 500, 999])
    eps = torch.randn_like(x0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x0).dtype == torch.bfloat16
        terms = DiffusionLoss(loss_type, min_snr_gamma=5.0)(lambda x, t: net(x), d, x0, t, eps)
    for k, v in terms.items():
        assert v.dtype == torch.float32 and v.shape == (4,) and torch.all(torch.isfinite(v)), k
    terms["loss"].mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ------------------------------------------------------------------ timestep samplers
def test_uniform_sampler() -> None:
    s = UniformTimestepSampler(50)
    assert isinstance(s, TimestepSampler) and s.state_dict() == {}  # nothing to resume
    t, w = s.sample(10_000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 49
    assert torch.all(w == 1)
    counts = torch.bincount(t, minlength=50).double()
    assert torch.all((counts - 200).abs() < 5 * math.sqrt(200))


def test_loss_second_moment_sampler() -> None:
    Tn, hist = 20, 4
    s = LossSecondMomentTimestepSampler(Tn, history=hist, uniform_prob=0.01)
    rng = np.random.default_rng(0)
    scale = np.linspace(0.1, 3.0, Tn)  # L_t grows with t
    # warm-up: uniform until every t has `history` losses, even with all but one t full
    for ti in range(Tn - 1):
        for _ in range(hist + 2):  # more than `history`: the oldest are dropped
            s.update(
                torch.tensor([ti]), torch.tensor([scale[ti] * (1 + 0.1 * rng.standard_normal())])
            )
    s.update(torch.tensor([Tn - 1] * (hist - 1)), torch.full((hist - 1,), scale[-1]))
    assert np.all(s.weights() == 1.0)
    _, w = s.sample(64, "cpu")
    assert torch.all(w == 1)
    # warm: p_t ∝ √E[L_t²] (last `history` losses) mixed with 1% uniform
    s.update(torch.tensor([Tn - 1]), torch.tensor([scale[-1]]))
    rms = np.sqrt(np.mean(s._hist**2, axis=1))
    p = 0.99 * rms / rms.sum() + 0.01 / Tn
    np.testing.assert_allclose(s.weights(), p, rtol=1e-12)
    assert s.weights()[-1] > 10 * s.weights()[0]
    # importance weights w_t = 1/(T p_t) make E[w·L] = mean_t L_t (unbiased)
    losses = torch.from_numpy(scale)
    n = 200_000
    t, w = s.sample(n, "cpu", torch.Generator().manual_seed(1))
    torch.testing.assert_close(w.double(), 1 / (Tn * torch.from_numpy(p)[t]), rtol=1e-5, atol=0)
    est = (w.double() * losses[t]).numpy()
    assert abs(est.mean() - scale.mean()) < 4 * est.std() / math.sqrt(n)
    freq = np.bincount(t.numpy(), minlength=Tn) / n
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(p / n).max())
    # state round trip
    s2 = LossSecondMomentTimestepSampler(Tn, history=hist, uniform_prob=0.01)
    s2.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(s2.weights(), s.weights())
