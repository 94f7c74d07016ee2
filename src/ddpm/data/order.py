"""The order of the training data: which examples form each batch, on each rank, rebuilt exactly
after a restart.

:class:`EpochShuffleOrder` is a data-order sampler in the sense of torch's ``DataLoader(sampler=)``
(in this project "sampler" otherwise means an image sampler, :mod:`ddpm.diffusion.samplers`);
:class:`ResumableDataLoader` saves and restores its position in checkpoints.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ddpm.utils.seeding import seeded_generator, step_seed


class EpochShuffleOrder(DistributedSampler):
    """This process's share of a permutation of ``range(n)`` that is a function of (``seed``,
    epoch) only, so the data order of every epoch can be rebuilt after a restart; ``skip``
    examples of this process's share are dropped from the next iteration (resuming mid-epoch).

    Rank ``r`` of ``num_replicas`` takes every ``num_replicas``-th index of the permutation from
    ``r`` (the tail that does not divide evenly is dropped), so the union of the ranks' j-th batches
    is the j-th global batch of a one-process run with the same global batch size. A
    ``DistributedSampler`` (already sharded), so Lightning does not replace it; Lightning calls
    :meth:`set_epoch` at every epoch start.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.n, self.seed, self.epoch, self.skip = int(n), int(seed), 0, 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_samples = self.n // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas
        self.shuffle, self.drop_last = True, True

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        perm = torch.randperm(self.n, generator=g)[: self.total_size]
        skip, self.skip = self.skip, 0
        return iter(perm[self.rank :: self.num_replicas][skip:].tolist())


class ResumableDataLoader(DataLoader):
    """Training DataLoader whose position Lightning saves in checkpoints and restores on resume
    (``state_dict`` / ``load_state_dict``: Lightning's stateful-loader protocol), so a run resumed
    mid-epoch sees exactly the batches the uninterrupted run would have seen, on every rank.

    ``progress()`` returns (epoch, batches of this epoch the model has consumed): read from the
    Trainer's loop progress, because Lightning pre-fetches one batch ahead of the model (a loader
    that counted the batches it handed out, like torchdata's ``StatefulDataLoader``, would resume
    one batch late).

    ``augment(batch, generator)`` (random flips) runs here, in the training process, after the
    batch left the workers, with a CPU generator seeded by (seed, epoch, rank, batch): the
    augmentation does not depend on when the batch was fetched nor on ``num_workers`` (worker
    processes have RNG streams of their own, which a resume does not restore). Batches of
    ``(x, labels)`` augment ``x``.
    """

    def __init__(
        self,
        *args: Any,
        progress: Callable[[], tuple[int, int]] | None = None,
        augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.progress, self.augment = progress, augment

    def _augmented(self, batch: Any, generator: torch.Generator | None) -> Any:
        if self.augment is None:
            return batch
        if isinstance(batch, (tuple, list)):
            return type(batch)([self.augment(batch[0], generator), *batch[1:]])
        return self.augment(batch, generator)

    def __iter__(self) -> Iterator[Any]:
        order = self.sampler
        if not isinstance(order, EpochShuffleOrder):  # replaced (e.g. overfit_batches)
            for batch in super().__iter__():
                yield self._augmented(batch, None)
            return
        first = order.skip // int(self.batch_size or 1)
        with torch.random.fork_rng(devices=[]):  # its base seed: not from the global streams
            it = super().__iter__()
        for j in itertools.count(first):
            try:
                batch = next(it)
            except StopIteration:
                return
            seed = step_seed(order.seed, order.epoch, order.rank, j)
            yield self._augmented(batch, seeded_generator(seed))

    def state_dict(self) -> dict[str, int]:
        order = self.sampler
        if not isinstance(order, EpochShuffleOrder):  # replaced (e.g. overfit_batches)
            return {}
        epoch, batches = self.progress() if self.progress is not None else (order.epoch, 0)
        return {"seed": order.seed, "epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        order = self.sampler
        if not state or not isinstance(order, EpochShuffleOrder):
            return
        order.seed = int(state["seed"])
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        order.set_epoch(epoch)
        order.skip = batches * int(self.batch_size or 1)


def trainer_progress(trainer: Any) -> tuple[int, int]:
    """(epoch, batches of the epoch the model has consumed) of a Lightning Trainer."""
    if trainer is None:
        return 0, 0
    epoch = int(trainer.current_epoch)
    batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    limit = trainer.num_training_batches  # with limit_train_batches; inf for iterable data
    if limit != float("inf") and batches >= limit:  # the epoch is over: the next starts afresh
        return epoch + 1, 0
    return epoch, batches


def train_loader(
    ds: Dataset,
    batch_size: int,
    world_size: int,
    trainer: Any,
    augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
    **kwargs: Any,
) -> DataLoader:
    """Shuffled, drop-last training loader of this process (rank ``trainer.global_rank`` of
    ``world_size``): a :class:`ResumableDataLoader` over an :class:`EpochShuffleOrder` seeded by
    ``torch.initial_seed()`` (the run's ``seed``), with ``augment``, exact when resumed mid-epoch
    and with any number of workers."""
    rank = int(getattr(trainer, "global_rank", 0) or 0) if world_size > 1 else 0
    order = EpochShuffleOrder(len(ds), torch.initial_seed(), world_size, rank)
    return ResumableDataLoader(
        ds,
        batch_size=batch_size,
        sampler=order,
        drop_last=True,
        progress=lambda: trainer_progress(trainer),
        augment=augment,
        **kwargs,
    )
