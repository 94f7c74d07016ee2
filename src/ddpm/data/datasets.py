"""Map-style datasets of uint8 images: in memory (one tensor) or files decoded on demand."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ddpm.data.sources import BadImageError, decode_image, resize_center_crop, warn_skipped
from ddpm.utils.seeding import step_seed


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) held in memory; ``__getitems__`` fetches a batch in one index."""

    def __init__(self, data: Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        return self.data[torch.as_tensor(indices, dtype=torch.long)]


class LabeledDataset(Dataset):
    """(example, label) pairs of a dataset and int64 ``labels`` (N,) for class-conditional
    training; ``__getitems__`` fetches a batch as (the dataset's batch, labels)."""

    def __init__(self, dataset: Dataset, labels: Tensor) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n != len(labels):
            raise ValueError(f"{n} examples but {len(labels)} labels")
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        return self.dataset[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Any, Tensor]:
        fetch = getattr(self.dataset, "__getitems__", None)
        x = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return x, self.labels[torch.as_tensor(indices, dtype=torch.long)]


class LabeledCollate:
    """collate_fn of a :class:`LabeledDataset`: ``(collate(examples), labels)``."""

    def __init__(self, collate: Callable[[Any], Tensor]) -> None:
        self.collate = collate

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], Tensor):
            x, y = batch  # from LabeledDataset.__getitems__
        else:  # a list of (example, label) pairs
            x, y = [b[0] for b in batch], torch.stack([torch.as_tensor(b[1]) for b in batch])
        return self.collate(x), y.to(torch.long)


class ImageFiles(Dataset):
    """Image files decoded, converted and resized on access (in DataLoader workers).

    A file that fails to decode raises :class:`BadImageError` naming it (``on_bad_image='error'``)
    or is replaced by the next readable file with a warning (``'skip'``).
    """

    def __init__(
        self, files: Sequence[Path], image_size: int, channels: int, on_bad_image: str = "error"
    ) -> None:
        self.files = list(files)
        self.image_size, self.channels, self.on_bad_image = image_size, channels, on_bad_image

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        x = decode_image(self.files[index], self.channels)
        return resize_center_crop(x.unsqueeze(0), self.image_size)[0]

    def __getitem__(self, index: int) -> Tensor:
        try:
            return self.load(index)
        except BadImageError as exc:
            if self.on_bad_image != "skip":
                raise
            warn_skipped(f"skipped unreadable image file {self.files[index]}: {exc.__cause__}")
        for k in range(1, len(self.files)):
            try:
                return self.load((index + k) % len(self.files))
            except BadImageError:
                continue
        raise BadImageError(f"no readable image among the {len(self.files)} files of this split")


class EpochShuffleSampler(DistributedSampler):
    """This process's share of a permutation of ``range(n)`` that is a function of (``seed``,
    epoch) only, so the data order of every epoch can be rebuilt after a restart; ``skip`` samples
    of this process's share are dropped from the next iteration (resuming mid-epoch).

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

    A batch is collated (``collate_fn``: random flips) under a CPU RNG seeded by (seed, epoch,
    rank, batch), so its augmentation does not depend on when it was fetched either. With
    ``num_workers > 0`` the collate runs in the workers, whose RNG streams a resume does not restore.
    """

    def __init__(
        self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, EpochShuffleSampler) or self.num_workers > 0:
            yield from super().__iter__()
            return
        first = sampler.skip // int(self.batch_size or 1)
        with torch.random.fork_rng(devices=[]):  # its base seed: drawn, unused without workers
            it = super().__iter__()
        for j in itertools.count(first):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_seed(sampler.seed, sampler.epoch, sampler.rank, j))
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        if not isinstance(sampler, EpochShuffleSampler):  # replaced (e.g. overfit_batches)
            return {}
        epoch, batches = self.progress() if self.progress is not None else (sampler.epoch, 0)
        return {"seed": sampler.seed, "epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if not state or not isinstance(sampler, EpochShuffleSampler):
            return
        sampler.seed = int(state["seed"])
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.skip = batches * int(self.batch_size or 1)


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
    ds: Dataset, batch_size: int, world_size: int, trainer: Any, **kwargs: Any
) -> DataLoader:
    """Shuffled, drop-last training loader of this process (rank ``trainer.global_rank`` of
    ``world_size``): a :class:`ResumableDataLoader` over an :class:`EpochShuffleSampler` seeded by
    ``torch.initial_seed()`` (the run's ``seed``), exact when resumed mid-epoch."""
    rank = int(getattr(trainer, "global_rank", 0) or 0) if world_size > 1 else 0
    sampler = EpochShuffleSampler(len(ds), torch.initial_seed(), world_size, rank)
    return ResumableDataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        progress=lambda: trainer_progress(trainer),
        **kwargs,
    )
