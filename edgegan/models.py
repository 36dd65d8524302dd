"""Generators and discriminators per data shape: short, boring `nn.Sequential`s.

Discriminators carry no batch-statistics layers: their parameters are averaged across devices and a
gradient penalty needs per-sample gradients, and both are clean only without batch statistics. Spectral
normalisation (`d_norm="spectral"`) is computed exactly from the weights at every forward pass, with no
power-iteration state, so a discriminator's state dict is the same with or without it and averages cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

D_NORMS = ("none", "spectral")


def check_discriminator(d_width: int, d_norm: str) -> None:
    """The discriminator's options, checked here for the recipe and the model alike."""
    if d_width < 0:
        raise ValueError(f"d_width must be >= 0 (0: the model's width), got {d_width}")
    if d_norm not in D_NORMS:
        raise ValueError(f"d_norm must be one of {', '.join(D_NORMS)}, got {d_norm!r}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same pair of networks anywhere (server, device, checkpoint)."""

    sample_shape: tuple[int, ...]  # (2,) for points, (C, H, W) for images
    latent_dim: int
    width: int
    d_width: int = 0  # the discriminator's width; 0: `width`
    d_norm: str = "none"  # one of D_NORMS

    def __post_init__(self) -> None:
        check_discriminator(self.d_width, self.d_norm)

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3

    @property
    def discriminator_width(self) -> int:
        return self.d_width or self.width


def spectrally_normalised(weight: torch.Tensor) -> torch.Tensor:
    """`weight` over the largest singular value of its (out, rest) matrix (Miyato et al. 2018), exact: the
    matrices are small enough for an SVD at every step, and no power-iteration vector has to be averaged."""
    return weight / torch.linalg.matrix_norm(weight.flatten(1), ord=2)


class SpectralConv2d(nn.Conv2d):
    """nn.Conv2d with its weight spectrally normalised; the same parameters, so the same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, spectrally_normalised(self.weight), self.bias)


class SpectralLinear(nn.Linear):
    """nn.Linear with its weight spectrally normalised; the same parameters, so the same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, spectrally_normalised(self.weight), self.bias)


def mlp_generator(latent_dim: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(latent_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2)
    )


def mlp_discriminator(width: int, norm: str = "none") -> nn.Module:
    linear = SpectralLinear if norm == "spectral" else nn.Linear
    return nn.Sequential(linear(2, width), nn.ReLU(), linear(width, width), nn.ReLU(), linear(width, 1))


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


def dcgan_discriminator(width: int, channels: int, size: int, norm: str = "none") -> nn.Module:
    """(C, s, s) -> (w, s/2, s/2) -> (2w, s/4, s/4) -> one logit."""
    base = size // 4
    conv, linear = (SpectralConv2d, SpectralLinear) if norm == "spectral" else (nn.Conv2d, nn.Linear)
    return nn.Sequential(
        conv(channels, width, 4, 2, 1),
        nn.LeakyReLU(0.2),
        conv(width, 2 * width, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        linear(2 * width * base * base, 1),
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
        model = dcgan_discriminator(spec.discriminator_width, channels, size, spec.d_norm)
    else:
        model = mlp_discriminator(spec.discriminator_width, spec.d_norm)
    model.apply(init_weights)
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def state_bytes(model: nn.Module) -> int:
    """Bytes of the full state dict at its stored precision (what an fp32 message carries)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def sample_noise(count: int, latent_dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(count, latent_dim, generator=generator)
