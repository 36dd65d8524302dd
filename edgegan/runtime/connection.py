"""Broker addresses, logins and TLS, and the reconnect-with-backoff loop every client of the runtime uses."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from edgegan.runtime.credentials import CredentialsError, read_secret

log = logging.getLogger("edgegan.connection")

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
CONNECT_TIMEOUT_S = 10.0  # one connection attempt
# The first connection of a client gives up after this long (a process that never reached its broker
# says why and exits); once connected, a lost broker is retried with backoff for as long as it takes.
FIRST_CONNECT_S = 20.0
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
PASSWORD_ENV = "EDGEGAN_PASSWORD"
# CONNACK codes of a refused login: MQTT 3.1.1 (4 bad username or password, 5 not authorised) and the
# MQTT 5 reason codes paho reports for them (134, 135). Retrying with the same login cannot help.
REFUSED_LOGIN = {4, 5, 134, 135}


@dataclass(kw_only=True, frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in to it. Its text form never shows the login."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None  # None with tls: the system's trusted CAs
    tls_cert: Path | None = None
    tls_key: Path | None = None
    first_connect_s: float = FIRST_CONNECT_S  # how long the first connection may take, retries included

    def __post_init__(self) -> None:
        if not 0 < self.first_connect_s <= 24 * 3600:
            raise ValueError(
                f"--connect-timeout-s must be > 0 s and at most a day, got {self.first_connect_s}"
            )

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def client_id(self, name: str) -> str:
        """The MQTT client id for `name` (e.g. `edgegan-{run}-{device}`) under this login: with a password,
        followed by 12 hex digits of a hash of the password and the name. A broker hands a session to
        whoever connects with its client id (Mosquitto takes over a connected one once the login checks
        out, whatever the login); a login that does not know this password cannot guess the id, so it
        cannot take over, nor disconnect, another login's session. Stable while the password is."""
        if not self.password:
            return name
        digest = hashlib.sha256(f"edgegan-client-id\0{self.password}\0{name}".encode()).hexdigest()
        return f"{name}-{digest[:12]}"


def parse_broker(url: str) -> BrokerAddress:
    """`mqtt://HOST:PORT` (port 1883 if left out) or `mqtts://HOST:PORT` (TLS, port 8883 if left out)."""
    parsed = urlparse(url)
    if parsed.scheme not in DEFAULT_PORTS or not parsed.hostname:
        raise ValueError(f"--broker takes mqtt://HOST:PORT or mqtts://HOST:PORT (TLS), got {url!r}")
    if parsed.username or parsed.password:
        raise ValueError("--broker takes no login: use --username and --password-file")
    try:
        port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    except ValueError:
        raise ValueError(f"--broker has a bad port: {url!r}") from None
    return BrokerAddress(host=parsed.hostname, port=port, tls=parsed.scheme == "mqtts")


def with_login(
    address: BrokerAddress,
    username: str | None = None,
    password_file: Path | None = None,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> BrokerAddress:
    """`address` with a login (the password from `password_file`, else from $EDGEGAN_PASSWORD) and TLS
    files, checked: a flag that cannot work is an error that names it."""
    password = None
    if password_file is not None and username is None:
        raise ValueError("--password-file needs --username")
    if username is not None:
        if not username or any(character in username for character in "+#/:"):
            raise ValueError(f"--username must be a non-empty name without + # / or :, got {username!r}")
        try:
            password = read_secret(password_file) if password_file is not None else environ.get(PASSWORD_ENV)
        except CredentialsError as error:
            raise ValueError(str(error)) from None
        if not password:
            raise ValueError(f"--username {username} needs --password-file FILE (or ${PASSWORD_ENV})")
    flags = {"--tls-ca": tls_ca, "--tls-cert": tls_cert, "--tls-key": tls_key}
    given = [flag for flag, path in flags.items() if path is not None]
    if given and not address.tls:
        raise ValueError(f"{', '.join(given)} need a TLS broker: --broker mqtts://HOST:PORT")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    for flag, path in flags.items():
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    return dataclasses.replace(
        address, username=username, password=password, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
    )


class LoginRefused(ConnectionError):
    """The broker refused our login, or its certificate failed verification: retrying cannot help."""


class Client(aiomqtt.Client):
    """aiomqtt's client, with a refused login or a failed certificate check raised as `LoginRefused`,
    whose message says which flag to look at."""

    def __init__(self, address: BrokerAddress, identifier: str, **options) -> None:
        # Nagle's algorithm held each small packet (a QoS 1 acknowledgement, a status or metrics message)
        # until the broker acknowledged the one before, which it delays by up to 40 ms: about 40 ms per
        # round in the server's metrics publish alone (scripts/bench_runtime.py measured it).
        options.setdefault("socket_options", [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        tls = None
        if address.tls:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(address.tls_ca) if address.tls_ca else None,
                certfile=str(address.tls_cert) if address.tls_cert else None,
                keyfile=str(address.tls_key) if address.tls_key else None,
            )
        super().__init__(
            address.host, address.port, identifier=identifier, username=address.username,
            password=address.password, tls_params=tls, **options,
        )  # fmt: skip
        self.address = address

    async def __aenter__(self) -> Client:
        try:
            return await super().__aenter__()
        except aiomqtt.MqttError as error:
            if isinstance(error, MqttConnectError):
                if getattr(error.rc, "value", error.rc) in REFUSED_LOGIN:
                    username = self.address.username
                    who = f"the login {username!r}" if username else "anonymous clients"
                    raise LoginRefused(
                        f"the broker at {self.address} refused {who} ({error}); check --username and "
                        "--password-file, and that the broker's password file and ACL list this identity"
                    ) from None
            elif "certificate verify failed" in str(error).lower():
                raise LoginRefused(
                    f"the certificate of the broker at {self.address} failed verification ({error}); check "
                    "--tls-ca, and that the certificate names the host in --broker (edgegan certs --hosts)"
                ) from None
            raise


class BrokerUnreachable(ConnectionError):
    """The first connection to the broker did not succeed within the address's `first_connect_s`."""


def unreachable_reason(address: BrokerAddress, error: BaseException | None) -> str:
    """The likely cause of a failed connection attempt, in words a user can act on."""
    text = str(error) if error is not None else ""
    lowered = text.lower()
    if error is None or "timed out" in lowered:
        return "no answer (is the host right and up? a firewall that drops packets looks like this too)"
    if "refused" in lowered or isinstance(error, ConnectionRefusedError):
        return f"connection refused ({text}): nothing listens there; is the broker up, is the port right?"
    if (
        isinstance(error, socket.gaierror)
        or "name or service not known" in lowered
        or "name resolution" in lowered
        or "nodename" in lowered
    ):
        return f"the name {address.host!r} does not resolve ({text}); check the host in --broker"
    if address.tls and any(
        word in lowered for word in ("ssl", "tls", "eof", "reset by peer", "handshake", "closed")
    ):
        return (
            f"the TLS handshake failed ({text}): is that a plain MQTT listener? use mqtt:// for it, "
            "or the broker's TLS port (8883 by default)"
        )
    return text or type(error).__name__


def mqtt_client(address: BrokerAddress, identifier: str, **options) -> Client:
    """A client for `address` with its login and TLS settings; `options` go to aiomqtt.Client."""
    return Client(address, identifier, **options)


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
    `stopped` is set or `session` returns normally. Until `identifier` has first connected (in this
    process), it tries for `address.first_connect_s` only, then raises BrokerUnreachable saying why."""
    backoff = FIRST_BACKOFF_S
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + address.first_connect_s
    last_error: BaseException | None = None
    while not stopped.is_set():
        first = (str(address), identifier) not in EVER_CONNECTED
        left = deadline - time.monotonic()
        if first and left <= 0 and last_error is not None:
            raise BrokerUnreachable(first_connect_failure(address, last_error)) from None
        try:
            # The first connection's attempts share one deadline; a connected session has none.
            async with asyncio.timeout_at(loop.time() + left if first else None) as limit:
                async with mqtt_client(
                    address, identifier, will=will, clean_session=False, timeout=CONNECT_TIMEOUT_S
                ) as client:
                    limit.reschedule(None)
                    EVER_CONNECTED.add((str(address), identifier))
                    backoff = FIRST_BACKOFF_S
                    await session(client)
                    return
        except TimeoutError:
            if not (first and limit.expired()):
                raise
            # An attempt that hung past the deadline: no answer, unless an earlier attempt said more.
            raise BrokerUnreachable(first_connect_failure(address, last_error)) from None
        except BaseException as error:
            if not is_connection_loss(error):
                raise
            last_error = error
            if first:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerUnreachable(first_connect_failure(address, last_error)) from None
                log.warning("%s cannot reach the broker at %s yet (%s); retrying in %.1f s", identifier,
                            address, error, min(backoff, left))  # fmt: skip
            else:
                log.warning(
                    "%s lost the broker at %s (%s); retrying in %.1f s", identifier, address, error, backoff
                )
        wait_s = min(backoff, max(0.0, deadline - time.monotonic())) if first else backoff
        try:
            await asyncio.wait_for(stopped.wait(), timeout=wait_s)
        except TimeoutError:
            pass
        backoff = min(backoff * 2, MAX_BACKOFF_S)


# (address, client identifier) pairs that have connected in this process: their reconnects are patient.
EVER_CONNECTED: set[tuple[str, str]] = set()


def first_connect_failure(address: BrokerAddress, error: BaseException | None) -> str:
    return (
        f"cannot connect to the broker at {address} within "
        f"{address.first_connect_s:g} s: {unreachable_reason(address, error)}"
    )
