"""GaussianDiffusion: q(x_t|x_0), the posterior, ε/x₀/v conversions and p_θ, against closed forms.

Reference values are computed here in float64 from β (numpy), not from the module's buffers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import (
    DISCRETE_PREDICTION_TYPES,
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    GaussianDiffusion,
)

T = 1000


class Ref:
    """The DDPM quantities in float64, straight from the paper's formulas."""

    def __init__(self, betas: np.ndarray) -> None:
        self.b = np.asarray(betas, dtype=np.float64)
        self.a = 1 - self.b
        self.ac = np.cumprod(self.a)
        self.ac_prev = np.concatenate([[1.0], self.ac[:-1]])
        self.bt = (1 - self.ac_prev) / (1 - self.ac) * self.b  # β̃_t (eq. 7)

    def col(self, arr: np.ndarray, t: torch.Tensor, nd: int = 2) -> torch.Tensor:
        return torch.from_numpy(arr[t.numpy()]).reshape(-1, *([1] * (nd - 1)))


@pytest.fixture(scope="module")
def diff() -> GaussianDiffusion:
    return GaussianDiffusion(num_timesteps=T)


@pytest.fixture(scope="module")
def ref(diff: GaussianDiffusion) -> Ref:
    return Ref(np.linspace(1e-4, 0.02, T))


def _all_t() -> torch.Tensor:
    return torch.arange(T)


def test_buffers_are_float32_and_exact(diff: GaussianDiffusion, ref: Ref) -> None:
    assert diff.alphas_cumprod.dtype == torch.float32
    assert diff.alphas_cumprod_f64.dtype == torch.float64
    np.testing.assert_allclose(diff.alphas_cumprod_f64.numpy(), ref.ac, rtol=1e-12)
    np.testing.assert_allclose(diff.alphas_cumprod.numpy(), ref.ac, rtol=1e-7)
    # buffers are not part of the state dict (rebuilt from the config)
    assert diff.state_dict() == {}


def test_snr_precise_at_small_t(diff: GaussianDiffusion, ref: Ref) -> None:
    # 1 - float32(ᾱ_1) would be off by ~2e-4 relative (ᾱ_1 = 0.9999).
    snr = diff.snr(_all_t()).double().numpy()
    np.testing.assert_allclose(snr, ref.ac / (1 - ref.ac), rtol=1e-6)


# ------------------------------------------------------------------ q(x_t | x_0)
def test_q_mean_variance_closed_form(diff: GaussianDiffusion, ref: Ref) -> None:
    t = _all_t()
    x0 = torch.linspace(-1, 1, T).unsqueeze(1)
    mean, var, log_var = diff.q_mean_variance(x0, t)
    np.testing.assert_allclose(
        mean.double(), ref.col(np.sqrt(ref.ac), t) * x0.double(), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(var.double(), ref.col(1 - ref.ac, t), rtol=1e-6)
    np.testing.assert_allclose(log_var.double(), ref.col(np.log(1 - ref.ac), t), atol=1e-6)


def test_q_sample_with_given_noise(diff: GaussianDiffusion, ref: Ref) -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (64,), generator=g)
    x0 = torch.rand(64, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    x_t = diff.q_sample(x0, t, eps)
    expect = (
        ref.col(np.sqrt(ref.ac), t, 4) * x0.double()
        + ref.col(np.sqrt(1 - ref.ac), t, 4) * eps.double()
    )
    np.testing.assert_allclose(x_t.double(), expect, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        diff.q_sample(x0, t, eps[:, :2])


@pytest.mark.parametrize("t_idx", [0, 9, 300, 999])
def test_q_sample_moments(diff: GaussianDiffusion, ref: Ref, t_idx: int) -> None:
    torch.manual_seed(t_idx)
    n = 40_000
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0])
    xs = diff.q_sample(x0.expand(n, 4), torch.full((n,), t_idx))
    mean, var = xs.double().mean(0), xs.double().var(0)
    m_expect = math.sqrt(ref.ac[t_idx]) * x0.double()
    v_expect = 1 - ref.ac[t_idx]
    assert torch.all((mean - m_expect).abs() < 5 * math.sqrt(v_expect / n))
    # sample variance: relative standard error √(2/(n-1))
    assert torch.all((var / v_expect - 1).abs() < 5 * math.sqrt(2 / (n - 1)))


def test_q_sample_under_bf16_autocast(diff: GaussianDiffusion, ref: Ref) -> None:
    """In bf16 ᾱ_t rounds to 1 for the first steps (8 mantissa bits: 1 - 1e-4 == 1), so a
    schedule kept in bf16 would give those steps no noise: it stays float32 under autocast."""
    # the pitfall is real: rounded to bf16 (fp16), the linear schedule's ᾱ_t is exactly 1 for
    # code index t ≤ 9 (t ≤ 1)
    ac_bf16 = torch.tensor(ref.ac, dtype=torch.bfloat16)
    assert torch.all(ac_bf16[:10] == 1.0) and ac_bf16[10] < 1.0
    ac_fp16 = torch.tensor(ref.ac, dtype=torch.float16)
    assert torch.all(ac_fp16[:2] == 1.0) and ac_fp16[2] < 1.0
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(16, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 2, 5, 8, 9, 10, 50, 100, 200, 400, 600, 800, 900, 998, 999])
    fp32 = diff.q_sample(x0, t, eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = diff.q_sample(x0, t, eps)
        from_bf16 = diff.q_sample(x0.bfloat16(), t, eps.bfloat16())
        at0 = diff.q_sample(x0, torch.zeros(16, dtype=torch.long), eps)
    assert mixed.dtype == torch.float32 and from_bf16.dtype == torch.float32
    assert torch.equal(mixed, fp32)
    # t = 0 (paper's t = 1): x_t - √ᾱ x₀ = √(1-ᾱ) ε = 0.01 ε, not rounded away
    assert not torch.equal(at0, x0)
    np.testing.assert_allclose(
        (at0 - x0 * math.sqrt(ref.ac[0])).double(), 0.01 * eps.double(), atol=1e-6
    )


# ------------------------------------------------------------------ posterior q(x_{t-1} | x_t, x_0)
def test_posterior_is_ddpm_eq7(diff: GaussianDiffusion, ref: Ref) -> None:
    g = torch.Generator().manual_seed(2)
    t = _all_t()
    x0 = torch.rand(T, 5, generator=g) * 2 - 1
    x_t = torch.randn(T, 5, generator=g)
    mean, var, log_var = diff.q_posterior_mean_variance(x0, x_t, t)
    c1 = np.sqrt(ref.ac_prev) * ref.b / (1 - ref.ac)
    c2 = np.sqrt(ref.a) * (1 - ref.ac_prev) / (1 - ref.ac)
    expect = ref.col(c1, t) * x0.double() + ref.col(c2, t) * x_t.double()
    np.testing.assert_allclose(mean.double(), expect, atol=2e-6)
    np.testing.assert_allclose(var[:, 0].double(), ref.bt, rtol=1e-6, atol=1e-12)
    assert float(var[0, 0]) == 0.0  # β̃_1 = 0: q(x_0 | x_1, x_0) is a point mass
    # log β̃ clipped at the first step to log β̃ of the second (index 1)
    np.testing.assert_allclose(log_var[1:, 0].double(), np.log(ref.bt[1:]), atol=1e-6)
    assert float(log_var[0, 0]) == pytest.approx(math.log(ref.bt[1]), abs=1e-6)
    # at the first step μ̃ = x₀ (coef1 = 1, coef2 = 0)
    np.testing.assert_allclose(mean[0], x0[0], atol=1e-6)


# ------------------------------------------------------------------ ε / x₀ / v
def test_conversions_round_trip(diff: GaussianDiffusion) -> None:
    g = torch.Generator().manual_seed(3)
    t = _all_t()
    x0 = torch.rand(T, 6, generator=g) * 2 - 1
    eps = torch.randn(T, 6, generator=g)
    x_t = diff.q_sample(x0, t, eps)
    v = diff.get_v(x0, eps, t)
    tol = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(diff.predict_start_from_noise(x_t, t, eps), x0, **tol)  # ε → x₀
    torch.testing.assert_close(diff.predict_noise_from_start(x_t, t, x0), eps, **tol)  # x₀ → ε
    torch.testing.assert_close(diff.predict_start_from_v(x_t, t, v), x0, **tol)  # v → x₀
    torch.testing.assert_close(diff.predict_noise_from_v(x_t, t, v), eps, **tol)  # v → ε
    x0_from_eps = diff.predict_start_from_noise(x_t, t, eps)
    torch.testing.assert_close(diff.get_v(x0_from_eps, eps, t), v, **tol)  # ε → v
    eps_from_x0 = diff.predict_noise_from_start(x_t, t, x0)
    torch.testing.assert_close(diff.get_v(x0, eps_from_x0, t), v, **tol)  # x₀ → v
    # v by its definition v = √ᾱ ε - √(1-ᾱ) x₀
    ac = diff.alphas_cumprod_f64[t].unsqueeze(1)
    torch.testing.assert_close(
        v.double(), ac.sqrt() * eps.double() - (1 - ac).sqrt() * x0.double(), atol=1e-6, rtol=1e-6
    )


def test_training_targets() -> None:
    g = torch.Generator().manual_seed(4)
    x0, eps, t = torch.rand(8, 2, generator=g), torch.randn(8, 2, generator=g), torch.arange(8)
    for pt in DISCRETE_PREDICTION_TYPES:
        d = GaussianDiffusion(schedule="cosine", num_timesteps=10, prediction_type=pt)
        want = {"epsilon": eps, "sample": x0, "v_prediction": d.get_v(x0, eps, t)}[pt]
        assert torch.equal(d.training_target(x0, eps, t), want)


# ------------------------------------------------------------------ p_θ(x_{t-1} | x_t)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_p_mean_epsilon_is_eq11(variance_type: str, ref: Ref) -> None:
    d = GaussianDiffusion(num_timesteps=T, variance_type=variance_type)
    g = torch.Generator().manual_seed(5)
    t = _all_t()
    x_t = torch.randn(T, 4, generator=g)
    eps = torch.randn(T, 4, generator=g)
    out = d.p_mean_variance(eps, x_t, t, clip_denoised=False)
    expect = (x_t.double() - ref.col(ref.b / np.sqrt(1 - ref.ac), t) * eps.double()) / ref.col(
        np.sqrt(ref.a), t
    )
    np.testing.assert_allclose(out["mean"].double(), expect, atol=2e-5, rtol=1e-5)
    assert out["mean"].dtype == torch.float32
    torch.testing.assert_close(out["pred_noise"], eps)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_p_mean_other_parameterisations(prediction_type: str, ref: Ref) -> None:
    d = GaussianDiffusion(num_timesteps=T, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(6)
    t = _all_t()
    x0 = torch.rand(T, 4, generator=g) * 2 - 1
    eps = torch.randn(T, 4, generator=g)
    x_t = d.q_sample(x0, t, eps)
    pred = x0 if prediction_type == "sample" else d.get_v(x0, eps, t)
    out = d.p_mean_variance(pred, x_t, t, clip_denoised=False)
    c1 = np.sqrt(ref.ac_prev) * ref.b / (1 - ref.ac)
    c2 = np.sqrt(ref.a) * (1 - ref.ac_prev) / (1 - ref.ac)
    expect = ref.col(c1, t) * x0.double() + ref.col(c2, t) * x_t.double()
    np.testing.assert_allclose(out["mean"].double(), expect, atol=5e-5)
    np.testing.assert_allclose(out["pred_xstart"].double(), x0.double(), atol=5e-5)
    np.testing.assert_allclose(out["pred_noise"].double(), eps.double(), atol=5e-3)


def test_clip_denoised_keeps_eps_consistent(diff: GaussianDiffusion) -> None:
    t = torch.full((4,), 500)
    x_t = torch.tensor([[3.0], [-3.0], [0.2], [0.0]])
    eps = torch.tensor([[-2.0], [2.0], [0.1], [0.0]])  # x̂₀ far outside [-1, 1] for the first two
    x0, eps_hat = diff.model_predictions(eps, x_t, t, clip_denoised=True)
    assert x0.abs().max() <= 1.0 and x0[0, 0] == 1.0 and x0[1, 0] == -1.0
    torch.testing.assert_close(diff.q_sample(x0, t, eps_hat), x_t, atol=1e-5, rtol=1e-5)


def test_variances(ref: Ref) -> None:
    t = _all_t()
    shape = (T, 3)
    small = GaussianDiffusion(num_timesteps=T, variance_type="fixed_small")
    var, log_var = small.p_variance(t, shape)
    np.testing.assert_allclose(var[:, 0].double(), ref.bt, rtol=1e-6, atol=1e-12)
    clipped = np.log(np.concatenate([[ref.bt[1]], ref.bt[1:]]))
    np.testing.assert_allclose(log_var[:, 0].double(), clipped, atol=1e-5)

    large = GaussianDiffusion(num_timesteps=T, variance_type="fixed_large")
    var, log_var = large.p_variance(t, shape)
    np.testing.assert_allclose(var[1:, 0].double(), ref.b[1:], rtol=1e-6)  # σ² = β_t
    # first step: β̃ of the second step (improved-diffusion), for a sane decoder L_0
    assert float(var[0, 0]) == pytest.approx(ref.bt[1], rel=1e-6)
    np.testing.assert_allclose(log_var.double(), var.double().log(), atol=1e-6)

    rng = GaussianDiffusion(num_timesteps=T, variance_type="learned_range")
    for v, want in ((-1.0, clipped), (1.0, np.log(ref.b)), (0.0, 0.5 * (clipped + np.log(ref.b)))):
        var, log_var = rng.p_variance(t, shape, torch.full(shape, v))
        np.testing.assert_allclose(log_var[:, 0].double(), want, atol=1e-5)
        np.testing.assert_allclose(var.double(), log_var.double().exp(), rtol=1e-6)
    with pytest.raises(ValueError, match="variance output"):
        rng.p_variance(t, shape)

    learned = GaussianDiffusion(num_timesteps=T, variance_type="learned")
    lv = torch.randn(shape)
    var, log_var = learned.p_variance(t, shape, lv)
    assert torch.equal(log_var, lv)
    torch.testing.assert_close(var, lv.exp())


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_p_mean_variance_output_channels(variance_type: str) -> None:
    d = GaussianDiffusion(schedule="cosine", num_timesteps=10, variance_type=variance_type)
    c = d.model_output_channels(3)
    assert c == (6 if variance_type.startswith("learned") else 3)
    x_t, t = torch.randn(2, 3, 4, 4), torch.tensor([0, 9])
    out = d.p_mean_variance(torch.zeros(2, c, 4, 4), x_t, t)
    assert out["mean"].shape == out["variance"].shape == out["log_variance"].shape == x_t.shape
    assert all(v.dtype == torch.float32 for v in out.values())
    # the wrong number of channels is rejected, also 2C for C = 1 (which would broadcast)
    bad = 3 if c == 6 else 6
    with pytest.raises(ValueError, match="channels"):
        d.p_mean_variance(torch.zeros(2, bad, 4, 4), x_t, t)
    x1 = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="channels"):
        d.p_mean_variance(torch.zeros(2, 2 if c == 3 else 4, 4, 4), x1, t)


def test_p_mean_variance_under_bf16_autocast() -> None:
    d = GaussianDiffusion(num_timesteps=T, variance_type="learned_range")
    net = torch.nn.Conv2d(3, 6, 3, padding=1)
    x_t, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 500, 999])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_raw = net(x_t)
        out = d.p_mean_variance(out_raw, x_t, t)
    assert out_raw.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in out.values())
    ref = d.p_mean_variance(out_raw.float(), x_t, t)
    for k in out:
        assert torch.equal(out[k], ref[k])


# ------------------------------------------------------------------ validation
def test_rejects_bad_types() -> None:
    with pytest.raises(ValueError) as err:
        GaussianDiffusion(prediction_type="eps")
    assert "prediction_type" in str(err.value)
    assert all(p in str(err.value) for p in PREDICTION_TYPES)
    with pytest.raises(ValueError) as err:
        GaussianDiffusion(variance_type="fixed")
    assert "variance_type" in str(err.value)
    assert all(v in str(err.value) for v in VARIANCE_TYPES)
