"""amqtt plugins that make the embedded broker enforce Mosquitto's password file and ACL file, read in
Mosquitto's own formats, and a broker that applies the ACL to retained messages too."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from edgegan.runtime.credentials import read_acl, read_password_file, verify_password

log = logging.getLogger("edgegan.broker")


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
            log.warning("refused the login %r (client %s)", session.username, session.client_id)
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
            log.warning("denied %r publishing on %s", session.username, topic)
        return allowed


class PermissionCheckingBroker(Broker):
    """amqtt 0.12 hands out retained messages without asking the topic plugins whether the client may read
    them (on each subscription, and on connect for every client's subscriptions); this asks them, so that
    the ACL's read rules hold for retained statuses and metrics too. Without topic plugins nothing changes."""

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
