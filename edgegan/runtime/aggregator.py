"""Sharded aggregation (`--aggregators K`, docs/scaling.md): K aggregator processes share the devices'
updates through an MQTT 5 shared subscription, so the broker hands each update to exactly one of them.

An aggregator decodes and checks each update it is handed, claims it with the server, adds it to a running
float64 sum for its round once the server grants the claim, and publishes that partial sum when the server
closes the round. The server's side, `ShardedCollector`, grants claims until the quorum (the same rules as
`ServerCoordinator.consider`), closes the round, and merges the partial sums into the weighted mean that
one server would have formed from the same updates.

Why claims and not a plain sum: a device that resends its update (it heard no newer model in time) may be
handed to a different aggregator than its first copy. Only the server sees both copies, and it must pick
one before either is added, since a running sum cannot take an update back out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgegan import topics, wire
from edgegan.algorithms import admission
from edgegan.algorithms.aggregation import RunningWeightedMean, State
from edgegan.runtime.connection import (
    CONNECT_TIMEOUT_S,
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    BrokerAddress,
    BrokerUnreachable,
    first_connect_failure,
    is_connection_loss,
    mqtt_client,
)
from edgegan.runtime.offload import off_loop, run_with_torch_workers
from edgegan.runtime.trust import DeviceKeys

log = logging.getLogger("edgegan.aggregator")

AGGREGATORS_ONLINE_S = 60.0  # how long the server waits for its aggregators before round 0
SESSION_EXPIRY_S = 300  # the broker keeps an aggregator's orders this long while it reconnects
MAX_OPEN_ROUNDS = 3  # rounds an aggregator holds updates for; older ones the server has closed or abandoned
UNSUPPORTED_PROTOCOL = 132  # MQTT 5 CONNACK reason code: the broker does not speak MQTT 5


@dataclass(frozen=True)
class AggregatorSettings:
    run: str
    name: str
    broker: BrokerAddress
    device_keys: DeviceKeys | None = None  # --device-keys: only updates their device signed are claimed

    def __post_init__(self) -> None:
        topics.check_name("run", self.run)
        topics.check_name("aggregator", self.name)


@dataclass(kw_only=True)
class AggregatorCounters:
    updates_received: int = 0  # handed to this aggregator by the broker
    claims_sent: int = 0
    granted: int = 0  # claims the server accepted: added to a partial sum
    refused: int = 0  # claims the server refused: late, duplicate, future round
    rejected: Counter = field(default_factory=Counter)  # by reason: never claimed
    unanswered: int = 0  # held when their round closed without a verdict: dropped
    unknown_grants: int = 0  # the server granted an update this aggregator does not hold
    ignored: int = 0  # messages on topics it did not subscribe to, malformed orders
    partials_sent: int = 0
    partial_bytes: int = 0

    def flat(self) -> dict[str, int]:
        """For the status message and the log: rejections as one total."""
        return {**asdict(self), "rejected": sum(self.rejected.values())}


@dataclass
class ShardRound:
    """One aggregator's share of one round: the running sum of the updates granted to it."""

    mean: RunningWeightedMean = field(default_factory=RunningWeightedMean)
    devices: list[str] = field(default_factory=list)
    samples: int = 0
    closing: int = 0  # closed by the server with this many granted, some verdicts still to come


def session_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    return properties


async def check_mqtt5(address: BrokerAddress, identifier: str) -> None:
    """Raises a RuntimeError a user can act on when the broker refuses MQTT 5. A bare CONNECT: the embedded
    amqtt broker (0.12) refuses that one with "unsupported protocol version", but hangs on one that carries
    a will or properties. A broker that cannot be reached is left to the reconnect loop."""
    try:
        async with mqtt_client(
            address, identifier, protocol=aiomqtt.ProtocolVersion.V5, timeout=CONNECT_TIMEOUT_S
        ):
            return
    except aiomqtt.MqttCodeError as error:
        if getattr(error.rc, "value", error.rc) == UNSUPPORTED_PROTOCOL:
            raise RuntimeError(
                f"the broker at {address} does not speak MQTT 5, which aggregators need for shared "
                "subscriptions (the embedded amqtt broker does not); use Mosquitto >= 2.0"
            ) from None
    except aiomqtt.MqttError:
        pass


class Aggregator:
    """One shard: claims the updates the broker hands it, sums the granted ones, reports at round close."""

    def __init__(self, settings: AggregatorSettings, expected: dict[str, tuple[int, ...]]):
        self.settings = settings
        self.expected = expected  # message tensor name -> shape: the discriminator an update must carry
        self.counters = AggregatorCounters()
        self.rules = admission.AdmissionRules(run=settings.run)
        self.held: dict[tuple[int, str], tuple[State, int, bool]] = {}  # (round, device) -> awaiting verdict
        self.rounds: dict[int, ShardRound] = {}
        self.stopped = asyncio.Event()

    async def run(self) -> AggregatorCounters:
        """Serves until the server says stop; reconnects with backoff to the same MQTT 5 session, so that
        orders published meanwhile are delivered and the sums held in memory stay valid."""
        settings = self.settings
        will = aiomqtt.Will(
            topics.aggregator_status(settings.run, settings.name),
            wire.encode_status("offline"),
            qos=1,
            retain=True,
        )
        # Until it first connects, an aggregator tries for the address's first_connect_s, then says why and
        # exits (as server and devices do); once connected, a lost broker is retried for as long as it takes.
        deadline = time.monotonic() + settings.broker.first_connect_s
        identifier = settings.broker.client_id(f"edgegan-{settings.run}-{settings.name}")
        await check_mqtt5(settings.broker, f"{identifier}-probe")
        backoff, clean_start, connected = FIRST_BACKOFF_S, True, False
        while not self.stopped.is_set():
            try:
                async with mqtt_client(
                    settings.broker, identifier,
                    protocol=aiomqtt.ProtocolVersion.V5, clean_start=clean_start,
                    properties=session_properties(), will=will, timeout=CONNECT_TIMEOUT_S,
                ) as client:  # fmt: skip
                    backoff, connected = FIRST_BACKOFF_S, True
                    await self.session(client)
            except BaseException as error:
                if not is_connection_loss(error):
                    raise
                if not connected and time.monotonic() >= deadline:
                    raise BrokerUnreachable(first_connect_failure(settings.broker, error)) from None
                log.warning("%s lost the broker at %s (%s)", settings.name, settings.broker, error)
            clean_start = not connected  # a fresh run starts clean; a reconnect resumes
            if self.stopped.is_set():
                break
            wait_s = backoff if connected else min(backoff, max(0.0, deadline - time.monotonic()))
            try:
                await asyncio.wait_for(self.stopped.wait(), timeout=wait_s)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        return self.counters

    async def session(self, client: aiomqtt.Client) -> None:
        """One connection: subscribe (orders first, so none is missed), say online, serve until stop."""
        settings = self.settings
        await client.subscribe(topics.order(settings.run, settings.name), qos=1)
        await client.subscribe(topics.control(settings.run), qos=1)
        await client.subscribe(topics.shared_updates(settings.run), qos=1)
        await self.publish_status(client, "online")
        log.info("%s serving run %s at %s", settings.name, settings.run, settings.broker)
        async for message in client.messages:
            await self.handle(client, message)
            if self.stopped.is_set():
                break
        await self.publish_status(client, "offline")

    async def publish_status(self, client: aiomqtt.Client, state: str) -> None:
        payload = wire.encode_status(state, **self.counters.flat())
        topic = topics.aggregator_status(self.settings.run, self.settings.name)
        await client.publish(topic, payload, qos=1, retain=True)

    async def handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        run = self.settings.run
        if message.topic.matches(topics.all_updates(run)):
            await self.on_update(client, message)
        elif message.topic.matches(topics.order(run, self.settings.name)):
            await self.on_order(client, bytes(message.payload))
        elif message.topic.matches(topics.control(run)):
            # A retained "stop" is an earlier run's ending (the server clears it when it starts): only a live
            # one ends this aggregator.
            if bytes(message.payload) == b"stop" and not message.retain:
                self.stopped.set()
        else:
            self.counters.ignored += 1

    async def on_update(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """Decodes and checks an update, holds it, and claims it; a bad one is logged, counted, and
        reported to the server (which counts it with the run's rejections) and never crashes anything."""
        settings = self.settings
        self.counters.updates_received += 1
        payload = bytes(message.payload)
        device = topics.device_of(message.topic.value) or "?"
        try:
            envelope = await off_loop(len(payload), wire.decode, payload, self.expected)
            refused = admission.check_envelope(self.rules, envelope, kind="update", sender=device)
            if refused is None and settings.device_keys is not None:
                refused = settings.device_keys.judge(device, envelope)
            if refused is not None:
                raise wire.WireError(refused.reason, refused.detail)
        except wire.WireError as error:
            self.counters.rejected[error.reason] += 1
            log.warning("%s rejected an update from %s: %s", settings.name, device, error)
            rejection = wire.encode_rejection(device, error.reason)
            await client.publish(topics.claim(settings.run, settings.name), rejection, qos=1)
            return
        state = wire.discriminator_state(envelope.tensors)
        # A resend of a held update replaces it (the same bytes); the server answers each claim.
        self.held[(envelope.base_round, device)] = (state, envelope.samples, envelope.delta)
        self.forget_old_rounds()
        claim = wire.encode_claim(device, envelope.base_round, envelope.samples, len(payload), envelope.loss)
        await client.publish(topics.claim(settings.run, settings.name), claim, qos=1)
        self.counters.claims_sent += 1

    async def on_order(self, client: aiomqtt.Client, payload: bytes) -> None:
        try:
            order = wire.decode_order(payload)
        except wire.WireError as error:
            self.counters.ignored += 1
            log.warning("%s ignored a malformed order: %s", self.settings.name, error)
            return
        if "close" in order:
            await self.close_round(client, order["round"], order["close"])
            return
        round_index, device = order["round"], order["device"]
        held = self.held.pop((round_index, device), None)
        if not order["accept"]:
            self.counters.refused += 1
            return
        if held is None:
            self.counters.unknown_grants += 1
            log.error("%s was granted %s's update for round %d, which it does not hold",
                      self.settings.name, device, round_index)  # fmt: skip
            return
        state, samples, is_change = held
        shard = self.rounds.setdefault(round_index, ShardRound())
        await asyncio.to_thread(shard.mean.add, state, float(samples), is_change)
        shard.devices.append(device)
        shard.samples += samples
        self.counters.granted += 1
        self.forget_old_rounds()
        if shard.closing and len(shard.devices) == shard.closing:
            await self.send_partial(client, round_index, shard)

    async def close_round(self, client: aiomqtt.Client, round_index: int, granted: int) -> None:
        """Publishes this round's partial sum once it holds the `granted` updates the server counted. A
        close normally follows every verdict of its round on the same topic, but a broker's redelivery
        after a reconnect may reorder them: then the partial sum waits for the missing verdicts."""
        if granted == 0:
            self.forget_through(round_index)
            return
        shard = self.rounds.setdefault(round_index, ShardRound())
        if len(shard.devices) < granted:
            shard.closing = granted
            log.warning("%s: round %d closed with %d updates granted but %d added; waiting for the rest",
                        self.settings.name, round_index, granted, len(shard.devices))  # fmt: skip
            return
        await self.send_partial(client, round_index, shard)

    async def send_partial(self, client: aiomqtt.Client, round_index: int, shard: ShardRound) -> None:
        settings = self.settings
        partial = shard.mean.partial()
        envelope = wire.Envelope(
            kind="partial",
            run=settings.run,
            round=round_index,
            base_round=round_index,
            device=settings.name,
            samples=shard.samples,
            codec="fp64",
            tensors=wire.discriminator_tensors(partial.sums | partial.counters),
            weight=partial.total_weight,
            change_weight=partial.change_weight,
            devices=tuple(shard.devices),
        )
        payload = await asyncio.to_thread(wire.encode, envelope)
        await client.publish(topics.partial(settings.run, settings.name), payload, qos=1)
        self.counters.partials_sent += 1
        self.counters.partial_bytes += len(payload)
        log.info("%s: round %d partial sum of %d updates, %d bytes",
                 settings.name, round_index, len(shard.devices), len(payload))  # fmt: skip
        self.forget_through(round_index)

    def forget_through(self, round_index: int) -> None:
        """Drops the sums of this round and older ones, and the updates still held for them."""
        for key in [key for key in self.held if key[0] <= round_index]:
            del self.held[key]
            self.counters.unanswered += 1
        for older in [older for older in self.rounds if older <= round_index]:
            del self.rounds[older]

    def forget_old_rounds(self) -> None:
        """Bounds memory when the server is gone or slow: keeps the newest few rounds' updates and sums."""
        for stale in sorted({round_index for round_index, _ in self.held})[:-MAX_OPEN_ROUNDS]:
            for key in [key for key in self.held if key[0] == stale]:
                del self.held[key]
                self.counters.unanswered += 1
        for stale in sorted(self.rounds)[:-MAX_OPEN_ROUNDS]:
            del self.rounds[stale]


def run_aggregator(
    settings: AggregatorSettings, dataset: str, data_dir: Path | None, width: int, latent_dim: int,
    *, d_width: int = 0,
) -> AggregatorCounters:
    """Serves as one of the run's aggregators until the server says stop."""
    from edgegan.data import load_dataset
    from edgegan.models import ModelSpec, build_discriminator
    from edgegan.runsetup import check_dataset

    check_dataset(dataset)
    spec = ModelSpec(load_dataset(dataset, data_dir).sample_shape, latent_dim, width, d_width=d_width)
    expected = wire.tensor_shapes(discriminator=build_discriminator(spec).state_dict())
    return run_with_torch_workers(Aggregator(settings, expected).run)
