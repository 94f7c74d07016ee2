"""Randomness as a function of position: every random draw of a training step comes from streams
seeded by (run seed, rank, epoch, batch), never from state carried over from earlier steps.

A resumed run therefore draws exactly what the uninterrupted run drew without saving or restoring
any RNG state, whatever happened in between (validation, sample grids, a new DataLoader iterator,
a restart on another machine). Changing the number of devices keeps every rank's streams
well-defined (they are keyed by rank) while the data shards change. The same idea as JAX's
``fold_in(key, step)`` and T5X/MaxText's per-step RNG.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


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
