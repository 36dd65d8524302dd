"""Generators and discriminators per data shape: short, boring `nn.Sequential`s.

Discriminators carry no normalisation layers: their parameters are averaged across devices and a gradient
penalty needs per-sample gradients, and both are clean only without batch statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same pair of networks anywhere (server, device, checkpoint)."""

    sample_shape: tuple[int, ...]  # (2,) for points, (C, H, W) for images
    latent_dim: int
    width: int

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3


def mlp_generator(latent_dim: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(latent_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
    )


def mlp_discriminator(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
    )


def dcgan_generator(latent_dim: int, width: int, channels: int, size: int) -> nn.Module:
    """z -> (4w, s/4, s/4) -> (2w, s/2, s/2) -> (C, s, s) for s = 28 or 32."""
    base = size // 4
    return nn.Sequential(
        nn.Linear(latent_dim, 4 * width * base * base),
        nn.Unflatten(1, (4 * width, base, base)),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(),
        nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.ConvTranspose2d(2 * width, channels, 4, 2, 1),
        nn.Tanh(),
    )


def dcgan_discriminator(width: int, channels: int, size: int) -> nn.Module:
    """(C, s, s) -> (w, s/2, s/2) -> (2w, s/4, s/4) -> one logit."""
    base = size // 4
    return nn.Sequential(
        nn.Conv2d(channels, width, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(2 * width * base * base, 1),
    )


def init_weights(module: nn.Module) -> None:
    """DCGAN's initialisation for conv layers (N(0, 0.02)); linear layers keep torch's default."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_generator(spec: ModelSpec) -> nn.Module:
    if spec.is_image:
        channels, size, _ = spec.sample_shape
        model = dcgan_generator(spec.latent_dim, spec.width, channels, size)
    else:
        model = mlp_generator(spec.latent_dim, spec.width)
    model.apply(init_weights)
    return model


def build_discriminator(spec: ModelSpec) -> nn.Module:
    if spec.is_image:
        channels, size, _ = spec.sample_shape
        model = dcgan_discriminator(spec.width, channels, size)
    else:
        model = mlp_discriminator(spec.width)
    model.apply(init_weights)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def state_bytes(model: nn.Module) -> int:
    """Bytes of the full state dict at its stored precision (what an fp32 message carries)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def sample_noise(count: int, latent_dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(count, latent_dim, generator=generator)
