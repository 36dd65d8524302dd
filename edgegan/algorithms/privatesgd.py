"""DP-SGD's discriminator step (Abadi et al. 2016): each real example's gradient clipped, Gaussian noise on
their sum, divided by the batch size; the device's optimiser then steps as usual.

Per-sample gradients come from torch.func (functional_call, vmap, grad), so a board needs nothing but torch:
no Opacus. The example a gradient belongs to is one (real, fake) pair of the batch: its loss is the batch
loss on that pair alone, so with no noise and a clip no gradient reaches, the step is the plain one (the
batch loss is the mean of these). Only the real example is private data; pairing keeps one term per
example. Every draw (the penalty's interpolation weights, then the noise) comes from the step's seeded
stream, so a device's noise is the same in the simulator and over MQTT.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.losses import interpolation_weights, logit_loss, penalty_of

# Added to a gradient's norm before dividing by it: a zero gradient is scaled by a finite factor.
NORM_FLOOR = 1e-12


def per_sample_gradients(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, mix: torch.Tensor | None,
    cfg: TrainConfig,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
    """({parameter name: gradients, one row per example}, the examples' losses) of the discriminator loss
    on each (real[i], fake[i]) pair; `mix` is the penalty's interpolation weights (WGAN-GP only)."""
    parameters = {name: parameter.detach() for name, parameter in discriminator.named_parameters()}
    buffers = {name: buffer.detach() for name, buffer in discriminator.named_buffers()}

    def logits(params, batch):
        return functional_call(discriminator, (params, buffers), (batch,))

    def example_loss(params, real_one, fake_one, mix_one):
        real_batch, fake_batch = real_one.unsqueeze(0), fake_one.unsqueeze(0)
        loss = logit_loss(cfg.loss, logits(params, real_batch), logits(params, fake_batch))
        if mix_one is not None:
            mix_batch = mix_one.unsqueeze(0)
            interpolates = mix_batch * real_batch + (1 - mix_batch) * fake_batch
            gradients = grad(lambda points: logits(params, points).sum())(interpolates)
            loss = loss + cfg.gp_weight * penalty_of(gradients)
        return loss, loss.detach()

    mix_dim = None if mix is None else 0
    gradients, losses = vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0, mix_dim))(
        parameters, real, fake, mix
    )
    return gradients, losses


def clip_per_sample(gradients: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Each example's gradient (across all parameters) scaled to a norm of at most `clip`."""
    squares = sum(rows.flatten(1).pow(2).sum(dim=1) for rows in gradients.values())
    factors = (clip / (squares.sqrt() + NORM_FLOOR)).clamp(max=1.0)
    return {name: rows * factors.view((-1,) + (1,) * (rows.dim() - 1)) for name, rows in gradients.items()}


def private_discriminator_step(
    discriminator: nn.Module,
    optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    cfg: TrainConfig,
    rng: torch.Generator,
) -> float:
    """One DP-SGD step of `discriminator` on a real and a fake batch of the same size; their mean loss."""
    count = real.shape[0]
    if fake.shape[0] != count:
        raise ValueError(f"DP-SGD pairs examples: {count} real and {fake.shape[0]} fake")
    # Drawn as the plain step's penalty draws it, before anything else, so the stream stays in step.
    mix = interpolation_weights(count, real, rng) if cfg.loss == "wgan-gp" and cfg.gp_weight else None
    gradients, losses = per_sample_gradients(discriminator, real, fake, mix, cfg)
    clipped = clip_per_sample(gradients, cfg.dp_clip)
    optimizer.zero_grad(set_to_none=True)
    for name, parameter in discriminator.named_parameters():
        summed = clipped[name].sum(dim=0)
        if cfg.dp_noise > 0:
            draw = torch.randn(summed.shape, generator=rng).to(summed.device)  # a CPU stream on any device
            summed = summed + draw * (cfg.dp_noise * cfg.dp_clip)
        parameter.grad = summed / count
    optimizer.step()
    return float(losses.mean())
