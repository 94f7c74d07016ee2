"""Which timesteps a training step uses: t ~ p(t) with importance weights (improved-diffusion's
``resample.py``).

A :class:`TimestepSampler` draws t for a batch and the weights w_t = 1/(T p_t) that keep
E[w_t L_t] the uniform average of the L_t, so the loss stays an unbiased estimate of L_vlb
(or L_simple) whatever p is. Not the image samplers of :mod:`ddpm.diffusion.samplers`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


class TimestepSampler(ABC):
    """A distribution p over the timesteps 0..T-1 given by :meth:`weights` (∝ p)."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = int(num_timesteps)

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised p_t, shape (T,), float64."""

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return timesteps (B,) and importance weights (B,) so that E[w·L_t] is unbiased."""
        w = self.weights()
        if np.all(w == w[0]):
            t = torch.randint(
                0,
                self.num_timesteps,
                (batch_size,),
                generator=generator,
                device="cpu" if generator is None else generator.device,
            )
            return t.to(device), torch.ones(batch_size, device=device)
        p = torch.as_tensor(
            w / w.sum(),
            dtype=torch.float32,
            device="cpu" if generator is None else generator.device,
        )
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:  # noqa: B027 - optional hook
        """Record per-sample losses (used by importance samplers)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """What a checkpoint must keep to resume the distribution (nothing for a fixed p)."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:  # noqa: B027 - stateless
        """Restore :meth:`state_dict`."""


class UniformTimestepSampler(TimestepSampler):
    """t ~ U{0..T-1} with unit weights (DDPM, Alg. 1)."""

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)


class LossSecondMomentTimestepSampler(TimestepSampler):
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
