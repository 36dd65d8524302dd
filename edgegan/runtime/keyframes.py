"""The MQTT side of downlink deltas (the policy is edgegan/downlink.py): a device that cannot apply a
delta asks for a keyframe in its status (`keyframe: "wanted"`, retained) and reads the keyframe topic
until it holds a version it can go on from; the server answers a request with its current version,
retained on that topic, once per version. Kept out of server.py and device.py, which hold the loops."""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiomqtt

from edgegan import topics, wire
from edgegan.downlink import DownlinkReceiver, DownlinkSender, Reception, split, to_envelope

log = logging.getLogger("edgegan.keyframes")
WANTED = "wanted"  # the status field `keyframe` of a device that needs one


class KeyframeServer:
    """Answers keyframe requests with the version every up-to-date device holds."""

    def __init__(self, *, run: str, sender: DownlinkSender, sign: Callable[[wire.Envelope], bytes]) -> None:
        self.run, self.sender, self.sign = run, sender, sign  # sign: the server's (runtime/server.py)
        self.published_round = -1  # the version the retained keyframe holds
        self.sent = 0
        self.bytes = 0

    async def answer(self, client: aiomqtt.Client, payload: bytes) -> None:
        """Publishes the current keyframe if this status asks for one and the retained one is older."""
        try:
            wanted = payload and wire.decode_status(payload).get("keyframe") == WANTED
        except wire.WireError:
            return  # counted by DeviceReports
        keyframe = self.sender.keyframe() if wanted else None
        if keyframe is None or keyframe.round == self.published_round:
            return
        message = self.sign(to_envelope(keyframe, kind="keyframe", run=self.run, device="server"))
        await client.publish(topics.keyframe(self.run), message, qos=1, retain=True)
        self.published_round = keyframe.round
        self.sent += 1
        self.bytes += len(message)
        log.info("published a keyframe of round %d (%d bytes) on request", keyframe.round, len(message))


class DeviceDownlink:
    """A device's reconstruction of the global model, and whether it is asking for a keyframe."""

    def __init__(self, *, run: str, work: bool) -> None:
        self.run, self.work = run, work  # work: --fakes server, a model is trainable only with its fakes
        self.receiver = DownlinkReceiver()
        self.asking = False  # subscribed to the keyframe topic, its status says "wanted"

    @property
    def status_fields(self) -> dict[str, str]:
        return {"keyframe": WANTED} if self.asking else {}

    def take(self, received: wire.Envelope) -> wire.Envelope | None:
        """The whole model to train on after a decoded global, work or keyframe message, or None (old, a
        gap, or a keyframe without the round's fakes). WireError: a change that does not fit."""
        message, extras = split(received)
        if received.kind == "keyframe":
            reception = self.receiver.keyframe(message, extras)
        else:
            reception = self.receiver.receive(message, extras)
        if reception is None or (self.work and not reception.extras):
            return None
        return self.whole(received, reception)

    @staticmethod
    def whole(received: wire.Envelope, reception: Reception) -> wire.Envelope:
        kind = "work" if reception.extras else "global"
        return wire.Envelope(
            kind=kind, run=received.run, round=reception.round, base_round=reception.round,
            device=received.device, samples=0, codec=received.codec,
            tensors=reception.tensors | reception.extras, sent_at=received.sent_at, digest=received.digest,
        )  # fmt: skip

    async def follow(self, client: aiomqtt.Client) -> bool:
        """(Un)subscribes the keyframe topic as the need changes; True when the device should (re)send its
        status: it has just started or stopped asking, or it is still asking after another gap."""
        topic = topics.keyframe(self.run)
        if self.receiver.needs_keyframe:
            if not self.asking:
                await client.subscribe(topic, qos=1)
            self.asking = True
            return True
        if self.asking:
            self.asking = False
            await client.unsubscribe(topic)
            return True
        return False
