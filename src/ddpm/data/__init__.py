"""Data: image datamodules (digits, torchvision, folders) and 2-D toy point clouds."""

from ddpm.data.datamodule import DATASETS, ImageDataModule, per_device_batch_size
from ddpm.data.sources import BadImageError, DatasetUnavailableError
from ddpm.data.toy import TOY_DATASETS, ToyDataModule
from ddpm.data.transforms import BatchTransform, Normalization

__all__ = [
    "DATASETS",
    "TOY_DATASETS",
    "BadImageError",
    "BatchTransform",
    "DatasetUnavailableError",
    "ImageDataModule",
    "Normalization",
    "ToyDataModule",
    "per_device_batch_size",
]
