"""The embedded broker: a pure-Python MQTT broker (amqtt) for the no-install default.

It lets anonymous clients in, so it refuses to listen beyond the loopback interface: a fleet of real
boards needs Mosquitto (or another broker) with credentials and ACLs; see broker/.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

log = logging.getLogger("edgegan.broker")


def check_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"the embedded broker admits anonymous clients, so it listens only on loopback (127.0.0.1), "
            f"not {host}; for devices on a network run Mosquitto with broker/ (see broker/README.md)"
        )


def broker_config(host: str, port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def serve_broker(
    host: str, port: int, stopped: asyncio.Event, ready: asyncio.Event | None = None
) -> None:
    """Serves MQTT on host:port until `stopped` is set."""
    check_loopback(host)
    try:
        from amqtt.broker import Broker
    except ImportError as error:
        message = f"the embedded broker needs the amqtt package ({error}); reinstall edgegan"
        raise RuntimeError(message) from None

    broker = Broker(broker_config(host, port))
    await broker.start()
    log.info("embedded broker listening on mqtt://%s:%d", host, port)
    if ready is not None:
        ready.set()
    try:
        await stopped.wait()
    finally:
        await asyncio.wait_for(broker.shutdown(), timeout=10)
