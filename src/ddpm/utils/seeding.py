"""Per-sample random streams: sample i depends only on its seed, not on batch size or devices.

As in EDM's ``StackedRandomGenerator``: one ``torch.Generator`` per sample, each drawing that
sample's noise, so the same seeds give the same images for any batch size or number of GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
