"""The device agent: joins its run from the configuration the server publishes, then subscribes to the
global model, trains its local discriminator and publishes it.

A device that starts before the server waits (status "waiting") for the run's configuration; one that
cannot join it (its data does not fit the run's model, or a flag it was given disagrees) says which field
in one line and in its status ("incompatible"), and stops. A changed configuration (a new run of the same
name) makes it join again.

One event loop; training and encoding run in a worker thread (and decoding too, for a global model larger
than runtime/offload.py's limit) so that the MQTT keep-alive and acknowledgements keep flowing. The agent
always trains on the newest global model it has: a model that arrives while it trains replaces any older
one still waiting.

Why over 500 lines in one file: the agent's join, session, receive and train loops share one connection's
state (the joined run, the newest model, the last update for resends); the ways to join (partition or own
data) are small functions next to it. Splitting them would make each reach into the agent's attributes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import re
import time
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiomqtt
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgegan import signing, topics, wire
from edgegan.algorithms.proposed import LocalDiscriminator
from edgegan.algorithms.sparsify import UplinkResidual
from edgegan.algorithms.staleness import difference
from edgegan.data import (
    DatasetError,
    LocalData,
    load_dataset,
    load_local,
    native_shape,
    parse_partition,
    partition_indices,
    sample_shape,
)
from edgegan.runsetup import RunSetup
from edgegan.runtime.connection import BrokerAddress, run_connected
from edgegan.runtime.featurestats import checked_join, measure_statistics
from edgegan.runtime.impairment import ImpairedLink, LinkImpairment
from edgegan.runtime.keyframes import DeviceDownlink
from edgegan.runtime.offload import off_loop, run_with_torch_workers
from edgegan.runtime.runconfig import RunConfig, RunIncompatible
from edgegan.runtime.stopsignals import signal_name, stop_on_signals
from edgegan.runtime.trust import FORGED, OLD_KEYFRAME, ServerTrust
from edgegan.torchdevice import CPU, DEFAULT_TORCH_DEVICE, resolve_torch_device

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
    torch_device: str = DEFAULT_TORCH_DEVICE  # auto | cpu | cuda: where the local networks train
    # The server's public key in hex (--server-key): only models it signed are trained on. None: trust the
    # key the run's configuration names, on first use (runtime/trust.py says what that leaves open).
    server_key: str | None = None
    # This device's own key (--update-key): it signs every update, so that a server checking --device-keys
    # counts only what this device made, whoever else can publish on its topic. None: unsigned updates.
    update_key: Ed25519PrivateKey | None = field(default=None, repr=False)

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
        resolve_torch_device(self.torch_device)
        if not self.speed_fits(self.speed):
            raise ValueError(f"--device-speed must be in (0, 1], got {self.speed}")
        if not math.isfinite(self.resend_s) or self.resend_s <= 0:
            raise ValueError(f"--resend-s must be > 0, got {self.resend_s}")
        if not math.isfinite(self.status_interval_s) or self.status_interval_s < 0:
            raise ValueError(f"--status-interval must be >= 0, got {self.status_interval_s}")
        if self.server_key is not None and not re.fullmatch(r"[0-9a-f]{64}", self.server_key):
            raise ValueError("--server-key must be an Ed25519 public key: 64 hex digits, or a file of them")

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
    forged: int = 0  # global, work or keyframe messages not signed by the trusted server key
    replayed: int = 0  # signed models older than one it already held
    keyframes_requested: int = 0  # times it missed a delta (or joined) and asked for the whole model
    keyframes_received: int = 0
    offline_periods: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    compute_s: float = 0.0  # decoding global models, training and encoding updates, all rounds
    round_compute_s: float = 0.0  # the same for the last update sent


class DeviceAgent:
    def __init__(
        self,
        settings: DeviceSettings,
        join: Callable[[RunConfig], LocalDiscriminator],
        statistics: Callable[[RunConfig, LocalDiscriminator], bytes | None] | None = None,
    ):
        self.settings = settings
        self.join = join  # builds this device's side of a run from the run's configuration (worker thread)
        # The `stats` message of its data for a run (worker thread), None for none: featurestats.py.
        self.statistics = statistics
        self.config: RunConfig | None = None
        self.local: LocalDiscriminator | None = None
        self.link = ImpairedLink(settings.impairment, seed=settings.seed * 1000)
        self.refusal: RunIncompatible | None = None
        self.unusable: str | None = None  # why the last global model could not be used (a WireError reason)
        self.counters = DeviceCounters()
        pinned = bytes.fromhex(settings.server_key) if settings.server_key else None
        self.trust = ServerTrust(device=settings.device, pinned=pinned)
        self.update_signer = signing.Signer(settings.update_key) if settings.update_key else None
        self.residual: UplinkResidual | None = None  # topk+ codecs: what its sent changes left out
        self.expected: dict[str, tuple[int, ...]] = {}
        self.keyframe_expected: dict[str, tuple[int, ...]] = {}  # a keyframe: the model, no fakes
        self.downlink: DeviceDownlink | None = None  # the model it holds, rebuilt from deltas
        self.last_trained_round = -1
        self.last_trained_digest = b""  # of the global model it last trained on (trained_on)
        self.last_update: bytes | None = None
        self.latest: wire.Envelope | None = None
        self.latest_decode_s = 0.0
        self.new_model = asyncio.Event()
        self.stopped = asyncio.Event()
        self.stopped_by: int | None = None  # SIGTERM or SIGINT, when one ended the device
        self.status_sent_at = -math.inf  # time.monotonic() of the last status message
        self.budget_said = False  # whether it has said that its privacy budget is spent (once)

    async def run(self) -> DeviceCounters:
        """Runs until the server says stop; reconnects with backoff whenever the broker goes away, and
        really disconnects for `offline_for_s` every `offline_every_s` when told to. Raises RunIncompatible
        when the run cannot be joined."""
        settings = self.settings
        will = aiomqtt.Will(
            topics.status(settings.run, settings.device), wire.encode_status("offline"), qos=1, retain=True
        )
        identifier = settings.broker.client_id(f"edgegan-{settings.run}-{settings.device}")
        while not self.stopped.is_set():
            if self.local is None:
                await run_connected(settings.broker, identifier, self.join_run, self.stopped, will)
                continue
            await run_connected(settings.broker, identifier, self.session, self.stopped, will)
            if self.local is not None and not self.stopped.is_set():
                self.counters.offline_periods += 1
                log.info("device %s offline for %.1f s", settings.device, settings.impairment.offline_for_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), settings.impairment.offline_for_s)
        if self.refusal is not None:
            raise self.refusal
        return self.counters

    async def join_run(self, client: aiomqtt.Client) -> None:
        """One connection: waits for the run's configuration (retained: at once if the server is up) and
        joins it; returns when joined, when it cannot join (then the device stops), or when stopped."""
        settings = self.settings
        await self.publish_status(client, "waiting")
        await client.subscribe(topics.run_config(settings.run), qos=1)
        await client.subscribe(topics.control(settings.run), qos=1)
        log.info("device %s waiting for run %s's configuration on %s", settings.device, settings.run,
                 topics.run_config(settings.run))  # fmt: skip
        async with asyncio.TaskGroup() as group:
            waiter = group.create_task(self.next_config(client))
            stopper = group.create_task(self.stopped.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (waiter, stopper):
                task.cancel()
        config = None if waiter.cancelled() else waiter.result()
        if config is None:
            await self.publish_status(client, "offline")
            return
        try:
            self.trust.join(config)
            local = await asyncio.to_thread(self.join, config)
        except RunIncompatible as error:
            self.refusal = error
            await self.publish_status(client, "incompatible", field=error.field, detail=str(error))
            self.stopped.set()
            return
        self.adopt(config, local)
        log.info("device %s joined run %s: %d examples, model %s, codec %s", settings.device,
                 settings.run, local.data.shape[0], config.sample_shape, config.codec)  # fmt: skip
        await self.publish_statistics(client, config, local)

    async def next_config(self, client: aiomqtt.Client) -> RunConfig | None:
        """The first readable run configuration that arrives, or None when the server says stop."""
        async for message in client.messages:
            if message.topic.matches(topics.control(self.settings.run)):
                if bytes(message.payload) == b"stop" and not message.retain:
                    self.stopped.set()
                    return None
                continue
            if not message.topic.matches(topics.run_config(self.settings.run)):
                continue
            try:
                return RunConfig.decode(bytes(message.payload))
            except wire.WireError as error:
                log.warning(
                    "device %s ignored a run configuration it cannot read: %s", self.settings.device, error
                )
        return None

    async def publish_statistics(self, client: aiomqtt.Client, config: RunConfig, local: LocalDiscriminator):
        """Once per join: the count, mean and covariance of a classifier feature of its images (never the
        images), retained, for a server that scores against the devices' data (docs/protocol.md)."""
        if self.statistics is None or config.quality_from != "devices":
            return
        payload = await asyncio.to_thread(self.statistics, config, local)
        if payload is not None:
            await client.publish(
                topics.stats(self.settings.run, self.settings.device), payload, qos=1, retain=True
            )

    def adopt(self, config: RunConfig, local: LocalDiscriminator) -> None:
        self.config, self.local = config, local
        self.settings = dataclasses.replace(self.settings, codec=config.codec, seed=config.seed)
        self.residual = UplinkResidual() if wire.is_sparse(config.codec) else None
        self.link = ImpairedLink(
            self.settings.impairment, seed=self.settings.seed * 1000 + local.device_index
        )
        if config.fakes == "server":
            batch = (config.train.batch_size, *config.sample_shape)
            self.expected = wire.tensor_shapes(
                discriminator=local.discriminator.state_dict(), fakes=(config.train.local_steps, batch)
            )
            self.keyframe_expected = wire.tensor_shapes(discriminator=local.discriminator.state_dict())
        else:
            self.expected = wire.tensor_shapes(
                generator=local.generator.state_dict(), discriminator=local.discriminator.state_dict()
            )
            self.keyframe_expected = self.expected
        self.downlink = DeviceDownlink(run=self.settings.run, work=config.fakes == "server")
        self.last_trained_round, self.last_update, self.latest = -1, None, None
        self.last_trained_digest = b""
        self.budget_said = False  # a new run, a new ledger (LocalDiscriminator.privacy)

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
        await client.subscribe(topics.run_config(settings.run), qos=1)
        await client.subscribe(self.model_topic, qos=1)
        if self.downlink is not None and self.downlink.asking:
            await client.subscribe(topics.keyframe(settings.run), qos=1)
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

    @property
    def model_topic(self) -> str:
        """Where its rounds come from: the global model, or its own share when the server draws the fakes."""
        if self.config is not None and self.config.fakes == "server":
            return topics.work(self.settings.run, self.settings.device)
        return topics.global_model(self.settings.run)

    @property
    def model_kind(self) -> str:
        return "work" if self.config is not None and self.config.fakes == "server" else "global"

    async def publish_status(self, client: aiomqtt.Client, state: str, **details: str) -> None:
        """Retained, so a watcher that subscribes later sees every device's latest state and counters."""
        self.status_sent_at = time.monotonic()
        # Its stream tells a server that draws the fakes (--fakes server) which noise is this device's.
        stream = {"stream": self.local.device_index} if self.local is not None else {}
        payload = wire.encode_status(
            state,
            round=self.last_trained_round,
            time=round(time.time(), 3),
            **asdict(self.counters),
            **stream,
            **(self.downlink.status_fields if self.downlink is not None else {}),
            **privacy_fields(self.local),
            **details,
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
            if message.topic.matches(topics.run_config(self.settings.run)):
                if self.changed_config(payload):
                    log.info("device %s: run %s has a new configuration; joining it again",
                             self.settings.device, self.settings.run)  # fmt: skip
                    self.local = None
                    return
                continue
            keyframe = message.topic.matches(topics.keyframe(self.settings.run))
            if not message.topic.matches(self.model_topic) and not (keyframe and self.downlink.asking):
                continue  # brokers may deliver retained messages of other topics (amqtt does, on connect)
            if not await self.link.carry(len(payload)):
                self.counters.globals_dropped += 1
                continue
            self.counters.bytes_down += len(payload)
            started = time.perf_counter()
            expected = self.keyframe_expected if keyframe else self.expected
            try:
                envelope = await off_loop(len(payload), wire.decode, payload, expected)
                kind_fits = envelope.kind == ("keyframe" if keyframe else self.model_kind)
                # Never the server's? Then it touches nothing: the device keeps the model it holds.
                refused = self.trust.check(envelope) if kind_fits else None
                # A delta is applied only to the version it was taken from (edgegan/downlink.py).
                envelope = self.downlink.take(envelope) if kind_fits and refused is None else envelope
            except wire.WireError as error:
                self.counters.rejected += 1
                await self.cannot_use(client, error)
                continue
            if refused is not None:
                await self.refuse(client, refused)
                continue
            self.counters.keyframes_received += keyframe
            if await self.follow_downlink(client) or envelope is None:
                continue
            if not kind_fits or envelope.run != self.settings.run:
                self.counters.rejected += 1
                log.warning(
                    "device %s rejected a %s message for run %s",
                    self.settings.device,
                    envelope.kind,
                    envelope.run,
                )
                continue
            self.counters.globals_received += 1
            if self.unusable is not None:  # the run's model fits again: say so at once
                self.unusable = None
                log.info("device %s can use the global model again", self.settings.device)
                await self.publish_status(client, "online")
            # A round number below the last one trained means the server started a new run: follow it. The
            # same round under another digest is a resumed server's model of that round: train on it too.
            if not self.trained_on(envelope):
                self.latest, self.latest_decode_s = envelope, time.perf_counter() - started
                self.new_model.set()

    def trained_on(self, envelope: wire.Envelope) -> bool:
        """Whether this device's last update was trained on `envelope`'s model. The round alone cannot say:
        a server killed after publishing round r and resumed from its checkpoint of round r publishes its
        own round r (another digest), and rejects the update trained on the old one as never published."""
        return envelope.round == self.last_trained_round and envelope.digest == self.last_trained_digest

    async def refuse(self, client: aiomqtt.Client, reason: str) -> None:
        """Counts a forged or replayed model (logged by ServerTrust); its status tells the server, which
        then republishes its own (at most once per status interval, so a flood cannot amplify)."""
        if reason == OLD_KEYFRAME:
            return
        if reason == FORGED:
            self.counters.forged += 1
        else:
            self.counters.replayed += 1
        if time.monotonic() - self.status_sent_at >= self.settings.status_interval_s:
            await self.publish_status(client, "online")

    async def follow_downlink(self, client: aiomqtt.Client) -> bool:
        """Asks for a keyframe (or stops asking) as the downlink needs; True while it still has no model it
        can train on from this message."""
        asking = self.downlink.asking
        if await self.downlink.follow(client):
            self.counters.keyframes_requested += not asking and self.downlink.asking
            await self.publish_status(client, "online")
        return self.downlink.asking

    async def cannot_use(self, client: aiomqtt.Client, error: wire.WireError) -> None:
        """A global model this device cannot train on (after joining, the run's own model should always
        fit): said once per reason in its log and in its status (state "incompatible", the reason as its
        field), where the server and `edgegan status` see it; it goes on with the next model."""
        if self.unusable == error.reason:
            return
        self.unusable = error.reason
        log.warning("device %s cannot use the global model: %s", self.settings.device, error)
        detail = f"device {self.settings.device} cannot use the global model: {error}"
        await self.publish_status(client, "incompatible", field=error.reason, detail=detail)

    def changed_config(self, payload: bytes) -> bool:
        try:
            return RunConfig.decode(payload) != self.config
        except wire.WireError as error:
            log.warning(
                "device %s ignored a run configuration it cannot read: %s", self.settings.device, error
            )
            return False

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
                    await client.unsubscribe(self.model_topic)
                    await client.subscribe(self.model_topic, qos=1)
                    continue
            self.new_model.clear()
            envelope, decode_s, self.latest = self.latest, self.latest_decode_s, None
            if envelope is None or self.trained_on(envelope):
                continue
            if not self.local.within_budget():
                await self.budget_spent(client, envelope.round)
                continue
            started = time.perf_counter()
            payload = await asyncio.to_thread(self.train_and_encode, envelope)
            self.counters.round_compute_s = decode_s + time.perf_counter() - started
            self.counters.compute_s += self.counters.round_compute_s
            self.last_trained_round, self.last_trained_digest = envelope.round, envelope.digest
            self.last_update = payload
            self.counters.updates_sent += 1
            await self.send(client, payload)
            if time.monotonic() - self.status_sent_at >= self.settings.status_interval_s:
                await self.publish_status(client, "online")

    async def budget_spent(self, client: aiomqtt.Client, round_index: int) -> None:
        """Its next round would pass its privacy budget (--dp-epsilon): it sends no more updates, and says so
        once, in one log line and in its status (privacy "budget-spent"); the run goes on without it."""
        self.last_update = None  # nothing more to resend either
        if self.budget_said:
            return
        self.budget_said = True
        ledger = self.local.privacy
        log.warning(
            "device %s stops contributing at round %d: its privacy budget epsilon %.3g (delta %g) would be "
            "passed; epsilon spent %.3g over %d rounds", self.settings.device, round_index,
            ledger.cfg.dp_epsilon, ledger.cfg.dp_delta, ledger.epsilon, ledger.rounds,
        )  # fmt: skip
        await self.publish_status(client, "online")

    async def send(self, client: aiomqtt.Client, payload: bytes) -> None:
        if not await self.link.carry(len(payload)):
            self.counters.updates_dropped += 1
            return
        await client.publish(topics.update(self.settings.run, self.settings.device), payload, qos=1)
        self.counters.bytes_up += len(payload)

    def train_and_encode(self, envelope: wire.Envelope) -> bytes:
        started = time.perf_counter()
        if envelope.kind == "work":  # --fakes server: the batches the server drew for this device
            update = self.local.update(
                envelope.round, None, wire.discriminator_state(envelope.tensors),
                wire.fake_batches(envelope.tensors),
            )  # fmt: skip
        else:
            update = self.local.update(
                envelope.round, wire.generator_state(envelope.tensors),
                wire.discriminator_state(envelope.tensors),
            )  # fmt: skip
        if self.settings.speed < 1.0:
            # Emulate a slower board: stretch the measured compute time by 1 / speed.
            time.sleep((time.perf_counter() - started) * (1.0 / self.settings.speed - 1.0))
        lossy = wire.is_lossy(self.settings.codec)
        state = (
            difference(update.state, wire.discriminator_state(envelope.tensors)) if lossy else update.state
        )
        if self.residual is not None:
            state = self.residual.select(state)
        message = wire.Envelope(
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
            trained_on=envelope.digest or None,  # the server counts it only if it published that model
        )
        payload = wire.encode(message) if self.update_signer is None else self.update_signer.sign(message)[0]
        if self.residual is not None:  # as the server will decode it (simulator: transfer.send_change)
            self.residual.sent(wire.discriminator_state(wire.decode(payload).tensors))
        return payload


def privacy_fields(local: LocalDiscriminator | None) -> dict[str, float | str]:
    """A private device's status: its epsilon so far (at the run's delta) and whether it still trains."""
    if local is None or local.privacy is None:
        return {}
    ledger = local.privacy
    return {"epsilon": ledger.epsilon, "privacy": "budget-spent" if ledger.stopped else "within-budget"}


def device_flags(setup: RunSetup, codec: str, *, from_run: Collection[str] = ()) -> dict[str, object]:
    """The run flags a device was started with, named as in the run's configuration (runtime/runconfig.py);
    those in `from_run` were left unset and are taken from the run."""
    flags = {"dataset": setup.dataset, "partition": setup.partition, "devices": setup.devices,
             "seed": setup.seed, "width": setup.width, "latent_dim": setup.latent_dim,
             "codec": codec}  # fmt: skip
    return {name: value for name, value in flags.items() if name not in from_run}


def join_partition(
    config: RunConfig, *, index: int, given: Mapping[str, object], data_dir: Path | None,
    torch_device: torch.device = CPU,
) -> LocalDiscriminator:  # fmt: skip
    """Partition `index` of the run's data set (as the simulator splits it), or RunIncompatible."""
    conflict = config.conflicts(given)
    if conflict is not None:
        raise conflict
    if not 0 <= index < config.devices:
        raise RunIncompatible(
            "devices", f"--index {index} is not one of the run's {config.devices} partitions"
        )
    try:
        dataset = load_dataset(config.dataset, data_dir)
    except DatasetError as error:
        raise RunIncompatible("dataset", str(error)) from None
    if tuple(dataset.sample_shape) != config.sample_shape:
        raise RunIncompatible(
            "sample_shape", f"the run's model takes {config.sample_shape}, this device's data is "
            f"{tuple(dataset.sample_shape)}",
        )  # fmt: skip
    parts = partition_indices(dataset.y, config.devices, parse_partition(config.partition), config.seed)
    spec = config.train.model_spec(config.sample_shape, config.latent_dim, config.width)
    # Only its own shard stays on the device (an indexed copy); the rest goes with `dataset`.
    return LocalDiscriminator(
        spec=spec, cfg=config.train, data=dataset.x[parts[index]], device_index=index, seed=config.seed,
        torch_device=torch_device, fakes=config.fakes,
    )  # fmt: skip


def join_local(
    config: RunConfig, *, own: LocalData, path: Path, stream: int, given: Mapping[str, object],
    torch_device: torch.device = CPU,
) -> LocalDiscriminator:  # fmt: skip
    """The device's own data (edgegan/data/local.py) in the run's model, or RunIncompatible. `own` was
    read at start with the shape the device expected; a run of another shape reads it again in its own."""
    conflict = config.conflicts({name: value for name, value in given.items() if name not in RUN_DATA})
    if conflict is not None:
        raise conflict
    if tuple(own.x.shape[1:]) != config.sample_shape:
        try:
            own = load_local(path, sample_shape=config.sample_shape)
        except DatasetError as error:
            raise RunIncompatible("sample_shape", str(error)) from None
    spec = config.train.model_spec(config.sample_shape, config.latent_dim, config.width)
    return LocalDiscriminator(
        spec=spec, cfg=config.train, data=own.x, device_index=stream, seed=config.seed,
        torch_device=torch_device, fakes=config.fakes,
    )  # fmt: skip


# With its own data a device does not use the run's data set, its split or its size.
RUN_DATA = ("dataset", "partition", "devices")


def run_device(
    settings: DeviceSettings,
    setup: RunSetup,
    index: int | None,
    *,
    data: Path | None = None,
    from_run: Collection[str] = (),
) -> tuple[DeviceCounters, int | None]:
    """Joins the run the server publishes and trains until the server says stop (or SIGTERM or SIGINT: the
    signal's number is returned with the counters, None after the server's stop): on partition `index` of
    the run's data set, or with `data` on the device's own data read from that path (edgegan/data/local.py;
    `index`, when given, then only numbers its random stream, else a number from its name). `setup` is what
    the device was told; the flags in `from_run` it takes from the run."""
    given = device_flags(setup, settings.codec, from_run=from_run)
    torch_device = resolve_torch_device(settings.torch_device)
    if data is not None:
        # Read at start, so that an empty folder or an unreadable file is an error before any connection.
        shape = native_shape(data) if "dataset" in from_run else sample_shape(setup.dataset)
        own = load_local(data, sample_shape=shape)
        log.info("device %s loaded %s", settings.device, own.describe())
        stream = index if index is not None else zlib.crc32(settings.device.encode())
        join = functools.partial(
            join_local, own=own, path=data, stream=stream, given=given, torch_device=torch_device
        )
    else:
        if index is None or not 0 <= index < setup.devices:
            raise ValueError(f"--index must be between 0 and --of - 1 ({setup.devices - 1}), got {index}")
        join = functools.partial(
            join_partition, index=index, given=given, data_dir=setup.data_dir, torch_device=torch_device
        )
    agent = DeviceAgent(settings, checked_join(join, features=setup.features), statistics_of(settings, setup))

    async def run_until_stopped() -> DeviceCounters:
        with stop_on_signals(agent.request_stop):
            return await agent.run()

    return run_with_torch_workers(run_until_stopped), agent.stopped_by


def statistics_of(
    settings: DeviceSettings, setup: RunSetup
) -> Callable[[RunConfig, LocalDiscriminator], bytes | None]:
    """The device's feature statistics for a run, with the run's extractor: the classifier its data dir
    holds (or the shipped MNIST one), as the server's quality probe finds it, or its own copy of another."""

    def measure(config: RunConfig, local: LocalDiscriminator) -> bytes | None:
        return measure_statistics(
            config, local.data, run=settings.run, device=settings.device, data_dir=setup.data_dir,
            features=setup.features,
        )  # fmt: skip

    return measure
