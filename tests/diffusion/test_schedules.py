"""Noise schedules against their closed forms, computed independently here (math / numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddpm.diffusion import SCHEDULES, GaussianDiffusion, make_beta_schedule
from ddpm.diffusion.schedules import rescale_zero_terminal_snr


def _cumprod(betas) -> np.ndarray:
    """ᾱ_t = Π_{s≤t} (1 - β_s), by a plain Python loop (no np.cumprod)."""
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - float(b)
        out.append(prod)
    return np.array(out)


def _cosine_f(t: float, T: int, s: float = 0.008) -> float:
    return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2


# ------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("T", [1000, 50, 250, 4000])
def test_linear_matches_ddpm_formula(T: int) -> None:
    scale = 1000.0 / T
    lo, hi = 1e-4 * scale, 0.02 * scale
    expect = [lo + i * (hi - lo) / (T - 1) for i in range(T)]
    betas = make_beta_schedule("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, expect, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.cumprod(1 - betas), _cumprod(expect), rtol=0, atol=1e-6)
    if T == 1000:  # DDPM's numbers: β_1 = 1e-4, β_T = 0.02
        assert betas[0] == pytest.approx(1e-4, abs=1e-15)
        assert betas[-1] == pytest.approx(0.02, abs=1e-15)


@pytest.mark.parametrize("T", [1000, 4000, 50])
def test_cosine_matches_improved_ddpm_formula(T: int) -> None:
    ac = np.cumprod(1 - make_beta_schedule("cosine", T))
    # ᾱ_t = f(t)/f(0) for the paper's t = 1..T (code index t-1)
    expect = np.array([_cosine_f(t, T) / _cosine_f(0, T) for t in range(1, T + 1)])
    raw_betas = 1 - expect / np.concatenate([[1.0], expect[:-1]])
    clipped = raw_betas > 0.999
    # f(T) = cos²(π/2) ≈ 0, so only the last β (≈ 1) hits the 0.999 cap; the one before is ≈ 0.75.
    assert np.flatnonzero(clipped).tolist() == [T - 1]
    assert 0.7 < raw_betas[-2] < 0.8
    np.testing.assert_allclose(ac[:-1], expect[:-1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ac[:-1], expect[:-1], rtol=1e-9)  # also relatively, near 0
    # clipping changes ᾱ only at the very end: ᾱ_T = (1 - 0.999) ᾱ_{T-1}, not f(T)/f(0) ≈ 0.
    assert ac[-1] == pytest.approx(0.001 * expect[-2], rel=1e-9)
    assert expect[-1] < 1e-30


def test_scaled_linear_is_linear_in_sqrt_beta() -> None:
    betas = make_beta_schedule("scaled_linear", 1000)
    root = np.sqrt(betas)
    assert root[0] == pytest.approx(math.sqrt(0.00085), rel=1e-12)
    assert root[-1] == pytest.approx(math.sqrt(0.012), rel=1e-12)
    steps = np.diff(root)
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)
    # not linear in β itself: latent diffusion's "linear" is diffusers' scaled_linear
    assert not np.allclose(np.diff(betas), np.diff(betas)[0], rtol=1e-3)
    # endpoints scale by 1000/T like the linear schedule
    b500 = make_beta_schedule("scaled_linear", 500)
    assert b500[0] == pytest.approx(2 * 0.00085, rel=1e-12)
    assert b500[-1] == pytest.approx(2 * 0.012, rel=1e-12)


def test_sigmoid_is_sane() -> None:
    T = 1000
    betas = make_beta_schedule("sigmoid", T)
    ac = np.cumprod(1 - betas)
    assert np.all((betas > 0) & (betas < 1))
    assert np.all(np.diff(ac) < 0)
    assert 0.999 < ac[0] < 1.0  # ≈ 1 - 6σ'(-3)/(σ(3)-σ(-3))/T ≈ 1 - 3e-4
    assert ac[-1] < 1e-5
    assert np.isclose(betas[-1], 0.999)  # f(1) = 0: last β capped
    # independent closed form: ᾱ(t) = (σ(3) - σ(6t-3)) / (σ(3) - σ(-3)), t = i/T
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expect = [(sig(3) - sig(6 * i / T - 3)) / (sig(3) - sig(-3)) for i in range(1, T)]
    np.testing.assert_allclose(ac[:-1], expect, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_alphas_cumprod_strictly_decreasing(name: str, T: int) -> None:
    for rescale in (False, True):
        betas = make_beta_schedule(name, T, rescale_to_zero_terminal_snr=rescale)
        ac = np.cumprod(1 - betas)
        assert np.all(np.diff(ac) < 0), (name, T, rescale)
        assert 0 < ac[0] < 1
        assert np.all(np.isfinite(betas))


# ------------------------------------------------------------------ independent implementations
@pytest.mark.parametrize(
    "ours, theirs, kwargs",
    [
        ("linear", "linear", {}),
        ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("cosine", "squaredcos_cap_v2", {}),
        ("sigmoid_beta", "sigmoid", {}),
    ],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_matches_diffusers(ours: str, theirs: str, kwargs: dict, zero_snr: bool) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=theirs, rescale_betas_zero_snr=zero_snr, **kwargs
    )
    ref = sched.alphas_cumprod.double().numpy()  # diffusers works in float32
    ac = np.cumprod(
        1 - make_beta_schedule(ours, 1000, rescale_to_zero_terminal_snr=zero_snr, **kwargs)
    )
    np.testing.assert_allclose(ac, ref, rtol=0, atol=1e-6)


def test_the_two_sigmoids_are_different_schedules() -> None:
    """``sigmoid`` (on ᾱ, denoising-diffusion-pytorch's) and ``sigmoid_beta`` (on β, diffusers'
    "sigmoid") share a word, not a curve: ᾱ is 0.5 half-way for one (a sigmoid symmetric in ᾱ),
    0.30 for the other, and at 3T/4 they differ 26-fold."""
    T = 1000
    on_ac = np.cumprod(1 - make_beta_schedule("sigmoid", T))
    on_beta = np.cumprod(1 - make_beta_schedule("sigmoid_beta", T))
    assert on_ac[T // 2 - 1] == pytest.approx(0.5, abs=2e-3)  # symmetric sigmoid in ᾱ
    assert on_beta[T // 2 - 1] == pytest.approx(0.302, abs=2e-3)
    assert on_ac[3 * T // 4 - 1] > 20 * on_beta[3 * T // 4 - 1]
    # sigmoid_beta: β itself is the sigmoid, from beta_start to beta_end
    betas = make_beta_schedule("sigmoid_beta", T)
    sig = 1 / (1 + np.exp(-np.linspace(-6, 6, T)))
    np.testing.assert_allclose(betas, 1e-4 + (0.02 - 1e-4) * sig, rtol=1e-12)
    assert make_beta_schedule("sigmoid_beta", 500)[-1] == pytest.approx(2 * betas[-1], rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [100, 1000])
def test_matches_denoising_diffusion_pytorch(name: str, T: int) -> None:
    ddp = pytest.importorskip("denoising_diffusion_pytorch.denoising_diffusion_pytorch")
    ref = getattr(ddp, f"{name}_beta_schedule")(T).numpy()  # float64 there ...
    ours = make_beta_schedule(name, T)
    np.testing.assert_allclose(np.cumprod(1 - ours), np.cumprod(1 - ref), rtol=0, atol=1e-6)
    if name != "sigmoid":  # ... except σ(±3) in its sigmoid schedule, from float32 tensors
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ user betas, zero terminal SNR
def test_user_given_betas() -> None:
    betas = [0.1, 0.2, 0.3, 0.5]
    out = make_beta_schedule(betas=betas)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, betas)
    d = GaussianDiffusion(betas=np.array(betas))
    assert d.num_timesteps == 4
    np.testing.assert_allclose(d.alphas_cumprod_f64.numpy(), _cumprod(betas), rtol=1e-15)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), _cumprod(betas), rtol=1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_zero_terminal_snr(name: str) -> None:
    T = 1000
    old = make_beta_schedule(name, T)
    new = make_beta_schedule(name, T, rescale_to_zero_terminal_snr=True)
    old_ac, new_ac = _cumprod(old), _cumprod(new)
    assert new_ac[-1] == 0.0 and new[-1] == 1.0
    assert new_ac[0] == pytest.approx(old_ac[0], rel=1e-12)  # ᾱ_1 kept
    # √ᾱ is an affine function of the old √ᾱ (shift then scale)
    a, b = np.polyfit(np.sqrt(old_ac), np.sqrt(new_ac), 1)
    np.testing.assert_allclose(a * np.sqrt(old_ac) + b, np.sqrt(new_ac), atol=1e-12)
    np.testing.assert_allclose(rescale_zero_terminal_snr(old), new)


def test_zero_terminal_snr_in_diffusion() -> None:
    with pytest.raises(ValueError, match="v_prediction"):
        GaussianDiffusion(num_timesteps=100, rescale_zero_terminal_snr=True)
    d = GaussianDiffusion(
        num_timesteps=100, rescale_zero_terminal_snr=True, prediction_type="v_prediction"
    )
    assert float(d.alphas_cumprod[-1]) == 0.0
    assert float(d.snr(d.alphas_cumprod.new_tensor([99]).long())) == 0.0


# ------------------------------------------------------------------ validation
def test_unknown_schedule_name_lists_allowed() -> None:
    with pytest.raises(ValueError) as err:
        make_beta_schedule("quadratic", 1000)
    for allowed in SCHEDULES:
        assert allowed in str(err.value)
    assert "quadratic" in str(err.value)
    with pytest.raises(ValueError, match="cosine"):
        GaussianDiffusion(schedule="squaredcos_cap_v2")


@pytest.mark.parametrize("T", [0, -5, 2.5, True, "1000"])
def test_bad_num_timesteps(T) -> None:
    with pytest.raises(ValueError, match="num_timesteps"):
        make_beta_schedule("linear", T)


def test_num_timesteps_one_is_allowed() -> None:
    assert make_beta_schedule("cosine", 1).shape == (1,)


@pytest.mark.parametrize(
    "betas", [[0.1, 0.0], [0.1, 1.0], [-0.1, 0.2], [0.1, 1.5], [0.1, float("nan")], []]
)
def test_betas_outside_open_unit_interval(betas) -> None:
    with pytest.raises(ValueError, match="betas"):
        make_beta_schedule(betas=betas)


def test_linear_with_too_few_steps_is_rejected() -> None:
    # β_T = 0.02 · 1000/T reaches 1 at T = 20.
    with pytest.raises(ValueError, match=r"beta\[19\]"):
        make_beta_schedule("linear", 20)


def test_bad_schedule_kwargs() -> None:
    with pytest.raises(ValueError, match="cosine"):
        make_beta_schedule("cosine", 100, beta_start=0.1)
