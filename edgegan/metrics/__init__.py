"""Quality scores: a Fréchet distance over a small classifier's features, class and mode coverage."""

from edgegan.metrics.classifier import (
    ClassifierMissingError,
    FeatureClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from edgegan.metrics.quality import ImageQuality, point_quality

__all__ = [
    "ClassifierMissingError",
    "FeatureClassifier",
    "ImageQuality",
    "load_classifier",
    "point_quality",
    "save_classifier",
    "train_classifier",
]
