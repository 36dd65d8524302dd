"""Quality scores: a Fréchet distance over a small classifier's features, class and mode coverage."""

from edgegan.metrics.classifier import (
    ClassifierMissingError,
    FeatureClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from edgegan.metrics.quality import (
    FeatureStatistics,
    ImageQuality,
    combined_statistics,
    feature_statistics,
    point_quality,
)

__all__ = [
    "ClassifierMissingError",
    "FeatureClassifier",
    "FeatureStatistics",
    "ImageQuality",
    "combined_statistics",
    "feature_statistics",
    "load_classifier",
    "point_quality",
    "save_classifier",
    "train_classifier",
]
