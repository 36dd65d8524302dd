"""Quality scores: a Fréchet distance over a chosen feature extractor's features (by default a small
classifier's), class and mode coverage."""

from edgegan.metrics.classifier import (
    ClassifierMissingError,
    FeatureClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from edgegan.metrics.extractors import (
    FEATURE_KINDS,
    FeatureExtractor,
    file_digest,
    load_extractor,
    parse_features,
)
from edgegan.metrics.quality import (
    FeatureStatistics,
    ImageQuality,
    class_scores,
    combined_statistics,
    feature_statistics,
    image_logits,
    point_quality,
)

__all__ = [
    "FEATURE_KINDS",
    "ClassifierMissingError",
    "FeatureClassifier",
    "FeatureExtractor",
    "FeatureStatistics",
    "ImageQuality",
    "class_scores",
    "combined_statistics",
    "feature_statistics",
    "image_logits",
    "file_digest",
    "load_classifier",
    "load_extractor",
    "parse_features",
    "point_quality",
    "save_classifier",
    "train_classifier",
]
