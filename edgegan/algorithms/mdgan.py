"""MD-GAN (Hardy, Le Merrer, Sericola 2019): one generator on the server, one discriminator per worker.

Iteration i:
    server:   X_1..X_k = G(Z_1..Z_k); worker n gets X_n^d = X_(n+1 mod k) and X_n^g = X_(n mod k)
    worker n: local_steps discriminator steps on (one real batch, X_n^d), reusing both batches as the
              paper does; then the error feedback F_n = d J_gen(D_n(x)) / d x on X_n^g with the new D_n
    server:   G <- Adam step on (1/N) sum_n sum_i F_n,i . dx_i/dw   (backprop of the feedback through G)
    every E local epochs (m E / b iterations): workers swap discriminator parameters (a random derangement)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.losses import generator_loss
from edgegan.algorithms.steps import (
    DEVICE_STREAM,
    SERVER_STREAM,
    SWAP_STREAM,
    clone_state,
    device_of,
    discriminator_step,
    make_device_optimizer,
    make_generator_optimizer,
    noise,
    rng_for,
    sample_real,
)
from edgegan.models import ModelSpec, build_discriminator, build_generator
from edgegan.torchdevice import CPU


def batch_count(cfg: TrainConfig, num_workers: int) -> int:
    """k: how many distinct fake batches the server makes per iteration (paper: ceil(log N))."""
    if cfg.mdgan_batches:
        return min(cfg.mdgan_batches, num_workers)
    return max(1, math.ceil(math.log(num_workers))) if num_workers > 1 else 1


def batch_assignment(worker: int, batches: int) -> tuple[int, int]:
    """(feedback batch, discriminator batch) of a worker, the paper's rule; equal when k = 1."""
    return worker % batches, (worker + 1) % batches


def swap_period(cfg: TrainConfig, mean_local_size: float) -> int:
    """Iterations between swaps: m E / b, at least 1."""
    return max(1, round(mean_local_size * cfg.mdgan_swap_epochs / cfg.batch_size))


def derangement(count: int, rng: torch.Generator) -> list[int]:
    """A random permutation with no fixed point: every worker hands its D to another worker."""
    if count < 2:
        return list(range(count))
    while True:
        order = torch.randperm(count, generator=rng).tolist()
        if all(source != target for target, source in enumerate(order)):
            return order


class MdganWorker:
    """A worker's D on `torch_device`; fakes arrive and feedback leaves as CPU tensors, as on a wire."""

    def __init__(
        self, *, spec: ModelSpec, cfg: TrainConfig, data: torch.Tensor, worker_index: int, seed: int,
        torch_device: torch.device = CPU,
    ):  # fmt: skip
        self.cfg = cfg
        self.data = data
        self.worker_index = worker_index
        self.seed = seed
        torch.manual_seed(seed)  # the paper starts every worker's D from the same parameters
        self.discriminator = build_discriminator(spec).to(torch_device)
        self.optimizer = make_device_optimizer(cfg, self.discriminator.parameters())

    def step(
        self, iteration: int, fake_for_d: torch.Tensor, fake_for_g: torch.Tensor
    ) -> tuple[torch.Tensor, float, float]:
        """Trains D_n, then returns the error feedback on X_n^g, the mean D loss and the G loss on X_n^g."""
        rng = rng_for(self.seed, DEVICE_STREAM, self.worker_index, iteration)
        device = device_of(self.discriminator)
        fake_for_d, fake_for_g = fake_for_d.to(device), fake_for_g.to(device)
        real = sample_real(self.data, fake_for_d.shape[0], rng).to(device)
        losses = [
            discriminator_step(self.discriminator, self.optimizer, real, fake_for_d, self.cfg, rng)
            for _ in range(self.cfg.local_steps)
        ]
        probe = fake_for_g.detach().clone().requires_grad_(True)
        g_loss = generator_loss(self.cfg.loss, self.discriminator(probe))
        (feedback,) = torch.autograd.grad(g_loss, probe)
        return feedback.cpu(), sum(losses) / len(losses), float(g_loss.detach())


class MdganServer:
    def __init__(
        self, spec: ModelSpec, cfg: TrainConfig, seed: int, num_workers: int, *,
        torch_device: torch.device = CPU,
    ):  # fmt: skip
        self.spec = spec
        self.cfg = cfg
        self.seed = seed
        self.num_workers = num_workers
        self.batches = batch_count(cfg, num_workers)
        torch.manual_seed(seed)
        self.generator = build_generator(spec).to(torch_device)
        self.optimizer = make_generator_optimizer(cfg, self.generator.parameters())

    def generate_batches(self, iteration: int) -> list[torch.Tensor]:
        """k fake batches that keep their graph, so the workers' feedback can be backpropagated."""
        rng = rng_for(self.seed, SERVER_STREAM, iteration)
        self.generator.train()
        device = device_of(self.generator)
        drawn = noise(self.batches * self.cfg.batch_size, self.spec.latent_dim, rng, device)
        return list(self.generator(drawn).split(self.cfg.batch_size))

    def apply_feedback(self, batches: Sequence[torch.Tensor], feedback: Sequence[torch.Tensor]) -> None:
        """One Adam step on G from the workers' feedback, averaged over the N workers."""
        self.optimizer.zero_grad(set_to_none=True)
        surrogate = sum(
            (batches[batch_assignment(worker, self.batches)[0]] * error.to(batches[0].device)).sum()
            for worker, error in enumerate(feedback)
        )
        (surrogate / len(feedback)).backward()
        self.optimizer.step()


def swap_discriminators(workers: Sequence[MdganWorker], seed: int, iteration: int) -> None:
    """Gossip swap of discriminator parameters only; each worker keeps its own optimiser state."""
    order = derangement(len(workers), rng_for(seed, SWAP_STREAM, iteration))
    states = [clone_state(worker.discriminator) for worker in workers]
    for target, source in enumerate(order):
        workers[target].discriminator.load_state_dict(states[source])
