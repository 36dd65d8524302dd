"""What the quality figures mean: the scores of image sets whose quality is known, measured exactly as a
run's evaluation measures a generator (the same real statistics, extractor and sample size). Real held-out
images give the floor of fid and the ceiling of IS; the same images made grainy or soft show what flaws a
person sees cost; one class, three classes and uniform noise show what mode collapse and garbage score
(`edgegan evaluate --reference`, docs/algorithms.md "Reading the figures").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgegan.data import Dataset
from edgegan.metrics.extractors import FeatureExtractor
from edgegan.metrics.quality import ImageQuality

REAL_IMAGES = 5000  # ImageQuality's num_real: the real side of every run's evaluation
NOISE_STD = 0.25  # digits still plain to a person, visibly grainy
BLUR_SIGMA = 0.7  # strokes still plain, edges soft


@dataclass(frozen=True)
class Reference:
    name: str
    quality: dict


def reference_sets(dataset: Dataset, samples: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """The known image sets, `samples` each: real images the evaluation's real side does not hold (drawn
    with replacement if fewer are left), the first class only, the first three classes only, and
    uniform noise in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    # The indices ImageQuality(real_images=dataset.x, seed=seed) takes for its real statistics.
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:REAL_IMAGES]
    held_out = torch.ones(len(dataset), dtype=torch.bool)
    held_out[chosen] = False

    def draw(mask: torch.Tensor) -> torch.Tensor:
        pool = mask.nonzero().squeeze(1)
        if len(pool) >= samples:
            return dataset.x[pool[torch.randperm(len(pool), generator=generator)[:samples]]]
        return dataset.x[pool[torch.randint(len(pool), (samples,), generator=generator)]]

    from torchvision.transforms.functional import gaussian_blur

    classes = dataset.y.unique(sorted=True)
    real = draw(held_out)
    noisy = (real + NOISE_STD * torch.randn(real.shape, generator=generator)).clamp(-1, 1)
    noise = torch.rand(samples, *dataset.sample_shape, generator=generator) * 2 - 1
    return [
        (f"real images the real side does not hold ({int(held_out.sum())} left)", real),
        (f"the same, with Gaussian pixel noise (std {NOISE_STD} of the [-1, 1] range)", noisy),
        (f"the same, blurred (Gaussian, sigma {BLUR_SIGMA} pixel)",
         gaussian_blur(real, [5, 5], [BLUR_SIGMA, BLUR_SIGMA])),
        (f"real images of three classes only ({', '.join(str(int(c)) for c in classes[:3])})",
         draw(torch.isin(dataset.y, classes[:3]))),
        (f"real images of one class only ({int(classes[0])})", draw(dataset.y == classes[0])),
        ("uniform noise in [-1, 1]", noise),
    ]  # fmt: skip


def calibrate(
    dataset: Dataset, extractor: FeatureExtractor, *, samples: int = 2500, seed: int = 0
) -> list[Reference]:
    """Each reference set scored as a generator's `samples` would be in a run on `dataset` with `seed`."""
    quality = ImageQuality(extractor, dataset.x, num_real=REAL_IMAGES, seed=seed)
    return [Reference(name, quality(images)) for name, images in reference_sets(dataset, samples, seed)]


def calibration_table(references: list[Reference]) -> str:
    """A markdown table: one row per reference set."""
    has_classes = any("is" in reference.quality for reference in references)
    header = "| images | fid | classes | IS | class shares |" if has_classes else "| images | fid |"
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for reference in references:
        quality = reference.quality
        cells = [reference.name, f"{quality['fid']:.1f}"]
        if has_classes:
            shares = quality.get("class_shares") or []
            spread = f"{min(shares):.1%} - {max(shares):.1%}" if shares else ""
            cells += [str(quality.get("classes", "")), f"{quality.get('is', float('nan')):.2f}", spread]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
