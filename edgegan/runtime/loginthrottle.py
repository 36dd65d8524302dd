"""How many wrong logins an address may try: after `max_failures` within `window_s`, every login from it is
refused for `lockout_s` (the embedded broker's; the shipped Mosquitto has no such limit: broker/README.md).
Transport-free, with an injectable clock, so the policy is tested without sockets.

Keyed by the client's IP address, not its username: a guesser tries many names. The price: boards behind
one NAT share an address, so a guesser among them locks them out too, for `lockout_s` at a time (their
sessions stay; they reconnect with their usual backoff once it ends)."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

MAX_FAILURES = 10  # wrong logins from one address within WINDOW_S before it is locked out
WINDOW_S = 60.0
LOCKOUT_S = 60.0
MAX_ADDRESSES = 10_000  # addresses tracked at once; the oldest are forgotten first


class LoginThrottle:
    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        lockout_s: float = LOCKOUT_S,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window_s <= 0 or lockout_s <= 0 or max_addresses < 1:
            raise ValueError("a login throttle needs max_failures >= 1 and positive times and size")
        self.max_failures, self.window_s, self.lockout_s = max_failures, window_s, lockout_s
        self.max_addresses, self.clock = max_addresses, clock
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()  # address -> when its recent ones came
        self.locked_until: dict[str, float] = {}
        self.refused = 0  # logins refused because their address was locked out

    def locked(self, address: str) -> bool:
        """Whether a login from `address` is refused without looking at its password (counted)."""
        until = self.locked_until.get(address)
        if until is None:
            return False
        if self.clock() >= until:
            del self.locked_until[address]
            return False
        self.refused += 1
        return True

    def failed(self, address: str) -> bool:
        """Books a wrong login; True when it locks `address` out."""
        now = self.clock()
        recent = self.failures.pop(address, None) or deque()
        recent.append(now)
        while recent and now - recent[0] > self.window_s:
            recent.popleft()
        if len(recent) >= self.max_failures:
            self.locked_until[address] = now + self.lockout_s
            return True
        self.failures[address] = recent  # most recent last
        while len(self.failures) > self.max_addresses:
            self.failures.popitem(last=False)
        return False

    def succeeded(self, address: str) -> None:
        self.failures.pop(address, None)
