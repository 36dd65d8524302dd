"""FedGAN (Rasouli, Sun, Rajagopal 2020): every device trains a whole GAN; the server averages both nets.

Round t: every agent starts from the global (G_t, D_t), takes `local_steps` (the paper's K) GAN steps on its
own data — a discriminator step, then a generator step against it — and sends both back; the server forms
G_t+1 and D_t+1 with the same aggregation rule and server optimiser as the proposed method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgegan.algorithms.aggregation import ServerOptimizer, State, aggregate, parse_aggregate
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.steps import (
    DEVICE_STREAM,
    clone_state,
    cpu_state,
    device_of,
    discriminator_step,
    generate,
    generator_steps,
    make_device_optimizer,
    make_generator_optimizer,
    rng_for,
    sample_real,
)
from edgegan.models import ModelSpec, build_discriminator, build_generator
from edgegan.torchdevice import CPU


@dataclass(kw_only=True, frozen=True)
class GanUpdate:
    generator_state: State
    discriminator_state: State
    num_samples: int
    d_loss: float
    g_loss: float


class FedganAgent:
    """A device with a whole GAN. Optimiser state (Adam moments for G, and for D if chosen) stays local."""

    def __init__(
        self, *, spec: ModelSpec, cfg: TrainConfig, data: torch.Tensor, device_index: int, seed: int,
        torch_device: torch.device = CPU,
    ):  # fmt: skip
        self.spec = spec
        self.cfg = cfg
        self.data = data
        self.device_index = device_index
        self.seed = seed
        self.generator = build_generator(spec).to(torch_device)
        self.discriminator = build_discriminator(spec).to(torch_device)
        self.d_optimizer = make_device_optimizer(cfg, self.discriminator.parameters())
        self.g_optimizer = make_generator_optimizer(cfg, self.generator.parameters())

    def update(self, round_index: int, generator_state: State, discriminator_state: State) -> GanUpdate:
        rng = rng_for(self.seed, DEVICE_STREAM, self.device_index, round_index)
        self.generator.load_state_dict(generator_state)
        self.discriminator.load_state_dict(discriminator_state)
        self.generator.train()
        d_losses, g_losses = [], []
        for _ in range(self.cfg.local_steps):
            real = sample_real(self.data, self.cfg.batch_size, rng).to(device_of(self.discriminator))
            fake = generate(self.generator, self.cfg.batch_size, self.spec.latent_dim, rng)
            d_losses.append(
                discriminator_step(self.discriminator, self.d_optimizer, real, fake, self.cfg, rng)
            )
            g_losses.append(
                generator_steps(
                    self.generator,
                    self.discriminator,
                    self.g_optimizer,
                    self.cfg,
                    self.spec.latent_dim,
                    rng,
                    self.cfg.g_steps,
                    self.cfg.batch_size,
                )
            )
        return GanUpdate(
            generator_state=clone_state(self.generator),
            discriminator_state=clone_state(self.discriminator),
            num_samples=self.data.shape[0],
            d_loss=sum(d_losses) / len(d_losses),
            g_loss=sum(g_losses) / len(g_losses),
        )


class FedganServer:
    """Only averages (on CPU states): holds the global pair and one server optimiser per network."""

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, seed: int, *, torch_device: torch.device = CPU):
        torch.manual_seed(seed)
        self.generator = build_generator(spec).to(torch_device)
        self.discriminator = build_discriminator(spec).to(torch_device)
        self.rule = parse_aggregate(cfg.aggregate)
        betas = (cfg.g_beta1, cfg.g_beta2)
        self.g_server = ServerOptimizer(
            cfg.server_opt, cfg.server_lr, [name for name, _ in self.generator.named_parameters()], betas
        )
        self.d_server = ServerOptimizer(
            cfg.server_opt, cfg.server_lr, [name for name, _ in self.discriminator.named_parameters()], betas
        )

    def snapshot(self) -> tuple[State, State]:
        return clone_state(self.generator), clone_state(self.discriminator)

    def fold(self, updates: Sequence[GanUpdate]) -> None:
        weights = [float(update.num_samples) for update in updates]
        for network, server, states in (
            (self.generator, self.g_server, [update.generator_state for update in updates]),
            (self.discriminator, self.d_server, [update.discriminator_state for update in updates]),
        ):
            current = cpu_state(network)
            network.load_state_dict(server.step(current, aggregate(self.rule, states, weights, current)))
