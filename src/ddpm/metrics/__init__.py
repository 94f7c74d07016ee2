"""Sample-quality metrics: FID / IS feature extractors and cached reference statistics."""

from ddpm.metrics.features import (
    INCEPTION_URL,
    InceptionUnavailableError,
    InceptionV3Features,
    RandomConvFeatures,
    extractor_id,
    inception_hub_path,
)
from ddpm.metrics.reference import FeatureStats, cache_key, cache_path, feature_sums

__all__ = [
    "INCEPTION_URL",
    "FeatureStats",
    "InceptionUnavailableError",
    "InceptionV3Features",
    "RandomConvFeatures",
    "cache_key",
    "cache_path",
    "extractor_id",
    "feature_sums",
    "inception_hub_path",
]
