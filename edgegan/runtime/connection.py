"""Broker addresses and the reconnect-with-backoff loop every client of the runtime uses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import aiomqtt

log = logging.getLogger("edgegan.connection")

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def parse_broker(url: str) -> BrokerAddress:
    """`mqtt://HOST:PORT` (port 1883 if left out)."""
    parsed = urlparse(url)
    if parsed.scheme != "mqtt" or not parsed.hostname:
        raise ValueError(f"--broker takes mqtt://HOST:PORT, got {url!r}")
    try:
        port = parsed.port or 1883
    except ValueError:
        raise ValueError(f"--broker has a bad port: {url!r}") from None
    return BrokerAddress(parsed.hostname, port)


def is_connection_loss(error: BaseException) -> bool:
    if isinstance(error, aiomqtt.MqttError):
        return True
    if isinstance(error, BaseExceptionGroup):
        return all(is_connection_loss(inner) for inner in error.exceptions)
    return False


async def run_connected(
    address: BrokerAddress,
    identifier: str,
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    stopped: asyncio.Event,
    will: aiomqtt.Will | None = None,
) -> None:
    """Runs `session` on a connected client; on a lost connection, reconnects with exponential backoff to a
    persistent session (clean_session=False, so QoS 1 messages queued meanwhile are delivered) until
    `stopped` is set or `session` returns normally."""
    backoff = FIRST_BACKOFF_S
    while not stopped.is_set():
        try:
            async with aiomqtt.Client(
                address.host, address.port, identifier=identifier, will=will, clean_session=False,
                timeout=CONNECT_TIMEOUT_S,
            ) as client:  # fmt: skip
                backoff = FIRST_BACKOFF_S
                await session(client)
                return
        except BaseException as error:
            if not is_connection_loss(error):
                raise
            log.warning(
                "%s lost the broker at %s (%s); retrying in %.1f s", identifier, address, error, backoff
            )
        try:
            await asyncio.wait_for(stopped.wait(), timeout=backoff)
        except TimeoutError:
            pass
        backoff = min(backoff * 2, MAX_BACKOFF_S)
