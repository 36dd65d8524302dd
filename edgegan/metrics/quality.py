"""Sample-quality scores for a generator: a Fréchet distance and class coverage for images, mode coverage
and high-quality fraction for 2-D mixtures."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from edgegan.metrics.classifier import FeatureClassifier

BATCH_SIZE = 500
COVERAGE_SHARE = 0.01  # a class or mode counts once it gets at least 1 % of the samples
HIGH_QUALITY_STDS = 3.0


class UnitRangeFeatures(nn.Module):
    """Feeds torchmetrics' [0, 1] images to a classifier trained on [-1, 1] images."""

    def __init__(self, classifier: FeatureClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, unit_images: torch.Tensor) -> torch.Tensor:
        return self.classifier(unit_images * 2.0 - 1.0)


class ImageQuality:
    """Scores fake images against real statistics computed once, so each call costs only the fakes.

    The Fréchet distance uses the classifier's 64-d features instead of Inception's: it ranks generators of
    the same data set but is not comparable with published FID numbers.
    """

    def __init__(
        self, classifier: FeatureClassifier, real_images: torch.Tensor, num_real: int = 5000, seed: int = 0
    ) -> None:
        self.classifier = classifier.eval()
        self.device = next(classifier.parameters()).device
        self.sample_shape = (classifier.channels, classifier.size, classifier.size)
        self.check_shape(real_images, "real_images")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(real_images.shape[0], generator=generator)[:num_real]
        self.fid = FrechetInceptionDistance(
            feature=UnitRangeFeatures(self.classifier), reset_real_features=False, normalize=True
        ).to(self.device)
        with torch.no_grad():
            for batch in self.batches(real_images[chosen]):
                self.fid.update(batch, real=True)

    def check_shape(self, images: torch.Tensor, name: str) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.sample_shape or images.shape[0] < 2:
            raise ValueError(
                f"{name} must be at least 2 images of shape {self.sample_shape}, got {tuple(images.shape)}"
            )

    def batches(self, images: torch.Tensor):
        """[-1, 1] images -> [0, 1] batches on the classifier's device, as `normalize=True` expects."""
        for start in range(0, images.shape[0], BATCH_SIZE):
            batch = images[start : start + BATCH_SIZE].detach().to(self.device, torch.float32)
            # Clamped because a generator without a final tanh can overshoot; torchmetrics assumes [0, 1].
            yield ((batch + 1.0) / 2.0).clamp_(0.0, 1.0)

    def __call__(self, fake_images: torch.Tensor) -> dict:
        """{"fid": Fréchet distance to the real features, "classes": classes getting >= 1 % of the fakes}."""
        self.check_shape(fake_images, "fake_images")
        self.fid.reset()  # drops the previous call's fakes; the real statistics survive (reset_real_features)
        class_counts = torch.zeros(self.classifier.num_classes, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for batch in self.batches(fake_images):
                self.fid.update(batch, real=False)
                predicted = self.classifier.logits(batch * 2.0 - 1.0).argmax(dim=1)
                class_counts += torch.bincount(predicted, minlength=self.classifier.num_classes)
            fid = float(self.fid.compute())
        covered = int((class_counts >= COVERAGE_SHARE * fake_images.shape[0]).sum())
        return {"fid": fid, "classes": covered}


def point_quality(samples: torch.Tensor, modes: torch.Tensor, std: float) -> dict:
    """{"modes": modes covered, "hq": high-quality fraction, "dist": mean distance to the nearest mode}
    for 2-D samples of a Gaussian mixture.

    A sample is high quality within 3 std of its nearest mode; a mode is covered once at least 1 % of all
    samples are high-quality samples nearest to it. `dist` moves long before the other two do, so it shows
    early progress (and damage: a poisoned run's samples fly off).
    """
    if samples.dim() != 2 or samples.shape[1] != modes.shape[1] or samples.shape[0] == 0:
        raise ValueError(f"samples must be (n, {modes.shape[1]}) with n >= 1, got {tuple(samples.shape)}")
    with torch.no_grad():
        distances = torch.cdist(samples.detach().float(), modes.to(samples.device).float())
        nearest_distance, nearest_mode = distances.min(dim=1)
        high_quality = nearest_distance <= HIGH_QUALITY_STDS * std
        per_mode = torch.bincount(nearest_mode[high_quality], minlength=modes.shape[0])
    covered = int((per_mode >= COVERAGE_SHARE * samples.shape[0]).sum())
    return {
        "modes": covered,
        "hq": float(high_quality.float().mean()),
        "dist": float(nearest_distance.float().mean()),
    }
