"""What a server is told (`ServerSettings`, validated once, here) and what it counts (`ServerCounters`):
shared by the coordinator (runtime/server.py) and its side of sharded aggregation (runtime/sharded.py)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgegan import topics, wire
from edgegan.algorithms.admission import AUTO, AdmissionRules, Outcome, Verdict, parse_update_bound
from edgegan.algorithms.health import DEFAULT_MAX_REJECTED_FRACTION, check_rejected_fraction
from edgegan.algorithms.proposed import check_fakes
from edgegan.algorithms.staleness import parse_staleness_weight
from edgegan.data import sample_shape
from edgegan.downlink import DEFAULT_KEYFRAME_EVERY, check_keyframe_every
from edgegan.runtime.connection import BrokerAddress
from edgegan.runtime.impairment import LinkImpairment
from edgegan.runtime.runconfig import QUALITY_SOURCES
from edgegan.torchdevice import DEFAULT_TORCH_DEVICE, resolve_torch_device

if TYPE_CHECKING:
    from edgegan.runsetup import RunSetup

SCHEDULES = ("sync", "parallel")
# feature statistics (docs/protocol.md, "Feature statistics")


@dataclass(kw_only=True, frozen=True)
class ServerSettings:
    run: str
    broker: BrokerAddress
    rounds: int
    quorum: int
    deadline_s: float
    min_devices: int
    codec: str = "fp32"
    impairment: LinkImpairment = field(default_factory=LinkImpairment)
    seed: int = 0
    schedule: str = "sync"  # "sync" | "parallel"
    tau: int = 1  # parallel: the stalest base round folded in is round - tau
    staleness_weight: str = "constant"
    aggregators: int = 1  # > 1: aggregator processes sum the updates (runtime/aggregator.py)
    # auto | a length > 0 | 0 (no limit): reject an update whose change from the global D is longer
    max_update_norm: float | str = AUTO
    max_rejected_fraction: float = DEFAULT_MAX_REJECTED_FRACTION  # more rejected than this: the run stops
    checkpoint_every: int = 50  # rounds between checkpoints (also after every evaluation)
    allowed_devices: tuple[str, ...] = ()  # non-empty: updates from any other device name are rejected
    quality_from: str = "data"  # one of QUALITY_SOURCES
    reference: Path | None = None  # quality_from "reference": a public set of images (edgegan/data/local.py)
    torch_device: str = DEFAULT_TORCH_DEVICE  # auto | cpu | cuda: where the global GAN trains
    fakes: str = "device"  # "server": draw each device's fakes, publish D + them per device (topics.work)
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY  # lossy codecs: rounds between whole-model downlinks
    signing_key: Path | None = None  # the key that signs its models (None: RUN_DIR/server-signing.key)
    device_keys: Path | None = None  # each device's update-signing public key; None: updates need none

    def __post_init__(self) -> None:
        topics.check_name("run", self.run)
        check_fakes(self.fakes)
        resolve_torch_device(self.torch_device)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.tau < 0:
            raise ValueError(f"--tau must be >= 0, got {self.tau}")
        parse_staleness_weight(self.staleness_weight)
        if self.quorum < 1:
            raise ValueError(f"--quorum must be >= 1, got {self.quorum}")
        if not 1 <= self.min_devices <= self.quorum:
            raise ValueError(
                f"--min-devices must be between 1 and --quorum ({self.quorum}), got {self.min_devices}"
            )
        if not math.isfinite(self.deadline_s) or self.deadline_s <= 0:
            raise ValueError(f"--deadline-s must be > 0, got {self.deadline_s}")
        wire.check_codec(self.codec)
        check_keyframe_every(self.keyframe_every)
        parse_update_bound(self.max_update_norm)
        check_rejected_fraction(self.max_rejected_fraction)
        for name in self.allowed_devices:
            topics.check_name("device", name)
        if self.quality_from not in QUALITY_SOURCES:
            raise ValueError(
                f"--quality-from must be one of {', '.join(QUALITY_SOURCES)}, got {self.quality_from!r}"
            )
        if (self.quality_from == "reference") != (self.reference is not None):
            raise ValueError(
                "--reference-set PATH goes with --quality-from reference (it is implied when given)"
            )
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.aggregators < 1:
            raise ValueError(f"--aggregators must be >= 1, got {self.aggregators}")
        if self.aggregators > 1 and self.schedule != "sync":
            raise ValueError("--aggregators > 1 works with --schedule sync only")
        if self.aggregators > 1 and self.impairment.drop_rate:
            raise ValueError("--drop-rate on the server needs --aggregators 1 (aggregators get the updates)")

    def check_setup(self, setup: RunSetup) -> None:
        """The rules that tie these settings to the run's set-up (serve and `edgegan run` call it)."""
        if self.aggregators > 1 and setup.train.aggregate != "mean":
            raise ValueError("--aggregators > 1 sums updates in shards: --aggregate mean only")
        if self.aggregators > 1 and setup.train.centrally_private:
            raise ValueError(
                "--central-dp-clip clips and noises in the server's own fold: --aggregators 1 only"
            )
        if self.quality_from != "data" and len(sample_shape(setup.dataset)) != 3:
            raise ValueError(
                f"--quality-from {self.quality_from} needs an image data set; {setup.dataset} is scored "
                "against its known modes, which holds no training data"
            )


@dataclass(kw_only=True)
class ServerCounters:
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # by reason
    late: int = 0
    ignored: int = 0  # messages on topics we did not subscribe to
    duplicates: int = 0
    dropped: int = 0  # lost on the emulated link
    stale: int = 0  # staler than tau, dropped
    staleness: Counter = field(default_factory=Counter)  # staleness -> accepted updates
    by_aggregator: dict[str, Counter] = field(default_factory=dict)  # --aggregators > 1: claims, partials
    by_device: dict[str, Counter] = field(default_factory=dict)  # device -> outcome -> count

    def count(self, device: str | None, outcome: str) -> None:
        self.by_device.setdefault(device or "?", Counter())[outcome] += 1

    def record(self, device: str | None, verdict: Verdict) -> None:
        """Counts an admission verdict (edgegan/algorithms/admission.py) by kind and by device."""
        outcome = verdict.outcome
        if outcome is Outcome.FOLD:
            self.accepted += 1
            self.staleness[verdict.staleness] += 1
        elif outcome is Outcome.LATE:
            self.late += 1
        elif outcome is Outcome.STALE:
            self.stale += 1
        elif outcome is Outcome.DUPLICATE:
            self.duplicates += 1
        else:
            self.rejected[verdict.reason] += 1
        self.count(device, verdict.counted_as)


def admission_rules(
    settings: ServerSettings, *, max_payload_bytes: int = 0, max_samples: int = 0
) -> AdmissionRules:
    """What the server's settings let count (edgegan/algorithms/admission.py), with the limits that come
    from the model and the data set rather than from flags."""
    return AdmissionRules(
        run=settings.run,
        window=settings.tau if settings.schedule == "parallel" else 0,
        allowed_devices=frozenset(settings.allowed_devices),
        max_payload_bytes=max_payload_bytes,
        max_samples=max_samples,
        update_bound=parse_update_bound(settings.max_update_norm),
    )
