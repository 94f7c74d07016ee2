"""Straightness (Liu et al. 2023, eq. 8) of probability-flow ODE paths, against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ddpm.diffusion import EDMProcess, RectifiedFlow
from ddpm.diffusion.reflow import coupled_pairs, straightness, trajectory
from ddpm.diffusion.samplers import EulerSampler, HeunSampler

T = 1000


class ConstantVelocity(nn.Module):
    """u(x, t) = c: every path a straight line at constant speed."""

    def __init__(self, c: Tensor) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: Tensor, tau: Tensor) -> Tensor:
        return self.c.expand_as(x)


class GaussianFlow(nn.Module):
    """The exact rectified-flow velocity for data N(0, s² I): x_t ~ N(0, r(t)² I) with
    r(t)² = (1 - t)² s² + t², and the paths x(t) = r(t) z scale each noise z: u = (r'/r) x."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s

    def forward(self, x: Tensor, tau: Tensor) -> Tensor:
        t = (tau.double() / T).reshape(-1, *([1] * (x.ndim - 1)))
        r2 = (1 - t) ** 2 * self.s**2 + t**2
        return (x.double() * (t - (1 - t) * self.s**2) / r2).float()


def gaussian_straightness(s: float, dim: int) -> float:
    """S = D ∫₀¹ ((s - 1) + r'(t))² dt for x(t) = r(t) z (Z₁ - Z₀ = (s - 1) z, Ż_s = -r' z)."""
    t = np.linspace(0.0, 1.0, 200_001)
    r = np.sqrt((1 - t) ** 2 * s**2 + t**2)
    dr = (t - (1 - t) * s**2) / r
    return dim * float(np.trapezoid((s - 1 + dr) ** 2, t))


def test_straight_field_has_zero_straightness_and_one_step_is_exact() -> None:
    process = RectifiedFlow(T)
    c = torch.tensor([[0.7, -1.3]])
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for steps in (1, 4, 50):
        sampler = EulerSampler(steps=steps, clip_denoised=False)
        x, noise, s = coupled_pairs(ConstantVelocity(c), process, z, sampler)
        torch.testing.assert_close(x, z - c)  # one step from t = 1 to 0: x = z - u
        torch.testing.assert_close(noise, z)
        assert s.abs().max().item() < 1e-8  # float32 rounding


@pytest.mark.parametrize("s", [0.2, 3.0])
def test_curved_gaussian_flow_matches_closed_form(s: float) -> None:
    process = RectifiedFlow(T)
    dim = 3
    z = torch.randn(4000, dim, generator=torch.Generator().manual_seed(1))
    sampler = EulerSampler(steps=400, clip_denoised=False)
    path = trajectory(GaussianFlow(s), process, z, sampler)
    torch.testing.assert_close(path.sample, s * z, atol=0, rtol=1e-2)  # Euler error O(1/steps)
    # E‖z‖² = D exactly: S per path is ‖z‖²/D times the closed form; compare path by path
    per_path = straightness(path, process.t_max)
    expected = gaussian_straightness(s, dim) * z.pow(2).sum(1).double() / dim
    torch.testing.assert_close(per_path, expected, rtol=2e-2, atol=1e-4)
    assert per_path.mean().item() > 0.01  # curved: not a straight path


def test_straightness_on_an_edm_process_with_heun() -> None:
    """Any process through its PF-ODE velocity: EDM's VE process with the exact ε-network of
    data N(0, s²): x(σ) = √(s² + σ²) w (w = z/√(1 + σ_max²) the sampler's start x(σ_max) = z√(1 + σ_max²)
    rescaled), a straight line through 0 travelled at varying speed."""
    process = EDMProcess(prediction_type="epsilon")
    s = 0.5

    def net(x: Tensor, tau: Tensor) -> Tensor:  # ε̂ = σ x/(s² + σ²), τ = ¼ ln σ
        sigma = torch.exp(4 * tau.double()).reshape(-1, 1)
        return (sigma * x.double() / (s**2 + sigma**2)).float()

    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(2))
    path = trajectory(net, process, z, HeunSampler(steps=200, clip_denoised=False))
    got = straightness(path, process.t_max) / (path.start.pow(2).sum(1).double())
    # per path: x(σ) = a(σ) x(σ_max) with a = √(s² + σ²)/R, R = √(s² + σ_max²); with
    # u = σ/σ_max ∈ [0, 1] (1 - u is the time s of eq. 8): (Z₁ - Z₀) - Ż = (a(0) - 1 + σ_max a'(σ)) x(σ_max)
    m = process.t_max
    sig = np.linspace(0.0, m, 400_001)
    R = np.sqrt(s**2 + m**2)
    integrand = (s / R - 1 + m * sig / np.sqrt(s**2 + sig**2) / R) ** 2
    expected = float(np.trapezoid(integrand, sig / m))
    torch.testing.assert_close(got, torch.full_like(got, expected), rtol=3e-2, atol=0)
    assert expected > 1e-3
