"""Synthetic 2-D Gaussian mixtures: the standard mode-collapse benchmarks."""

from __future__ import annotations

import math

import torch

from edgegan.data.datasets import Dataset

RING8_RADIUS = 2.0
RING8_STD = 0.02
GRID25_SPACING = 2.0
GRID25_STD = 0.05


def ring8_modes() -> torch.Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return (RING8_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)).float()


def grid25_modes() -> torch.Tensor:
    axis = (torch.arange(5, dtype=torch.float32) - 2) * GRID25_SPACING
    xs, ys = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def make_mixture(name: str, samples_per_mode: int, seed: int) -> Dataset:
    """Draws `samples_per_mode` points around each mode; the label of a point is its mode's index."""
    if name == "ring8":
        modes, std = ring8_modes(), RING8_STD
    elif name == "grid25":
        modes, std = grid25_modes(), GRID25_STD
    else:
        raise ValueError(f"unknown mixture {name!r}")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(modes.shape[0]).repeat_interleave(samples_per_mode)
    points = modes[labels] + std * torch.randn(labels.shape[0], 2, generator=generator)
    return Dataset(name=name, x=points, y=labels, num_classes=modes.shape[0], modes=modes, mode_std=std)
