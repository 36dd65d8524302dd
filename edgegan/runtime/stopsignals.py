"""SIGTERM and SIGINT as a request to stop cleanly, for the server and the device processes.

`systemctl stop`, `docker stop` and `edgegan run`'s launcher send SIGTERM; Ctrl-C sends SIGINT. The first
one sets an asyncio event (through the event loop's own signal handler, so nothing runs inside the signal)
and the process winds down: the server saves its checkpoint, generator and summary, a device publishes
"offline". A second one gets the default action back (SIGTERM ends the process, SIGINT raises
KeyboardInterrupt), so that someone who does not want to wait need not reach for SIGKILL.

Exit codes: 128 + the signal's number, as a shell reports a process the signal ended (130 for SIGINT, 143
for SIGTERM). Not 0: a stopped server has not finished its run, and a script that goes on after
`edgegan server && ...` must be able to tell. The systemd units list 130 and 143 in SuccessExitStatus, so
that a deliberate stop does not mark the unit failed (nor restart it under Restart=on-failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator

log = logging.getLogger("edgegan.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """128 + the signal number: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals(on_stop: Callable[[int], None]) -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGINT calls `on_stop(signum)` on the running event loop;
    a second one has the signal's default action."""
    loop = asyncio.get_running_loop()

    def first(signum: int) -> None:
        for each in STOP_SIGNALS:
            loop.remove_signal_handler(each)  # the next one: the default action
        on_stop(signum)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, first, signum)
    try:
        yield
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
