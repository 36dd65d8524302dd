"""What a server learns of its devices besides their updates: the status each publishes (a device that
cannot use the run's global model says so there, with the field, and the server says it in its log and
summary) and how long each takes to answer a global model (the slowest device's share of a round, in the
server's evaluation line). Transport-free: the server hands it topics, payloads and times.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

from edgegan import topics, wire

log = logging.getLogger("edgegan.server")

KEPT_ROUNDS = 256  # publish times kept for answers to older rounds (parallel schedule: at most tau back)


class DeviceReports:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.incompatible: dict[str, str] = {}  # device -> the field it named, while it says so
        self.ever_incompatible: dict[str, str] = {}  # for the summary: the last field each device named
        self.unreadable = 0  # status messages that were not a status
        self.published_at: dict[int, float] = {}
        self.answers: dict[str, list[float]] = defaultdict(list)  # since the last evaluation, seconds
        self.rounds: list[float] = []  # round durations since the last evaluation, seconds
        # device -> its random stream (partition index, or the number its agent chose), from its "online"
        # status: whom a server that draws the fakes (--fakes server) serves, and with which noise.
        self.streams: dict[str, int] = {}
        self.refused: dict[str, int] = {}  # device -> the forged or replayed models it says it refused
        # DP-SGD (docs/privacy.md): each private device's epsilon as it last said, and the devices that said
        # their budget is spent (they send no more updates, so a round does not wait for them).
        self.epsilons: dict[str, float | None] = {}
        self.budget_spent: set[str] = set()

    def status(self, topic: str, payload: bytes) -> str | None:
        """Takes a status in; returns the device's name when it refused a forged or replayed model since its
        last one (the server then republishes its own: runtime/trust.py)."""
        device = topics.device_of(topic)
        if device is None or not payload:  # an empty retained message clears a status: nothing to say
            return None
        try:
            fields = wire.decode_status(payload)
        except wire.WireError:
            self.unreadable += 1
            return None
        counts = [fields.get(name, 0) for name in ("forged", "replayed")]
        counted = all(isinstance(count, int) and not isinstance(count, bool) for count in counts)
        refused = counted and sum(counts) > self.refused.get(device, 0)
        if counted:
            self.refused[device] = sum(counts)
        if fields["state"] == "incompatible":
            field = str(fields.get("field", "?"))
            if self.incompatible.get(device) != field:
                log.warning("device %s cannot take part: %s", device, fields.get("detail", field))
            self.incompatible[device] = self.ever_incompatible[device] = field
        elif fields["state"] == "online" and self.incompatible.pop(device, None) is not None:
            log.info("device %s takes part again", device)
        self.privacy(device, fields)
        stream = fields.get("stream")
        if fields["state"] == "online" and isinstance(stream, int) and not isinstance(stream, bool):
            self.streams[device] = stream
        elif fields["state"] != "online":
            self.streams.pop(device, None)
        return device if refused else None

    def privacy(self, device: str, fields: dict) -> None:
        """A private device's epsilon (None: infinite, no noise) and whether its budget is spent."""
        if "epsilon" not in fields:
            return
        epsilon = fields["epsilon"]
        number = isinstance(epsilon, int | float) and not isinstance(epsilon, bool)
        self.epsilons[device] = float(epsilon) if number else None
        if fields.get("privacy") == "budget-spent" and device not in self.budget_spent:
            log.info("device %s has spent its privacy budget and sends no more updates", device)
            self.budget_spent.add(device)

    def expected_arrivals(self, quorum: int) -> int:
        """The arrivals that close a round: `quorum`, less the devices whose privacy budget is spent (at
        least one, so a round never closes empty)."""
        return max(1, quorum - len(self.budget_spent))

    def published(self, round_index: int) -> None:
        self.published_at[round_index] = self.clock()
        self.published_at.pop(round_index - KEPT_ROUNDS, None)

    def answered(self, device: str, base_round: int) -> None:
        """`device`'s update, trained on the global model of `base_round`, has arrived."""
        sent = self.published_at.get(base_round)
        if sent is not None:
            self.answers[device].append(self.clock() - sent)

    def round_took(self, seconds: float) -> None:
        self.rounds.append(seconds)

    def slowest(self) -> str:
        """The slowest device since the last call, and its median answer's share of the median round
        (an empty string before any answer); starts a new window."""
        answers, rounds = self.answers, self.rounds
        self.answers, self.rounds = defaultdict(list), []
        if not answers or not rounds:
            return ""
        medians = {device: statistics.median(times) for device, times in answers.items()}
        device = max(medians, key=medians.get)
        round_s = statistics.median(rounds)
        share = medians[device] / round_s if round_s > 0 else 0.0
        return (f"slowest device {device}: {medians[device]:.2f} s per update, {share:.0%} of a "
                f"{round_s:.2f} s round")  # fmt: skip
