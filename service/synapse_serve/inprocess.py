"""The engine in the caller's process: what ``SynapseClient("local")`` talks to, with no HTTP.

Not a second implementation: the server's own backend (``LocalBackend``), and each request a
client handle makes run as a frame by ``api/frames.run_frame``, the dispatcher the session stream
uses, so checks, errors, limits and numbers are the server's. The caller is the local admin (it
is the caller's own process: no tokens).

For the blocking client the backend runs every call in the caller's thread (``in_caller_thread``),
and its coroutines complete without suspending, so ``run`` steps them directly: no event loop,
no thread hop (it also works inside a notebook, whose loop is left alone). The asyncio client
awaits them on its own loop (``arun``): long calls go to worker threads, as in the server.

Without a state directory the engine keeps instances in memory only (durability off, in a
temporary directory removed at ``close``); with one, it is a server's state directory (locked:
a server and an engine cannot share it), written as the durability setting says.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import weakref
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

from synapse_serve.api.frames import problem_of, run_frame
from synapse_serve.api.server import Server
from synapse_serve.auth import LOCAL
from synapse_serve.errors import MalformedBody
from synapse_serve.settings import Settings


class Engine:
    """Named instances in this process, reached by frames (``run`` blocking, ``arun`` for asyncio)."""

    def __init__(self, state_dir: str | Path | None = None, *, in_caller_thread: bool = True,
                 **settings: Any) -> None:
        from synapse_serve.local.backend import LocalBackend  # JAX is imported here

        self._temporary = None
        if state_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="synapse-local-")
            state_dir = self._temporary.name
            settings.setdefault("durability", "off")
            # memory-only because nothing asked for a directory, not because the caller chose durability=off: the
            # learning-curve history is kept as a server keeps it (a sample costs ~40 µs an evolve; history_length=0
            # keeps none)
            settings.setdefault("history_when_durability_off", True)
        # the caller's process: no warm-up compile; JAX's compilation cache, Python's GC and the C heap left as the
        # caller set them
        settings.setdefault("warmup", False)
        settings.setdefault("compilation_cache", False)
        settings.setdefault("gc_freeze", False)
        settings.setdefault("trim_when_idle", False)
        self.settings = Settings(state_dir=Path(state_dir), auth="off", **settings)
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.backend = LocalBackend(self.settings, in_caller_thread=in_caller_thread)
        # no metrics: nothing in the caller's process could scrape them, and counting costs each call a few µs
        self.server = Server(settings=self.settings, backend=self.backend, tokens=None, metrics=None)
        self._ids = itertools.count(1)
        self._started = False
        self._closed = False
        self._start_lock: asyncio.Lock | None = None
        if in_caller_thread:
            _complete(self.backend.start())  # StateDirLocked if a server (or another engine) holds the directory
            self._started = True
            self._finalizer = weakref.finalize(self, _close_now, self.backend, self._temporary)  # also at exit
            _complete(self._get_ready())

    async def _get_ready(self) -> None:
        await self.backend.get_ready(self.server.set_phase)
        self.server.set_phase("ready")
        self.server.ready.set()

    def run(self, frame: dict[str, Any]) -> dict[str, Any]:
        """A frame's answer, computed in this thread (blocking engines only)."""
        if self._closed:
            raise RuntimeError("this in-process engine is closed")
        request_id = f"local:{next(self._ids)}"
        refused = self._oversized(frame, request_id)
        return refused or _complete(run_frame(self.server, LOCAL, frame, request_id))

    async def arun(self, frame: dict[str, Any]) -> dict[str, Any]:
        """A frame's answer, awaited on the running loop (asyncio engines; started on first use)."""
        if self._closed:
            raise RuntimeError("this in-process engine is closed")
        if not self._started:
            self._start_lock = self._start_lock or asyncio.Lock()
            async with self._start_lock:
                if not self._started:
                    await self.backend.start()
                    self._started = True
                    await self._get_ready()
        request_id = f"local:{next(self._ids)}"
        return self._oversized(frame, request_id) or await run_frame(self.server, LOCAL, frame, request_id)

    def _oversized(self, frame: dict[str, Any], request_id: str) -> dict[str, Any] | None:
        """The 400 answer REST and the stream give a tensor over max_tensor_elements (their decoders refuse it; here
        the caller's arrays arrive as they are), or None."""
        limit = self.server.settings.max_tensor_elements
        for array in _arrays(frame):
            if array.size > limit:
                error = MalformedBody(f"shape {list(array.shape)} declares {array.size} elements; the limit is {limit}")
                return {"status": error.status, "problem": problem_of(error, request_id)}
        return None

    @property
    def ready(self) -> bool:
        return self.server.ready.is_set()

    def close(self) -> None:
        """Write what changed (as the durability setting says), release the state directory."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._started:
                await self.backend.close()
            if self._temporary is not None:
                self._temporary.cleanup()


def _close_now(backend: Any, temporary: tempfile.TemporaryDirectory | None) -> None:
    _complete(backend.close())
    if temporary is not None:
        temporary.cleanup()


def _arrays(value: Any, depth: int = 0) -> Iterator[Any]:
    """Every array in a frame (its tensors, a packed call's, a write's value); frames nest a few levels at most."""
    if isinstance(value, str):  # names: the most common item of a packed call's lists
        return
    if hasattr(value, "shape") and hasattr(value, "size"):
        yield value
    elif depth < 8 and isinstance(value, dict):
        for item in value.values():
            yield from _arrays(item, depth + 1)
    elif depth < 8 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _arrays(item, depth + 1)


def _complete(coroutine: Coroutine) -> Any:
    """Run a coroutine that never suspends (the backend in the caller's thread) to its result."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("an in-process call waited for an event loop; the engine runs every call in the caller's "
                       "thread (a bug: please report it)")
