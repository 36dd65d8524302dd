"""Who a model may come from, and what an update may be bound to (docs/protocol.md, "Threat model").

`ServerTrust` is a device's side: the server key it trusts (pinned with --server-key, or the run
configuration's on first use), and whether a global, work or keyframe message is the server's, signed, and
no older than one it already accepted. `PublishedDigests` is the server's: the digests of the messages it
published lately, which an update's `trained_on` must name. `DeviceKeys` is the server's check of the
devices' own signatures on their updates (--device-keys). Transport-free: none reads a socket.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from edgegan import signing, wire
from edgegan.algorithms import admission
from edgegan.runtime.runconfig import RunConfig, RunIncompatible

log = logging.getLogger("edgegan.device")

FORGED, REPLAYED = "forged", "replayed"  # a device's counters, and why it refused a model
# An older keyframe still retained from an earlier request: ignored like a replay, but not counted (an
# honest server leaves one behind whenever a device asks again later).
OLD_KEYFRAME = "old-keyframe"
UNBOUND, UNKNOWN_GLOBAL = "unbound", "unknown-global"  # the server's rejection reasons
BINDING_REASONS = frozenset({UNBOUND, UNKNOWN_GLOBAL})
MIN_REMEMBERED = 4096
LOG_INTERVAL_S = 60.0  # one line per reason per interval, with the count since the last


class ServerTrust:
    """A device's trust in its server's key; `check` says whether a decoded model may be trained on."""

    def __init__(self, *, device: str, pinned: bytes | None, clock: Callable[[], float] = time.monotonic):
        self.device, self.pinned, self.clock = device, pinned, clock
        self.key: bytes | None = pinned  # pinned, or the first run configuration's (trust on first use)
        self.newest: tuple[int, float] | None = None  # (round, sent_at) of the newest model accepted
        self.logged_at: dict[str, float] = {}
        self.unlogged: dict[str, int] = {}

    def join(self, config: RunConfig) -> None:
        """Takes the key a run configuration names; RunIncompatible when there is none to trust."""
        named = bytes.fromhex(config.server_key) if config.server_key else None
        self.newest = None  # a new run (or the same one joined again) starts its rounds afresh
        if self.key is None:
            if named is None:
                raise RunIncompatible(
                    "server_key", "the run's configuration names no server key and no --server-key was "
                    "given: this device trains only on models signed by its server",
                )  # fmt: skip
            self.key = named
            log.warning(
                "device %s trusts server key %s from the run's configuration (trust on first use): whoever "
                "publishes that configuration first (the broker operator, a holder of the server login) "
                "could have named their own key; pin it with --server-key", self.device,
                signing.fingerprint(named),
            )  # fmt: skip
        elif named is not None and named != self.key:
            how = "pinned" if self.pinned else "trusted first"
            log.warning(
                "device %s: the run's configuration names server key %s, not the key %s it %s; it goes on "
                "trusting only that one", self.device, signing.fingerprint(named),
                signing.fingerprint(self.key), how,
            )  # fmt: skip

    def check(self, envelope: wire.Envelope) -> str | None:
        """None when the server signed this model and it is not older than the newest one accepted (then
        it becomes the newest), else FORGED or REPLAYED (logged, rate-limited), or OLD_KEYFRAME."""
        problem = signing.verify(envelope, public_key=self.key) if self.key is not None else signing.UNSIGNED
        if problem is not None:
            signer = signing.fingerprint(envelope.signer) if envelope.signer else "none"
            self.refused(FORGED, f"{problem}, round {envelope.round}, signer {signer}")
            return FORGED
        # Signed rounds and times only go forward: an older signed model resent is a replay. (A new run of
        # the same name starts at round 0 again, but at a later time.)
        if self.newest is not None:
            newest_round, newest_sent_at = self.newest
            if envelope.round < newest_round and envelope.sent_at < newest_sent_at:
                if envelope.kind == "keyframe":
                    return OLD_KEYFRAME
                self.refused(REPLAYED, f"round {envelope.round}, it holds round {newest_round}")
                return REPLAYED
        if self.newest is None or envelope.sent_at >= self.newest[1]:
            self.newest = (envelope.round, envelope.sent_at)
        return None

    def refused(self, reason: str, detail: str) -> None:
        self.unlogged[reason] = self.unlogged.get(reason, 0) + 1
        now = self.clock()
        if now - self.logged_at.get(reason, -LOG_INTERVAL_S) < LOG_INTERVAL_S:
            return
        count, self.unlogged[reason] = self.unlogged[reason], 0
        self.logged_at[reason] = now
        log.warning("device %s refused %d %s model(s) (%s); it keeps its previous model; further ones are "
                    "logged at most once per %.0f s", self.device, count, reason, detail,
                    LOG_INTERVAL_S)  # fmt: skip


class PublishedDigests:
    """The digests of the server's last `capacity` published messages (global, work, keyframe): an
    update counts only when its `trained_on` names one of them."""

    def __init__(self, *, capacity: int, digests: Iterable[bytes] = ()) -> None:
        self.capacity = capacity
        self.order: deque[bytes] = deque()
        self.known: set[bytes] = set()
        for digest in digests:
            self.add(digest)

    @staticmethod
    def capacity_for(*, tau: int, devices: int) -> int:
        """Enough for every message an update may still be bound to: (tau + 2) rounds of one message per
        device (--fakes server), four times over for replays and keyframes."""
        return max(MIN_REMEMBERED, 4 * (tau + 2) * devices)

    def add(self, digest: bytes) -> None:
        if digest in self.known:
            return
        self.order.append(digest)
        self.known.add(digest)
        while len(self.order) > self.capacity:
            self.known.discard(self.order.popleft())

    def judge(self, trained_on: bytes | None) -> admission.Verdict | None:
        """None when the update is bound to a message we published, else a rejection."""
        if trained_on is None:
            return admission.reject(UNBOUND, "the update names no global model it was trained on")
        if trained_on not in self.known:
            return admission.reject(UNKNOWN_GLOBAL, f"trained on {trained_on.hex()[:16]}, never published")
        return None

    def hex(self) -> list[str]:
        """For the checkpoint (plain strings: it is loaded with weights_only)."""
        return [digest.hex() for digest in self.order]


# Why the server refused an update under --device-keys (docs/protocol.md, "Update signatures").
UNSIGNED_UPDATE, NO_DEVICE_KEY = "unsigned-update", "no-device-key"
WRONG_DEVICE_KEY, BAD_UPDATE_SIGNATURE = "wrong-device-key", "bad-update-signature"
SIGNATURE_REASONS = {
    signing.UNSIGNED: UNSIGNED_UPDATE, signing.WRONG_KEY: WRONG_DEVICE_KEY,
    signing.BAD_SIGNATURE: BAD_UPDATE_SIGNATURE,
}  # fmt: skip
# Not the device's word (anyone could publish it on the device's topic): the device still sends its own.
SIGNATURE_FAILURES = frozenset({UNSIGNED_UPDATE, WRONG_DEVICE_KEY, BAD_UPDATE_SIGNATURE})
DEVICE_KEYS_FILE = "device-keys"  # beside the logins' passwords: `edgegan broker add-device` writes it


def parse_device_keys(text: str, *, source: str) -> dict[str, bytes]:
    """`NAME HEX` lines (64 hex digits: an Ed25519 public key), `#` comments and blank lines; ValueError
    naming `source` and the line otherwise."""
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or not re.fullmatch(r"[0-9a-f]{64}", words[1]):
            raise ValueError(f"{source}, line {number}: expected 'DEVICE HEX' with a 64-hex-digit key")
        keys[words[0]] = bytes.fromhex(words[1])
    return keys


def device_keys_text(keys: Mapping[str, bytes]) -> str:
    head = "# Device update-signing keys (`edgegan server --device-keys FILE`): DEVICE PUBLIC-KEY-HEX\n"
    return head + "".join(f"{name} {key.hex()}\n" for name, key in sorted(keys.items()))


class DeviceKeys:
    """The server's (and an aggregator's) side of update signatures: the public key each device signs its
    updates with, so that an update counts only when its own device made it — whoever could publish on
    its topic (the broker, a stolen login)."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self.keys = dict(keys)

    @classmethod
    def load(cls, path: Path) -> DeviceKeys:
        try:
            text = path.read_text()
        except OSError as error:
            raise ValueError(f"--device-keys {path}: {error.strerror or error}") from None
        return cls(parse_device_keys(text, source=f"--device-keys {path}"))

    def judge(self, device: str, envelope: wire.Envelope) -> admission.Verdict | None:
        """None when `device`'s own key signed this update, else a rejection saying why."""
        key = self.keys.get(device)
        if key is None:
            return admission.reject(NO_DEVICE_KEY, f"device {device} has no key in the device keys")
        problem = signing.verify(envelope, public_key=key)
        if problem is None:
            return None
        signer = signing.fingerprint(envelope.signer) if envelope.signer else "none"
        return admission.reject(SIGNATURE_REASONS[problem], f"{problem}: signer {signer}, device {device}")
