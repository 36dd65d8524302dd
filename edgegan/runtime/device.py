"""The device agent: subscribes to the global model, trains its local discriminator, publishes it.

One event loop; training and encoding run in a worker thread (and decoding too, for a global model larger
than runtime/offload.py's limit) so that the MQTT keep-alive and acknowledgements keep flowing. The agent
always trains on the newest global model it has: a model that arrives while it trains replaces any older
one still waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import aiomqtt

from edgegan import topics, wire
from edgegan.algorithms.proposed import LocalDiscriminator
from edgegan.algorithms.staleness import difference
from edgegan.runsetup import RunSetup, prepare
from edgegan.runtime.connection import BrokerAddress, run_connected
from edgegan.runtime.impairment import ImpairedLink, LinkImpairment
from edgegan.runtime.offload import off_loop, run_with_torch_workers
from edgegan.runtime.stopsignals import signal_name, stop_on_signals

log = logging.getLogger("edgegan.device")


@dataclass(kw_only=True, frozen=True)
class DeviceSettings:
    run: str
    device: str
    broker: BrokerAddress
    codec: str = "fp32"
    speed: float = 1.0  # < 1 stretches each update to emulate a slower board
    impairment: LinkImpairment = field(default_factory=LinkImpairment)
    resend_s: float = 5.0  # resend the last update when no newer global model came within this time
    seed: int = 0
    # Seconds between status messages while training (0: after every update). They feed fleet views; at
    # dozens of rounds a second one per round would cost more than the round's messaging itself.
    status_interval_s: float = 1.0

    def __post_init__(self) -> None:
        topics.check_name("device", self.device)
        topics.check_name("run", self.run)
        # The broker's ACL lets a login publish only on update/LOGIN and status/LOGIN (broker/acl).
        if self.broker.username is not None and self.device != self.broker.username:
            raise ValueError(
                f"--id {self.device!r} must equal --username {self.broker.username!r}: the broker lets a "
                "device publish only on the topics named after its login"
            )
        wire.check_codec(self.codec)
        if not self.speed_fits(self.speed):
            raise ValueError(f"--device-speed must be in (0, 1], got {self.speed}")
        if not math.isfinite(self.resend_s) or self.resend_s <= 0:
            raise ValueError(f"--resend-s must be > 0, got {self.resend_s}")
        if not math.isfinite(self.status_interval_s) or self.status_interval_s < 0:
            raise ValueError(f"--status-interval must be >= 0, got {self.status_interval_s}")

    @staticmethod
    def speed_fits(speed: float) -> bool:
        """A speed factor a device can emulate: 1 is its own speed, 0.25 four times slower."""
        return 0 < speed <= 1


@dataclass(kw_only=True)
class DeviceCounters:
    updates_sent: int = 0
    updates_resent: int = 0
    updates_dropped: int = 0  # lost on the emulated uplink
    globals_received: int = 0
    globals_dropped: int = 0  # lost on the emulated downlink
    rejected: int = 0
    offline_periods: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    compute_s: float = 0.0  # decoding global models, training and encoding updates, all rounds
    round_compute_s: float = 0.0  # the same for the last update sent


class DeviceAgent:
    def __init__(self, settings: DeviceSettings, local: LocalDiscriminator):
        self.settings = settings
        self.local = local
        self.link = ImpairedLink(settings.impairment, seed=settings.seed * 1000 + local.device_index)
        self.counters = DeviceCounters()
        self.expected = wire.tensor_shapes(
            generator=local.generator.state_dict(), discriminator=local.discriminator.state_dict()
        )
        self.last_trained_round = -1
        self.last_update: bytes | None = None
        self.latest: wire.Envelope | None = None
        self.latest_decode_s = 0.0
        self.new_model = asyncio.Event()
        self.stopped = asyncio.Event()
        self.stopped_by: int | None = None  # SIGTERM or SIGINT, when one ended the device
        self.status_sent_at = -math.inf  # time.monotonic() of the last status message

    async def run(self) -> DeviceCounters:
        """Runs until the server says stop; reconnects with backoff whenever the broker goes away, and
        really disconnects for `offline_for_s` every `offline_every_s` when told to."""
        settings = self.settings
        will = aiomqtt.Will(
            topics.status(settings.run, settings.device), wire.encode_status("offline"), qos=1, retain=True
        )
        identifier = f"edgegan-{settings.run}-{settings.device}"
        while not self.stopped.is_set():
            await run_connected(settings.broker, identifier, self.session, self.stopped, will)
            if not self.stopped.is_set():
                self.counters.offline_periods += 1
                log.info("device %s offline for %.1f s", settings.device, settings.impairment.offline_for_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), settings.impairment.offline_for_s)
        return self.counters

    def request_stop(self, signum: int) -> None:
        """Leave the run: the session says "offline" and the agent returns (an update being trained is
        not sent)."""
        log.info("device %s: %s, stopping", self.settings.device, signal_name(signum))
        self.stopped_by = signum
        self.stopped.set()

    async def session(self, client: aiomqtt.Client) -> None:
        """One connection: returns when the server says stop or an offline period begins."""
        settings = self.settings
        await self.publish_status(client, "online")
        await client.subscribe(topics.global_model(settings.run), qos=1)
        await client.subscribe(topics.control(settings.run), qos=1)
        async with asyncio.TaskGroup() as group:
            waits = {group.create_task(self.receive_loop(client)), group.create_task(self.stopped.wait())}
            trainer = group.create_task(self.train_loop(client))
            if settings.impairment.offline_every_s:
                waits.add(group.create_task(asyncio.sleep(settings.impairment.offline_every_s)))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in (*waits, trainer):
                task.cancel()
        await self.publish_status(client, "offline")

    async def publish_status(self, client: aiomqtt.Client, state: str) -> None:
        """Retained, so a watcher that subscribes later sees every device's latest state and counters."""
        self.status_sent_at = time.monotonic()
        payload = wire.encode_status(
            state, round=self.last_trained_round, time=round(time.time(), 3), **asdict(self.counters)
        )
        await client.publish(
            topics.status(self.settings.run, self.settings.device), payload, qos=1, retain=True
        )

    async def receive_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = bytes(message.payload)
            if message.topic.matches(topics.control(self.settings.run)):
                if payload == b"stop":
                    self.stopped.set()
                    return
                continue
            if not message.topic.matches(topics.global_model(self.settings.run)):
                continue  # brokers may deliver retained messages of other topics (amqtt does, on connect)
            if not await self.link.carry(len(payload)):
                self.counters.globals_dropped += 1
                continue
            self.counters.bytes_down += len(payload)
            started = time.perf_counter()
            try:
                envelope = await off_loop(len(payload), wire.decode, payload, self.expected)
            except wire.WireError as error:
                self.counters.rejected += 1
                log.warning("device %s rejected a global model: %s", self.settings.device, error)
                continue
            if envelope.kind != "global" or envelope.run != self.settings.run:
                self.counters.rejected += 1
                log.warning(
                    "device %s rejected a %s message for run %s",
                    self.settings.device,
                    envelope.kind,
                    envelope.run,
                )
                continue
            self.counters.globals_received += 1
            # A round number below the last one trained means the server started a new run: follow it.
            if envelope.round != self.last_trained_round:
                self.latest, self.latest_decode_s = envelope, time.perf_counter() - started
                self.new_model.set()

    async def train_loop(self, client: aiomqtt.Client) -> None:
        while True:
            if self.last_update is None:
                await self.new_model.wait()
            else:
                try:
                    await asyncio.wait_for(self.new_model.wait(), timeout=self.settings.resend_s)
                except TimeoutError:
                    # No newer model: our update or the next global model may have been lost. Send the
                    # update again (the server counts each device once per round) and subscribe again, which
                    # makes the broker deliver the retained global model once more.
                    self.counters.updates_resent += 1
                    await self.send(client, self.last_update)
                    await client.unsubscribe(topics.global_model(self.settings.run))
                    await client.subscribe(topics.global_model(self.settings.run), qos=1)
                    continue
            self.new_model.clear()
            envelope, decode_s, self.latest = self.latest, self.latest_decode_s, None
            if envelope is None or envelope.round == self.last_trained_round:
                continue
            started = time.perf_counter()
            payload = await asyncio.to_thread(self.train_and_encode, envelope)
            self.counters.round_compute_s = decode_s + time.perf_counter() - started
            self.counters.compute_s += self.counters.round_compute_s
            self.last_trained_round = envelope.round
            self.last_update = payload
            self.counters.updates_sent += 1
            await self.send(client, payload)
            if time.monotonic() - self.status_sent_at >= self.settings.status_interval_s:
                await self.publish_status(client, "online")

    async def send(self, client: aiomqtt.Client, payload: bytes) -> None:
        if not await self.link.carry(len(payload)):
            self.counters.updates_dropped += 1
            return
        await client.publish(topics.update(self.settings.run, self.settings.device), payload, qos=1)
        self.counters.bytes_up += len(payload)

    def train_and_encode(self, envelope: wire.Envelope) -> bytes:
        started = time.perf_counter()
        update = self.local.update(
            envelope.round, wire.generator_state(envelope.tensors), wire.discriminator_state(envelope.tensors)
        )
        if self.settings.speed < 1.0:
            # Emulate a slower board: stretch the measured compute time by 1 / speed.
            time.sleep((time.perf_counter() - started) * (1.0 / self.settings.speed - 1.0))
        lossy = wire.is_lossy(self.settings.codec)
        state = (
            difference(update.state, wire.discriminator_state(envelope.tensors)) if lossy else update.state
        )
        return wire.encode(
            wire.Envelope(
                kind="update",
                run=self.settings.run,
                round=envelope.round,
                base_round=envelope.round,
                device=self.settings.device,
                samples=update.num_samples,
                codec=self.settings.codec,
                tensors=wire.discriminator_tensors(state),
                loss=update.d_loss,
                delta=lossy,
            )
        )


def run_device(settings: DeviceSettings, setup: RunSetup, index: int) -> tuple[DeviceCounters, int | None]:
    """Trains partition `index` of `setup.devices` until the server says stop or SIGTERM or SIGINT
    arrives; returns the counters and that signal's number (None after the server's stop)."""
    if not 0 <= index < setup.devices:
        raise ValueError(f"--index must be between 0 and --of - 1 ({setup.devices - 1}), got {index}")
    prepared = prepare(setup, with_probe=False)
    shard = prepared.dataset.x[prepared.parts[index]]
    local = LocalDiscriminator(
        spec=prepared.spec, cfg=setup.train, data=shard, device_index=index, seed=setup.seed
    )
    del prepared  # the whole data set: a device keeps only its own shard
    agent = DeviceAgent(settings, local)

    async def run_until_stopped() -> DeviceCounters:
        with stop_on_signals(agent.request_stop):
            return await agent.run()

    return run_with_torch_workers(run_until_stopped), agent.stopped_by
