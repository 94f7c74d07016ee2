"""Samplers: DDPM ancestral (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021) and its inversion,
DPM-Solver++ multistep (Lu et al. 2022).

Every sampler is a stateless function of a denoiser ``model(x_t, t) -> output`` (``t`` a
LongTensor (B,) of the model's training timesteps), a :class:`GaussianDiffusion`, a shape and a
generator. Shared conventions:

* ``generator``: a :class:`~ddpm.utils.seeding.PerSampleGenerator` (sample i depends only on its
  seed, whatever the batch size), a ``torch.Generator`` or None (global RNG). ``noise`` gives
  x_T directly (then ``shape`` may be None).
* ``clip_denoised``: x̂₀ is clipped to [-1, 1] and ε̂ recomputed from the clipped x̂₀, exactly as
  :meth:`GaussianDiffusion.model_predictions` (thresholding in diffusers' terms).
* ``device`` defaults to the device of the model's parameters (CPU for plain callables).
  Model outputs are cast to float32 and all sampler math runs in float32; the per-step schedule
  coefficients are computed once per call in float64 and kept as Python floats, so the loop
  has no host syncs and little Python work besides the network call.
* Runs under ``torch.inference_mode()``: the returned tensors are inference tensors.
* ``return_intermediates``: False (default) returns only the final samples. Otherwise the
  sampler returns ``(samples, intermediates)`` where ``intermediates`` is a dict with
  ``timesteps`` (LongTensor (K,), the model timesteps), ``x_t`` and ``pred_xstart`` (float32
  tensors (K, *shape) on the CPU), in sampling order. ``True`` records every step, an int
  ``k >= 1`` every k-th step (the first and the last always included), a sequence of timesteps
  records the steps whose timestep is nearest to each of them. ``x_t`` is the sampler's state at
  that timestep (the network input; for :func:`ddim_invert` the latent just reached) and
  ``pred_xstart`` the x̂₀ predicted there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.respace import SPACINGS, check_steps, respace, space_timesteps
from ddpm.utils.progress import progress_iter
from ddpm.utils.seeding import PerSampleGenerator, randn

DPM_SPACINGS = ("time_uniform", "logSNR", "trailing")

Model = Callable[[Tensor, Tensor], Tensor]
Generator = torch.Generator | PerSampleGenerator | None
Intermediates = bool | int | Sequence[int]
SampleOutput = Tensor | tuple[Tensor, dict[str, Tensor]]


# ---------------------------------------------------------------------------------------- helpers
def _model_device(model: Model) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def _randn(shape: Sequence[int], generator: Generator, device: torch.device) -> Tensor:
    """Standard normal float32 noise on ``device`` (a PerSampleGenerator draws on its own)."""
    return randn(tuple(shape), generator, device).to(device=device, dtype=torch.float32)


def _start(
    model: Model,
    shape: Sequence[int] | None,
    noise: Tensor | None,
    generator: Generator,
    device: torch.device | str | None,
) -> tuple[Tensor, torch.device]:
    """(x_T in float32 on the device, device)."""
    device = _model_device(model) if device is None else torch.device(device)
    if noise is not None:
        if shape is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != shape {tuple(shape)}")
        return noise.to(device=device, dtype=torch.float32), device
    if shape is None:
        raise ValueError("shape is required when noise is not given")
    return _randn(shape, generator, device), device


def _timestep_map(diffusion: GaussianDiffusion) -> list[int]:
    """Model timestep of each index of ``diffusion`` (the identity unless it is respaced)."""
    tmap = getattr(diffusion, "timestep_map", None)
    return list(range(diffusion.num_timesteps)) if tmap is None else tmap.tolist()


def _alphas_cumprod(diffusion: GaussianDiffusion) -> np.ndarray:
    return diffusion.alphas_cumprod_f64.detach().cpu().numpy()


class _Denoiser:
    """Calls the network at step k of a grid and returns (x̂₀, ε̂ or None, variance values).

    The same math as :meth:`GaussianDiffusion.model_predictions`, with the schedule values of
    the grid precomputed as Python floats instead of gathered per step.
    """

    def __init__(
        self,
        model: Model,
        diffusion: GaussianDiffusion,
        alphas_cumprod: Sequence[float],
        model_timesteps: Sequence[int],
        batch: int,
        device: torch.device,
        clip_denoised: bool,
    ) -> None:
        self.model, self.diffusion, self.clip = model, diffusion, clip_denoised
        self.kind = diffusion.prediction_type
        self.sqrt_ac = [math.sqrt(a) for a in alphas_cumprod]
        self.sqrt_1m_ac = [math.sqrt(1.0 - a) for a in alphas_cumprod]
        if self.kind == "epsilon":  # x₀ = √(1/ᾱ) x_t - √(1/ᾱ - 1) ε
            self.recip = [1.0 / math.sqrt(a) for a in alphas_cumprod]
            self.recipm1 = [math.sqrt(1.0 / a - 1.0) for a in alphas_cumprod]
        ts = torch.tensor([int(s) for s in model_timesteps], dtype=torch.long).to(device)
        self.t = ts[:, None].expand(len(ts), batch).contiguous()  # row k: the (B,) input at k

    def __call__(
        self, x: Tensor, k: int, need_eps: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        out = self.model(x, self.t[k])
        pred, var_values = self.diffusion.split_model_output(out, x.shape[1])
        eps = None
        if self.kind == "epsilon":
            eps = pred
            x0 = torch.sub(x * self.recip[k], pred, alpha=self.recipm1[k])
        elif self.kind == "sample":
            x0 = pred
        else:  # v: x₀ = √ᾱ x_t - √(1-ᾱ) v, ε = √(1-ᾱ) x_t + √ᾱ v
            x0 = torch.sub(x * self.sqrt_ac[k], pred, alpha=self.sqrt_1m_ac[k])
            if need_eps and not self.clip:
                eps = torch.add(x * self.sqrt_1m_ac[k], pred, alpha=self.sqrt_ac[k])
        if self.clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = None
        if need_eps and eps is None:  # ε = (x_t - √ᾱ x̂₀)/√(1-ᾱ)
            eps = torch.sub(x, x0, alpha=self.sqrt_ac[k]).mul_(1.0 / self.sqrt_1m_ac[k])
        return x0, eps, var_values


class _Recorder:
    """Keeps (t, x_t, x̂₀) at the steps ``return_intermediates`` asks for (module docstring)."""

    def __init__(self, request: Intermediates, timesteps: Sequence[int]) -> None:
        n = len(timesteps)
        if request is None or isinstance(request, (bool, int, np.integer)):
            stride = int(request or 0)
            if stride < 0:
                raise ValueError(f"return_intermediates must be >= 0 (a stride), got {stride}")
            self.steps = set(range(0, n, stride)) | {n - 1} if stride else set()
            self.requested = stride > 0
        else:
            wanted = [int(t) for t in request]
            grid = np.asarray(timesteps)
            self.steps = {int(np.argmin(np.abs(grid - t))) for t in wanted}
            self.requested = bool(wanted)
        self.timesteps = list(timesteps)
        self.items: list[tuple[int, Tensor, Tensor]] = []

    def __call__(self, k: int, x: Tensor, x0: Tensor) -> None:
        if k in self.steps:
            self.items.append((self.timesteps[k], x.to("cpu", copy=True), x0.to("cpu", copy=True)))

    def output(self, x: Tensor) -> SampleOutput:
        if not self.requested:
            return x
        ts, xs, x0s = zip(*self.items, strict=True) if self.items else ((), (), ())
        return x, {
            "timesteps": torch.tensor(ts, dtype=torch.long),
            "x_t": torch.stack(xs) if xs else torch.empty(0),
            "pred_xstart": torch.stack(x0s) if x0s else torch.empty(0),
        }


def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


# ---------------------------------------------------------------------------------------- DDPM
@torch.inference_mode()
def ddpm_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int] | None,
    *,
    steps: int | None = None,
    spacing: str = "uniform",
    generator: Generator = None,
    clip_denoised: bool = True,
    progress: bool = False,
    return_intermediates: Intermediates = False,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
) -> SampleOutput:
    """Ancestral sampling, DDPM Algorithm 2: x_{t-1} = μ̃_t(x̂₀, x_t) + σ_t z, z = 0 at the last step.

    The mean is the posterior mean at the predicted x̂₀ (eq. 7; eq. 11 for an ε-network without
    clipping); σ_t² follows the diffusion's ``variance_type``: ``fixed_large`` β_t,
    ``fixed_small`` β̃_t (eq. 6-7), ``learned_range`` / ``learned`` Σ_θ (improved DDPM eq. 15).
    ``steps`` < T respaces the chain to ``space_timesteps(T, steps, spacing)`` (improved DDPM §4).
    """
    T = diffusion.num_timesteps
    _check_flag(clip_denoised, "clip_denoised")
    kept = space_timesteps(T, T if steps is None else steps, spacing)
    sched = diffusion if len(kept) == T else respace(diffusion, kept)
    x, device = _start(model, shape, noise, generator, device)
    n = sched.num_timesteps
    model_t = _timestep_map(sched)
    den = _Denoiser(
        model, sched, _alphas_cumprod(sched).tolist(), model_t, x.shape[0], device, clip_denoised
    )
    coef1 = sched.posterior_mean_coef1.tolist()
    coef2 = sched.posterior_mean_coef2.tolist()
    learned = sched.learned_variance
    if learned:
        min_log = sched.posterior_log_variance_clipped.tolist()
        max_log = sched.log_betas.tolist()
    else:
        std = sched.p_variance(torch.arange(n), (n,))[0].sqrt().tolist()
    rec = _Recorder(return_intermediates, model_t[::-1])
    for i in progress_iter(range(n), total=n, desc="DDPM", enabled=progress):
        k = n - 1 - i
        x0, _, var_values = den(x, k)
        rec(i, x, x0)
        x = torch.add(x0 * coef1[k], x, alpha=coef2[k])  # μ̃_t(x̂₀, x_t); = x̂₀ at k = 0
        if k == 0:
            continue
        z = _randn(x.shape, generator, device)
        if not learned:
            x.add_(z, alpha=std[k])
            continue
        if sched.variance_type == "learned":
            log_var = var_values
        else:  # improved DDPM eq. 15: log Σ = v log β + (1-v) log β̃, v = (output+1)/2
            log_var = (var_values + 1.0) * (0.5 * (max_log[k] - min_log[k])) + min_log[k]
        x.addcmul_(torch.exp(0.5 * log_var), z)
    return rec.output(x)


# ---------------------------------------------------------------------------------------- DDIM
def _ddim_coefficients(ac: np.ndarray, eta: float) -> tuple[list[float], list[float], list[float]]:
    """(b, c, σ_t) per step such that DDIM's x_{t-1} = b x̂₀ + c x_t + σ_t z.

    DDIM eq. 12 with ε̂ = (x_t - √ᾱ_t x̂₀)/√(1-ᾱ_t) (recomputed from the possibly clipped x̂₀):
    b = √ᾱ_{t-1} - d √ᾱ_t/√(1-ᾱ_t), c = d/√(1-ᾱ_t), d = √(1-ᾱ_{t-1}-σ_t²). ``ac`` is the grid's ᾱ
    (ascending timesteps; ᾱ = 1 before the first).
    """
    ac_prev = np.append(1.0, ac[:-1])
    sigma = eta * np.sqrt((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev))
    rest = 1.0 - ac_prev - sigma**2
    if np.any(rest < -1e-12):
        raise ValueError(f"eta={eta} is too large: σ_t² exceeds 1 - ᾱ_(t-1) (eta <= 1 is safe)")
    d = np.sqrt(np.maximum(rest, 0.0)) / np.sqrt(1.0 - ac)
    return (np.sqrt(ac_prev) - d * np.sqrt(ac)).tolist(), d.tolist(), sigma.tolist()


def _ddim_grid(
    diffusion: GaussianDiffusion, steps: int, spacing: str
) -> tuple[np.ndarray, list[int]]:
    """(ᾱ, model timesteps) of the kept timesteps, ascending."""
    kept = space_timesteps(diffusion.num_timesteps, steps, spacing)
    tmap = _timestep_map(diffusion)
    return _alphas_cumprod(diffusion)[kept], [tmap[s] for s in kept]


def _check_eta(eta: float) -> float:
    if not (isinstance(eta, (int, float)) and eta >= 0.0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)


@torch.inference_mode()
def ddim_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int] | None,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "uniform",
    generator: Generator = None,
    clip_denoised: bool = True,
    progress: bool = False,
    return_intermediates: Intermediates = False,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
) -> SampleOutput:
    """DDIM (Song et al. 2021, eq. 12): x_{t-1} = √ᾱ_{t-1} x̂₀ + √(1-ᾱ_{t-1}-σ_t²) ε̂ + σ_t z.

    σ_t(η) = η √((1-ᾱ_{t-1})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t-1}) (eq. 16): η = 0 is deterministic, η = 1
    with all T steps is DDPM with σ² = β̃. The last step goes to ᾱ = 1, i.e. returns x̂₀. ε̂ is
    recomputed from the (clipped) x̂₀. Timesteps: ``space_timesteps(T, steps, spacing)``.
    """
    eta = _check_eta(eta)
    _check_flag(clip_denoised, "clip_denoised")
    ac, model_t = _ddim_grid(diffusion, steps, spacing)
    b, c, sigma = _ddim_coefficients(ac, eta)
    x, device = _start(model, shape, noise, generator, device)
    den = _Denoiser(model, diffusion, ac.tolist(), model_t, x.shape[0], device, clip_denoised)
    n = len(model_t)
    rec = _Recorder(return_intermediates, model_t[::-1])
    for i in progress_iter(range(n), total=n, desc="DDIM", enabled=progress):
        k = n - 1 - i
        x0, _, _ = den(x, k)
        rec(i, x, x0)
        if k == 0:  # ᾱ_{t-1} = 1: x₀ = x̂₀
            x = x0
            continue
        x = torch.add(x * c[k], x0, alpha=b[k])  # √ᾱ_{t-1} x̂₀ + √(1-ᾱ_{t-1}-σ_t²) ε̂
        if sigma[k] > 0.0:
            x.add_(_randn(x.shape, generator, device), alpha=sigma[k])
    return rec.output(x)


@torch.inference_mode()
def ddim_invert(
    model: Model,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    *,
    steps: int = 50,
    spacing: str = "uniform",
    fixed_point_iters: int = 0,
    clip_denoised: bool = False,
    progress: bool = False,
    return_intermediates: Intermediates = False,
    device: torch.device | str | None = None,
) -> SampleOutput:
    """Deterministic DDIM inversion (image -> noise): ``ddim_sample`` with η = 0 run backwards.

    On the grid τ_0 < ... < τ_{K-1} of ``ddim_sample(steps, spacing)``, each step inverts one
    sampling step: x_{τ_k} = √ᾱ_{τ_k} x̂₀ + √(1-ᾱ_{τ_k}) ε̂ with x̂₀ = (x_{τ_{k-1}} -
    √(1-ᾱ_{τ_{k-1}}) ε̂)/√ᾱ_{τ_{k-1}} (ᾱ = 1 before τ_0, so x̂₀ = x₀ at the first step) and ε̂
    predicted at (x, τ_k). The exact inverse needs ε̂ at the unknown x_{τ_k}; the plain inversion
    (``fixed_point_iters=0``, as diffusers' ``DDIMInverseScheduler``) uses x = x_{τ_{k-1}}, an
    O(1/steps) error; each fixed-point iteration re-predicts ε̂ at the new x_{τ_k} (one more
    network call per step) and converges to the exact inverse where the map contracts.
    Returns x_{τ_{K-1}}, the noise from which ``ddim_sample(..., noise=x_T)`` gives back ``x0``.
    No clipping by default (clipping would make the inverse inexact).
    """
    _check_flag(clip_denoised, "clip_denoised")
    if (
        isinstance(fixed_point_iters, bool)
        or not isinstance(fixed_point_iters, int)
        or fixed_point_iters < 0
    ):
        raise ValueError(f"fixed_point_iters must be an integer >= 0, got {fixed_point_iters!r}")
    ac, model_t = _ddim_grid(diffusion, steps, spacing)
    x, device = _start(model, None, x0, None, device)
    den = _Denoiser(model, diffusion, ac.tolist(), model_t, x.shape[0], device, clip_denoised)
    sqrt_ac, sqrt_1m_ac = np.sqrt(ac).tolist(), np.sqrt(1.0 - ac).tolist()
    n = len(model_t)
    rec = _Recorder(return_intermediates, model_t)
    for k in progress_iter(range(n), total=n, desc="DDIM inversion", enabled=progress):
        x_next = x
        for _ in range(1 + fixed_point_iters):
            _, eps, _ = den(x_next, k, need_eps=True)
            if k == 0:  # ᾱ = 1 before the first step: x̂₀ is the image itself
                x0_hat = x
            else:  # the x̂₀ implied by x_{τ_{k-1}} and ε̂ (DDIM eq. 12 solved for x̂₀)
                x0_hat = torch.sub(x, eps, alpha=sqrt_1m_ac[k - 1]).mul_(1.0 / sqrt_ac[k - 1])
            x_next = torch.add(x0_hat * sqrt_ac[k], eps, alpha=sqrt_1m_ac[k])
        x = x_next
        rec(k, x, x0_hat)
    return rec.output(x)


# ---------------------------------------------------------------------------------------- DPM-Solver++
def dpm_solver_timesteps(
    diffusion: GaussianDiffusion, steps: int, spacing: str = "time_uniform"
) -> list[int]:
    """Model timesteps of DPM-Solver++ (descending; after the last one the solver goes to σ = 0).

    ``time_uniform``: round(linspace(0, T-1, steps+1)) without the 0 (diffusers'
    ``timestep_spacing="linspace"``; steps <= T-1); ``logSNR``: steps+1 points uniform in
    λ = log(α/σ) from λ(T-1) to λ(0), the nearest timesteps without the last (an error when two
    points fall on one timestep, e.g. 20 steps at T = 100: λ changes fast near t = 0); ``trailing`` as in
    :func:`space_timesteps` (and diffusers). Grids that include t = 0 (``uniform``) are not
    offered: the jump from t ≈ T/steps to 0 is long in λ and a second-order step overshoots.
    """
    T = diffusion.num_timesteps
    if spacing == "time_uniform":
        steps = check_steps(steps, T, max_steps=max(T - 1, 1), why=" for time_uniform spacing")
        ts = np.round(np.linspace(0, T - 1, steps + 1))[1:] if T > 1 else np.zeros(1)
    elif spacing == "logSNR":
        steps = check_steps(steps, T)
        ac = _alphas_cumprod(diffusion)
        if ac[-1] <= 0.0:
            raise ValueError("spacing='logSNR' needs ᾱ_T > 0 (zero-terminal-SNR schedule)")
        lam = 0.5 * (np.log(ac) - np.log1p(-ac))
        grid = np.linspace(lam[-1], lam[0], steps + 1)[:-1]
        ts = np.argmin(np.abs(lam[None, :] - grid[:, None]), axis=1)
    elif spacing == "trailing":
        ts = space_timesteps(T, steps, spacing)
    else:
        raise ValueError(f"spacing must be one of {DPM_SPACINGS}, got {spacing!r}")
    out = sorted({int(t) for t in ts}, reverse=True)
    if len(out) != steps:
        raise ValueError(
            f"spacing={spacing!r} gives only {len(out)} distinct timesteps for "
            f"steps={steps} and T={T}; use fewer steps"
        )
    return out


def _check_order(order: int) -> None:
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")


def _dpm_solver_coefficients(
    ac: np.ndarray, order: int, lower_order_final: bool
) -> list[tuple[float, float, float, float]]:
    """Per step (a, c0, c1, c2): x_next = a x + c0 D_k + c1 D_{k-1} + c2 D_{k-2}, D = x̂₀.

    DPM-Solver++ multistep (Lu et al. 2022, Alg. 2; 3rd order as in diffusers) in
    λ = log(α/σ), α = √ᾱ, σ = √(1-ᾱ); the grid ``ac`` is followed by σ = 0, λ = +∞. Order k at the
    k-th step (warm-up), first order at the last step (to σ = 0: x = x̂₀) and at most second order
    at the one before when ``lower_order_final`` and fewer than 15 steps (as diffusers).
    """
    n = len(ac)
    alpha = np.append(np.sqrt(ac), 1.0)
    sigma = np.append(np.sqrt(1.0 - ac), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # -inf at ᾱ = 0, +inf at the clean end
    m = np.eye(3)  # D_k, D_{k-1}, D_{k-2} as coefficient vectors
    out = []
    for k in range(n):
        h = lam[k + 1] - lam[k]
        a = sigma[k + 1] / sigma[k]
        p = alpha[k + 1] * -math.expm1(-h)  # -α_t (e^{-h} - 1)
        o = min(order, k + 1)
        if k == n - 1:
            o = 1
        elif k == n - 2 and lower_order_final and n < 15:
            o = min(o, 2)
        c = p * m[0]
        if o >= 2:
            r0 = (lam[k] - lam[k - 1]) / h
            d1_0 = (m[0] - m[1]) / r0
            if o == 2:  # midpoint: x = a x + p D0 + p/2 D1
                c = c + 0.5 * p * d1_0
            else:
                r1 = (lam[k - 1] - lam[k - 2]) / h
                d1_1 = (m[1] - m[2]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                em1 = math.expm1(-h)
                c = (
                    c
                    + alpha[k + 1] * (em1 / h + 1.0) * d1
                    - alpha[k + 1] * ((em1 + h) / h**2 - 0.5) * d2
                )
        out.append((float(a), float(c[0]), float(c[1]), float(c[2])))
    return out


@torch.inference_mode()
def dpm_solver_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int] | None,
    *,
    steps: int = 20,
    order: int = 2,
    spacing: str = "time_uniform",
    lower_order_final: bool = True,
    generator: Generator = None,
    clip_denoised: bool = True,
    progress: bool = False,
    return_intermediates: Intermediates = False,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
) -> SampleOutput:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep data-prediction solver of the diffusion ODE.

    The discrete-time version of diffusers' ``DPMSolverMultistepScheduler(algorithm_type=
    "dpmsolver++", solver_order=order, final_sigmas_type="zero")``: with h = λ_{t} - λ_{s},
    x_t = (σ_t/σ_s) x_s + α_t (1 - e^{-h}) (D0 + D1/(2 r)), D0 = x̂₀(x_s), D1 = D0 - x̂₀ of the
    previous step, r = h_prev/h. The first step is first order, the last goes to σ = 0 (returns
    x̂₀). ``clip_denoised`` clips x̂₀ (diffusers' thresholding with max value 1). ``order`` in
    1 (DDIM), 2, 3. Timesteps: :func:`dpm_solver_timesteps`.
    """
    _check_order(order)
    _check_flag(clip_denoised, "clip_denoised")
    _check_flag(lower_order_final, "lower_order_final")
    ts = dpm_solver_timesteps(diffusion, steps, spacing)
    ac = _alphas_cumprod(diffusion)[ts]
    coefs = _dpm_solver_coefficients(ac, order, lower_order_final)
    tmap = _timestep_map(diffusion)
    model_t = [tmap[s] for s in ts]
    x, device = _start(model, shape, noise, generator, device)
    den = _Denoiser(model, diffusion, ac.tolist(), model_t, x.shape[0], device, clip_denoised)
    rec = _Recorder(return_intermediates, model_t)
    d1 = d2 = None
    for k in progress_iter(range(len(ts)), total=len(ts), desc="DPM-Solver++", enabled=progress):
        x0, _, _ = den(x, k)
        rec(k, x, x0)
        a, c0, c1, c2 = coefs[k]
        x_next = x0 * c0 if a == 0.0 else torch.add(x * a, x0, alpha=c0)
        if c1 != 0.0:
            x_next.add_(d1, alpha=c1)
        if c2 != 0.0:
            x_next.add_(d2, alpha=c2)
        x, d1, d2 = x_next, x0, d1
    return rec.output(x)


# ---------------------------------------------------------------------------------------- configs
def _check_config(
    steps: int | None,
    clip_denoised: bool,
    spacing: str,
    spacings: Sequence[str],
    optional_steps: bool = False,
) -> None:
    if not (optional_steps and steps is None) and (
        isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1
    ):
        allowed = "null or an integer >= 1" if optional_steps else "an integer >= 1"
        raise ValueError(f"steps must be {allowed}, got {steps!r}")
    _check_flag(clip_denoised, "clip_denoised")
    if spacing not in spacings:
        raise ValueError(f"spacing must be one of {tuple(spacings)}, got {spacing!r}")


class _Sampler:
    """The call signature shared by the config-friendly samplers (``conf/sampler/*.yaml``)."""

    name: ClassVar[str] = ""

    def _run(
        self, model: Model, diffusion: GaussianDiffusion, shape: Sequence[int] | None, **common: Any
    ) -> SampleOutput:
        raise NotImplementedError

    def __call__(
        self,
        model: Model,
        diffusion: GaussianDiffusion,
        shape: Sequence[int] | None,
        *,
        generator: Generator = None,
        progress: bool = False,
        return_intermediates: Intermediates = False,
        device: torch.device | str | None = None,
        noise: Tensor | None = None,
    ) -> SampleOutput:
        return self._run(
            model,
            diffusion,
            shape,
            generator=generator,
            progress=progress,
            return_intermediates=return_intermediates,
            device=device,
            noise=noise,
        )


@dataclass
class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling (:func:`ddpm_sample`); ``steps=None`` runs all T steps."""

    name: ClassVar[str] = "ddpm"
    steps: int | None = None
    clip_denoised: bool = True
    spacing: str = "uniform"

    def __post_init__(self) -> None:
        _check_config(self.steps, self.clip_denoised, self.spacing, SPACINGS, optional_steps=True)

    def _run(
        self, model: Model, diffusion: GaussianDiffusion, shape: Sequence[int] | None, **common: Any
    ) -> SampleOutput:
        return ddpm_sample(
            model,
            diffusion,
            shape,
            steps=self.steps,
            spacing=self.spacing,
            clip_denoised=self.clip_denoised,
            **common,
        )


@dataclass
class DDIMSampler(_Sampler):
    """DDIM sampling (:func:`ddim_sample`): η = 0 deterministic, η = 1 DDPM-like."""

    name: ClassVar[str] = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "uniform"
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        _check_config(self.steps, self.clip_denoised, self.spacing, SPACINGS)
        self.eta = _check_eta(self.eta)

    def _run(
        self, model: Model, diffusion: GaussianDiffusion, shape: Sequence[int] | None, **common: Any
    ) -> SampleOutput:
        return ddim_sample(
            model,
            diffusion,
            shape,
            steps=self.steps,
            eta=self.eta,
            spacing=self.spacing,
            clip_denoised=self.clip_denoised,
            **common,
        )


@dataclass
class DPMSolverSampler(_Sampler):
    """DPM-Solver++ multistep sampling (:func:`dpm_solver_sample`); order 2 is DPM-Solver++(2M)."""

    name: ClassVar[str] = "dpm_solver"
    steps: int = 20
    order: int = 2
    spacing: str = "time_uniform"
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        _check_config(self.steps, self.clip_denoised, self.spacing, DPM_SPACINGS)
        _check_order(self.order)

    def _run(
        self, model: Model, diffusion: GaussianDiffusion, shape: Sequence[int] | None, **common: Any
    ) -> SampleOutput:
        return dpm_solver_sample(
            model,
            diffusion,
            shape,
            steps=self.steps,
            order=self.order,
            spacing=self.spacing,
            clip_denoised=self.clip_denoised,
            **common,
        )
