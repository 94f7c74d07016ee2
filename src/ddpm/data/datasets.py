"""Map-style datasets: uint8 images (or points) held in memory, and examples paired with their
class labels. Image files decoded on demand: :class:`ddpm.data.files.ImageFiles`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


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

    def subset(self, indices: Sequence[int]) -> TensorImages:
        return type(self)(self.data[torch.as_tensor(indices, dtype=torch.long)])


def check_labels(labels: Tensor, num_classes: int, what: str) -> Tensor:
    """``labels`` as int64, or a ValueError naming ``what`` when one lies outside [0, K)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        values = sorted(set(labels[bad].tolist()))[:10]
        raise ValueError(
            f"{what}: {int(bad.sum())} label(s) outside [0, {num_classes}) (e.g. {values}); "
            "class-conditional training needs every example labelled with a class index"
        )
    return labels


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
