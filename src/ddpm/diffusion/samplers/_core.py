"""What every sampler shares: the common options, the grid, the guided network call (the
denoiser), x_T, intermediates and option checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.respace import net_timesteps
from ddpm.utils.devices import model_device
from ddpm.utils.progress import progress_iter
from ddpm.utils.seeding import PerSampleGenerator, randn

Net = Callable[..., Tensor]
Generator = torch.Generator | PerSampleGenerator | None
Intermediates = bool | int | Sequence[int]
SampleOutput = Tensor | tuple[Tensor, dict[str, Tensor]]

# ᾱ = 0 (zero terminal SNR) has σ = ∞ and λ = -∞; the σ/λ-space solvers use ᾱ = 2⁻²⁴ there,
# as diffusers' DPM-Solver/UniPC schedulers do with ``rescale_betas_zero_snr``.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


# ---------------------------------------------------------------------------------------- checks
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")  # DPM-Solver++: ODE, SDE
SOLVER_TYPES = ("bh1", "bh2")  # UniPC's B(h)


def check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_number(value: Any, name: str, minimum: float | None = None) -> float:
    """A finite number (>= ``minimum``); ``inf`` allowed only as an upper bound (no minimum)."""
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    ok = ok and not math.isnan(value) and (minimum is None or math.isfinite(value))
    if not ok or (minimum is not None and value < minimum):
        need = "a finite number" if minimum is None else f"a finite number >= {minimum:g}"
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return float(value)


def check_order(order: int) -> int:
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    return int(order)


def check_choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def check_steps_setting(steps: Any, optional: bool = False) -> None:
    """A config's ``steps``: an integer >= 1 (or None when ``optional``); T is checked at call."""
    if optional and steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        allowed = "null or an integer >= 1" if optional else "an integer >= 1"
        raise ValueError(f"steps must be {allowed}, got {steps!r}")


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "eta": lambda v: check_number(v, "eta", 0.0),
    "order": check_order,
    "guidance_scale": lambda v: check_number(v, "guidance_scale"),
    "clip_denoised": lambda v: check_flag(v, "clip_denoised"),
    "lower_order_final": lambda v: check_flag(v, "lower_order_final"),
    "algorithm_type": lambda v: check_choice(v, "algorithm_type", ALGORITHM_TYPES),
    "solver_type": lambda v: check_choice(v, "solver_type", SOLVER_TYPES),
    "s_churn": lambda v: check_number(v, "s_churn", 0.0),
    "s_tmin": lambda v: check_number(v, "s_tmin", 0.0),
    "s_noise": lambda v: check_number(v, "s_noise", 0.0),
}


def check_options(
    options: dict[str, Any], spacings: Sequence[str] | None = None, steps_optional: bool = False
) -> None:
    """Validate sampler options by name: the one rule per option of the sampling functions and
    their config wrappers (``steps`` against T and ``spacing`` are checked by the grids)."""
    for name, value in options.items():
        if name == "steps":
            check_steps_setting(value, steps_optional)
        elif name == "spacing" and spacings is not None:
            check_choice(value, "spacing", spacings)
        elif name in _CHECKS:
            _CHECKS[name](value)
    if options.get("s_tmax") is not None:  # None: no upper bound
        tmax = options["s_tmax"]
        if check_number(tmax, "s_tmax") < options.get("s_tmin", 0.0):
            raise ValueError(f"s_tmax must be >= s_tmin={options['s_tmin']}, got {tmax!r}")


# ---------------------------------------------------------------------------------------- x_T
def draw_noise(shape: Sequence[int], generator: Generator, device: torch.device) -> Tensor:
    """Standard normal float32 noise on ``device`` (a PerSampleGenerator draws on its own)."""
    return randn(tuple(shape), generator, device).to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------- grid
def alphas_cumprod(diffusion: GaussianDiffusion) -> np.ndarray:
    """ᾱ of every index of ``diffusion`` in float64."""
    return diffusion.alphas_cumprod_f64.detach().cpu().numpy()


def solver_alphas_cumprod(diffusion: GaussianDiffusion) -> np.ndarray:
    """ᾱ for the σ/λ-space solvers: ᾱ = 0 replaced by ``ZERO_SNR_ALPHA_CUMPROD``."""
    ac = alphas_cumprod(diffusion)
    return np.where(ac > 0.0, ac, ZERO_SNR_ALPHA_CUMPROD)


def grid(
    diffusion: GaussianDiffusion, indices: Iterable[int], solver: bool = False
) -> tuple[np.ndarray, list[int]]:
    """A sampler's grid: (ᾱ, the network's timestep) at each of the ``indices`` of
    ``diffusion``, the timestep being ``timestep_map`` of a respaced diffusion. ``solver``:
    ᾱ of the σ/λ-space solvers (:func:`solver_alphas_cumprod`)."""
    indices = list(indices)
    ac = solver_alphas_cumprod(diffusion) if solver else alphas_cumprod(diffusion)
    return ac[indices], net_timesteps(diffusion, torch.tensor(indices, dtype=torch.long)).tolist()


def log_snr(ac: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(α, σ, λ) of a grid's ᾱ followed by the clean end α = 1, σ = 0, λ = +∞ (α = √ᾱ,
    σ = √(1-ᾱ), λ = log(α/σ): the variables of DPM-Solver and UniPC)."""
    alpha = np.append(np.sqrt(ac), 1.0)
    sigma = np.append(np.sqrt(1.0 - ac), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def combine(a: float, x: Tensor, terms: Iterable[tuple[float, Tensor | None]]) -> Tensor:
    """a·x + Σ c·d over the (c, d) of ``terms``: one step of a linear multistep solver. Terms
    with c = 0 are skipped (their d may be None: a history not yet filled)."""
    out = x * a if a != 0.0 else None
    for c, d in terms:
        if c != 0.0:
            out = d * c if out is None else out.add_(d, alpha=c)
    return torch.zeros_like(x) if out is None else out


# ---------------------------------------------------------------------------------------- network
class Denoiser:
    """EDM's denoiser D(x; σ) = x̂₀ on a grid: ``denoise(x, k)`` calls the (guided) network at
    step k and returns (x̂₀, ε̂ or None, variance values).

    The same math as :meth:`GaussianDiffusion.model_predictions`, with the schedule values of
    the grid (α = √ᾱ, σ = √(1-ᾱ)) precomputed as Python floats instead of gathered per step.
    Classifier-free guidance (package docstring) mixes the conditional and null-class outputs
    before any conversion.
    """

    def __init__(
        self,
        net: Net,
        diffusion: GaussianDiffusion,
        alphas_cumprod: Sequence[float],
        net_timesteps: Sequence[int],
        clip_denoised: bool,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> None:
        """``alphas_cumprod``: ᾱ at each step; ``net_timesteps``: the network's t there."""
        self.net, self.diffusion, self.clip = net, diffusion, clip_denoised
        self.kind = diffusion.prediction_type
        self.alpha = [math.sqrt(a) for a in alphas_cumprod]
        self.sigma = [math.sqrt(1.0 - a) for a in alphas_cumprod]
        if self.kind == "epsilon":  # x₀ = √(1/ᾱ) x_t - √(1/ᾱ - 1) ε
            self.recip = [1.0 / math.sqrt(a) for a in alphas_cumprod]
            self.recipm1 = [math.sqrt(1.0 / a - 1.0) for a in alphas_cumprod]
        self.net_timesteps = [int(s) for s in net_timesteps]
        self.class_labels = class_labels
        self.scale = check_number(guidance_scale, "guidance_scale")

    def start(
        self,
        shape: Sequence[int] | None,
        noise: Tensor | None,
        generator: Generator,
        device: torch.device | str | None,
    ) -> Tensor:
        """x_T in float32 on the device (default: the network's); fixes the batch for the calls."""
        device = model_device(self.net) if device is None else torch.device(device)
        if noise is not None:
            if shape is not None and tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != shape {tuple(shape)}")
            x = noise.to(device=device, dtype=torch.float32)
        elif shape is None:
            raise ValueError("shape is required when noise is not given")
        else:
            x = draw_noise(shape, generator, device)
        batch = x.shape[0]
        self.labels = _guidance_labels(self.net, self.class_labels, self.scale, batch, device)
        self.guided = self.labels is not None and self.labels.shape[0] == 2 * batch
        width = 2 * batch if self.guided else batch
        ts = torch.tensor(self.net_timesteps, dtype=torch.long).to(device)
        self.t = ts[:, None].expand(len(ts), width).contiguous()  # row k: the input at step k
        return x

    def net_output(self, x: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        """The (guided) network output at step k as (mean prediction, variance values)."""
        if self.labels is None:
            return self.diffusion.split_model_output(self.net(x, self.t[k]), x.shape[1])
        if not self.guided:
            out = self.net(x, self.t[k], class_labels=self.labels)
            return self.diffusion.split_model_output(out, x.shape[1])
        out = self.net(torch.cat([x, x]), self.t[k], class_labels=self.labels)
        pred, var_values = self.diffusion.split_model_output(out, x.shape[1])
        cond, uncond = pred.chunk(2)
        # ε̃ = ε_u + s (ε_c - ε_u) in the network's output space; the conditional variance
        pred = torch.lerp(uncond, cond, self.scale)
        return pred, None if var_values is None else var_values.chunk(2)[0]

    def __call__(
        self, x: Tensor, k: int, need_eps: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        pred, var_values = self.net_output(x, k)
        eps = None
        if self.kind == "epsilon":
            eps = pred
            x0 = torch.sub(x * self.recip[k], pred, alpha=self.recipm1[k])
        elif self.kind == "sample":
            x0 = pred
        else:  # v: x₀ = α x_t - σ v, ε = σ x_t + α v
            x0 = torch.sub(x * self.alpha[k], pred, alpha=self.sigma[k])
            if need_eps and not self.clip:
                eps = torch.add(x * self.sigma[k], pred, alpha=self.alpha[k])
        if self.clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = None
        if need_eps and eps is None:  # ε = (x_t - α x̂₀)/σ
            eps = torch.sub(x, x0, alpha=self.alpha[k]).mul_(1.0 / self.sigma[k])
        return x0, eps, var_values


def _guidance_labels(
    net: Net, class_labels: Tensor | None, scale: float, batch: int, device: torch.device
) -> Tensor | None:
    """The labels of the one forward per step: None (unconditional call), (B,) for s = 1 (the
    labels) or s = 0 (the null class), or (2B,) = [labels; null] for a guided forward."""
    if class_labels is None:
        if scale != 1.0:
            raise ValueError(
                f"guidance_scale={scale:g} needs class_labels: classifier-free guidance mixes "
                "the class-conditional and the null-class predictions (guidance_scale=1 samples "
                "without guidance)"
            )
        return None
    labels = torch.as_tensor(class_labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (batch,):
        raise ValueError(
            f"class_labels must be an integer tensor of shape ({batch},) (one per sample), got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    labels = labels.to(device=device, dtype=torch.long)
    if scale == 1.0:
        return labels
    null = getattr(net, "null_class", None)
    if null is None:
        raise ValueError(
            f"guidance_scale={scale:g} needs a class-conditional network with a null class "
            "(attribute `null_class`, built with num_classes=K)"
        )
    nulls = torch.full_like(labels, int(null))
    return nulls if scale == 0.0 else torch.cat([labels, nulls])


# ---------------------------------------------------------------------------------------- records
class Recorder:
    """Keeps (t, x_t, x̂₀) at the steps ``return_intermediates`` asks for (package docstring)."""

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

    def result(self, x: Tensor) -> SampleOutput:
        """What the sampler returns: ``x``, with the intermediates when they were asked for."""
        if not self.requested:
            return x
        ts, xs, x0s = zip(*self.items, strict=True) if self.items else ((), (), ())
        return x, {
            "timesteps": torch.tensor(ts, dtype=torch.long),
            "x_t": torch.stack(xs) if xs else torch.empty(0),
            "pred_xstart": torch.stack(x0s) if x0s else torch.empty(0),
        }


# ---------------------------------------------------------------------------------------- a call
@dataclass(frozen=True)
class SampleCall:
    """The keyword arguments every sampling function takes besides its own options (their
    meaning: the package docstring). The sampling functions receive them as ``**common``."""

    generator: Generator = None
    clip_denoised: bool = True
    progress: bool = False
    return_intermediates: Intermediates = False
    device: torch.device | str | None = None
    noise: Tensor | None = None
    class_labels: Tensor | None = None
    guidance_scale: float = 1.0

    @classmethod
    def parse(cls, caller: str, common: dict[str, Any], exclude: Sequence[str] = ()) -> SampleCall:
        """The options of a call to ``caller``; an unknown (or ``exclude``-d) name is a TypeError,
        as for any Python signature, and ``clip_denoised`` must be a bool."""
        names = [f.name for f in fields(cls) if f.name not in exclude]
        unknown = sorted(set(common) - set(names))
        if unknown:
            raise TypeError(
                f"{caller}() got unexpected keyword argument(s) {unknown}; besides its own "
                f"options it takes {names}"
            )
        check_flag(common.get("clip_denoised", True), "clip_denoised")
        return cls(**common)

    def start(
        self,
        net: Net,
        diffusion: GaussianDiffusion,
        shape: Sequence[int] | None,
        alphas_cumprod: Sequence[float],
        net_timesteps: Sequence[int],
        desc: str,
        recorded_timesteps: Sequence[int] | None = None,
    ) -> Run:
        """x_T and the loop's helpers on the grid (``alphas_cumprod``, ``net_timesteps``: ᾱ and
        the network's timestep at each step, :func:`grid`); ``recorded_timesteps``: the
        timestep of each loop step (default: ``net_timesteps``)."""
        denoise = Denoiser(
            net,
            diffusion,
            alphas_cumprod,
            net_timesteps,
            self.clip_denoised,
            self.class_labels,
            self.guidance_scale,
        )
        x = denoise.start(shape, self.noise, self.generator, self.device)
        rec_t = net_timesteps if recorded_timesteps is None else recorded_timesteps
        return Run(self, denoise, x, Recorder(self.return_intermediates, rec_t), desc)


class Run:
    """One sampling loop: x_T (``x``), the denoiser x̂₀ = D(x_t) at step k
    (``denoise(x, k)``), the intermediates (``record(k, x, x0)``; ``result(x)`` is what the
    sampler returns), fresh noise from the call's generator on x_T's device (``noise``) and
    the progress-reporting steps."""

    def __init__(
        self, call: SampleCall, denoise: Denoiser, x: Tensor, record: Recorder, desc: str
    ) -> None:
        self.call, self.denoise, self.x, self.record, self.desc = call, denoise, x, record, desc
        self.device = x.device

    def result(self, x: Tensor) -> SampleOutput:
        return self.record.result(x)

    def noise(self, shape: Sequence[int]) -> Tensor:
        return draw_noise(shape, self.call.generator, self.device)

    def steps(self, n: int) -> Iterator[int]:
        return progress_iter(range(n), total=n, desc=self.desc, enabled=self.call.progress)
