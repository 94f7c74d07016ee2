"""Rectified flow's reflow (Liu et al. 2023, "Flow straight and fast", Alg. 1) and the
straightness of a probability-flow ODE's paths, in plain torch.

* :func:`trajectory`: a deterministic sampler's path from noise z (at the process's t_max) to its
  sample, with the PF-ODE velocity dx/dt = α̇ x̂₀ + σ̇ ε̂ (:meth:`Process.velocity`) at every grid
  time: the coupling (z, x = ODE(z)) reflow trains on, and what :func:`straightness` integrates.
* :func:`straightness`: S(Z) = ∫₀¹ E‖(Z₁ - Z₀) - Ż_s‖² ds (Liu et al. 2023, eq. 8 / Def. 2.2),
  with Z₀ the noise, Z₁ the sample and s = 1 - t/t_max the process time run from noise to data
  and rescaled to [0, 1] (rectified flow: s = 1 - t). S = 0 exactly when every path is a
  straight line travelled at constant speed, which one Euler step integrates without error.
* Reflow's loss is flow matching's with the noise of each example given (the coupled pair)
  instead of drawn: x_t = (1 - t) x + t z, target z - x.
* A class-conditional model's paths are drawn for seeded labels (:func:`seeded_chunk`), uniform
  over its classes: its pairs are (x = ODE(z | y), z, y).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ddpm.diffusion.process import Process
from ddpm.utils.classes import num_classes_of
from ddpm.utils.devices import model_device
from ddpm.utils.seeding import seeded_generator, step_seed

_LABEL_STREAM = 1  # seeded_labels' stream: step_seed(seed, chunk, 1), the noise's is (seed, chunk)


@dataclass(frozen=True)
class Trajectory:
    """A batch of sampler paths. ``times`` (n,): the grid's process times, descending from
    t_max; ``x`` and ``velocity`` (n, B, ...): the state and the PF-ODE's dx/dt at those times;
    ``noise`` (B, ...): the unit-variance noise given to the sampler, which starts the paths at
    x[0] = s·noise (s: :meth:`Process.prior_std`); ``sample`` (B, ...): where they end (the clean
    end t = 0, after the grid's last time)."""

    times: Tensor
    x: Tensor
    velocity: Tensor
    noise: Tensor
    sample: Tensor

    @property
    def start(self) -> Tensor:
        """Z₀, the paths' first state."""
        return self.x[0]


@torch.inference_mode()
def trajectory(
    net: Callable[..., Tensor],
    process: Process,
    noise: Tensor,
    sampler: Callable[..., Any],
    **call: Any,
) -> Trajectory:
    """Run ``sampler(net, process, shape, noise=noise, return_intermediates=1, **call)`` (a
    deterministic one: euler, heun, ddim with η = 0, the DPM-Solver++/UniPC ODE solvers) and
    return its path with the PF-ODE velocity at each recorded (t, x_t, x̂₀)."""
    sample, inter = sampler(
        net, process, tuple(noise.shape), noise=noise, return_intermediates=1, **call
    )
    times = inter["timesteps"].double()
    dev = sample.device  # the intermediates are kept on the CPU

    def u(t: float, x: Tensor, x0: Tensor) -> Tensor:
        t_b = torch.full((x.shape[0],), t, device=dev)
        return process.velocity(x.to(dev), t_b, x0.to(dev).float()).cpu()

    xs = inter["x_t"].float()
    velocity = torch.stack(
        [u(t, x, x0) for t, x, x0 in zip(times.tolist(), xs, inter["pred_xstart"], strict=True)]
    )
    return Trajectory(times, xs, velocity, noise.detach().cpu().float(), sample.cpu().float())


def straightness(path: Trajectory, t_max: float) -> Tensor:
    """S(Z) = ∫₀¹ ‖(Z₁ - Z₀) - Ż_s‖² ds per path (B,) (Liu et al. 2023, eq. 8; the expectation
    is the mean over the batch): s = 1 - t/t_max, so Ż_s = -t_max dx/dt, and the integral is the
    left Riemann sum over the sampler's grid (its last interval ends at t = 0), the rule Euler's
    steps follow: on an Euler path it is the exact S of the piecewise-linear path."""
    t = path.times.double()
    widths = (t - torch.cat([t[1:], t.new_zeros(1)])) / float(t_max)  # (n,), sums to t_0/t_max
    chord = (path.sample - path.start).double()  # Z₁ - Z₀
    dev = chord.unsqueeze(0) + float(t_max) * path.velocity.double()  # (n, B, ...)
    sq = dev.pow(2).flatten(2).sum(-1)  # (n, B)
    return (widths[:, None] * sq).sum(0)


def coupled_pairs(
    net: Callable[..., Tensor],
    process: Process,
    noise: Tensor,
    sampler: Callable[..., Any],
    **call: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reflow's coupling (Liu et al. 2023, Alg. 1): (x, z, S) with x = ODE(z) the sampler's
    sample of the noise z and S its path's :func:`straightness` (B,)."""
    path = trajectory(net, process, noise, sampler, **call)
    return path.sample, path.noise, straightness(path, process.t_max)


def seeded_noise(shape: Sequence[int], seed: int, chunk: int) -> Tensor:
    """The unit noise of chunk ``chunk`` of a seeded run of paths: float32 on the CPU, a
    function of (seed, chunk) only (pairs made in chunks continue where they stopped)."""
    return torch.randn(tuple(shape), generator=seeded_generator(step_seed(seed, chunk)))


def seeded_labels(n: int, num_classes: int, seed: int, chunk: int) -> Tensor:
    """The class labels (n,) of chunk ``chunk`` of a seeded run of a class-conditional model's
    paths, uniform over the ``num_classes`` classes: int64 on the CPU, a function of (seed,
    chunk) only, drawn from a stream of their own (the noise is :func:`seeded_noise`'s)."""
    g = seeded_generator(step_seed(seed, chunk, _LABEL_STREAM))
    return torch.randint(num_classes, (n,), generator=g)


def seeded_chunk(
    n: int, sample_shape: Sequence[int], num_classes: int | None, seed: int, chunk: int
) -> tuple[Tensor, Tensor | None]:
    """(noise, labels) of chunk ``chunk``: :func:`seeded_noise` and, for a class-conditional
    model (``num_classes`` not None), :func:`seeded_labels`; None for an unconditional one."""
    z = seeded_noise((n, *sample_shape), seed, chunk)
    return z, None if num_classes is None else seeded_labels(n, num_classes, seed, chunk)


def chunk_sizes(n: int, batch_size: int) -> list[int]:
    """``n`` split into chunks of ``batch_size`` (the last one smaller)."""
    return [min(batch_size, n - i) for i in range(0, n, batch_size)]


def seeded_pairs(
    net: Callable[..., Tensor],
    process: Process,
    sampler: Callable[..., Any],
    n: int,
    sample_shape: Sequence[int],
    seed: int,
    chunk: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(x, z, y, S) of chunk ``chunk``: :func:`coupled_pairs` of its :func:`seeded_chunk` noise z
    (and, for a class-conditional network, labels y), run on the network's device and returned
    on the CPU; the noise and labels are drawn on the CPU, the same on every device."""
    device = model_device(net)
    z, y = seeded_chunk(n, sample_shape, num_classes_of(net), seed, chunk)
    y_dev = None if y is None else y.to(device)
    x, z, s = coupled_pairs(net, process, z.to(device), sampler, class_labels=y_dev)
    return x, z, y, s.cpu()


def mean_straightness(
    net: Callable[..., Tensor],
    process: Process,
    sampler: Callable[..., Any],
    sample_shape: Sequence[int],
    num_samples: int,
    seed: int,
    batch_size: int,
) -> float:
    """E[S] (:func:`straightness`) over ``num_samples`` paths from the seeded noise and, for a
    class-conditional network, labels (:func:`seeded_pairs`): the same paths for any network
    of those classes, so before / after reflow compare."""
    total = 0.0
    for i, n in enumerate(chunk_sizes(num_samples, batch_size)):
        total += float(seeded_pairs(net, process, sampler, n, sample_shape, seed, i)[3].sum())
    return total / num_samples
