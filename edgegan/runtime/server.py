"""The server coordinator: publish the global GAN, collect a quorum of local discriminators before a
deadline, fold them in, update the generator, repeat. Sync steps the generator after the fold; parallel
steps it against the published discriminator while the devices train, and folds in updates up to `tau`
rounds stale (docs/protocol.md, "Rounds").

The arithmetic is `edgegan.algorithms.proposed.GlobalGan`, the same object the simulator drives; this
module only moves bytes and decides which arrivals count. Encoding, decoding and training run in a worker
thread so the event loop keeps serving the connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiomqtt

from edgegan import topics, wire
from edgegan.algorithms.proposed import DiscriminatorUpdate, GlobalGan
from edgegan.algorithms.staleness import apply_difference, parse_staleness_weight, rebase
from edgegan.checkpoints import save_atomic
from edgegan.costmodel import RoundTrace
from edgegan.runtime.connection import BrokerAddress
from edgegan.runtime.impairment import ImpairedLink, LinkImpairment
from edgegan.simulate import RunRecorder, SimConfig, prepare

log = logging.getLogger("edgegan.server")

MAX_DEADLINE_EXTENSIONS = 20
SCHEDULES = ("sync", "parallel")


@dataclass(frozen=True)
class ServerSettings:
    run: str
    broker: BrokerAddress
    rounds: int
    quorum: int
    deadline_s: float
    min_devices: int
    codec: str = "fp32"
    impairment: LinkImpairment = field(default_factory=LinkImpairment)
    seed: int = 0
    schedule: str = "sync"  # "sync" | "parallel"
    tau: int = 1  # parallel: the stalest base round folded in is round - tau
    staleness_weight: str = "constant"

    def __post_init__(self) -> None:
        topics.check_name("run", self.run)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.tau < 0:
            raise ValueError(f"--tau must be >= 0, got {self.tau}")
        parse_staleness_weight(self.staleness_weight)
        if self.quorum < 1:
            raise ValueError(f"--quorum must be >= 1, got {self.quorum}")
        if not 1 <= self.min_devices <= self.quorum:
            raise ValueError(
                f"--min-devices must be between 1 and --quorum ({self.quorum}), got {self.min_devices}"
            )
        if not math.isfinite(self.deadline_s) or self.deadline_s <= 0:
            raise ValueError(f"--deadline-s must be > 0, got {self.deadline_s}")
        wire.check_codec(self.codec)


@dataclass
class ServerCounters:
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # by reason
    late: int = 0
    ignored: int = 0  # messages on topics we did not subscribe to
    duplicates: int = 0
    dropped: int = 0  # lost on the emulated link
    stale: int = 0  # staler than tau, dropped
    staleness: Counter = field(default_factory=Counter)  # staleness -> accepted updates
    by_device: dict[str, Counter] = field(default_factory=dict)  # device -> outcome -> count

    def count(self, device: str | None, outcome: str) -> None:
        self.by_device.setdefault(device or "?", Counter())[outcome] += 1


def natural_key(name: str) -> tuple:
    """device-2 before device-10: arrivals are folded in a fixed order, whatever order they came in."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


class ServerCoordinator:
    def __init__(self, settings: ServerSettings, global_gan: GlobalGan, recorder: RunRecorder):
        self.settings = settings
        self.gan = global_gan
        self.recorder = recorder
        self.counters = ServerCounters()
        self.link = ImpairedLink(settings.impairment, seed=settings.seed * 1000 + 999)
        self.window = settings.tau if settings.schedule == "parallel" else 0
        self.discount = parse_staleness_weight(settings.staleness_weight)
        self.history: dict[int, dict] = {}  # base round -> the D it published, for rebasing stale updates
        self.expected = {
            f"D.{name}": tuple(t.shape) for name, t in global_gan.discriminator.state_dict().items()
        }

    async def run(self) -> ServerCounters:
        settings = self.settings
        async with aiomqtt.Client(
            settings.broker.host, settings.broker.port, identifier=f"edgegan-server-{settings.run}",
            clean_session=True, timeout=10.0,
        ) as client:  # fmt: skip
            # A retained "stop" from an earlier run of the same name would stop our devices at once.
            await client.publish(topics.control(settings.run), b"", qos=1, retain=True)
            await client.subscribe(topics.all_updates(settings.run), qos=1)
            await asyncio.to_thread(self.recorder.start, self.gan.generator)
            loop = asyncio.get_running_loop()
            started = loop.time()
            quality = self.recorder.initial
            for round_index in range(settings.rounds):
                trace = await self.play_round(client, round_index)
                # Evaluation runs a classifier over thousands of samples: off the event loop.
                measured = await asyncio.to_thread(
                    self.recorder.record, round_index + 1, loop.time() - started, trace, self.gan.generator
                )
                quality = measured or quality
                if measured is not None:
                    await asyncio.to_thread(self.save_checkpoint, round_index + 1)
                await self.publish_metrics(client, round_index + 1, quality, len(trace.bytes_up))
            await client.publish(topics.control(settings.run), b"stop", qos=1, retain=True)
        return self.counters

    def save_checkpoint(self, rounds_done: int) -> None:
        """After every evaluation round, so that a stopped or crashed run keeps its latest state."""
        payload = {"rounds_done": rounds_done, "run": self.settings.run, **self.gan.checkpoint()}
        save_atomic(payload, self.recorder.out / "checkpoint.pt")

    async def publish_metrics(self, client: aiomqtt.Client, done: int, quality: dict, reported: int) -> None:
        payload = wire.encode_json(
            {
                "round": done,
                "rounds": self.settings.rounds,
                "quality": quality,
                "devices_reported": reported,
                "bytes_up": self.recorder.bytes_up,
                "bytes_down": self.recorder.bytes_down,
                "accepted": self.counters.accepted,
                "late": self.counters.late,
                "stale": self.counters.stale,
                "rejected": dict(self.counters.rejected),
                "wall_time_s": round(self.recorder.wall_time_s(), 3),
            }
        )
        await client.publish(topics.metrics(self.settings.run), payload, qos=1, retain=True)

    async def play_round(self, client: aiomqtt.Client, round_index: int) -> RoundTrace:
        """Sync: collect, fold, then step G against the new D. Parallel: step G against the published D
        while the devices train, then fold whatever arrived within the staleness window."""
        generator_state, discriminator_state = self.gan.snapshot()
        self.history[round_index] = discriminator_state
        self.history.pop(round_index - self.window - 1, None)
        envelope = wire.Envelope(
            "global", self.settings.run, round_index, round_index, "server", 0, self.settings.codec,
            wire.prefixed("G", generator_state) | wire.prefixed("D", discriminator_state),
        )  # fmt: skip
        payload = await asyncio.to_thread(wire.encode, envelope)
        await self.link.carry(len(payload), can_drop=False)
        await client.publish(topics.global_model(self.settings.run), payload, qos=1, retain=True)
        parallel = self.settings.schedule == "parallel"
        generator_step = None
        if parallel and self.gan.generator_due(round_index):
            generator_step = asyncio.create_task(asyncio.to_thread(self.gan.update_generator, round_index))
        try:
            arrivals = await self.collect(client, round_index)
        finally:
            g_loss = await generator_step if generator_step else float("nan")
        names = sorted(arrivals, key=natural_key)
        updates = [arrivals[name][0] for name in names]
        weights = [arrivals[name][2] for name in names]
        await asyncio.to_thread(self.gan.fold_discriminators, updates, weights)
        if not parallel and self.gan.generator_due(round_index):
            g_loss = await asyncio.to_thread(self.gan.update_generator, round_index)
        return RoundTrace(
            device_compute_s=[0.0] * len(names),
            bytes_down=[len(payload)] * len(names),
            bytes_up=[arrivals[name][1] for name in names],
            d_loss=sum(update.d_loss for update in updates) / len(updates),
            g_loss=g_loss,
        )

    async def collect(
        self, client: aiomqtt.Client, round_index: int
    ) -> dict[str, tuple[DiscriminatorUpdate, int, float, int]]:
        """Arrivals for this round until `quorum` devices reported, or the deadline passed with at least
        `min_devices`; below that the deadline is extended (and logged) a bounded number of times."""
        settings = self.settings
        arrivals: dict[str, tuple[DiscriminatorUpdate, int, float, int]] = {}
        loop = asyncio.get_running_loop()
        for extension in range(MAX_DEADLINE_EXTENSIONS + 1):
            try:
                async with asyncio.timeout_at(loop.time() + settings.deadline_s):
                    async for message in client.messages:
                        await self.consider(message, round_index, arrivals)
                        if len(arrivals) >= settings.quorum:
                            return arrivals
            except TimeoutError:
                if len(arrivals) >= settings.min_devices:
                    return arrivals
                log.warning(
                    "round %d: %d of at least %d devices after %.1f s; waiting longer (%d)",
                    round_index, len(arrivals), settings.min_devices, settings.deadline_s, extension + 1,
                )  # fmt: skip
        waited = (MAX_DEADLINE_EXTENSIONS + 1) * settings.deadline_s
        raise TimeoutError(
            f"round {round_index}: only {len(arrivals)} of at least {settings.min_devices} devices "
            f"reported in {waited:.0f} s"
        )

    async def consider(self, message: aiomqtt.Message, round_index: int, arrivals: dict) -> None:
        """Accepts an update for this round, or rejects it with a reason that is logged and counted."""
        if not message.topic.matches(topics.all_updates(self.settings.run)):
            # Brokers may deliver retained messages of other topics (amqtt does on connect): not updates.
            self.counters.ignored += 1
            return
        payload = bytes(message.payload)
        device = topics.device_of(message.topic.value)
        if not await self.link.carry(len(payload)):
            self.counters.dropped += 1
            self.counters.count(device, "dropped")
            return
        try:
            envelope = await asyncio.to_thread(wire.decode, payload, self.expected)
            if envelope.kind != "update":
                raise wire.WireError("bad-kind", f"{envelope.kind} on an update topic")
            if envelope.run != self.settings.run:
                raise wire.WireError("wrong-run", envelope.run)
            if envelope.device != device:
                raise wire.WireError("device-mismatch", f"{envelope.device} published on {device}'s topic")
            if envelope.samples < 1:
                raise wire.WireError("bad-field", "an update must carry at least one sample")
        except wire.WireError as error:
            self.counters.rejected[error.reason] += 1
            self.counters.count(device, "rejected")
            log.warning("rejected an update from %s in round %d: %s", device, round_index, error)
            return
        staleness = round_index - envelope.base_round
        if staleness < 0:
            self.counters.rejected["future-round"] += 1
            self.counters.count(device, "rejected")
            log.warning(
                "rejected %s's update for future round %d in round %d",
                device,
                envelope.base_round,
                round_index,
            )
            return
        if staleness > self.window:
            if self.window:
                self.counters.stale += 1
                self.counters.count(device, "stale")
            else:
                self.counters.late += 1
                self.counters.count(device, "late")
            log.info(
                "dropped %s's update from round %d in round %d", device, envelope.base_round, round_index
            )
            return
        if device in arrivals and arrivals[device][3] <= envelope.base_round:
            self.counters.duplicates += 1  # a device resent an update we already have
            self.counters.count(device, "duplicate")
            return
        if staleness and envelope.base_round not in self.history:
            self.counters.stale += 1  # its base model is gone (the server restarted since)
            self.counters.count(device, "stale")
            return
        state = wire.unprefixed("D", envelope.tensors)
        if envelope.delta:
            # A change from the base model: on top of the current one, which rebases it when stale.
            state = apply_difference(self.gan.discriminator.state_dict(), state)
        elif staleness:
            state = rebase(state, self.history[envelope.base_round], self.gan.discriminator.state_dict())
        loss = envelope.loss if envelope.loss is not None else float("nan")
        weight = envelope.samples * self.discount(staleness)
        arrivals[device] = (
            DiscriminatorUpdate(state, envelope.samples, loss),
            len(payload),
            weight,
            envelope.base_round,
        )
        self.counters.accepted += 1
        self.counters.count(device, "accepted")
        self.counters.staleness[staleness] += 1


def serve(settings: ServerSettings, config: SimConfig) -> dict:
    """Runs the server to the end of the run and writes the same outputs as `edgegan simulate`."""
    prepared = prepare(config)
    recorder = RunRecorder(config.out, prepared, config.eval_every, settings.rounds)
    gan = GlobalGan(prepared.spec, config.train, config.seed)
    counters = asyncio.run(ServerCoordinator(settings, gan, recorder).run())
    return recorder.finish(
        gan.generator,
        {
            "algo": "serial" if settings.schedule == "sync" else "parallel",
            "schedule": settings.schedule,
            "tau": settings.tau if settings.schedule == "parallel" else 0,
            "staleness_weight": settings.staleness_weight,
            "staleness_histogram": {str(key): value for key, value in sorted(counters.staleness.items())},
            "updates_stale": counters.stale,
            "updates_by_device": {
                device: dict(outcomes) for device, outcomes in sorted(counters.by_device.items())
            },
            "dataset": config.dataset,
            "devices": config.devices,
            "partition": config.partition,
            "seed": config.seed,
            "run": settings.run,
            "broker": str(settings.broker),
            "quorum": settings.quorum,
            "sim_time_s": recorder.wall_time_s(),
            "codec": settings.codec,
            "updates_accepted": counters.accepted,
            "updates_late": counters.late,
            "updates_duplicate": counters.duplicates,
            "updates_dropped_on_link": counters.dropped,
            "updates_rejected": dict(counters.rejected),
            "train": asdict(config.train),
        },
    )
