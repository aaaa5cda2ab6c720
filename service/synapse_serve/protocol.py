"""uvicorn's HTTP protocol (httptools) with every part of a connection bounded: a request's head, its trailer fields,
the rest of a body no route reads, the requests read ahead of an answer, the bytes between requests, the connections.

uvicorn bounds none of them with httptools (its maintainers: the parser's limit cannot be set). Red-team runs found
each one a way in, no token needed: one 64 MiB header (or trailer field, after a chunked body) was joined a read at a
time on the event loop, ~4 s with every connection waiting (the cost grows with the square of its size), and 200 MiB
of short trailer fields grew a server by 850 MB; one connection sending tiny requests without pause grew one by 2.4 GB
in 20 s (each answer let another read of ~7,500 requests be parsed and queued); and connections that sent part of a
head, nothing, a bare line break now and then between requests, or a declared body a byte at a time after their
route had answered, were never closed (hundreds of them took a server's descriptors).

So: a head (request line and fields, and the trailer fields after a chunked body) is at most ``MAX_HEAD_BYTES``
(431, as it arrives); it must arrive within the server's ``head_timeout_s`` from its first byte, a line break
between requests included (408); the rest of a request's body within ``body_timeout_s`` of its head, pausing at most
``unread_s`` (the body idle timeout) — a route that reads its body answers 408 itself, one that answered without it
has its connection closed; at most ``MAX_PIPELINED`` requests wait behind the one being answered (more: the
connection is closed); an answer its client stops reading for ``unread_s`` is cut. One connection over
``max_connections`` is answered 503 and closed at once: each holds a file descriptor, and a flood of them would take
the descriptors the state directory needs to write what a call acknowledges (by default the bound leaves a quarter
of the process's descriptor limit free, and the server raises that limit to the most the system allows at start).
uvicorn's own refusals (a request that is no HTTP) carry ``nosniff`` here too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 << 10  # a request line and headers; a token is ~100 bytes, a browser's head ~1-2 KiB
MAX_PIPELINED = 32  # requests read ahead of the one being answered (HTTP clients hardly pipeline at all)
SLOW_READ_BYTES_S = 256 << 10  # an answer waiting for its reader may take this long a byte more (2 Mbit/s)
DESCRIPTORS_KEPT = 128  # at least, out of the process's limit, never taken by connections
REFUSALS_LOGGED_EVERY_S = 10.0  # a flood of connections is one warning a while, not a line each

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}
log = logging.getLogger("synapse_serve.protocol")


class _Refused(Exception):
    """Raised in a parser callback to stop the parse there: the connection is refused with (status, message)."""


class BoundedHeadProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with each request bounded in bytes and time, and the connections in number
    (``protocol_for`` sets the bounds)."""

    head_timeout_s: float = 10.0
    body_timeout_s: float = 300.0
    unread_s: float = 30.0
    max_connections: int = 1 << 20
    _refused_since_log, _logged_at = 0, 0.0  # connections refused over the bound (class-wide: one server)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counted among the server's connections (session streams are too)
        self._in_head = True  # a head is arriving, or due (nothing of the next request read yet)
        self._head_bytes = 0  # read while it arrives, across reads: a long one is stopped before it is all joined
        self._head_size = 0  # its line and fields, exactly (trailer fields count too)
        self._message_open = False  # from a request's first byte to its body's last
        self._in_trailer, self._trailer_bytes, self._chunks = False, 0, 0
        self._body_due = self._body_moved = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._unread_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes of answer waiting in the transport when it was last seen waiting
        self._cycles: collections.deque = collections.deque()  # requests read and not answered yet, oldest first
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
        self._body_done()
        self._read_again()
        super().connection_lost(exc)
        self._hang_up()  # uvicorn tells only the request read last; the one being answered may be an earlier one

    def _hang_up(self) -> None:
        """Every request read and not answered learns the connection is gone: none writes to a closed one."""
        for cycle in self._cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._cycles.clear()

    def pause_writing(self) -> None:
        """The answer waits for its client to read (the socket's buffer is full): it has ``unread_s``, and as long
        again as what waits takes at ``SLOW_READ_BYTES_S``, for what waits to shrink, or the connection is cut — an
        answer waiting for a reader that never comes holds its memory for good. The event loop sees a large part
        leave only once all of it has (a red-team run's reader at a steady 5 MB/s was cut in a 207 MB part)."""
        super().pause_writing()
        if self._unread_timer is None:
            self._time_unread()

    def resume_writing(self) -> None:
        self._read_again()
        super().resume_writing()

    def _read_again(self) -> None:
        if self._unread_timer is not None:
            self._unread_timer.cancel()
            self._unread_timer = None

    def _never_read(self) -> None:
        self._unread_timer = None
        unsent = self.transport.get_write_buffer_size()
        if 0 < unsent < self._unsent:  # read meanwhile, if slowly (closing too: its last bytes): timed again
            self._time_unread()
            return
        if unsent or not self.transport.is_closing():
            self._hang_up()
            self.transport.abort()  # close() would wait for the buffer to be read first

    def _time_unread(self) -> None:
        self._unsent = self.transport.get_write_buffer_size()
        self._unread_timer = self.loop.call_later(self.unread_s + self._unsent / SLOW_READ_BYTES_S, self._never_read)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the bytes of heads and trailer fields counted, and a refusal raised in a callback answered
        as what it is (not as an unreadable request)."""
        if not self._message_open:  # what comes between requests (a bare line break too) is the next head's
            self._in_head = True
            self._time_head()
        if self._in_head:
            self._head_bytes += len(data)  # this read may hold the body's first bytes too: only checked if not done
        elif self._message_open:
            self._body_moved = self.loop.time()
        in_trailer, chunks = self._in_trailer, self._chunks
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refused):
                self._refuse(*exc.__context__.args)
            else:
                self._unreadable()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._unreadable()
            return
        if self.transport.is_closing():
            return
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, f"a request's line and headers are at most {MAX_HEAD_BYTES} bytes")
            return
        if self._message_open and not self._in_head and self._body_timer is None:  # a body still to come: timed
            self._time_body(min(self.unread_s, self.body_timeout_s))
        if in_trailer and self._in_trailer and self._chunks == chunks:  # a whole read of trailer fields (no body)
            self._trailer_bytes += len(data)
            if self._trailer_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"a request's trailer fields are at most {MAX_HEAD_BYTES} bytes")

    def _upgrade(self) -> None:
        """Hand the connection to the WebSocket protocol, which must have answered its handshake within the head
        timeout (a red-team run: uvicorn's never answers one whose request carries a body, nor closes it; such
        connections were held for good, no token needed). A handshake with a body is refused here at once."""
        if any(name in (b"content-length", b"transfer-encoding") and value.strip() not in (b"", b"0")
               for name, value in self.headers):
            self._refuse(400, "a WebSocket handshake carries no body")
            return
        self.handle_websocket_upgrade()
        self._time_head()  # not this protocol's any more: only its handshake is watched, once

    def _unreadable(self) -> None:
        message = "Invalid HTTP request received."
        self.logger.warning(message)
        self.send_400_response(message)

    # --- parser callbacks ---

    def on_message_begin(self) -> None:  # a request's first byte: its head starts (again, on a kept-alive connection)
        if len(self.pipeline) >= MAX_PIPELINED:
            raise _Refused(400, f"more than {MAX_PIPELINED} requests sent ahead of their answers")
        super().on_message_begin()
        self._head_bytes = self._head_size = self._trailer_bytes = 0
        self._in_head, self._message_open, self._in_trailer = True, True, False
        self._time_head()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:  # the head's fields, and the trailer's after the body
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            raise _Refused(431, f"a request's line and headers are at most {MAX_HEAD_BYTES} bytes")

    def on_headers_complete(self) -> None:
        self._head_done()
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:
            while self._cycles and self._cycles[0].response_complete:
                self._cycles.popleft()
            self._cycles.append(self.cycle)
        now = self.loop.time()
        self._body_due, self._body_moved = now + self.body_timeout_s, now

    def on_chunk_header(self) -> None:  # the last chunk's is followed by the trailer fields, if any
        self._in_trailer = True
        self._chunks += 1

    def on_body(self, body: bytes) -> None:  # (per chunk of a chunked body: kept to one store and uvicorn's own)
        self._in_trailer = False
        HttpToolsProtocol.on_body(self, body)

    def on_message_complete(self) -> None:
        self._message_open, self._in_trailer = False, False
        self._body_done()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    # --- timers ---

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
        handed = self.transport.get_protocol()
        if handed is not self:  # upgraded: the WebSocket protocol has not answered its handshake in time
            if not getattr(handed, "handshake_complete", True) and not self.transport.is_closing():
                self.transport.abort()
            return
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head behind an answer still
            self._time_head()  # being made: timed again, never closing the connection under that answer
            return
        self._refuse(408, f"the request's line and headers did not arrive within {self.head_timeout_s:g} s")

    def _time_body(self, delay: float) -> None:
        self._body_done()
        self._body_timer = self.loop.call_later(delay, self._body_too_slow)

    def _body_done(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_too_slow(self) -> None:
        """The body has not arrived in time, or paused too long. A route reading it answers 408 itself (its own
        timeouts: api/bodies.py); once the request is answered, what is still to come of it is waited for no
        longer: the connection is closed (an answer being made, a route's that did not read it, is let finish)."""
        self._body_timer = None
        if not self._message_open or self.transport.is_closing():
            return
        now = self.loop.time()
        due = min(self._body_due, self._body_moved + self.unread_s)
        if now < due or any(not cycle.response_complete for cycle in self._cycles):
            self._time_body(max(due - now, 0.5))
            return
        self._hang_up()
        self.transport.close()

    def _refuse(self, status: int, message: str, retry_after: bool = False) -> None:
        """Answer ``status`` in plain text and close; while an earlier request's answer is being sent, only close (its
        answer and those of the requests read after it are not sent)."""
        self._head_done()
        self._body_done()
        if self.cycle is None or self.cycle.response_complete:
            body = message.encode("ascii", "replace")
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"retry-after: 1\r\n"] if retry_after else []
            head += [b"content-type: text/plain; charset=utf-8\r\n", b"x-content-type-options: nosniff\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
        else:
            self._hang_up()
        self.transport.close()


def protocol_for(head_timeout_s: float, body_timeout_s: float, unread_s: float, max_connections: int
                 ) -> type[BoundedHeadProtocol]:
    """The protocol class for a server whose heads must arrive within ``head_timeout_s`` and bodies within
    ``body_timeout_s``, whose bodies may pause and answers wait unread at most ``unread_s``, and which keeps at most
    ``max_connections`` open (uvicorn takes a class)."""
    attributes: dict[str, Any] = {"head_timeout_s": head_timeout_s, "body_timeout_s": body_timeout_s,
                                  "unread_s": unread_s, "max_connections": max_connections}
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
