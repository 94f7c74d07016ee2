"""What the network sees and predicts, stated once for every process x_t = α x₀ + σ ε.

At a fixed t each parameterisation is an affine map from the raw network output F to the
denoised x̂₀ (EDM's D(x; σ), Karras et al. 2022, eq. 7), with an input scaling c_in:

    x̂₀ = c_skip · x_t + c_out · F(c_in · x_t, τ(t)),     ε̂ = e_skip · x_t + e_out · F,

ε̂ = (x_t - α x̂₀)/σ being the noise that x̂₀ implies (τ, the network's time input, is the
process's: :meth:`ddpm.diffusion.process.Process.net_time`). With α̇ = dα/dt, σ̇ = dσ/dt:

| ``prediction_type`` | F predicts              | c_in    | c_skip    | c_out     | e_skip | e_out  |
|---------------------|-------------------------|---------|-----------|-----------|--------|--------|
| ``epsilon``         | ε (DDPM)                | 1       | 1/α       | -σ/α      | 0      | 1      |
| ``sample``          | x₀                      | 1       | 0         | 1         | 1/σ    | -α/σ   |
| ``v_prediction``    | v = α ε - σ x₀          | 1       | α/N       | -σ/N      | σ/N    | α/N    |
| ``velocity``        | u = α̇ x₀ + σ̇ ε (flow)  | 1       | σ̇/Δ      | -σ/Δ      | -α̇/Δ  | α/Δ    |
| ``edm``             | Karras et al. Table 1   | 1/√D    | σ_d² α/D  | σ σ_d/√D  | σ/D    | -α σ_d/√D |

with N = α² + σ² (1 on a variance-preserving process: Salimans & Ho 2022's v), Δ = α σ̇ - σ α̇
(1 for rectified flow, α = 1 - t, σ = t: x̂₀ = x_t - t u, ε̂ = x_t + (1 - t) u; Liu et al. 2023)
and D = σ² + α² σ_d². The ``edm`` row is EDM's preconditioning of the scaled variable
x̃ = x/α at σ̃ = σ/α (c_skip = σ_d²/(σ̃² + σ_d²), c_out = σ̃ σ_d/√(σ̃² + σ_d²), c_in =
1/√(σ̃² + σ_d²), σ_d = 0.5), written without dividing by α so that it holds at α = 0 too; on
EDM's own process (α = 1) it is Table 1 as printed.

The training target of F is F* = (x₀ - c_skip x_t)/c_out, computed per row without the division
(:func:`target`): ε, x₀, v, u, and (σ x₀/σ_d - σ_d α ε)/√D for ``edm``, which has unit variance
at every σ for data of variance σ_d² (EDM §5: λ(σ) c_out(σ)² = 1, so EDM's loss λ(σ)‖D - x₀‖²
is ‖F - F*‖²). The conversions are exact (affine) whenever the denominators are non-zero:
``epsilon`` needs α > 0 (no x̂₀ at α = 0, e.g. zero terminal SNR or rectified flow at t = 1),
``sample`` needs σ > 0 for ε̂.

Everything works on Python floats, float64 NumPy arrays (the samplers' per-step coefficients)
and tensors (training) alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "velocity", "edm")

SIGMA_DATA = 0.5  # EDM's σ_data for images in [-1, 1] (Karras et al. 2022, Table 1)


class Preconditioning(NamedTuple):
    """x̂₀ = c_skip x_t + c_out F(c_in x_t), ε̂ = e_skip x_t + e_out F (module table)."""

    c_in: Any
    c_skip: Any
    c_out: Any
    e_skip: Any
    e_out: Any


def check_prediction_type(prediction_type: str, allowed: tuple[str, ...] = PREDICTION_TYPES) -> str:
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type must be one of {allowed}, got {prediction_type!r}")
    return prediction_type


def preconditioning(
    prediction_type: str,
    alpha: Any,
    sigma: Any,
    alpha_dot: Any = None,
    sigma_dot: Any = None,
    sigma_data: float = SIGMA_DATA,
) -> Preconditioning:
    """The row of the module table at (α, σ) (and α̇, σ̇ for ``velocity``): floats, float64
    arrays or tensors."""
    if prediction_type == "epsilon":
        return Preconditioning(1.0, 1.0 / alpha, -sigma / alpha, 0.0, 1.0)
    if prediction_type == "sample":
        return Preconditioning(1.0, 0.0, 1.0, 1.0 / sigma, -alpha / sigma)
    if prediction_type == "v_prediction":
        n = alpha * alpha + sigma * sigma
        return Preconditioning(1.0, alpha / n, -sigma / n, sigma / n, alpha / n)
    if prediction_type == "velocity":
        if alpha_dot is None or sigma_dot is None:
            raise ValueError("prediction_type 'velocity' needs dα/dt and dσ/dt")
        det = alpha * sigma_dot - sigma * alpha_dot
        return Preconditioning(1.0, sigma_dot / det, -sigma / det, -alpha_dot / det, alpha / det)
    if prediction_type == "edm":
        d = sigma * sigma + (alpha * sigma_data) ** 2
        root = d**0.5
        return Preconditioning(
            1.0 / root,
            sigma_data**2 * alpha / d,
            sigma * sigma_data / root,
            sigma / d,
            -alpha * sigma_data / root,
        )
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def target(
    prediction_type: str,
    x_start: Any,
    noise: Any,
    alpha: Any,
    sigma: Any,
    alpha_dot: Any = None,
    sigma_dot: Any = None,
    sigma_data: float = SIGMA_DATA,
) -> Any:
    """F* = (x₀ - c_skip x_t)/c_out at x_t = α x₀ + σ ε, written per row without dividing."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x_start
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * x_start
    if prediction_type == "velocity":
        return alpha_dot * x_start + sigma_dot * noise
    if prediction_type == "edm":
        root = (sigma * sigma + (alpha * sigma_data) ** 2) ** 0.5
        return (sigma / sigma_data * x_start - sigma_data * alpha * noise) / root
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
