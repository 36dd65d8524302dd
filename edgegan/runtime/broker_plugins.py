"""amqtt plugins that make the embedded broker enforce Mosquitto's password file and ACL file, read in
Mosquitto's own formats, and a broker that applies the ACL to retained and queued messages too, checks a
login before it touches any session, binds each session to the login that made it, caps its connections,
gives a client a deadline for its CONNECT and locks out an address that keeps guessing passwords."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import amqtt.mqtt.protocol.handler as amqtt_handler
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.packet import RESERVED_0, MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.utils import gen_client_id

from edgegan import wire
from edgegan.runtime.broker_audit import AuditLog
from edgegan.runtime.credentials import read_acl, read_password_file, verify_password
from edgegan.runtime.loginthrottle import LoginThrottle

log = logging.getLogger("edgegan.broker")
AUDIT = AuditLog(log)  # shared by the plugins and the broker of this process
CONNECT_DEADLINE_S = 10.0  # a connection that sends no CONNECT within this is closed
MAX_CLIENTS = 1000  # connections held at once; more are closed at once (the shipped Mosquitto: unlimited)
# The largest packet accepted without a run to size it by: the largest payload edgegan's decoder accepts and
# room for a topic (the shipped Mosquitto's max_packet_size); `edgegan run` passes its own run's bound.
MAX_PACKET_BYTES = wire.MAX_PAYLOAD_BYTES + 64 * 1024


class LimitedFixedHeader(MQTTFixedHeader):
    """amqtt reads a whole packet, however long its header says it is, before anything can look at it.
    This header reader turns a packet over `limit` bytes into a reserved packet type, on which amqtt closes
    the connection before reading its body: memory stays bounded. Installed process-wide in amqtt's protocol
    handler by the broker (one embedded broker per process)."""

    limit = MAX_PACKET_BYTES

    @classmethod
    async def from_stream(cls, reader):
        header = await super().from_stream(reader)
        if header is not None and header.remaining_length > cls.limit:
            AUDIT.note(
                "closed a connection that sent a packet over", f"{cls.limit:,} bytes",
                f"{header.remaining_length:,} bytes",
            )  # fmt: skip
            return cls(RESERVED_0, 0, 0)
        return header


class PasswordFileAuth(BaseAuthPlugin):
    """Logins checked against a Mosquitto password file; no username, no entry."""

    @dataclass
    class Config:
        password_file: str = ""

    def __init__(self, context) -> None:
        super().__init__(context)
        self.users = read_password_file(Path(self.config.password_file))

    async def authenticate(self, *, session) -> bool:
        hashed = self.users.get(session.username or "")
        if hashed is None or not verify_password(session.password or "", hashed):
            AUDIT.note("refused the login", repr(session.username))
            return False
        return True


class AclTopicCheck(BaseTopicPlugin):
    """Mosquitto 2.0's ACL semantics: publishing needs write, receiving needs read; any subscription is
    accepted, and read access is checked on every message delivered through it."""

    @dataclass
    class Config:
        acl_file: str = ""

    def __init__(self, context) -> None:
        super().__init__(context)
        self.acl = read_acl(Path(self.config.acl_file))

    async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool:
        if action == Action.SUBSCRIBE:
            return True
        if session is None or topic is None:
            return False
        access = "write" if action == Action.PUBLISH else "read"
        allowed = self.acl.allows(session.username, session.client_id or "", topic, access)
        if not allowed and action == Action.PUBLISH:
            AUDIT.note("denied a publish by", repr(session.username), f"on {topic}")
        return allowed


class PermissionCheckingBroker(Broker):
    """amqtt 0.12 with the holes a red-team pass found closed (docs/reliability.md, "The embedded broker"):

    - It handed out retained and queued messages without asking the topic plugins whether the client may
      read them; this asks them, so that the ACL's read rules hold for those too.
    - It deleted (clean session) or resumed (copying the new login into it) the session of a CONNECT's
      client id before checking the login, and took over a connected one whatever the login: a refused
      login could disconnect the server, and a device login using the server's client id got its queued
      messages and left the server without updates. Here the login is checked first and a session belongs to
      the login that made it: another login asking for its client id is refused, and the session is untouched.
    - It waited for ever for a CONNECT, accepted any number of connections and packets of any size (a 200 MB
      publish took it to +1.3 GB); here a CONNECT has a deadline, connections past `max_clients` are closed
      at once, and so is one that sends a packet over `max_packet_bytes`, before its body is read.
    - It checked any number of passwords as fast as a client sent them (50 in 0.06 s); here an address with
      too many wrong ones is locked out for a while (`LoginThrottle`), every login from it refused unread.
    Without logins (an anonymous loopback broker) sessions have no owner and behave as amqtt's.
    """

    def __init__(
        self,
        config: dict,
        *,
        max_clients: int = MAX_CLIENTS,
        connect_deadline_s: float = CONNECT_DEADLINE_S,
        max_packet_bytes: int = MAX_PACKET_BYTES,
        throttle: LoginThrottle | None = None,
    ) -> None:
        super().__init__(config)
        self.throttle = throttle or LoginThrottle()
        LimitedFixedHeader.limit = max_packet_bytes
        amqtt_handler.MQTTFixedHeader = LimitedFixedHeader
        self.max_clients = max_clients
        self.connect_deadline_s = connect_deadline_s
        self.owners: dict[str, str | None] = {}  # client id -> the login whose session it is
        self.clients = 0

    async def _client_connected(self, listener_name, reader, writer) -> None:
        if self.clients >= self.max_clients:
            AUDIT.note("refused a connection:", f"{self.max_clients} clients already connected")
            await writer.close()
            return
        self.clients += 1
        try:
            await super()._client_connected(listener_name, reader, writer)
        finally:
            self.clients -= 1

    async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
        """amqtt's own, reordered: read the CONNECT (within the deadline), check the login, check that the
        client id is not another login's session, and only then delete or resume a session."""
        try:
            handler, session = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                timeout=self.connect_deadline_s,
            )
        except TimeoutError:
            AUDIT.note("closed a connection", "that sent no CONNECT", f"{self.connect_deadline_s:g} s")
            await writer.close()
            raise AMQTTError("no CONNECT in time") from None
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(exc) from exc
        address = str(remote_address)
        if self.throttle.locked(address):
            AUDIT.note("refused a login from", address, "locked out after too many wrong passwords")
            await self.refuse(writer, NOT_AUTHORIZED)
            raise AMQTTError(f"{address} is locked out")
        if not await super()._authenticate(session, None):
            if self.throttle.failed(address):
                AUDIT.note("locked out", address, f"{self.throttle.max_failures} wrong logins in "
                           f"{self.throttle.window_s:g} s; for {self.throttle.lockout_s:g} s")  # fmt: skip
            await self.refuse(writer, NOT_AUTHORIZED)
            raise AMQTTError(f"refused the login {session.username!r}")
        self.throttle.succeeded(address)
        client_id = session.client_id
        if client_id and client_id in self._sessions and self.owners.get(client_id) != session.username:
            AUDIT.note(
                "refused the client id", repr(client_id), f"another login's; asked by {session.username!r}"
            )
            await self.refuse(writer, IDENTIFIER_REJECTED)
            raise AMQTTError(f"client id {client_id!r} belongs to another login")
        session.edgegan_authenticated = True
        if session.clean_session:
            if client_id:
                await self._delete_session(client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif client_id in self._sessions:
            existing, _ = self._sessions[client_id]  # the same login's: it may bring a new will and password
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "password"):
                setattr(existing, name, getattr(session, name))
            existing.edgegan_authenticated = True
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        self.owners[session.client_id] = session.username
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _authenticate(self, session, listener) -> bool:
        # Checked once, before any session was touched (_initialize_client_session).
        return bool(getattr(session, "edgegan_authenticated", False))

    async def _delete_session(self, client_id: str) -> None:
        self.owners.pop(client_id, None)
        await super()._delete_session(client_id)

    async def _cleanup_session(self, client_id: str) -> None:
        self.owners.pop(client_id, None)
        await super()._cleanup_session(client_id)

    @staticmethod
    async def refuse(writer, code: int) -> None:
        try:
            await ConnackPacket.build(0, code).to_stream(writer)
        finally:
            await writer.close()

    async def _publish_session_retained_messages(self, session) -> None:
        """Messages queued while the session was away, each checked against the ACL as it is handed out."""
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        while not session.retained_messages.empty():
            queued = await session.retained_messages.get()
            if await self._topic_filtering(session, queued.topic, Action.RECEIVE):
                sends.append(asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=True)
                ))  # fmt: skip
        if sends:
            await asyncio.wait(sends)

    async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = [
            asyncio.ensure_future(
                handler.mqtt_publish(
                    retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )
            )
            for topic, retained in list(self._retained_messages.items())
            if self._matches(topic, topic_filter)
            and await self._topic_filtering(session, topic, Action.RECEIVE)
        ]
        if sends:
            await asyncio.wait(sends)
