"""Busy polling: after an answer, the event loop keeps polling its sockets for a moment instead of sleeping.

A loop client sends its next request a few hundred microseconds after reading an answer. If the
server's event loop has gone to sleep in ``epoll_wait`` by then, the request is picked up by a
CPU that was idle: the wake-up, and then caches, TLB and branch predictors that went cold, cost
the next frame tens of microseconds in every step of its path (measured on the 2-core machine:
a tiny forward on the session stream 232 → 158 µs, over REST 355 → 290 µs, docs/benchmarks.md).
So for ``busy_poll_us`` after each answer to a session frame or an operation request, one task
keeps the loop turning (``await asyncio.sleep(0)``: each turn polls the sockets with a zero
timeout) and the next request is read by a CPU still awake.

The cost is one core spinning for at most that window after each answer, bounded:

- one poller per server, however many connections answer (it keeps the whole loop turning);
- it stops as soon as the backend runs work off the loop (a worker thread's computation, a
  shard's call): spinning would take a core from that work, and those calls are long enough
  that a wake-up is no part of their cost;
- ``busy_poll_us = 0`` turns it off (a server on few cores shared with other work).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class BusyPoll:
    """Keeps the running event loop polling for ``window_s`` after each ``kick``, while ``busy()`` is false."""

    def __init__(self, window_s: float, busy: Callable[[], bool]) -> None:
        self.window_s = window_s
        self.busy = busy
        self._until = 0.0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def kick(self) -> None:
        """An answer went out: poll until the window after it ends (a no-op when polling is off)."""
        if self.window_s <= 0:
            return
        self._until = time.perf_counter() + self.window_s
        if self._task is None:  # started on the first answer, in the loop that serves
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="synapse-busy-poll")
        self._wake.set()

    async def _poll(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while time.perf_counter() < self._until and not self.busy():
                await asyncio.sleep(0)  # one turn of the loop: its sockets polled with a zero timeout

    async def close(self) -> None:
        """Stop polling (at shutdown, before the loop closes)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
