"""A load generator for the server: N light clients that answer each global model with a ready-made update,
so that the server's aggregation throughput and memory can be measured against N without N trainings.

The clients are logical: N device names multiplexed over a few MQTT connections (client k publishes on its
own topic `update/{prefix}-{k}` through connection k mod C), because N real connections would cost this
process more than the server it measures. Every envelope is encoded before the first round (`encode_updates`)
so that only publishing happens while the server works; a round's updates are published as soon as the
global model of that round arrives, the way N devices that train instantly would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiomqtt
import torch

from edgegan import topics, wire
from edgegan.runtime.connection import BrokerAddress, mqtt_client


@dataclass(kw_only=True, frozen=True)
class LoadSettings:
    run: str
    broker: BrokerAddress
    clients: int  # logical devices, each answering every round
    rounds: int  # rounds answered; later global models are ignored
    connections: int = 4  # MQTT connections the clients are spread over
    codec: str = "fp32"
    samples: int = 10  # the sample count each update claims (its weight at the server)
    prefix: str = "load"
    timeout_s: float = 600.0  # the whole run, so that a stuck server cannot hang the generator

    def __post_init__(self) -> None:
        topics.check_name("run", self.run)
        wire.check_codec(self.codec)
        if self.clients < 1 or self.rounds < 1 or self.connections < 1 or self.samples < 1:
            raise ValueError("clients, rounds, connections and samples must be >= 1")

    def device(self, index: int) -> str:
        return topics.check_name("device", f"{self.prefix}-{index}")


@dataclass(kw_only=True)
class LoadReport:
    published: int = 0
    rounds_answered: list[int] = field(default_factory=list)
    publish_s: list[float] = field(default_factory=list)  # per answered round: first to last PUBACK
    globals_received: int = 0
    stopped_by_server: bool = False


def encode_updates(settings: LoadSettings, tensors: Mapping[str, torch.Tensor]) -> list[list[bytes]]:
    """[round][client] -> the update envelope that client sends in that round. `tensors` is a
    discriminator state (fp32) or, with a lossy codec, a change from the global one, as devices send."""
    named = wire.discriminator_tensors(tensors)

    def update(round_index: int, index: int) -> bytes:
        return wire.encode(
            wire.Envelope(
                kind="update",
                run=settings.run,
                round=round_index,
                base_round=round_index,
                device=settings.device(index),
                samples=settings.samples,
                codec=settings.codec,
                tensors=named,
                loss=0.0,
                delta=wire.is_lossy(settings.codec),
                trained_on=bytes(wire.DIGEST_BYTES),  # bound to each round's global as it arrives
            )
        )

    return [
        [update(round_index, index) for index in range(settings.clients)]
        for round_index in range(settings.rounds)
    ]


async def generate_load(settings: LoadSettings, payloads: Sequence[Sequence[bytes]]) -> LoadReport:
    """Answers each global model of rounds 0 .. rounds-1 with every client's update; returns when the
    server publishes "stop" (after the first answered round) or `timeout_s` has passed."""
    report = LoadReport()
    async with contextlib.AsyncExitStack() as stack:
        connections = []
        for index in range(settings.connections):
            client = mqtt_client(
                settings.broker, f"edgegan-load-{settings.run}-{index}", clean_session=True, timeout=10.0
            )
            connections.append(await stack.enter_async_context(client))
        listener = connections[0]
        await listener.subscribe(topics.global_model(settings.run), qos=1)
        await listener.subscribe(topics.control(settings.run), qos=1)
        async with asyncio.timeout(settings.timeout_s):
            async for message in listener.messages:
                payload = bytes(message.payload)
                if message.topic.matches(topics.control(settings.run)):
                    # A retained "stop" of an earlier run with this name is ignored until we have answered.
                    if payload == b"stop" and report.rounds_answered:
                        report.stopped_by_server = True
                        return report
                    continue
                if not message.topic.matches(topics.global_model(settings.run)):
                    continue
                report.globals_received += 1
                envelope = await asyncio.to_thread(wire.decode, payload)
                round_index = envelope.round
                if round_index >= len(payloads) or round_index in report.rounds_answered:
                    continue
                started = time.perf_counter()
                bound = [wire.rebind(payload, envelope.digest) for payload in payloads[round_index]]
                await publish_round(settings, connections, round_index, bound)
                report.publish_s.append(time.perf_counter() - started)
                report.rounds_answered.append(round_index)
                report.published += len(payloads[round_index])
    return report


async def publish_round(
    settings: LoadSettings, connections: Sequence[aiomqtt.Client], round_index: int, payloads: Sequence[bytes]
) -> None:
    """Every client's update of one round, QoS 1 like a device's, all in flight at once."""
    await asyncio.gather(
        *(
            connections[index % len(connections)].publish(
                topics.update(settings.run, settings.device(index)), payload, qos=1
            )
            for index, payload in enumerate(payloads)
        )
    )
