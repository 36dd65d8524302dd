"""The proposed method (Ren, Liu, Yu, Guo 2021): local discriminators, one global GAN on the server.

Round t, serial schedule:
    device k:  D_k   = local_steps discriminator steps from D_t on its data, fakes from G_t
    server:    D_t+1 = ServerOpt(D_t, Aggregate(D_1..D_N; weights n_k))
               G_t+1 = g_steps generator steps from G_t against D_t+1
Parallel schedule: the server's generator update overlaps the devices' work, so it can only use what it
already has: G_t+1 = g_steps from G_t against D_t, while D_t+1 is formed from the devices as above.
A device never sees the server's optimiser; the server never sees a device's data.

Who draws device k's fakes from G_t is a transport choice (FAKES): the device from its copy of G_t, or the
server, which sends them with D_t; the noise is FAKE_STREAM's either way, so the numbers are the same.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from edgegan.algorithms.aggregation import (
    AggregateRule,
    RunningWeightedMean,
    ServerOptimizer,
    State,
    aggregate,
    clipped,
    parse_aggregate,
)
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.privacy import CentralPrivacy, DevicePrivacy
from edgegan.algorithms.steps import (
    CENTRAL_DP_STREAM,
    DEVICE_STREAM,
    FAKE_STREAM,
    SERVER_STREAM,
    clone_state,
    cpu_state,
    fake_batches,
    generator_steps,
    local_discriminator_steps,
    make_device_optimizer,
    make_generator_optimizer,
    rng_for,
)
from edgegan.models import ModelSpec, build_discriminator, build_generator
from edgegan.torchdevice import CPU

# Who draws a device's fake batches from the global G: the device (it is sent G) or the server (it sends
# the batches instead of G, and the device never holds a generator).
FAKES = ("device", "server")


def check_fakes(fakes: str) -> str:
    if fakes not in FAKES:
        raise ValueError(f"--fakes must be one of {', '.join(FAKES)}, got {fakes!r}")
    return fakes


def draw_fakes(
    generator_net: torch.nn.Module, spec: ModelSpec, cfg: TrainConfig, seed: int, device_index: int,
    round_index: int,
) -> list[torch.Tensor]:  # fmt: skip
    """Device `device_index`'s fake batches of round `round_index` (one per local step, in step order),
    from `generator_net` in train mode (batch statistics), on CPU as the wire needs them."""
    rng = rng_for(seed, FAKE_STREAM, device_index, round_index)
    generator_net.train()
    batches = fake_batches(generator_net, cfg.local_steps, cfg.batch_size, spec.latent_dim, rng)
    return [batch.cpu() for batch in batches]


@dataclass(frozen=True)
class DiscriminatorUpdate:
    """What a device sends back: its trained discriminator and how many examples it holds."""

    state: State
    num_samples: int
    d_loss: float


class LocalDiscriminator:
    """A device's side of the method: its data shard and its local discriminator.

    With `device_opt = sgd` the device is stateless between rounds (the optimiser carries nothing); with
    `adam` the moments persist on the device across rounds, as a real board's would. The networks train on
    `torch_device`; the data stays on CPU and each batch moves there; updates come back on CPU.
    With `fakes = "server"` it holds no generator (`generator` is None) and trains on the fake batches
    it is sent. With a private recipe (DP-SGD) it keeps its privacy ledger (`privacy`): ask
    `within_budget` before `update`, which spends one round of it.
    """

    def __init__(
        self, *, spec: ModelSpec, cfg: TrainConfig, data: torch.Tensor, device_index: int, seed: int,
        torch_device: torch.device = CPU, fakes: str = "device",
    ):  # fmt: skip
        self.spec = spec
        self.cfg = cfg
        self.data = data
        self.device_index = device_index
        self.seed = seed
        self.fakes = check_fakes(fakes)
        self.torch_device = torch_device
        self.generator = build_generator(spec).to(torch_device) if fakes == "device" else None
        self.discriminator = build_discriminator(spec).to(torch_device)
        self.optimizer = make_device_optimizer(cfg, self.discriminator.parameters())
        self.privacy = DevicePrivacy(cfg=cfg, samples=data.shape[0]) if cfg.private else None

    def within_budget(self) -> bool:
        """Whether one more round keeps this device within its privacy budget (always without DP or a
        budget); once False, False for good."""
        return self.privacy is None or self.privacy.allows_next()

    def update(
        self,
        round_index: int,
        generator_state: Mapping[str, torch.Tensor] | None,
        discriminator_state: State,
        fakes: Sequence[torch.Tensor] | None = None,
    ) -> DiscriminatorUpdate:
        """Start from the global D, train on local real data against the global G's fakes: drawn here from
        `generator_state`, or the batches the server drew (`fakes`, one per local step)."""
        rng = rng_for(self.seed, DEVICE_STREAM, self.device_index, round_index)
        if fakes is None:
            if self.generator is None or generator_state is None:
                raise ValueError("a device without a generator needs its fake batches")
            self.generator.load_state_dict(generator_state)
            fakes = draw_fakes(self.generator, self.spec, self.cfg, self.seed, self.device_index, round_index)
        if len(fakes) != self.cfg.local_steps:
            raise ValueError(f"{len(fakes)} fake batches for {self.cfg.local_steps} local steps")
        batches = iter(fakes)
        self.discriminator.load_state_dict(discriminator_state)
        d_loss = local_discriminator_steps(
            self.discriminator,
            self.optimizer,
            self.data,
            lambda count: next(batches).to(self.torch_device),
            self.cfg,
            rng,
            self.cfg.local_steps,
            self.cfg.batch_size,
        )
        if self.privacy is not None:
            self.privacy.spend()
        return DiscriminatorUpdate(clone_state(self.discriminator), self.data.shape[0], d_loss)


def local_discriminators(
    *, spec: ModelSpec, cfg: TrainConfig, shards: Sequence[torch.Tensor], seed: int,
    torch_device: torch.device = CPU, fakes: str = "device",
) -> list[LocalDiscriminator]:  # fmt: skip
    """One device per shard, device k holding shard k: the in-process runners' fleet."""
    return [
        LocalDiscriminator(
            spec=spec,
            cfg=cfg,
            data=shard,
            device_index=index,
            seed=seed,
            torch_device=torch_device,
            fakes=fakes,
        )  # fmt: skip
        for index, shard in enumerate(shards)
    ]


class DiscriminatorFold:
    """One round's aggregation, fed one update at a time. `mean` and `clip` stream into a float64 running
    sum, so the server's memory stays flat however many devices report; `median` and `trimmed` need every
    state at once and keep them until `result`."""

    def __init__(
        self, rule: AggregateRule, reference: State, *, central: CentralPrivacy | None = None,
        noise: torch.Generator | None = None,
    ):  # fmt: skip
        self.rule = rule
        self.reference = reference  # the global D the updates started from; clip measures from it
        # Central DP: every change clipped to its clip and counted once (a sample count would set how far
        # one device may move the result), the result released with `noise`'s draw.
        self.central = central
        self.noise = noise
        self.running = RunningWeightedMean()
        self.states: list[State] = []
        self.weights: list[float] = []
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if self.central is not None:
            state, weight = clipped(state, self.reference, self.central.clip), 1.0
        elif self.rule.kind == "clip":
            state = clipped(state, self.reference, self.rule.clip_norm)
        if self.rule.streams:
            self.running.add(state, weight)
        else:
            self.states.append(dict(state))
            self.weights.append(weight)
        self.count += 1

    def result(self) -> State:
        if self.count == 0:
            raise ValueError("no update was added")
        if self.central is not None:
            mean = self.running.result(self.reference)
            return self.central.release(
                mean, count=self.count, reference=self.reference, generator=self.noise
            )
        if self.rule.streams:
            return self.running.result(self.reference)
        return aggregate(self.rule, self.states, self.weights, self.reference)


class GlobalGan:
    """The server's side: the global G and D, G's optimiser and the server optimiser over D. The networks
    train on `torch_device`; aggregation and the server optimiser work on CPU states, as they arrive."""

    def __init__(
        self, spec: ModelSpec, cfg: TrainConfig, seed: int, *, torch_device: torch.device = CPU,
        expected_updates: int = 1, noise_secret: int | None = None,
    ):  # fmt: skip
        self.spec = spec
        self.cfg = cfg
        self.seed = seed
        torch.manual_seed(seed)  # the initial weights are the only draw outside rng_for streams
        self.generator = build_generator(spec).to(torch_device)
        self.discriminator = build_discriminator(spec).to(torch_device)
        # Draws fakes for devices (fakes_for); a copy, since building one would draw from torch's global RNG.
        self.fake_generator = copy.deepcopy(self.generator)
        self.generator_optimizer = make_generator_optimizer(cfg, self.generator.parameters())
        names = [name for name, _ in self.discriminator.named_parameters()]
        self.server_optimizer = ServerOptimizer(
            cfg.server_opt, cfg.server_lr, names, (cfg.g_beta1, cfg.g_beta2)
        )
        self.rule = parse_aggregate(cfg.aggregate)
        # Central DP: the updates a round expects (its quorum) set each device's share of the noisy mean.
        self.central = (
            CentralPrivacy(cfg=cfg, expected_updates=expected_updates) if cfg.centrally_private else None
        )
        # What seeds that noise: a secret on a server (whoever knows it could subtract the noise; the run's
        # seed is published with its configuration); the run's seed in the simulator, which has no adversary.
        self.noise_secret = seed if noise_secret is None else noise_secret

    def fakes_for(self, generator_state: Mapping[str, torch.Tensor], device_index: int, round_index: int):
        """Device `device_index`'s fake batches of `round_index`, drawn from `generator_state` (the G the
        round published) on a copy of G: the global G's BatchNorm buffers stay as they are, and a
        generator step that overlaps (parallel schedule) changes nothing here."""
        self.fake_generator.load_state_dict(generator_state)
        return draw_fakes(self.fake_generator, self.spec, self.cfg, self.seed, device_index, round_index)

    def snapshot(self) -> tuple[State, State]:
        """The global GAN as published to devices: (G state, D state), detached copies."""
        return clone_state(self.generator), clone_state(self.discriminator)

    def fold_discriminators(
        self, updates: Sequence[DiscriminatorUpdate], weights: Sequence[float], round_index: int
    ) -> None:
        """D_t+1 = ServerOpt(D_t, Aggregate(updates)); weights are sample counts (times any discount)."""
        fold = self.begin_fold(round_index)
        for update, weight in zip(updates, weights, strict=True):
            fold.add(update.state, weight)
        self.apply_fold(fold)

    def begin_fold(self, round_index: int) -> DiscriminatorFold:
        """Round `round_index`'s aggregation, to be fed updates as they arrive and then applied with
        `apply_fold`; under central DP its noise is the round's own stream, whoever folds it."""
        noise = rng_for(self.noise_secret, CENTRAL_DP_STREAM, round_index) if self.central else None
        return DiscriminatorFold(self.rule, cpu_state(self.discriminator), central=self.central, noise=noise)

    def apply_fold(self, fold: DiscriminatorFold) -> None:
        self.fold_aggregate(fold.result())

    def fold_aggregate(self, combined: State) -> None:
        """D_t+1 = ServerOpt(D_t, combined), for an aggregate formed elsewhere (sharded partial sums)."""
        current = cpu_state(self.discriminator)
        self.discriminator.load_state_dict(self.server_optimizer.step(current, combined))

    def checkpoint(self) -> dict:
        """Everything the server would need to continue: both networks and both optimisers."""
        return {
            "generator": cpu_state(self.generator),
            "discriminator": cpu_state(self.discriminator),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "server_optimizer": self.server_optimizer.state_dict(),
            "central_dp_rounds": self.central.rounds if self.central else 0,
        }

    def restore(self, checkpoint: Mapping) -> None:
        """The inverse of `checkpoint`: a restarted server goes on exactly where this one was."""
        self.generator.load_state_dict(checkpoint["generator"])
        self.discriminator.load_state_dict(checkpoint["discriminator"])
        self.generator_optimizer.load_state_dict(checkpoint["generator_optimizer"])
        self.server_optimizer.load_state_dict(checkpoint["server_optimizer"])
        if self.central is not None:
            self.central.rounds = int(checkpoint.get("central_dp_rounds", 0))

    def generator_due(self, round_index: int) -> bool:
        return (round_index + 1) % self.cfg.critic_ratio == 0

    def update_generator(self, round_index: int) -> float:
        """g_steps generator steps against the current global D."""
        rng = rng_for(self.seed, SERVER_STREAM, round_index)
        self.generator.train()
        return generator_steps(
            self.generator,
            self.discriminator,
            self.generator_optimizer,
            self.cfg,
            self.spec.latent_dim,
            rng,
            self.cfg.g_steps,
            self.cfg.g_batch_size,
        )


def sample_weights(updates: Sequence[DiscriminatorUpdate]) -> list[float]:
    return [float(update.num_samples) for update in updates]
