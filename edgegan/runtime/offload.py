"""Where the event-loop processes run CPU work: small jobs inline, large ones in a worker thread.

A hand-off to a worker thread costs two wake-ups (about 0.1 ms on an idle machine, more on a busy one)
and, on a machine with fewer cores than processes, a context switch each. Decoding, validating or folding
a message of a few hundred kilobytes takes less than that hand-off, so it runs on the loop; anything
bigger (an MNIST global model is 2.3 MB), and all training, goes to a thread so that keep-alives and
acknowledgements keep flowing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# About 1 ms of decoding (msgpack, validation, float checks) at this size on a Raspberry Pi 4 class core.
INLINE_MAX_BYTES = 256 * 1024


async def off_loop(size_bytes: int, function: Callable[..., T], /, *args: object) -> T:
    """`function(*args)`, inline when it handles at most INLINE_MAX_BYTES, else in a worker thread."""
    if size_bytes <= INLINE_MAX_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)


def run_with_torch_workers(main: Callable[[], Awaitable[T]]) -> T:
    """`asyncio.run(main())` with a default executor whose threads use the process's torch thread count.

    torch.set_num_threads sets OpenMP's thread count for the calling thread only; a worker thread started
    later would run MKL and oneDNN kernels on every core, and the OpenMP threads it wakes spin between
    kernels. Measured: 32 ring8 device processes on 2 cores went from a fraction of a second to several
    seconds a round that way, and a Raspberry Pi device asked for --threads 2 would use all 4 cores.
    """
    import torch

    threads = torch.get_num_threads()

    async def wrapped() -> T:
        pool = ThreadPoolExecutor(
            thread_name_prefix="edgegan-worker", initializer=torch.set_num_threads, initargs=(threads,)
        )
        asyncio.get_running_loop().set_default_executor(pool)
        return await main()

    return asyncio.run(wrapped())
