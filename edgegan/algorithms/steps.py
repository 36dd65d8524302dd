"""The training steps every algorithm is built from: a discriminator step and a generator step.

Every random draw comes from a `torch.Generator` seeded by (run seed, role, index, round), so a step gives
the same numbers wherever it runs: in the simulator, on a device, in any order. The generators are CPU
ones on any torch device: draws are made on CPU and moved to the model's device (a no-op on CPU), and
every state that leaves a model is a CPU tensor (`clone_state`, `cpu_state`), as the wire needs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.losses import discriminator_loss, generator_loss
from edgegan.algorithms.privatesgd import private_discriminator_step

# Roles that seed independent random streams.
SERVER_STREAM = 1
DEVICE_STREAM = 2
SWAP_STREAM = 3
EVAL_STREAM = 4
POISON_STREAM = 5
# The noise of device d's fake batches in round r, and nothing else: whoever draws them (the device from
# its copy of G, or the server, docs/algorithms.md "Who draws the fakes") draws the same numbers.
FAKE_STREAM = 6
CENTRAL_DP_STREAM = 7  # the server's noise on a centrally private round's fold


def rng_for(seed: int, *keys: int) -> torch.Generator:
    """A generator whose stream depends only on the run seed and the keys (role, index, round...)."""
    entropy = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def device_of(module: nn.Module) -> torch.device:
    """The torch device a model's parameters live on."""
    return next(module.parameters()).device


def sample_real(data: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return data[torch.randint(data.shape[0], (count,), generator=generator)]


def noise(count: int, latent_dim: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
    """Noise drawn from the CPU stream `rng`, then moved to `device`: the same draws on any device."""
    return torch.randn(count, latent_dim, generator=rng).to(device)


class PlainSgd:
    """SGD without momentum or weight decay: p -= lr * grad, the very update torch.optim.SGD makes on CPU
    tensors, without torch.optim. Building a torch.optim optimiser imports torch._dynamo and sympy, about
    70 MB in every device process, for a rule that needs none of it."""

    def __init__(self, parameters, lr: float) -> None:
        self.parameters = list(parameters)
        self.lr = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for parameter in self.parameters:
            if parameter.grad is not None:
                parameter.add_(parameter.grad, alpha=-self.lr)


def make_device_optimizer(cfg: TrainConfig, parameters) -> torch.optim.Optimizer | PlainSgd:
    if cfg.device_opt == "adam":
        return torch.optim.Adam(parameters, lr=cfg.device_lr, betas=(cfg.g_beta1, cfg.g_beta2))
    return PlainSgd(parameters, cfg.device_lr)


def make_generator_optimizer(cfg: TrainConfig, parameters) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=cfg.g_lr, betas=(cfg.g_beta1, cfg.g_beta2))


def generate(generator_net: nn.Module, count: int, latent_dim: int, rng: torch.Generator) -> torch.Tensor:
    """Fake samples without a graph (for discriminator steps); G stays in train mode (batch statistics)."""
    with torch.no_grad():
        return generator_net(noise(count, latent_dim, rng, device_of(generator_net)))


def fake_batches(
    generator_net: nn.Module, batches: int, batch_size: int, latent_dim: int, rng: torch.Generator
) -> list[torch.Tensor]:
    """`batches` fake batches in step order, one `generate` call each: with BatchNorm in train mode a
    batch's statistics are its own, so one call for all of them would give other numbers."""
    return [generate(generator_net, batch_size, latent_dim, rng) for _ in range(batches)]


def discriminator_step(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    cfg: TrainConfig,
    rng: torch.Generator,
) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = discriminator_loss(cfg.loss, discriminator, real, fake, rng, cfg.gp_weight)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def local_discriminator_steps(
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    real_data: torch.Tensor,
    fake_source: Callable[[int], torch.Tensor],
    cfg: TrainConfig,
    rng: torch.Generator,
    steps: int,
    batch_size: int,
) -> float:
    """`steps` discriminator steps, each on a fresh real batch and a fresh fake batch; mean loss. With
    `cfg.private` each is a DP-SGD step (a device's step on its own data; the accounting assumes it)."""
    losses = []
    device = device_of(discriminator)
    step = private_discriminator_step if cfg.private else discriminator_step
    for _ in range(steps):
        real = sample_real(real_data, batch_size, rng).to(device)
        fake = fake_source(batch_size)
        losses.append(step(discriminator, optimizer, real, fake, cfg, rng))
    return float(np.mean(losses))


def generator_steps(
    generator_net: nn.Module,
    discriminator: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    latent_dim: int,
    rng: torch.Generator,
    steps: int,
    batch_size: int,
) -> float:
    """`steps` generator steps against a fixed discriminator (its parameters get no update); mean loss."""
    discriminator.requires_grad_(False)
    losses = []
    try:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            fake = generator_net(noise(batch_size, latent_dim, rng, device_of(generator_net)))
            loss = generator_loss(cfg.loss, discriminator(fake))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        discriminator.requires_grad_(True)
    return float(np.mean(losses))


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the state, wherever the model lives: what is sent, kept or aggregated."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()}


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state as CPU tensors: the model's own tensors on CPU (no copy), copies from any other device."""
    return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
