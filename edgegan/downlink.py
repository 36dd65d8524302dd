"""What the server downlinks each round, and what every receiver holds: deltas with error feedback.

With a lossy codec the global model (G + D, or the D of a `work` message) travels as the change from the
version the devices already hold. The sender keeps that reconstruction (`held`, exactly what every device
holds) and sends `source - held`, then adds the *decoded* change to `held`: the quantisation error of one
round is part of the next round's change (fed back) instead of piling up. A keyframe (the first message,
every `keyframe_every` rounds, and on request) carries `held` itself in fp32, so a device that joined
late or missed a version holds bit-identical weights to the others. A tensor whose source did not change
since the last publish (G while `--critic-ratio` > 1 leaves it alone) is left out of the delta. With fp32
every message is absolute, exactly as before.

Why here (the `runsetup | transfer` layer): the simulator (inprocess.py) and the MQTT runtime (server.py,
device.py) both call it, and neither may import the other; it needs the wire's per-tensor codec to know
what a receiver decodes (so it sits above `wire`), and holds no network, topic or clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from edgegan import wire

DEFAULT_KEYFRAME_EVERY = 50
KEYFRAME_CODEC = "fp32+zstd"  # exact: a keyframe reproduces `held` bit for bit
State = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Downlink:
    """One downlinked model: absolute tensors (`delta` false: a keyframe, or any fp32 message) or the
    changes from version `base_round` (only the tensors that changed)."""

    round: int
    base_round: int
    delta: bool
    codec: str
    tensors: State


def check_keyframe_every(keyframe_every: int) -> int:
    if keyframe_every < 1:
        raise ValueError(f"--keyframe-every must be >= 1, got {keyframe_every}")
    return keyframe_every


def quantised(tensor: torch.Tensor, codec: str) -> torch.Tensor:
    """The tensor as a receiver decodes it from a message in `codec` (zstd is lossless: ignored)."""
    base_codec = codec.partition("+")[0]
    return wire.decode_tensor("change", wire.encode_tensor(tensor, base_codec))


def copied(state: Mapping[str, torch.Tensor]) -> State:
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


class DownlinkSender:
    """The server's side: turns each round's model (`source`, message tensor names) into the message to
    publish, and keeps what every receiver holds after it."""

    def __init__(self, *, codec: str, keyframe_every: int = DEFAULT_KEYFRAME_EVERY) -> None:
        self.codec = wire.check_codec(codec)
        self.keyframe_every = check_keyframe_every(keyframe_every)
        self.held: State | None = None  # what every up-to-date receiver holds, version `held_round`
        self.held_round = -1
        self.keyframe_round = -1
        self.sources: State = {}  # the source as last published, to leave unchanged tensors out
        self.last: Downlink | None = None

    def publish(self, round_index: int, source: Mapping[str, torch.Tensor]) -> Downlink:
        """Round `round_index`'s message; the same one again for a round played again (a lost broker)."""
        if self.last is not None and self.last.round == round_index:
            return self.last
        if not wire.is_lossy(self.codec):
            message = Downlink(
                round=round_index, base_round=round_index, delta=False, codec=self.codec, tensors=dict(source)
            )
        elif (
            self.held is None
            or round_index - self.keyframe_round >= self.keyframe_every
            or set(source) != set(self.held)
            or round_index <= self.held_round
        ):
            self.held, self.keyframe_round = copied(source), round_index
            message = Downlink(
                round=round_index, base_round=round_index, delta=False, codec=KEYFRAME_CODEC,
                tensors=dict(self.held),
            )  # fmt: skip
        else:
            changes = {}
            for name, tensor in source.items():
                if torch.equal(tensor, self.sources[name]):
                    continue  # unchanged since the last publish: not re-sent
                # Against what receivers hold, not the last source: last round's rounding error is sent too.
                change = quantised(tensor.detach().cpu() - self.held[name], self.codec)
                self.held[name] = self.held[name] + change
                changes[name] = change
            message = Downlink(
                round=round_index, base_round=self.held_round, delta=True, codec=self.codec, tensors=changes
            )
        if wire.is_lossy(self.codec):
            self.sources = copied(source)
        self.held_round, self.last = round_index, message
        return message

    def keyframe(self) -> Downlink | None:
        """The current version whole and exact, for a device that asked (None before the first publish)."""
        if self.held is None:
            return None
        return Downlink(
            round=self.held_round, base_round=self.held_round, delta=False, codec=KEYFRAME_CODEC,
            tensors=dict(self.held),
        )  # fmt: skip


@dataclass(frozen=True)
class Reception:
    """A model a device can train on: version `round`, the whole model, and what came with it (a `work`
    message's fake batches; empty when a keyframe brought the version without them)."""

    round: int
    tensors: State
    extras: State = field(default_factory=dict)


class DownlinkReceiver:
    """A device's side: applies deltas to the version it holds; a delta on another base (a missed
    message, or nothing held yet) is kept aside until a keyframe, and never applied to the wrong base."""

    def __init__(self) -> None:
        self.held: State | None = None
        self.held_round = -1
        self.pending: tuple[Downlink, State] | None = None  # a delta it could not apply yet
        self.gaps = 0

    @property
    def needs_keyframe(self) -> bool:
        return self.pending is not None

    def receive(self, message: Downlink, extras: Mapping[str, torch.Tensor] = {}) -> Reception | None:  # noqa: B006 - read only
        """What to train on after `message`, or None (an old message, or a gap: `needs_keyframe`)."""
        if not message.delta:
            return self.keyframe(message, extras)
        if message.round == self.held_round and self.held is not None:  # already there (redelivered)
            return Reception(message.round, dict(self.held), dict(extras))
        if message.round < self.held_round:
            return None
        if message.base_round != self.held_round or self.held is None:
            if self.pending is None:
                self.gaps += 1
            self.pending = (message, dict(extras))
            return None
        self.apply(message)
        if self.pending is not None and self.pending[0].round <= message.round:
            self.pending = None
        return Reception(message.round, dict(self.held), dict(extras))

    def keyframe(self, message: Downlink, extras: Mapping[str, torch.Tensor] = {}) -> Reception | None:  # noqa: B006 - read only
        """Adopts an absolute model; then the waiting delta, if it fits."""
        if message.delta:
            raise wire.WireError("bad-field", "a keyframe carries the model, not changes")
        if message.round == self.held_round and self.pending is None and self.held is not None:
            # Held already (a redelivery after a reconnect): the device trains on it if it has not yet.
            return Reception(message.round, dict(self.held), dict(extras))
        # An older absolute model is adopted too: a server that started a new run starts from round 0.
        self.held, self.held_round = dict(message.tensors), message.round
        extras = dict(extras)
        if self.pending is not None:
            waiting, waiting_extras = self.pending
            if waiting.round == message.round:
                self.pending, extras = None, extras or waiting_extras
            elif waiting.base_round == message.round:
                self.apply(waiting)
                self.pending, extras = None, waiting_extras
            elif waiting.round < message.round:
                self.pending = None
            else:  # an older keyframe than the gap needs: hold it, still wait for a newer one
                return None
        return Reception(self.held_round, dict(self.held), extras)

    def apply(self, message: Downlink) -> None:
        """held += the decoded changes; a change that does not fit the model is a rejection, not a crash."""
        for name, change in message.tensors.items():
            if name not in self.held or self.held[name].shape != change.shape:
                raise wire.WireError("bad-shape", f"a change to {name} that the model does not hold")
        for name, change in message.tensors.items():
            self.held[name] = self.held[name] + change
        self.held_round = message.round


def to_envelope(
    message: Downlink, *, kind: str, run: str, device: str, extras: Mapping[str, torch.Tensor] | None = None,
    sent_at: float | None = None,
) -> wire.Envelope:  # fmt: skip
    """The message as an envelope of `kind` (`global`, `work` with its `extras`, or `keyframe`)."""
    timing = {} if sent_at is None else {"sent_at": sent_at}
    return wire.Envelope(
        kind=kind, run=run, round=message.round, base_round=message.base_round, device=device, samples=0,
        codec=message.codec, tensors=dict(message.tensors) | dict(extras or {}), delta=message.delta,
        **timing,
    )  # fmt: skip


def split(received: wire.Envelope) -> tuple[Downlink, State]:
    """A decoded `global`, `work` or `keyframe` envelope as (the model part, the fake batches)."""
    extras = wire.fake_tensors(wire.fake_batches(received.tensors))
    model = {name: tensor for name, tensor in received.tensors.items() if name not in extras}
    message = Downlink(
        round=received.round, base_round=received.base_round, delta=received.delta, codec=received.codec,
        tensors=model,
    )  # fmt: skip
    return message, extras


def deliver(
    message: Downlink,
    receiver: DownlinkReceiver,
    *,
    kind: str,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> tuple[int, State]:
    """In-process delivery of a lossy-codec message (the simulator's): (bytes on the wire, the model and
    extras as a receiver that got every earlier message holds them)."""
    envelope = to_envelope(message, kind=kind, run="sim", device="sim", extras=extras or {}, sent_at=0.0)
    payload = wire.encode_as_sent(envelope)  # signed, as over MQTT
    reception = receiver.receive(*split(wire.decode(payload)))
    return len(payload), reception.tensors | reception.extras
