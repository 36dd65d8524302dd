"""The bytes the broker itself counted during a run, next to the payload bytes the cost model charges.

Mosquitto keeps two cumulative counters of every byte it read from and wrote to its clients' sockets
(`$SYS/broker/bytes/received`, `$SYS/broker/bytes/sent`: MQTT headers, topic names, acknowledgements, pings
and every subscriber's copy of a message included; TLS framing not) and publishes them, retained, every
`sys_interval` seconds (default 10). `BrokerByteCounter` reads them on a connection of its own: the
retained values when the run starts, and the first values published after it ends; the difference is the
broker's count for the run, to within one `sys_interval` on either side (docs/protocol.md, "Bytes the
broker counts"). A broker that publishes no such counters (the embedded amqtt broker, `sys_interval 0`,
or an ACL that does not grant the server identity `$SYS/broker/bytes/#`) gives `None` and a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from dataclasses import dataclass, field

import aiomqtt

from edgegan import topics
from edgegan.runtime.connection import CONNECT_TIMEOUT_S, BrokerAddress, mqtt_client

log = logging.getLogger("edgegan.brokerbytes")

SOURCE = "mosquitto $SYS"
# How long to wait for the counters: to connect and subscribe, and then for the retained values, which
# Mosquitto hands out right after its SUBACK.
FIRST_VALUES_WAIT_S = 2.0
RETAINED_WAIT_S = 0.5
# How long to wait at the end for values published after the run, when the broker's own interval is not
# known yet (fewer than two publications seen): Mosquitto's default sys_interval of 10 s, plus slack.
DEFAULT_END_WAIT_S = 12.0


@dataclass
class Reading:
    """Both counters as of one publication, and when it arrived (time.monotonic())."""

    at: float
    received: int
    sent: int


@dataclass
class BrokerByteCounter:
    """`async with BrokerByteCounter(address, run) as counter:` around a run, then `await counter.finish()`:
    the broker's byte counts for the run, or None and `counter.unavailable` saying why."""

    address: BrokerAddress
    run: str
    first_values_wait_s: float = FIRST_VALUES_WAIT_S
    readings: list[Reading] = field(default_factory=list)
    unavailable: str | None = None
    start: Reading | None = None
    subscribed_at: float | None = None
    _latest: dict[str, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task | None = None

    async def __aenter__(self) -> BrokerByteCounter:
        self._task = asyncio.create_task(self._listen())
        await self._wait_for(self._started, self.first_values_wait_s)
        self.start = self.readings[-1] if self.readings else None
        return self

    async def __aexit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _started(self) -> bool:
        """Values came, or long enough after subscribing that a broker with retained counters would have sent
        them (the embedded broker has none: the run is not held up for it)."""
        subscribed = (
            self.subscribed_at is not None and time.monotonic() - self.subscribed_at > RETAINED_WAIT_S
        )
        return bool(self.readings) or subscribed

    async def _listen(self) -> None:
        try:
            async with mqtt_client(
                self.address,
                self.address.client_id(f"edgegan-server-{self.run}-bytes"),
                clean_session=True,
                timeout=CONNECT_TIMEOUT_S,
            ) as client:
                await client.subscribe(topics.broker_bytes(), qos=0)
                self.subscribed_at = time.monotonic()
                self._changed.set()
                async for message in client.messages:
                    self._take(message)
        except (aiomqtt.MqttError, ConnectionError) as error:  # lost or refused: no later readings
            self.unavailable = f"lost the broker's $SYS connection ({error})"
            self._changed.set()

    def _take(self, message: aiomqtt.Message) -> None:
        name = message.topic.value
        if name not in (topics.BROKER_BYTES_RECEIVED, topics.BROKER_BYTES_SENT):
            return
        try:
            self._latest[name] = int(bytes(message.payload))
        except ValueError:
            return
        # Each publication is bytes/received (only when it changed) then bytes/sent (which always changed:
        # the last publication was sent to us), so a reading is taken when `sent` arrives, with the latest
        # `received`; the first one as soon as both are known (the retained pair arrives in either order).
        if len(self._latest) == 2 and (name == topics.BROKER_BYTES_SENT or not self.readings):
            received, sent = (
                self._latest[topics.BROKER_BYTES_RECEIVED],
                self._latest[topics.BROKER_BYTES_SENT],
            )
            self.readings.append(Reading(time.monotonic(), received, sent))
            self._changed.set()

    async def _wait_for(self, condition, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.unavailable is not None or (self._task is not None and self._task.done()):
                return condition()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.1))
        return True

    def sys_interval_s(self) -> float | None:
        """The broker's publication interval as observed: the median gap between readings after the first
        (the first is the retained one, handed out on subscribing)."""
        times = [reading.at for reading in self.readings[1:]]
        gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        return round(statistics.median(gaps), 1) if gaps else None

    async def finish(self) -> dict | None:
        """The counts from the run's start to the first publication after now; None when the broker
        published none (`unavailable` then says why)."""
        ended = time.monotonic()
        if self.start is None:
            # Nothing at the start: give a broker that is merely slow the rest of the first wait (the first
            # values then came after the run started: a slight undercount).
            waited = ended - (self.subscribed_at or ended)
            await self._wait_for(lambda: bool(self.readings), max(0.0, self.first_values_wait_s - waited))
            if not self.readings:
                self.unavailable = self.unavailable or (
                    f"the broker published no {topics.broker_bytes()} "
                    f"within {self.first_values_wait_s:.0f} s "
                    "(no $SYS tree, as on the embedded amqtt broker; sys_interval 0; or an ACL that does not "
                    f"let this login read {topics.broker_bytes()})"
                )
                return None
            self.start = self.readings[0]
        interval = self.sys_interval_s()
        wait_s = 2 * interval + 1 if interval else DEFAULT_END_WAIT_S
        if not await self._wait_for(lambda: self.readings[-1].at > ended, wait_s):
            self.unavailable = (
                self.unavailable or f"no publication of the counters within {wait_s:.0f} s of the end"
            )
            return None
        end = next(reading for reading in self.readings if reading.at > ended)
        return {
            "received": end.received - self.start.received,
            "sent": end.sent - self.start.sent,
            "source": SOURCE,
            "sys_interval_s": self.sys_interval_s(),
        }


def compare_with_payload(counted: dict | None, bytes_up: int, bytes_down: int) -> dict | None:
    """The broker's counts with the run's payload bytes beside them: every payload the cost model charges
    is one delivery by the broker (an update to the server, a global model or work message to a device), so
    the broker's `sent` is the comparable figure; `received` holds each global model once, not per device."""
    if counted is None:
        return None
    payload = bytes_up + bytes_down
    return {**counted, "payload_bytes": payload, "sent_per_payload_byte": round(counted["sent"] / payload, 4)
            if payload else None}  # fmt: skip
