"""Lossy links emulated in the application, since the kernel here has no netem.

Where it acts: on a device, on every update it publishes and every global model it receives (a dropped
global is never seen, a dropped update never sent); on the server, on every global model it publishes
(delay, jitter and bandwidth only: a dropped broadcast would drop the round for everyone) and every
update it receives (drop). A delayed message waits in the sender's (or receiver's) event loop, so the
rest of the process keeps running. MQTT itself never sees the loss: its own recovery (QoS 1 redelivery,
reconnects, session resume) is exercised by `edgegan link-proxy` instead, which breaks the byte stream.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class LinkImpairment:
    drop_rate: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_kbps: float = 0.0  # 0: unlimited
    offline_every_s: float = 0.0  # 0: never goes offline
    offline_for_s: float = 0.0

    def __post_init__(self) -> None:
        values = {
            "--drop-rate": self.drop_rate, "--delay-ms": self.delay_ms, "--jitter-ms": self.jitter_ms,
            "--bandwidth-kbps": self.bandwidth_kbps, "--offline-every": self.offline_every_s,
            "--offline-for": self.offline_for_s,
        }  # fmt: skip
        for flag, value in values.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{flag} must be a number >= 0, got {value}")
        if self.drop_rate >= 1:
            raise ValueError(f"--drop-rate must be below 1, got {self.drop_rate}")
        if (self.offline_every_s > 0) != (self.offline_for_s > 0):
            raise ValueError("--offline-every and --offline-for go together")

    @property
    def active(self) -> bool:
        return any((self.drop_rate, self.delay_ms, self.jitter_ms, self.bandwidth_kbps, self.offline_every_s))


class ImpairedLink:
    """Applies a LinkImpairment to messages, with its own seeded random stream (reproducible drops)."""

    def __init__(self, impairment: LinkImpairment, seed: int):
        self.impairment = impairment
        self.random = random.Random(seed)
        self.dropped = 0
        self.delayed_s = 0.0

    def drops(self) -> bool:
        if self.impairment.drop_rate and self.random.random() < self.impairment.drop_rate:
            self.dropped += 1
            return True
        return False

    def delay_s(self, size_bytes: int) -> float:
        impairment = self.impairment
        jitter = (
            self.random.uniform(-impairment.jitter_ms, impairment.jitter_ms) if impairment.jitter_ms else 0.0
        )
        delay = max(0.0, impairment.delay_ms + jitter) / 1000.0
        if impairment.bandwidth_kbps:
            delay += size_bytes * 8 / (impairment.bandwidth_kbps * 1000.0)
        return delay

    async def carry(self, size_bytes: int, can_drop: bool = True) -> bool:
        """Waits out the link's delay; False when the message is lost on the way."""
        if can_drop and self.drops():
            return False
        delay = self.delay_s(size_bytes)
        if delay:
            self.delayed_s += delay
            await asyncio.sleep(delay)
        return True
