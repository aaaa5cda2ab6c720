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
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from synapse_client._codec import TooManyValues, WireError, pack_held, unpack_held
from synapse_serve.api.bodies import too_many_values
from synapse_serve.api.frames import problem_of, run_frame
from synapse_serve.api.server import Server
from synapse_serve.auth import LOCAL
from synapse_serve.errors import BodyTooLarge, MalformedBody, SynapseServeError
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
        sent, refused = self._as_sent(frame, request_id)
        return refused or _complete(run_frame(self.server, LOCAL, sent, request_id))

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
        sent, refused = self._as_sent(frame, request_id)
        return refused or await run_frame(self.server, LOCAL, sent, request_id)

    def _as_sent(self, frame: dict[str, Any], request_id: str) -> tuple[Any, dict[str, Any] | None]:
        """The frame as a server would receive it, or the answer it would give instead.

        The caller's arrays stay where they are, but every other value goes through msgpack as over the wire
        (``pack_held``): numpy scalars become numbers, map keys must be strings, an int the wire cannot carry
        is the WireError the wire client raises. Then the limits a server's decoder applies: the body's size
        (a 413; the bytes sent but for the arrays' msgpack headers) and each tensor's elements (a 400)."""
        settings = self.server.settings
        body, held = pack_held(frame)
        size = len(body) + sum(int(getattr(array, "nbytes", 0)) for array in held)
        if size > settings.max_body_bytes:
            return None, _refused(BodyTooLarge(f"body of {size} bytes is over the limit of {settings.max_body_bytes} "
                                               "bytes"), request_id)
        limit = settings.max_tensor_elements
        for array in held:
            if array.size > limit:
                return None, _refused(MalformedBody(f"shape {list(array.shape)} declares {array.size} elements; the "
                                                    f"limit is {limit}"), request_id)
        try:
            return unpack_held(body, held, limit, settings.max_body_values), None
        except TooManyValues as exc:
            return None, _refused(too_many_values(exc, settings.max_body_values), request_id)
        except WireError as exc:
            return None, _refused(MalformedBody(str(exc)), request_id)

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
            self.server.threads.close()
            if self._temporary is not None:
                self._temporary.cleanup()


def _close_now(backend: Any, temporary: tempfile.TemporaryDirectory | None) -> None:
    _complete(backend.close())
    if temporary is not None:
        temporary.cleanup()


def _refused(error: SynapseServeError, request_id: str) -> dict[str, Any]:
    return {"status": error.status, "problem": problem_of(error, request_id)}


def _complete(coroutine: Coroutine) -> Any:
    """Run a coroutine that never suspends (the backend in the caller's thread) to its result."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("an in-process call waited for an event loop; the engine runs every call in the caller's "
                       "thread (a bug: please report it)")
