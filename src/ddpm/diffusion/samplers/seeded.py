"""Samples for a list of seeds, a batch at a time: the one loop behind the sample task, the
evaluation, the sample-grid and FID callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpm.utils.checks import check_positive_int
from ddpm.utils.seeding import PerSampleGenerator


def sample_batches(
    sampler: Callable[..., Tensor],
    net: Callable[..., Tensor],
    diffusion: Any,
    sample_shape: Sequence[int],
    seeds: Sequence[int],
    batch_size: int,
    device: torch.device | str | None = None,
    class_labels: Tensor | None = None,
    **sampler_kwargs: Any,
) -> Iterator[Tensor]:
    """``sampler(net, diffusion, (b, *sample_shape), generator=..., device=device, ...)`` for
    ``batch_size`` seeds at a time, yielded as they come (on the sampler's device, unconverted).

    Sample i draws its noise from ``seeds[i]`` alone (:class:`PerSampleGenerator`), so the
    samples do not depend on ``batch_size``; ``class_labels``: one per seed; ``sampler_kwargs``
    (e.g. ``progress``) go to every call.
    """
    check_positive_int("batch_size", batch_size)
    seeds = list(seeds)
    if class_labels is not None and len(class_labels) != len(seeds):
        raise ValueError(f"{len(class_labels)} class_labels for {len(seeds)} seeds: one per seed")
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        extra = dict(sampler_kwargs)
        if class_labels is not None:
            extra["class_labels"] = class_labels[start : start + batch_size].to(device or "cpu")
        with torch.inference_mode():
            yield sampler(
                net,
                diffusion,
                (len(chunk), *sample_shape),
                generator=PerSampleGenerator(chunk, device=device or "cpu"),
                device=device,
                **extra,
            )
