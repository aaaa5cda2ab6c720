"""Fair shares of threads: how many of one caller's pieces of work may hold threads at once.

Used on the event loop's thread. The local backend shares its worker threads this way (per instance and per
owner); the API shares the threads that write and read large JSON texts and draw pictures (per caller), so that
one caller's queue of such work never holds every thread while another caller's waits behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Slots:
    """At most ``size`` holders per key at once; the others wait on the event loop (a coroutine each, no thread).
    Used on the loop's thread; a key's entry is kept only while it is used (owners and instances come and go)."""

    def __init__(self, size: int) -> None:
        self.size = size
        # key -> (its slots, [calls holding or waiting for one, calls waiting])
        self._slots: dict[Any, tuple[asyncio.Semaphore, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def held(self, key: Any) -> AsyncIterator[None]:
        entry = self._slots.get(key)
        if entry is None:
            entry = self._slots[key] = (asyncio.Semaphore(self.size), [0, 0])
        counts = entry[1]
        counts[0] += 1
        try:
            counts[1] += 1
            try:
                await entry[0].acquire()
            finally:
                counts[1] -= 1
            try:
                yield
            finally:
                entry[0].release()
        finally:
            counts[0] -= 1
            if not counts[0]:
                del self._slots[key]

    def waiting(self) -> dict[Any, int]:
        """The calls waiting for a slot now, by key (keys with none left out)."""
        return {key: counts[1] for key, (_, counts) in self._slots.items() if counts[1]}


class SharedThreads:
    """A few threads of their own for CPU work the API does around calls (JSON texts of tensors, pictures), each
    caller holding at most a quarter of them at once: a caller's many large answers queue on the loop, not on the
    threads, and another caller's start at once. Threads start as work comes (none in a process that has none)."""

    def __init__(self, threads: int | None = None, per_caller: int | None = None) -> None:
        threads = threads or min(32, (os.cpu_count() or 1) + 4)  # asyncio's own default pool size
        self.per_caller = per_caller or max(1, threads // 4)
        self.shares = Slots(self.per_caller)
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="synapse-api")

    async def run(self, caller: Any, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on one of the threads once ``caller`` has a slot free."""
        async with self.shares.held(caller):
            return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
