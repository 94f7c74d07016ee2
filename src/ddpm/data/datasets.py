"""Map-style datasets of uint8 images: in memory (one tensor) or files decoded on demand."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.data.sources import BadImageError, decode_image, resize_center_crop, warn_skipped


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
