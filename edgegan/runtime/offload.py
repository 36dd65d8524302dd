"""Where the event-loop processes run CPU work: small jobs inline, large ones in a worker thread.

A hand-off to a worker thread costs two wake-ups (about 0.1 ms on an idle machine, more on a busy one)
and, on a machine with fewer cores than processes, a context switch each. Decoding, validating or folding
a message of a few hundred kilobytes takes less than that hand-off, so it runs on the loop; anything
bigger (an MNIST global model is 2.3 MB), and all training, goes to a thread so that keep-alives and
acknowledgements keep flowing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# About 1 ms of decoding (msgpack, validation, float checks) at this size on a Raspberry Pi 4 class core.
INLINE_MAX_BYTES = 256 * 1024


async def off_loop(size_bytes: int, function: Callable[..., T], /, *args: object) -> T:
    """`function(*args)`, inline when it handles at most INLINE_MAX_BYTES, else in a worker thread."""
    if size_bytes <= INLINE_MAX_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)
