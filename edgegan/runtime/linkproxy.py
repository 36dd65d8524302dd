"""`edgegan link-proxy`: a TCP proxy between a device and the broker that delays, throttles and resets
the real byte stream, so that MQTT's own recovery (QoS 1 redelivery, reconnects, session resume) is
exercised, not only the application's emulated losses.

Delay and throttling act per chunk read from a socket (at most 64 KiB): each chunk waits
`delay_ms + size / bandwidth` before it is forwarded, in order. A reset aborts both TCP connections of a
client at once (no MQTT DISCONNECT is sent), as a dropped Wi-Fi link or a rebooting router would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from dataclasses import dataclass

from edgegan.runtime.connection import BrokerAddress

log = logging.getLogger("edgegan.linkproxy")

CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0


@dataclass(kw_only=True, frozen=True)
class ProxySettings:
    listen: BrokerAddress
    target: BrokerAddress
    delay_ms: float = 0.0
    bandwidth_kbps: float = 0.0  # 0: unlimited
    reset_every_s: float = 0.0  # 0: never; otherwise each connection is reset after ~this long (+-50%)
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value in (("--delay-ms", self.delay_ms), ("--bandwidth-kbps", self.bandwidth_kbps),
                            ("--reset-every", self.reset_every_s)):  # fmt: skip
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{flag} must be a number >= 0, got {value}")


@dataclass
class ProxyCounters:
    connections: int = 0
    resets: int = 0
    bytes_to_target: int = 0
    bytes_to_client: int = 0


class LinkProxy:
    def __init__(self, settings: ProxySettings):
        self.settings = settings
        self.counters = ProxyCounters()
        self.random = random.Random(settings.seed)

    async def serve(self, stopped: asyncio.Event, ready: asyncio.Event | None = None) -> ProxyCounters:
        server = await asyncio.start_server(self.handle, self.settings.listen.host, self.settings.listen.port)
        log.info("link proxy %s -> %s", self.settings.listen, self.settings.target)
        if ready is not None:
            ready.set()
        async with server:
            await stopped.wait()
        return self.counters

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        target = self.settings.target
        try:
            target_reader, target_writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as error:
            log.warning("cannot reach %s: %s", target, error)
            client_writer.transport.abort()
            return
        pumps = {
            asyncio.create_task(self.pump(client_reader, target_writer, "bytes_to_target")),
            asyncio.create_task(self.pump(target_reader, client_writer, "bytes_to_client")),
        }
        waits = set(pumps)
        if self.settings.reset_every_s:
            waits.add(
                asyncio.create_task(
                    asyncio.sleep(self.settings.reset_every_s * self.random.uniform(0.5, 1.5))
                )
            )
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not done & pumps:
                self.counters.resets += 1
                log.info("reset connection %d", self.counters.connections)
        finally:
            for task in waits:
                task.cancel()
            for writer in (client_writer, target_writer):
                writer.transport.abort()
            for task in waits:
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await task

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        settings = self.settings
        while chunk := await reader.read(CHUNK_BYTES):
            wait = settings.delay_ms / 1000.0
            if settings.bandwidth_kbps:
                wait += len(chunk) * 8 / (settings.bandwidth_kbps * 1000.0)
            if wait:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
            setattr(self.counters, counter, getattr(self.counters, counter) + len(chunk))
