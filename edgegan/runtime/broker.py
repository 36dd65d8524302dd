"""The embedded broker: a pure-Python MQTT broker (amqtt) for the no-install default.

Without a password file and an ACL file it admits anonymous clients, so it listens only on loopback. With
them (`edgegan broker --passwd --acl`) it enforces the same rules as Mosquitto from the same
files (edgegan/runtime/broker_plugins.py). Beyond loopback it also needs TLS, as the shipped Mosquitto
configuration does (broker/mosquitto.conf).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from edgegan.runtime.credentials import read_acl, read_password_file

log = logging.getLogger("edgegan.broker")
PLUGINS = "edgegan.runtime.broker_plugins"  # amqtt loads plugins by dotted path


class PortInUse(OSError):
    """The broker's port is taken (often by a Mosquitto already running there); str() is one line."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"port {port} on {host} is in use (another broker, such as Mosquitto, may be listening there); "
            "stop it or pick another port with --port"
        )
        self.errno = errno.EADDRINUSE


@dataclass(kw_only=True, frozen=True)
class BrokerSecurity:
    """Files that make the embedded broker refuse strangers: all None means anonymous, loopback only."""

    password_file: Path | None = None
    acl_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # verifies client certificates when they present one

    @property
    def authenticated(self) -> bool:
        return self.password_file is not None and self.acl_file is not None


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_loopback(host: str) -> None:
    if not is_loopback(host):
        raise ValueError(
            f"the embedded broker admits anonymous clients, so it listens only on loopback (127.0.0.1), "
            f"not {host}; for devices on a network give it --passwd, --acl, --tls-cert and "
            "--tls-key, or run Mosquitto with broker/mosquitto.conf (see broker/README.md)"
        )


def check_security(host: str, security: BrokerSecurity) -> None:
    """Refuses settings that would let strangers in: a broker reachable beyond loopback needs logins,
    topic permissions and TLS (passwords must not cross a network in the clear)."""
    if (security.password_file is None) != (security.acl_file is None):
        raise ValueError("--passwd and --acl go together: logins without permissions let any "
                         "device publish a global model")  # fmt: skip
    if (security.tls_cert is None) != (security.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    for flag, path in (("--passwd", security.password_file), ("--acl", security.acl_file),
                       ("--tls-cert", security.tls_cert), ("--tls-key", security.tls_key),
                       ("--tls-ca", security.tls_ca)):  # fmt: skip
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if security.authenticated:  # read now, so that a bad file is a one-line error rather than a plugin's
        read_password_file(security.password_file)
        read_acl(security.acl_file)
    if is_loopback(host):
        return
    if not security.authenticated:
        check_loopback(host)
    if security.tls_cert is None:
        raise ValueError(
            f"the embedded broker sends passwords in the clear without TLS, so it listens only on loopback "
            f"without --tls-cert and --tls-key, not on {host} (edgegan certs makes a development pair)"
        )


def broker_config(host: str, port: int, security: BrokerSecurity | None = None) -> dict:
    security = security or BrokerSecurity()
    listener: dict = {"type": "tcp", "bind": f"{host}:{port}"}
    if security.tls_cert is not None:
        listener.update(ssl=True, certfile=str(security.tls_cert), keyfile=str(security.tls_key))
        if security.tls_ca is not None:
            listener["cafile"] = str(security.tls_ca)
    if not security.authenticated:
        plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    else:
        plugins = {
            f"{PLUGINS}.PasswordFileAuth": {"password_file": str(security.password_file)},
            f"{PLUGINS}.AclTopicCheck": {"acl_file": str(security.acl_file)},
        }
    return {"listeners": {"default": listener}, "plugins": plugins}


def disable_nagle(broker: object) -> None:
    """TCP_NODELAY on the broker's listening sockets, which the connections it accepts inherit (Linux).
    amqtt leaves Nagle's algorithm on: a small write (a PUBACK, the tail of a message) then waits for the
    peer's delayed ACK, tens of milliseconds, whenever little else is flowing. Our clients set it too
    (runtime/connection.py)."""
    for server in getattr(broker, "_servers", {}).values():  # amqtt keeps its asyncio servers here
        instance = getattr(server, "instance", None)
        for sock in getattr(instance, "sockets", None) or ():
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def check_port_free(host: str, port: int) -> None:
    """Raises PortInUse when host:port cannot be bound, before amqtt tries: amqtt logs a traceback of its
    own and wraps the OSError in a BrokerError with another one."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # amqtt reports an unknown host itself
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers bind
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise PortInUse(host, port) from None
                raise


class QuietStartupFailure(logging.Filter):
    """Drops amqtt's own traceback of a failed start: serve_broker raises the cause as one error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Broker startup failed"


async def serve_broker(
    host: str,
    port: int,
    stopped: asyncio.Event,
    ready: asyncio.Event | None = None,
    security: BrokerSecurity | None = None,
    max_packet_bytes: int | None = None,
) -> None:
    """Serves MQTT on host:port until `stopped` is set; packets over `max_packet_bytes` (default: what
    edgegan's decoder accepts) close their connection."""
    security = security or BrokerSecurity()
    check_security(host, security)
    try:
        from amqtt.errors import BrokerError

        from edgegan.runtime.broker_plugins import PermissionCheckingBroker
    except ImportError as error:
        message = (
            f"the embedded broker needs {error.name}, which a base install leaves out: "
            "pip install 'edgegan[server]'"
        )
        raise RuntimeError(message) from None

    check_port_free(host, port)
    limits = {} if max_packet_bytes is None else {"max_packet_bytes": max_packet_bytes}
    broker = PermissionCheckingBroker(broker_config(host, port, security), **limits)
    quiet = QuietStartupFailure()
    amqtt_log = logging.getLogger("amqtt.broker")
    amqtt_log.addFilter(quiet)
    try:
        await broker.start()
    except BrokerError as error:  # taken between the check and the bind, or another OSError
        cause = error.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            raise PortInUse(host, port) from None
        if isinstance(cause, OSError):
            raise cause from None
        raise RuntimeError(f"the embedded broker did not start: {cause or error}") from None
    finally:
        amqtt_log.removeFilter(quiet)
    disable_nagle(broker)
    scheme = "mqtts" if security.tls_cert is not None else "mqtt"
    mode = "logins and ACL enforced" if security.authenticated else "anonymous, loopback only"
    log.info("embedded broker listening on %s://%s:%d (%s)", scheme, host, port, mode)
    if ready is not None:
        ready.set()
    try:
        await stopped.wait()
    finally:
        await asyncio.wait_for(broker.shutdown(), timeout=10)
