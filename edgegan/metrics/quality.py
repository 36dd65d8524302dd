"""Sample-quality scores for images: a Fréchet distance, class coverage and the classifier-based IS (2-D
mixtures: points.py)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from edgegan.metrics.classifier import FeatureClassifier
from edgegan.metrics.extractors import FeatureExtractor
from edgegan.metrics.points import COVERAGE_SHARE
from edgegan.metrics.statistics import (
    FeatureStatistics,
    UnitRangeFeatures,
    as_extractor,
    check_images,
    unit_batches,
)


class ImageQuality:
    """Scores fake images against real statistics computed once, so each call costs only the fakes.

    With the `classifier` extractor the Fréchet distance uses its 64-d features instead of Inception's: it
    ranks generators of the same data set but is not comparable with published FID numbers (`inception`
    is). The `classes` score needs an extractor with a class head and is left out without one.
    """

    def __init__(
        self,
        features: FeatureExtractor | FeatureClassifier,
        real_images: torch.Tensor | None = None,
        num_real: int = 5000,
        seed: int = 0,
        *,
        real_statistics: FeatureStatistics | None = None,
    ) -> None:
        """Real statistics from `real_images` (up to `num_real` of them, chosen with `seed`), or given as
        `real_statistics` (the sum of devices' `feature_statistics`; see `from_statistics`)."""
        if (real_images is None) == (real_statistics is None):
            raise ValueError("give either real_images or real_statistics")
        self.extractor = as_extractor(features).eval()
        self.device = self.extractor.device
        self.sample_shape = self.extractor.sample_shape
        self.fid = FrechetInceptionDistance(
            feature=UnitRangeFeatures(self.extractor), reset_real_features=False, normalize=True
        ).to(self.device)
        if real_statistics is not None:
            self.set_real_statistics(real_statistics)
            return
        self.check_shape(real_images, "real_images")
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(real_images.shape[0], generator=generator)[:num_real]
        with torch.no_grad():
            for batch in self.batches(real_images[chosen]):
                self.fid.update(batch, real=True)

    @classmethod
    def from_statistics(
        cls, features: FeatureExtractor | FeatureClassifier, statistics: FeatureStatistics
    ) -> ImageQuality:
        """Scores against real statistics that arrived from elsewhere (devices), without any real image."""
        return cls(features, real_statistics=statistics)

    def set_real_statistics(self, statistics: FeatureStatistics) -> None:
        """Puts the statistics where torchmetrics keeps its real side, so that its own Fréchet distance
        (matrix square root included) runs on them as if it had seen the images."""
        dimension = self.extractor.num_features
        statistics.check(dimension)
        self.fid.real_features_sum = statistics.feature_sum.to(self.device, torch.float64).clone()
        self.fid.real_features_cov_sum = statistics.outer_sum.to(self.device, torch.float64).clone()
        count = torch.tensor(statistics.count, dtype=torch.long, device=self.device)
        self.fid.real_features_num_samples = count

    def check_shape(self, images: torch.Tensor, name: str) -> None:
        check_images(images, self.sample_shape, name)

    def batches(self, images: torch.Tensor):
        return unit_batches(images, self.device)

    def __call__(self, fake_images: torch.Tensor) -> dict:
        """{"fid": Fréchet distance to the real features, and with a class head in the extractor
        `class_scores` of the fakes: "classes", "is", "class_shares"}."""
        self.check_shape(fake_images, "fake_images")
        if not torch.isfinite(fake_images).all():
            # A diverged generator: its features would reach LAPACK's eigenvalue routine as NaN, which MKL
            # answers with "Parameter 3 was incorrect on entry to DGEBAL" and a corrupted heap (an abort).
            return {"fid": math.inf, "classes": 0}
        self.fid.reset()  # drops the previous call's fakes; the real statistics survive (reset_real_features)
        logits = []
        with torch.no_grad():
            for batch in self.batches(fake_images):
                self.fid.update(batch, real=False)
                if self.extractor.num_classes:
                    logits.append(self.extractor.logits(batch * 2.0 - 1.0))
            fid = float(self.fid.compute())
        if not logits:
            return {"fid": fid}
        return {"fid": fid, **class_scores(torch.cat(logits))}


def image_logits(extractor: FeatureExtractor | FeatureClassifier, images: torch.Tensor) -> torch.Tensor:
    """The class head's logits of [-1, 1] `images`, in the batches and clamping the scores use."""
    extractor = as_extractor(extractor).eval()
    if not extractor.num_classes:
        raise ValueError(f"{extractor.description} has no class head: no class scores")
    check_images(images, extractor.sample_shape, "images")
    with torch.no_grad():
        return torch.cat(
            [extractor.logits(batch * 2.0 - 1.0) for batch in unit_batches(images, extractor.device)]
        )


def class_scores(logits: torch.Tensor) -> dict:
    """What a classifier makes of n images from their (n, K) logits: "classes" (those getting at least
    COVERAGE_SHARE of the images), "is" (the classifier-based Inception Score, exp E[KL(p(y|x) || p(y))]
    over all n images as one split: the "MNIST score" of the MD-GAN paper, K at most, 1 for one class) and
    "class_shares" (each class's share of the images, summing to 1).

    The score is torchmetrics' InceptionScore on the logits themselves (an identity feature module)."""
    count, num_classes = logits.shape
    with warnings.catch_warnings():  # "saves all features in a buffer"; the std of a single split is NaN
        warnings.simplefilter("ignore")
        metric = InceptionScore(feature=nn.Identity(), splits=1)
        metric.update(logits.detach().double().cpu())
        with torch.random.fork_rng(devices=[]):  # compute() shuffles with the global generator
            score = float(metric.compute()[0])
    counts = torch.bincount(logits.argmax(dim=1).cpu(), minlength=num_classes)
    return {
        "classes": int((counts >= COVERAGE_SHARE * count).sum()),
        "is": score,
        "class_shares": [round(float(share), 4) for share in counts.double() / count],
    }
