"""Quality scores: a Fréchet distance over a chosen feature extractor's features (by default a small
classifier's), class and mode coverage.

The image scores (quality.py) need torchmetrics, which a board's install leaves out; a device only
computes feature statistics (statistics.py), and 2-D runs score with points.py. So quality.py's names are
loaded on first use (`__getattr__`, PEP 562): `edgegan device` runs without torchmetrics, and a 2-D run
never pays its import.
"""

from importlib import import_module

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
from edgegan.metrics.points import point_quality
from edgegan.metrics.statistics import FeatureStatistics, combined_statistics, feature_statistics

QUALITY_NAMES = ("ImageQuality", "class_scores", "image_logits")


def __getattr__(name: str):
    if name in QUALITY_NAMES:
        return getattr(import_module("edgegan.metrics.quality"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
