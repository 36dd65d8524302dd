"""Whether a run should go on: the one transport-free rule, called after every round by the simulator and
the MQTT server alike. A run whose global weights are non-finite has diverged (a GAN never recovers from
that); a run that rejects more than a set share of its updates is under attack or misconfigured. Either
stops it, with one reason a user can act on, instead of finishing "successfully" on a broken model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_REJECTED_FRACTION = 0.25
REJECTED_FRACTION_FLAG = "--max-rejected-fraction"
# The share is judged only once it means something: a few rounds in, one rejection of a handful of
# arrivals would be 25% on its own.
WARMUP_ROUNDS = 20
WARMUP_ARRIVALS_PER_DEVICE = 4


def check_rejected_fraction(value: float) -> float:
    """--max-rejected-fraction: a share in (0, 1]; 1 never stops a run for its rejections."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{REJECTED_FRACTION_FLAG} must be > 0 and <= 1 (1: never stop), got {value!r}")
    return float(value)


def percent_above(share: float, limit: float) -> str:
    """`share` with as few decimals as show it above `limit` (25.02% is "25.02", not "25")."""
    for decimals in range(4):
        text = f"{math.floor(share * 10**decimals) / 10**decimals:.{decimals}f}"
        if float(text) > limit:
            return text
    return text


@dataclass(frozen=True)
class Failure:
    """Why a run stopped before its last round, and after which round."""

    reason: str
    round: int

    def line(self) -> str:
        return f"run stopped at round {self.round}: {self.reason}"

    def as_dict(self) -> dict:
        return {"reason": self.reason, "round": self.round}


def failure_line(failure: dict) -> str:
    """The one line a command prints for summary.json's `failure`."""
    return Failure(failure["reason"], failure["round"]).line()


@dataclass(frozen=True, kw_only=True)
class RunHealth:
    devices: int
    max_rejected_fraction: float = DEFAULT_MAX_REJECTED_FRACTION

    def __post_init__(self) -> None:
        check_rejected_fraction(self.max_rejected_fraction)

    def judge(self, *, done: int, accepted: int, rejected: int, finite: bool) -> Failure | None:
        """After round `done`: a Failure if the global weights are not `finite`, or if the run's `rejected`
        updates so far pass the allowed share of those judged on their merits (`accepted` + `rejected`;
        late, stale and duplicate ones say nothing of a device's honesty), after the warm-up; None to go
        on."""
        arrivals = accepted + rejected
        if not finite:
            return Failure("the global model diverged (non-finite weights)", done)
        warm = done >= WARMUP_ROUNDS and arrivals >= WARMUP_ARRIVALS_PER_DEVICE * self.devices
        if warm and rejected > self.max_rejected_fraction * arrivals:
            limit = 100 * self.max_rejected_fraction
            share = percent_above(100 * rejected / arrivals, limit)
            return Failure(f"{share}% of updates rejected (> {limit:g}%, {REJECTED_FRACTION_FLAG})", done)
        return None
