"""The real side of a Fréchet distance: feature statistics of [-1, 1] images under an extractor.

Apart from quality.py because a device computes its data's statistics (`--quality-from devices`) and a
board's install leaves torchmetrics out: nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from edgegan.metrics.classifier import FeatureClassifier
from edgegan.metrics.extractors import ClassifierFeatures, FeatureExtractor

BATCH_SIZE = 500


class UnitRangeFeatures(nn.Module):
    """Feeds torchmetrics' [0, 1] images to an extractor of [-1, 1] images."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_features

    def forward(self, unit_images: torch.Tensor) -> torch.Tensor:
        return self.extractor(unit_images * 2.0 - 1.0)


def as_extractor(features: FeatureExtractor | FeatureClassifier) -> FeatureExtractor:
    """A bare classifier (as callers before extractors pass it) becomes the `classifier` extractor."""
    if isinstance(features, FeatureClassifier):
        return ClassifierFeatures(features)
    return features


def check_images(images: torch.Tensor, sample_shape: tuple[int, ...], name: str) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != sample_shape or images.shape[0] < 2:
        raise ValueError(
            f"{name} must be at least 2 images of shape {sample_shape}, got {tuple(images.shape)}"
        )


def unit_batches(images: torch.Tensor, device: torch.device):
    """[-1, 1] images -> [0, 1] batches on the classifier's device, as `normalize=True` expects."""
    for start in range(0, images.shape[0], BATCH_SIZE):
        batch = images[start : start + BATCH_SIZE].detach().to(device, torch.float32)
        # Clamped because a generator without a final tanh can overshoot; torchmetrics assumes [0, 1].
        yield ((batch + 1.0) / 2.0).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class FeatureStatistics:
    """What torchmetrics' Fréchet distance keeps of the real images: their count, the sum of their
    features (d) and the sum of the features' outer products (d x d), in float64. Sums add up: the sum of
    the devices' statistics is the statistics of the union of their images."""

    count: int
    feature_sum: torch.Tensor
    outer_sum: torch.Tensor

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        return FeatureStatistics(
            self.count + other.count, self.feature_sum + other.feature_sum, self.outer_sum + other.outer_sum
        )

    def check(self, dimension: int) -> None:
        """Raises ValueError unless these are the statistics of at least 2 `dimension`-d features."""
        shapes = (tuple(self.feature_sum.shape), tuple(self.outer_sum.shape))
        if shapes != ((dimension,), (dimension, dimension)):
            raise ValueError(f"feature statistics must be of shapes ({dimension},) and "
                             f"({dimension}, {dimension}), got {shapes[0]} and {shapes[1]}")  # fmt: skip
        if self.count < 2:
            raise ValueError(f"feature statistics need at least 2 images, got {self.count}")
        if not (torch.isfinite(self.feature_sum).all() and torch.isfinite(self.outer_sum).all()):
            raise ValueError("feature statistics hold NaN or infinite values")


def feature_statistics(
    features: FeatureExtractor | FeatureClassifier, images: torch.Tensor
) -> FeatureStatistics:
    """The real-side statistics of [-1, 1] `images` under an extractor, computed as torchmetrics' FID
    computes them in `update(real=True)` (same batches, features cast to float64 before summing)."""
    features = as_extractor(features).eval()
    device = features.device
    check_images(images, features.sample_shape, "images")
    extractor = UnitRangeFeatures(features)
    dimension = features.num_features
    feature_sum = torch.zeros(dimension, dtype=torch.float64, device=device)
    outer_sum = torch.zeros(dimension, dimension, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in unit_batches(images, device):
            batch_features = extractor(batch).double()
            feature_sum += batch_features.sum(dim=0)
            outer_sum += batch_features.t().mm(batch_features)
    return FeatureStatistics(int(images.shape[0]), feature_sum.cpu(), outer_sum.cpu())


def combined_statistics(parts: Iterable[FeatureStatistics]) -> FeatureStatistics:
    """The statistics of the union of the parts' images (their sum); at least one part."""
    parts = list(parts)
    if not parts:
        raise ValueError("no feature statistics to combine")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
