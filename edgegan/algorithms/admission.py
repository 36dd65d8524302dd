"""Whether an arrival counts: the one transport-free policy of every party that folds discriminators in
(the simulator's runners, the MQTT server, and the server's side of sharded aggregation).

An arrival is judged in the order its facts become known, so that nothing is decoded or rebased that a
cheaper fact already refuses: by its sender and size before decoding (`screen`), by its envelope once
decoded (`check_envelope`), by its round against the server's open round (`judge`), and by the change it
would make to the global discriminator once rebased onto it (`judge_change`, or `judge_rebased` from the
states). Each returns a `Verdict`, a value: the caller counts it and folds the update only when it says
so. Transport (topics, emulated links, worker threads) stays with the caller. When a round may close
despite missing updates is `round_closes`; whose rejected updates count as reports there, `Reporters`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Container, Hashable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch

from edgegan.algorithms.aggregation import state_norm, update_norm

FUTURE_ROUND = "future-round"  # trained on a model of a later round than the open one (after a resume)


class Outcome(Enum):
    FOLD = "fold"  # counts: folded into this round's discriminator
    LATE = "late"  # sync: trained on an earlier round's model, or came after the round closed
    STALE = "stale"  # parallel: staler than tau, or its base model is no longer held for rebasing
    DUPLICATE = "duplicate"  # a second update of one device within a round (a resend)
    REPLAY = "replay"  # an update already folded into an earlier round, sent again
    REJECT = "reject"  # malformed, unknown, oversized, inflated, non-finite or too large a change


# How each outcome is counted per device (summary.json's updates_by_device, `edgegan status`). A fold is
# counted "accepted" by whoever closes the round; a replay is one of the rejections, by reason.
COUNTED_AS = {
    Outcome.FOLD: "accepted",
    Outcome.LATE: "late",
    Outcome.STALE: "stale",
    Outcome.DUPLICATE: "duplicate",
    Outcome.REPLAY: "rejected",
    Outcome.REJECT: "rejected",
}


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    staleness: int = 0  # rounds between the model it trained on and the open round
    reason: str = ""  # rejections and replays: a short stable label, counted by label
    detail: str = ""  # for the log line

    @property
    def folds(self) -> bool:
        return self.outcome is Outcome.FOLD

    @property
    def counted_as(self) -> str:
        return COUNTED_AS[self.outcome]


def reject(reason: str, detail: str = "") -> Verdict:
    return Verdict(Outcome.REJECT, reason=reason, detail=detail)


AUTO = "auto"
# auto: an honest update moves D by a small fraction of its own length (local SGD steps from it); a change
# longer than twice D itself replaces the model rather than training it (a x100 update is ~99x).
AUTO_FACTOR = 2.0
UPDATE_BOUND_FLAG = "--max-update-norm"


@dataclass(frozen=True, kw_only=True)
class UpdateBound:
    """How long (L2) an update's change from the global discriminator may be: a fixed length, a multiple
    of the global discriminator's own length (`auto`), or unbounded (both 0)."""

    fixed: float = 0.0
    relative: float = 0.0

    @property
    def unbounded(self) -> bool:
        return not (self.fixed or self.relative)

    def limit(self, global_length: float) -> float:
        """The longest change accepted from a global discriminator `global_length` long."""
        if self.fixed:
            return self.fixed
        return self.relative * global_length if self.relative else math.inf

    def describe(self) -> str:
        if self.fixed:
            return f"{self.fixed:g}"
        return f"{AUTO} ({self.relative:g} x |D|)" if self.relative else "0 (unbounded)"


UNBOUNDED = UpdateBound()


def parse_update_bound(value: str | float) -> UpdateBound:
    """--max-update-norm (a flag, a config file's value or a settings field): "auto", a length > 0, or 0
    for none; anything else is a ValueError naming the flag. The one place that reads it."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return UpdateBound(relative=AUTO_FACTOR)
    try:
        length = float(value)
    except (TypeError, ValueError):
        length = math.nan
    if isinstance(value, bool) or not math.isfinite(length) or length < 0:
        raise ValueError(f"{UPDATE_BOUND_FLAG} must be auto, a number > 0 or 0 (no limit), got {value!r}")
    return UpdateBound(fixed=length)


@dataclass(frozen=True, kw_only=True)
class AdmissionRules:
    """What a run lets count; fixed for the run."""

    run: str
    window: int = 0  # the stalest base round folded in is round - window (parallel: tau; sync: 0)
    allowed_devices: Collection[str] = ()  # non-empty: any other sender is rejected
    max_payload_bytes: int = 0  # > 0: larger payloads are rejected before decoding
    max_samples: int = 0  # > 0: no device holds more examples than the whole data set
    update_bound: UpdateBound = UNBOUNDED  # a longer change from the global discriminator is rejected


@dataclass(frozen=True, kw_only=True)
class OpenRound:
    """The server's state an arrival is judged against."""

    index: int
    arrived: Container[Hashable] = ()  # devices already folded in this round
    last_counted: Mapping[Hashable, int] = field(default_factory=dict)  # device -> base round last counted
    held_bases: Container[int] = ()  # base rounds whose published discriminator is held for rebasing
    closed: bool = False  # the quorum has closed the round: nothing more joins it


class EnvelopeFields(Protocol):
    """The fields of a decoded message the policy reads (wire.Envelope has them)."""

    kind: str
    run: str
    device: str
    base_round: int
    samples: int


def screen(rules: AdmissionRules, *, device: str | None, payload_bytes: int = 0) -> Verdict | None:
    """Before decoding: a rejection by who sent it and how large it is, or None. A flood of unknown or
    huge payloads then costs no decompression or parsing."""
    if device is None:
        return reject("bad-field", "no valid device name")
    if rules.allowed_devices and device not in rules.allowed_devices:
        return reject("unknown-device", "not in --allow-devices")
    if rules.max_payload_bytes and payload_bytes > rules.max_payload_bytes:
        return reject("oversized", f"{payload_bytes} bytes > {rules.max_payload_bytes}")
    return None


ARTICLES = {"update": "an", "partial": "a"}


def check_envelope(
    rules: AdmissionRules, envelope: EnvelopeFields, *, kind: str, sender: str | None
) -> Verdict | None:
    """A rejection of a decoded message that is not what its topic promises, or None: its kind, run and
    sender must be the topic's, and an update must carry a believable sample count (weights are sample
    counts: an inflated one would buy a device the whole mean)."""
    if envelope.kind != kind:
        return reject("bad-kind", f"{envelope.kind} on {ARTICLES.get(kind, 'a')} {kind} topic")
    if envelope.run != rules.run:
        return reject("wrong-run", envelope.run)
    if envelope.device != sender:
        return reject("device-mismatch", f"{envelope.device} published on {sender}'s topic")
    if kind == "update":
        if envelope.samples < 1:
            return reject("bad-field", "an update must carry at least one sample")
        if rules.max_samples and envelope.samples > rules.max_samples:
            detail = f"{envelope.samples} samples, more than the data set's {rules.max_samples}"
            return reject("bad-field", detail)
    return None


def judge(rules: AdmissionRules, open_round: OpenRound, *, device: Hashable, base_round: int) -> Verdict:
    """An update trained on round `base_round`'s model, arriving while `open_round` collects."""
    staleness = open_round.index - base_round
    if staleness < 0:
        return reject(FUTURE_ROUND, f"base round {base_round}")
    if staleness > rules.window:
        outcome = Outcome.STALE if rules.window else Outcome.LATE
        return Verdict(outcome, staleness, detail=f"trained on round {base_round}, beyond the window")
    if device in open_round.arrived:
        return Verdict(Outcome.DUPLICATE, staleness)
    if open_round.closed:
        return Verdict(Outcome.LATE, staleness)
    if base_round <= open_round.last_counted.get(device, -1):
        # Folded into an earlier round already: a resend that lagged, or a replay.
        return Verdict(Outcome.REPLAY, staleness, "replay", f"base round {base_round} was counted")
    if staleness and base_round not in open_round.held_bases:
        return Verdict(Outcome.STALE, staleness)  # its base model is gone (the server restarted since)
    return Verdict(Outcome.FOLD, staleness)


def judge_change(
    rules: AdmissionRules, length: float, staleness: int = 0, *, global_length: float = math.nan
) -> Verdict:
    """An update by the length (L2) of its change from the global discriminator, once rebased onto it;
    `global_length` is the global discriminator's own (what the auto bound is relative to)."""
    if not math.isfinite(length):
        return reject("non-finite", "its change from the global model overflows")
    limit = rules.update_bound.limit(global_length)
    if length > limit or math.isnan(limit):
        detail = f"change {length:.3g} > {limit:.3g}, {UPDATE_BOUND_FLAG} {rules.update_bound.describe()}"
        return reject("norm", detail)
    return Verdict(Outcome.FOLD, staleness)


State = Mapping[str, torch.Tensor]


def judge_rebased(rules: AdmissionRules, state: State, current: State, staleness: int = 0) -> Verdict:
    """`judge_change` from the states: an update rebased onto the global discriminator `current`."""
    global_length = state_norm(current) if rules.update_bound.relative else math.nan
    return judge_change(rules, update_norm(state, current), staleness, global_length=global_length)


def round_closes(
    *, accepted: int, rejected: int, quorum: int, fleet: int, min_devices: int, at_deadline: bool
) -> bool:
    """Whether a round may close with `accepted` updates folded and `rejected` more devices whose update
    for it was rejected: once `quorum` were accepted; once the whole `fleet` has reported, rejected ones
    included (they will not send again); or at the deadline with `min_devices` reports. So a round whose
    every update is refused closes (and folds nothing) instead of waiting for updates that never come,
    while a device sending rejected updates cannot close a round before the rest of the fleet reported."""
    reported = accepted + rejected
    return accepted >= quorum or reported >= max(fleet, quorum) or (at_deadline and reported >= min_devices)


class Reporters:
    """Which devices' rejected updates count as reports for `round_closes`: an allowed name's; or, with no
    allow-list, that of a name with an update accepted in this run, or of any name seen in an earlier round
    while no more names than the fleet's size have sent updates. Otherwise a client of an open broker could
    send junk under a new name and close a round before the honest devices' updates arrived: a name new in
    this round may be the stranger whose first junk beat a fleet device's first update. A rejection whose
    device will send again (`sends_again` reasons: a later round's update, or one trained on a model from
    before a resume) is no report either. At most fleet + 1 names are kept."""

    def __init__(self, *, fleet: int, allowed: Collection[str] = (), sends_again: Collection[str] = ()):
        self.fleet = fleet
        self.allowed = frozenset(allowed)
        self.sends_again = frozenset(sends_again) | {FUTURE_ROUND}
        self.first_seen: dict[str, int] = {}  # name -> the round its first update arrived in
        self.accepted: set[str] = set()

    def sent(self, device: str, round_index: int) -> None:
        """An update from `device` passed `screen` while round `round_index` was open."""
        if len(self.first_seen) <= self.fleet:  # names beyond the fleet's size: enough to know
            self.first_seen.setdefault(device, round_index)

    def folded(self, device: str) -> None:
        if len(self.accepted) <= self.fleet:
            self.accepted.add(device)

    def counts(self, device: str, round_index: int, reason: str | None) -> bool:
        """Whether `device`'s rejected update (for `reason`) in round `round_index` counts as its report."""
        if reason in self.sends_again:
            return False
        if self.allowed:
            return device in self.allowed
        if device in self.accepted:
            return True
        first = self.first_seen.get(device, round_index)
        return len(self.first_seen) <= self.fleet and first < round_index
