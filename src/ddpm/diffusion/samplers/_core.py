"""What every sampler shares: the common options, the grid, the guided network call (the
denoiser), x_T, the Langevin corrector, intermediates and option checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm.diffusion.parameterisation import Preconditioning
from ddpm.diffusion.process import Process
from ddpm.utils.devices import model_device
from ddpm.utils.progress import progress_iter
from ddpm.utils.seeding import PerSampleGenerator, randn

Net = Callable[..., Tensor]
Generator = torch.Generator | PerSampleGenerator | None
Intermediates = bool | int | Sequence[float]
SampleOutput = Tensor | tuple[Tensor, dict[str, Tensor]]

# ---------------------------------------------------------------------------------------- checks
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")  # DPM-Solver++: ODE, SDE
SOLVER_TYPES = ("bh1", "bh2")  # UniPC's B(h)
CORRECTORS = ("langevin",)  # predictor-corrector sampling (Song et al. 2021), or None


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


def check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


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
    "snr": lambda v: check_number(v, "snr", 0.0),
    "corrector_steps": lambda v: check_count(v, "corrector_steps"),
    "corrector": lambda v: None if v is None else check_choice(v, "corrector", CORRECTORS),
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
@dataclass(frozen=True)
class Grid:
    """A sampler's steps on a process: at step k the process time ``t[k]``, α_k and σ_k
    (float64; α = 0 replaced by √(2⁻²⁴) on a ``solver`` grid) and the network's time input
    ``net_t[k]`` (an integer timestep on DDPM's discrete process, τ(t) on a continuous one)."""

    t: list[float] | list[int]
    alpha: np.ndarray
    sigma: np.ndarray
    net_t: list[float] | list[int]
    pre: Preconditioning

    def __len__(self) -> int:
        return len(self.t)


def with_clean_end(
    alpha: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(α, σ, λ) of a grid followed by the clean end α = 1, σ = 0, λ = +∞ (λ = log(α/σ): the
    variable of DPM-Solver and UniPC)."""
    alpha = np.append(alpha, 1.0)
    sigma = np.append(sigma, 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def grid(process: Process, times: Iterable[float], solver: bool = False) -> Grid:
    """The :class:`Grid` of ``process`` at ``times``; ``solver``: α floored for the σ/λ-space
    solvers (:data:`~ddpm.diffusion.process.ZERO_SNR_ALPHA_CUMPROD`)."""
    times = list(times)
    alpha, sigma = process.alpha_sigma_np(times, floor=solver)
    pre = process.preconditioning_np(times, floor=solver)
    return Grid(times, alpha, sigma, process.net_time_np(times), pre)


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

    The parameterisation's affine maps (:mod:`ddpm.diffusion.parameterisation`) with the grid's
    coefficients precomputed as Python floats: x̂₀ = c_skip x + c_out F(c_in x, τ_k),
    ε̂ = e_skip x + e_out F; with ``clip_denoised`` x̂₀ is clipped and ε̂ = (x - α x̂₀)/σ
    recomputed. Classifier-free guidance (package docstring) mixes the conditional and null-class
    outputs F before any conversion.
    """

    def __init__(
        self,
        net: Net,
        process: Process,
        grid: Grid,
        clip_denoised: bool,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> None:
        self.net, self.process, self.clip = net, process, clip_denoised
        self.alpha = grid.alpha.tolist()
        self.sigma = grid.sigma.tolist()
        self.c_in, self.c_skip, self.c_out, self.e_skip, self.e_out = (
            np.broadcast_to(np.asarray(c, dtype=np.float64), (len(grid),)).tolist()
            for c in grid.pre
        )
        self.net_times = list(grid.net_t)
        self.class_labels = class_labels
        self.scale = check_number(guidance_scale, "guidance_scale")

    def start(
        self,
        shape: Sequence[int] | None,
        noise: Tensor | None,
        generator: Generator,
        device: torch.device | str | None,
    ) -> Tensor:
        """Unit-variance noise (or ``noise``) in float32 on the device (default: the network's);
        fixes the batch for the calls."""
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
        dtype = torch.long if self.process.discrete else torch.float32
        ts = torch.tensor(self.net_times, dtype=dtype).to(device)
        self.t = ts[:, None].expand(len(ts), width).contiguous()  # row k: the input at step k
        return x

    def net_output(self, x: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        """The (guided) network output F at step k as (prediction, variance values)."""
        x_in = x if self.c_in[k] == 1.0 else x * self.c_in[k]
        split = self.process.split_model_output
        if self.labels is None:
            return split(self.net(x_in, self.t[k]), x.shape[1])
        if not self.guided:
            return split(self.net(x_in, self.t[k], class_labels=self.labels), x.shape[1])
        out = self.net(torch.cat([x_in, x_in]), self.t[k], class_labels=self.labels)
        pred, var_values = split(out, x.shape[1])
        cond, uncond = pred.chunk(2)
        # F̃ = F_u + s (F_c - F_u) in the network's output space; the conditional variance
        pred = torch.lerp(uncond, cond, self.scale)
        return pred, None if var_values is None else var_values.chunk(2)[0]

    def __call__(
        self, x: Tensor, k: int, need_eps: bool = False, clip: bool | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(x̂₀, ε̂ when ``need_eps`` else None, variance values) at step k; ``clip``: override
        ``clip_denoised`` (the corrector's score uses the network's own ε̂)."""
        clip = self.clip if clip is None else clip
        pred, var_values = self.net_output(x, k)
        if self.c_skip[k] == 0.0:
            x0 = pred if self.c_out[k] == 1.0 else pred * self.c_out[k]
        else:
            x0 = torch.add(x * self.c_skip[k], pred, alpha=self.c_out[k])
        eps = None
        if need_eps and not clip:
            if self.e_skip[k] == 0.0 and self.e_out[k] == 1.0:
                eps = pred
            else:
                eps = torch.add(x * self.e_skip[k], pred, alpha=self.e_out[k])
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
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

    def __init__(
        self, request: Intermediates, timesteps: Sequence[float], discrete: bool = True
    ) -> None:
        n = len(timesteps)
        self.dtype = torch.long if discrete else torch.float64
        if request is None or isinstance(request, (bool, int, np.integer)):
            stride = int(request or 0)
            if stride < 0:
                raise ValueError(f"return_intermediates must be >= 0 (a stride), got {stride}")
            self.steps = set(range(0, n, stride)) | {n - 1} if stride else set()
            self.requested = stride > 0
        else:
            wanted = np.asarray([float(t) for t in request], dtype=np.float64)
            grid = np.asarray(timesteps, dtype=np.float64)
            if not discrete:  # continuous times (σ, t > 0) span decades: nearest in log t
                wanted, grid = np.log(np.maximum(wanted, 1e-30)), np.log(grid)
            self.steps = {int(np.argmin(np.abs(grid - t))) for t in wanted}
            self.requested = len(wanted) > 0
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
            "timesteps": torch.tensor(ts, dtype=self.dtype),
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
    corrector: str | None = None
    snr: float = 0.16
    corrector_steps: int = 1

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
        check_options(
            {k: common[k] for k in ("corrector", "snr", "corrector_steps") if k in common}
        )
        return cls(**common)

    def start(
        self,
        net: Net,
        process: Process,
        shape: Sequence[int] | None,
        grid: Grid,
        desc: str,
        recorded_times: Sequence[float] | None = None,
        prior: bool = True,
    ) -> Run:
        """x at the grid's first time and the loop's helpers on ``grid`` (:func:`grid`):
        ``noise`` (or fresh unit noise) times the process's prior std there (``prior``; False
        takes ``noise`` as x itself, e.g. the image an inversion starts from);
        ``recorded_times``: the time of each loop step for the intermediates (default: the
        grid's, the network's timestep on a discrete process)."""
        denoise = Denoiser(
            net, process, grid, self.clip_denoised, self.class_labels, self.guidance_scale
        )
        x = denoise.start(shape, self.noise, self.generator, self.device)
        std = process.prior_std(grid.t[0]) if prior else 1.0
        if std != 1.0:
            x = x * std
        if recorded_times is None:
            recorded_times = grid.net_t if process.discrete else grid.t
        record = Recorder(self.return_intermediates, recorded_times, process.discrete)
        return Run(self, process, grid, denoise, x, record, desc)


class Run:
    """One sampling loop: the starting x (``x``), the denoiser x̂₀ = D(x_t) at step k
    (``denoise(x, k)``), the Langevin corrector at step k (``correct(x, k)``), the
    intermediates (``record(k, x, x0)``; ``result(x)`` is what the sampler returns), fresh noise
    from the call's generator on x's device (``noise``) and the progress-reporting steps."""

    def __init__(
        self,
        call: SampleCall,
        process: Process,
        grid: Grid,
        denoise: Denoiser,
        x: Tensor,
        record: Recorder,
        desc: str,
    ) -> None:
        self.call, self.process, self.grid = call, process, grid
        self.denoise, self.x, self.record, self.desc = denoise, x, record, desc
        self.device = x.device

    def result(self, x: Tensor) -> SampleOutput:
        return self.record.result(x)

    def noise(self, shape: Sequence[int]) -> Tensor:
        return draw_noise(shape, self.call.generator, self.device)

    def steps(self, n: int) -> Iterator[int]:
        return progress_iter(range(n), total=n, desc=self.desc, enabled=self.call.progress)

    def correct(self, x: Tensor, k: int) -> Tensor:
        """``corrector_steps`` Langevin steps at the grid's step k (Song et al. 2021, Alg. 4-5,
        the corrector of predictor-corrector sampling) when ``corrector="langevin"``, else x.

        The score of the same network, s = ∇ log p_t(x) = -ε̂/σ_k (ε̂ unclipped); each step
        x ← x + η s + √(2η) z, z ~ N(0, I), with η = 2 α_i (r ‖z‖/‖s‖)² from the target
        signal-to-noise ratio r = ``snr`` (per-sample norms, so a sample does not depend on its
        batch) and α_i the process's per-step α (1 - β_t on DDPM's chain, 1 on a continuous
        process, as Song et al.'s VP and VE correctors). One network call per step.
        """
        if self.call.corrector is None or self.denoise.sigma[k] == 0.0:
            return x
        alpha_i = self.process.langevin_alpha(self.grid.t[k])
        inv_sigma = -1.0 / self.denoise.sigma[k]
        for _ in range(self.call.corrector_steps):
            _, eps, _ = self.denoise(x, k, need_eps=True, clip=False)
            score = eps * inv_sigma
            z = self.noise(x.shape)
            ratio = z.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1).clamp(min=1e-20)
            step = (2.0 * alpha_i) * (self.call.snr * ratio) ** 2
            step = step.reshape(-1, *([1] * (x.ndim - 1)))
            x = x + step * score + (2.0 * step).sqrt() * z
        return x
