"""Which times a training step uses: t ~ p(t) with importance weights (improved-diffusion's
``resample.py``), for every process of the family (:mod:`ddpm.diffusion.process`).

A :class:`TimestepSampler` draws t for a batch and per-sample weights. On DDPM's discrete
process the weights w_t = 1/(T p_t) keep E[w_t L_t] the uniform average of the L_t, so the loss
stays an unbiased estimate of L_vlb (or L_simple) whatever p is. On a continuous process the
distribution of t is part of the objective itself (EDM's ln σ ~ N(P_mean, P_std²), flow
matching's uniform or logit-normal t) and the weights are 1. Each sampler draws in one time
domain (``time_domain``: ``index`` 0..T-1, ``sigma`` = EDM's σ, ``unit`` = t ∈ [0, 1]) and
:meth:`TimestepSampler.check` refuses a process with another. Not the image samplers of
:mod:`ddpm.diffusion.samplers`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ddpm.diffusion.process import Process

T_SAMPLINGS = ("uniform", "logit_normal")


def _draw_device(generator: torch.Generator | None) -> torch.device | str:
    return "cpu" if generator is None else generator.device


class TimestepSampler(ABC):
    """Draws the training times of a batch (:meth:`sample`) from a distribution over one time
    domain of the processes (``index``, ``sigma`` or ``unit``)."""

    time_domain: ClassVar[str]

    @abstractmethod
    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return times (B,) and importance weights (B,) so that E[w·L_t] is unbiased."""

    @abstractmethod
    def validation_timesteps(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """The times of a validation batch (B,), on the generator's device: the distribution
        ``val/loss`` averages over (fixed, whatever the training history)."""

    def check(self, process: Process) -> None:
        """A ValueError unless ``process`` lives in this sampler's time domain."""
        if process.time_domain != self.time_domain:
            raise ValueError(
                f"objective.timestep_sampler {type(self).__name__} draws times in the "
                f"{self.time_domain!r} domain ({_DOMAINS[self.time_domain]}), but the process "
                f"{type(process).__name__} has times in the {process.time_domain!r} domain "
                f"({_DOMAINS[process.time_domain]}): pick an objective and a schedule that agree "
                "(objective=edm with schedule=edm | edm_vp, objective=flow_matching with "
                "schedule=rectified_flow, the DDPM objectives with a β schedule)"
            )

    def update(self, t: Tensor, losses: Tensor) -> None:  # noqa: B027 - optional hook
        """Record per-sample losses (used by importance samplers)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """What a checkpoint must keep to resume the distribution (nothing for a fixed p)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 - stateless
        """Restore :meth:`state_dict`."""


_DOMAINS = {
    "index": "DDPM's integer timesteps 0..T-1",
    "sigma": "EDM's noise level σ > 0",
    "unit": "t in [0, 1]",
}


class DiscreteTimestepSampler(TimestepSampler):
    """A distribution p over the timesteps 0..T-1 given by :meth:`weights` (∝ p)."""

    time_domain: ClassVar[str] = "index"

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = int(num_timesteps)

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised p_t, shape (T,), float64."""

    def check(self, process: Process) -> None:
        super().check(process)
        if process.num_timesteps != self.num_timesteps:
            raise ValueError(
                f"the timestep sampler draws t from {self.num_timesteps} timesteps, the process "
                f"has T={process.num_timesteps}"
            )

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        w = self.weights()
        if np.all(w == w[0]):
            t = torch.randint(
                0,
                self.num_timesteps,
                (batch_size,),
                generator=generator,
                device=_draw_device(generator),
            )
            return t.to(device), torch.ones(batch_size, device=device)
        p = torch.as_tensor(w / w.sum(), dtype=torch.float32, device=_draw_device(generator))
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def validation_timesteps(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Uniform over 0..T-1: the average of the L_t (the bound's and L_simple's weighting)."""
        return torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=generator.device
        )


class UniformTimestepSampler(DiscreteTimestepSampler):
    """t ~ U{0..T-1} with unit weights (DDPM, Alg. 1)."""

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)


class LossSecondMomentTimestepSampler(DiscreteTimestepSampler):
    """Importance sampling p_t ∝ √E[L_t²] over the last ``history`` losses (improved DDPM §3.3).

    Uniform until every t has ``history`` recorded losses; ``uniform_prob`` of uniform mixing.
    Under DDP, losses from every rank are gathered so all ranks keep the same statistics.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self._hist = np.zeros((num_timesteps, history), dtype=np.float64)
        self._count = np.zeros(num_timesteps, dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not np.all(self._count == self.history):
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self._hist**2, axis=-1))
        w /= w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / len(w)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample ``losses`` at timesteps ``t``; non-finite losses are dropped.

        Under DDP every rank's pairs are gathered (collective: every rank calls it each step).
        Ranks may hold different counts (a NaN dropped on one rank only), so the counts are
        gathered first and every rank pads to the largest, as improved-diffusion's
        ``LossAwareSampler.update_with_local_losses`` does.
        """
        t, losses = t.detach().long().flatten(), losses.detach().float().flatten()
        if t.numel() != losses.numel():
            raise ValueError(f"got {t.numel()} timesteps but {losses.numel()} losses")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            count = torch.tensor([t.numel()], device=t.device)
            counts = [torch.zeros_like(count) for _ in range(world)]
            dist.all_gather(counts, count)
            sizes = [int(c) for c in counts]
            pad = max(sizes) - t.numel()
            t = torch.cat([t, t.new_zeros(pad)])
            losses = torch.cat([losses, losses.new_zeros(pad)])
            ts = [torch.zeros_like(t) for _ in range(world)]
            ls = [torch.zeros_like(losses) for _ in range(world)]
            dist.all_gather(ts, t)
            dist.all_gather(ls, losses)
            t = torch.cat([x[:n] for x, n in zip(ts, sizes, strict=True)])
            losses = torch.cat([x[:n] for x, n in zip(ls, sizes, strict=True)])
        finite = torch.isfinite(losses)
        t, losses = t[finite], losses[finite]
        for ti, li in zip(t.cpu().tolist(), losses.cpu().tolist(), strict=True):
            if self._count[ti] == self.history:
                self._hist[ti, :-1] = self._hist[ti, 1:]
                self._hist[ti, -1] = li
            else:
                self._hist[ti, self._count[ti]] = li
                self._count[ti] += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"hist": self._hist.copy(), "count": self._count.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._hist = np.asarray(state["hist"], dtype=np.float64)
        self._count = np.asarray(state["count"], dtype=np.int64)


class ContinuousTimestepSampler(TimestepSampler):
    """t from a fixed continuous distribution (:meth:`draw`), unit weights; validation draws
    from the same distribution (the objective's own average)."""

    @abstractmethod
    def draw(self, batch_size: int, generator: torch.Generator | None) -> Tensor:
        """(B,) float32 times on the generator's device."""

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.draw(batch_size, generator).to(device), torch.ones(batch_size, device=device)

    def validation_timesteps(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return self.draw(batch_size, generator)


def _finite(name: str, value: float, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return float(value)


class LogNormalTimestepSampler(ContinuousTimestepSampler):
    """EDM's training noise levels: ln σ ~ N(P_mean, P_std²) (Karras et al. 2022, §5 and
    Table 1: P_mean = -1.2, P_std = 1.2), t = σ."""

    time_domain: ClassVar[str] = "sigma"

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        self.p_mean = _finite("p_mean", p_mean)
        self.p_std = _finite("p_std", p_std, positive=True)

    def draw(self, batch_size: int, generator: torch.Generator | None) -> Tensor:
        n = torch.randn((batch_size,), generator=generator, device=_draw_device(generator))
        return torch.exp(n * self.p_std + self.p_mean)


class FlowTimestepSampler(ContinuousTimestepSampler):
    """Flow matching's t ∈ [0, 1]: ``uniform`` (Lipman et al. 2023; Liu et al. 2023) or
    ``logit_normal``, t = sigmoid(m + s n) with n ~ N(0, 1) (Esser et al. 2024, §3.1: m = 0,
    s = 1), which puts more of the training at mid-range t."""

    time_domain: ClassVar[str] = "unit"

    def __init__(self, distribution: str = "uniform", loc: float = 0.0, scale: float = 1.0) -> None:
        if distribution not in T_SAMPLINGS:
            raise ValueError(
                f"t_sampling (distribution) must be one of {T_SAMPLINGS}, got {distribution!r}"
            )
        self.distribution = distribution
        self.loc = _finite("loc", loc)
        self.scale = _finite("scale", scale, positive=True)

    def draw(self, batch_size: int, generator: torch.Generator | None) -> Tensor:
        device = _draw_device(generator)
        if self.distribution == "uniform":
            return torch.rand((batch_size,), generator=generator, device=device)
        n = torch.randn((batch_size,), generator=generator, device=device)
        return torch.sigmoid(n * self.scale + self.loc)


def default_timestep_sampler(process: Process) -> TimestepSampler:
    """The papers' training times for ``process``: DDPM's uniform t, EDM's log-normal σ, flow
    matching's uniform t."""
    if process.time_domain == "index":
        return UniformTimestepSampler(int(process.num_timesteps))
    return LogNormalTimestepSampler() if process.time_domain == "sigma" else FlowTimestepSampler()
