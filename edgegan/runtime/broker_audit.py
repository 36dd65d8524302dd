"""The embedded broker's audit lines: refused logins, refused client ids and denied publishes, one line per
(event, login) per interval with a count of the repeats, so that a flood of them can neither fill a disk
nor drown the first line that says what is going on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

AUDIT_INTERVAL_S = 10.0
MAX_TRACKED = 1024  # distinct (event, login) pairs held between flushes; past it, all are flushed


class AuditLog:
    """The first event of a kind from a login is logged at once; repeats within `interval_s` are counted and
    logged as one line when the next one comes after the interval, or at `flush()` (the broker's shutdown)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = AUDIT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self.opened: dict[tuple[str, str], float] = {}  # (event, who) -> when its line was logged
        self.repeats: dict[tuple[str, str], int] = {}

    def note(self, event: str, who: str, detail: str = "") -> None:
        """`detail` (e.g. the topic) goes on the first line only: repeats are counted by (event, who)."""
        key, now = (event, who), self.clock()
        opened = self.opened.get(key)
        if opened is not None and now - opened < self.interval_s:
            self.repeats[key] += 1
            return
        self.summarise(key)
        if len(self.opened) >= MAX_TRACKED:
            self.flush()
        self.logger.warning("%s %s%s", event, who, f" ({detail})" if detail else "")
        self.opened[key], self.repeats[key] = now, 0

    def summarise(self, key: tuple[str, str]) -> None:
        repeats = self.repeats.pop(key, 0)
        opened = self.opened.pop(key, None)
        if repeats and opened is not None:
            event, who = key
            self.logger.warning(
                "%s %s: %d more times in %.0f s", event, who, repeats, max(0.0, self.clock() - opened)
            )

    def flush(self) -> None:
        for key in list(self.opened):
            self.summarise(key)
