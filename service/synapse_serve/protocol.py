"""uvicorn's HTTP protocol (httptools) with bounds on a request's head: its size, and the time it may take.

uvicorn bounds neither with httptools (its maintainers: the parser's limit cannot be set). A red-team run sent one
64 MiB header without a token: the head was joined a read at a time on the event loop, ~4 s with every connection
waiting (the cost grows with the square of the size); and a connection that sent part of a head, or nothing, was
never closed (520 of them took a server's descriptors). A head is refused once it passes ``MAX_HEAD_BYTES`` (431),
and closed when it has not arrived within the server's ``head_timeout_s`` (408). uvicorn's own refusals (a request
that is no HTTP) carry ``nosniff`` here too. And an answer its client stops reading for the body idle timeout is cut:
an answer waiting on a full socket waited for good, holding its memory.

Connections are bounded in number too: each holds a file descriptor, and a flood of them (each closed only once its
head timeout has passed) would take the descriptors the state directory needs to write what a call acknowledges.
One over ``max_connections`` is answered 503 and closed at once; by default the bound leaves a quarter of the
process's descriptor limit free, and the server raises that limit to the most the system allows at start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 << 10  # a request line and headers; a token is ~100 bytes, a browser's head ~1-2 KiB
DESCRIPTORS_KEPT = 128  # at least, out of the process's limit, never taken by connections
REFUSALS_LOGGED_EVERY_S = 10.0  # a flood of connections is one warning a while, not a line each

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}
log = logging.getLogger("synapse_serve.protocol")


class BoundedHeadProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol``, with each request's head bounded in bytes and in time (``protocol_for`` sets the time)."""

    head_timeout_s: float = 10.0
    unread_s: float = 30.0
    max_connections: int = 1 << 20
    _refused_since_log, _logged_at = 0, 0.0  # connections refused over the bound (class-wide: one server)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counted among the server's connections (session streams are too)
        self._head_bytes, self._in_head, self._head_timer, self._unread_timer = 0, True, None, None
        if len(self.connections) > self.max_connections:
            self._too_many()
            return
        self._time_head()  # a connection that sends nothing is closed too

    def _too_many(self) -> None:
        cls = type(self)
        cls._refused_since_log += 1
        now = time.monotonic()
        if now - cls._logged_at >= REFUSALS_LOGGED_EVERY_S:
            log.warning("%d connections refused: %d open, at most %d (SYNAPSE_MAX_CONNECTIONS)",
                        cls._refused_since_log, len(self.connections) - 1, self.max_connections)
            cls._refused_since_log, cls._logged_at = 0, now
        self._refuse(503, f"the server has {self.max_connections} connections open, its most; try again shortly",
                     retry_after=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        self._read_again()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client stopped reading the answer (the socket's buffer is full): it has ``unread_s`` to read on, or the
        connection is cut — an answer waiting for a reader that never comes holds its memory for good."""
        super().pause_writing()
        if self._unread_timer is None:
            self._unread_timer = self.loop.call_later(self.unread_s, self._never_read)

    def resume_writing(self) -> None:
        self._read_again()
        super().resume_writing()

    def _read_again(self) -> None:
        if self._unread_timer is not None:
            self._unread_timer.cancel()
            self._unread_timer = None

    def _never_read(self) -> None:
        self._unread_timer = None
        if not self.transport.is_closing() or self.transport.get_write_buffer_size():
            self.transport.abort()  # close() would wait for the buffer to be read first

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)  # this read may hold the body's first bytes too: only checked if not done
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(431, f"a request's line and headers are at most {MAX_HEAD_BYTES} bytes")

    def on_message_begin(self) -> None:  # a request's first byte: its head starts (again, on a kept-alive connection)
        super().on_message_begin()
        self._head_bytes, self._in_head = 0, True
        self._time_head()

    def on_headers_complete(self) -> None:
        self._head_done()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    def _time_head(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _head_done(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head behind an answer still
            self._time_head()  # being made: timed again, never closing the connection under that answer
            return
        self._refuse(408, f"the request's line and headers did not arrive within {self.head_timeout_s:g} s")

    def _refuse(self, status: int, message: str, retry_after: bool = False) -> None:
        """Answer ``status`` in plain text and close; while an earlier request's answer is being sent, only close."""
        self._head_done()
        if self.cycle is None or self.cycle.response_complete:
            body = message.encode("ascii", "replace")
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"retry-after: 1\r\n"] if retry_after else []
            head += [b"content-type: text/plain; charset=utf-8\r\n", b"x-content-type-options: nosniff\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
        self.transport.close()


def protocol_for(head_timeout_s: float, unread_s: float, max_connections: int) -> type[BoundedHeadProtocol]:
    """The protocol class for a server whose heads must arrive within ``head_timeout_s``, whose answers may wait
    unread at most ``unread_s`` and which keeps at most ``max_connections`` open (uvicorn takes a class)."""
    attributes: dict[str, Any] = {"head_timeout_s": head_timeout_s, "unread_s": unread_s,
                                  "max_connections": max_connections}
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), attributes)


def connection_bound(setting: int, descriptors: int | None) -> int:
    """The most connections a server keeps open: the setting, or (0) the descriptor limit less what is kept free."""
    if setting:
        return setting
    if descriptors is None:  # no limit known (not POSIX): nothing to keep free of
        return 1 << 20
    return max(16, descriptors - max(DESCRIPTORS_KEPT, descriptors // 4))


def descriptor_limit(raise_to_most: bool = False) -> int | None:
    """The process's descriptor limit (RLIMIT_NOFILE's soft one), first raised as far as the system allows if asked
    (the server's process does: a soft limit of 1,024 is common where the hard one is far higher); None if unknown."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if raise_to_most and soft != unlimited and (hard == unlimited or hard > soft):
        for wanted in ((hard,) if hard != unlimited else ()) + (1 << 20, 10240):  # macOS refuses above OPEN_MAX
            if wanted > soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                except (ValueError, OSError):
                    continue
                soft = wanted
                break
    return None if soft == unlimited else soft
