"""Sample-quality metrics: FID, IS, KID and precision/recall (torchmetrics states reduced across
processes, torch-fidelity's formulas), their extractors, image sources and cached reference
features; and the distances of the 2-D playground."""

from ddpm.metrics.features import (
    EXTRACTORS,
    DinoV2Features,
    RandomConvFeatures,
    WeightsUnavailableError,
    build_extractor,
    extractor_id,
)
from ddpm.metrics.images import (
    DatasetImages,
    FolderImages,
    ImageSource,
    NpzImages,
    open_images,
    save_npz,
)
from ddpm.metrics.scores import Features, SampleMetrics, Scores

__all__ = [
    "EXTRACTORS",
    "DatasetImages",
    "DinoV2Features",
    "Features",
    "FolderImages",
    "ImageSource",
    "NpzImages",
    "RandomConvFeatures",
    "SampleMetrics",
    "Scores",
    "WeightsUnavailableError",
    "build_extractor",
    "extractor_id",
    "open_images",
    "save_npz",
]
