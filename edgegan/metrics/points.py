"""Quality of 2-D samples of a Gaussian mixture: modes covered, high-quality share, distance to the modes.

Apart from quality.py (which needs torchmetrics for images) so that a 2-D run never imports torchmetrics.
"""

from __future__ import annotations

import torch

COVERAGE_SHARE = 0.01  # a class or mode counts once it gets at least 1 % of the samples
HIGH_QUALITY_STDS = 3.0


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
