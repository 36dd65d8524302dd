"""One simulated clock for every algorithm: measured compute plus transfer time of the real bytes.

A round is three phases: server work before the devices can start (MD-GAN generating fakes), the devices'
work (download, compute scaled by each device's speed factor, upload) overlapped with any server work that
needs no device result (the parallel schedule's generator step), and server work after the last arrival
(aggregation; the serial schedule's generator step). Devices work concurrently, so a phase costs its
slowest member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LinkProfile:
    """Every device's link to the server. Bandwidths in megabits per second, one-way latency in ms."""

    uplink_mbps: float = 100.0
    downlink_mbps: float = 100.0
    latency_ms: float = 1.0

    def __post_init__(self) -> None:
        if self.uplink_mbps <= 0 or self.downlink_mbps <= 0:
            raise ValueError("link bandwidths must be > 0 Mbps")
        if self.latency_ms < 0:
            raise ValueError("latency must be >= 0 ms")

    def upload_s(self, payload_bytes: int) -> float:
        return transfer_s(payload_bytes, self.uplink_mbps, self.latency_ms)

    def download_s(self, payload_bytes: int) -> float:
        return transfer_s(payload_bytes, self.downlink_mbps, self.latency_ms)


def transfer_s(payload_bytes: int, mbps: float, latency_ms: float) -> float:
    if payload_bytes == 0:
        return 0.0
    return latency_ms / 1000.0 + payload_bytes * 8 / (mbps * 1e6)


@dataclass(kw_only=True)
class RoundTrace:
    """What one round did: measured compute seconds per party and bytes per device and direction."""

    device_compute_s: list[float] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    server_before_s: float = 0.0
    server_overlap_s: float = 0.0
    server_after_s: float = 0.0
    d_loss: float = float("nan")
    g_loss: float = float("nan")
    # Set by a schedule that keeps its own event clock (edgegan/quorum.py): the round's simulated seconds
    # under the link and speeds it was played with, which no other profile can re-cost.
    elapsed_s: float | None = None


def device_phase_s(trace: RoundTrace, speeds: Sequence[float], link: LinkProfile) -> list[float]:
    """Each device's download + scaled compute + upload."""
    return [
        link.download_s(down) + compute / speed + link.upload_s(up)
        for compute, speed, down, up in zip(
            trace.device_compute_s, speeds, trace.bytes_down, trace.bytes_up, strict=True
        )
    ]


def round_time_s(trace: RoundTrace, speeds: Sequence[float], link: LinkProfile) -> float:
    if trace.elapsed_s is not None:
        return trace.elapsed_s
    devices = max(device_phase_s(trace, speeds, link), default=0.0)
    return trace.server_before_s + max(devices, trace.server_overlap_s) + trace.server_after_s


def load_trace(row: dict) -> RoundTrace:
    """A RoundTrace from one line of a run's trace.jsonl."""
    fields = {key: row[key] for key in RoundTrace.__dataclass_fields__ if key in row}
    for loss in ("d_loss", "g_loss"):
        if fields.get(loss) is None:
            fields[loss] = float("nan")
    return RoundTrace(**fields)


def recost(traces: Sequence[RoundTrace], speeds: Sequence[float], link: LinkProfile) -> list[float]:
    """The simulated clock after each round under another link profile or other device speeds (a trace
    played on its own event clock keeps the times it was played with)."""
    clock, times = 0.0, []
    for trace in traces:
        clock += round_time_s(trace, speeds, link)
        times.append(clock)
    return times
