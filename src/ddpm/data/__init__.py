"""Data: the image datamodule (one source per kind of image data, :mod:`ddpm.data.sources`) and
2-D toy point clouds."""

from ddpm.data.datamodule import SOURCES, ImageDataModule, per_device_batch_size
from ddpm.data.files import BadImageError
from ddpm.data.sources import DatasetUnavailableError
from ddpm.data.toy import TOY_DATASETS, ToyDataModule
from ddpm.data.transforms import BatchTransform, Normalization

__all__ = [
    "SOURCES",
    "TOY_DATASETS",
    "BadImageError",
    "BatchTransform",
    "DatasetUnavailableError",
    "ImageDataModule",
    "Normalization",
    "ToyDataModule",
    "per_device_batch_size",
]
