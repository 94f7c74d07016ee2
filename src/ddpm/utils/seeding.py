"""Randomness as a function of position, never of history.

* Training (:func:`step_seed`): every random draw of a step comes from streams seeded by (run
  seed, rank, epoch, batch), never from state carried over from earlier steps. A resumed run
  therefore draws exactly what the uninterrupted run drew without saving or restoring any RNG
  state, whatever happened in between (validation, sample grids, a new DataLoader iterator, a
  restart on another machine). Changing the number of devices keeps every rank's streams
  well-defined (they are keyed by rank) while the data shards change. The same idea as JAX's
  ``fold_in(key, step)`` and T5X/MaxText's per-step RNG.
* Sampling (:class:`PerSampleGenerator`): sample i depends only on its seed, not on batch size or
  devices. As in EDM's ``StackedRandomGenerator``: one ``torch.Generator`` per sample, each
  drawing that sample's noise, so the same seeds give the same images for any batch size or
  number of GPUs.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def step_seed(seed: int, *position: int) -> int:
    """A 63-bit seed that is a hash of ``seed`` and the ``position`` tuple (e.g. rank, epoch,
    batch): nearby positions give unrelated seeds (unlike ``seed + step``)."""
    key = ",".join(str(int(v)) for v in (seed, *position)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def seed_global_rngs(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), NumPy's legacy global RNG and Python's ``random``:
    dropout and any user code that draws from the global streams."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global legacy RNG is what user code draws from
    random.seed(seed)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class PerSampleGenerator:
    """One CPU generator per sample; ``randn(shape)`` stacks one draw of ``shape[1:]`` per seed.

    Noise is drawn on the CPU (identical on every device type) and moved to ``device``.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"batch size {shape[0]} != number of seeds {len(self.generators)}")
        out = torch.stack(
            [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.generators]
        )
        return out.to(self.device, non_blocking=True)


def randn(
    shape: Sequence[int],
    generator: torch.Generator | PerSampleGenerator | None,
    device: torch.device | str,
) -> Tensor:
    """Standard normal noise of ``shape`` from a per-sample generator, a torch generator or none."""
    if isinstance(generator, PerSampleGenerator):
        return generator.randn(shape)
    if generator is None:
        return torch.randn(tuple(shape), device=device)
    return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
