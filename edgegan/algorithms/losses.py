"""GAN losses on discriminator logits: non-saturating, hinge and WGAN-GP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def discriminator_loss(
    loss: str,
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator,
    gp_weight: float,
) -> torch.Tensor:
    """The loss a discriminator minimises on one real and one fake batch (fakes carry no graph to G)."""
    real_logits = discriminator(real)
    fake_logits = discriminator(fake)
    logit_part = logit_loss(loss, real_logits, fake_logits)
    if loss != "wgan-gp" or gp_weight == 0:
        return logit_part
    return logit_part + gp_weight * gradient_penalty(discriminator, real, fake, generator)


def logit_loss(loss: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The part of a discriminator's loss that its logits alone give (all of it but WGAN-GP's penalty);
    shared by the batch step and the per-sample step of DP-SGD (edgegan/algorithms/privatesgd.py)."""
    if loss == "ns":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if loss == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if loss == "wgan-gp":
        return fake_logits.mean() - real_logits.mean()
    raise ValueError(f"unknown loss {loss!r}")


def penalty_of(gradients: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's (||grad||- 1)^2, averaged over the batch, from D's gradients at the interpolates."""
    return (gradients.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


def interpolation_weights(count: int, sample: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The random mix of real and fake for `count` interpolates shaped like `sample`'s batch, from the CPU
    stream `generator`, on the sample's device."""
    mix_shape = (count,) + (1,) * (sample.dim() - 1)
    return torch.rand(mix_shape, generator=generator).to(sample.device)  # a CPU stream on any device


def gradient_penalty(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Gulrajani et al. 2017: (||grad D(x_hat)|| - 1)^2 on random interpolates of real and fake."""
    count = min(real.shape[0], fake.shape[0])
    real, fake = real[:count], fake[:count]
    mix = interpolation_weights(count, real, generator)
    interpolates = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (gradients,) = torch.autograd.grad(discriminator(interpolates).sum(), interpolates, create_graph=True)
    return penalty_of(gradients)


def generator_loss(loss: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """The loss a generator minimises, given the discriminator's logits on its samples."""
    if loss == "ns":
        return F.softplus(-fake_logits).mean()
    if loss in ("hinge", "wgan-gp"):
        return -fake_logits.mean()
    raise ValueError(f"unknown loss {loss!r}")
