"""The session stream, client side: the same handles, their operations over one WebSocket.

``client.session()`` opens ``/v1/session`` (authenticated once) and returns a ``Session`` whose
handles (``session.get(name)``) are the ordinary ``Synapse`` handles: each request a handle makes
(operations, compartments, describe, help, snapshots, export, delete) becomes one msgpack frame
instead of an HTTP request, with the same answers and the same errors (``_frames.py``). ``handle.submit(...)`` sends a frame without
waiting for its answer (pipelining); ``.result()`` waits for it.

A dropped connection is re-opened; the call is sent again only if repeating it cannot apply it
twice (reads, compartment writes, keyed calls: ``evolve`` and ``step`` always carry a key) nor run
after a call sent after it that changes state (a compartment write would undo a later ``evolve`` that
may have run, a read would show it: ``_overtaken``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import select
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import connect as async_connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from synapse_client import _codec
from synapse_client._exceptions import APIConnectionError, APITimeoutError, AuthenticationError
from synapse_client import _progress
from synapse_client._frames import READ_ONLY_OPS, frame_of, result_of

INBOX_BYTES = 1 << 20  # the most a session reads from its socket at once
# keyed frames (evolve, step, any call with an Idempotency-Key) a session has unanswered at most: an instance's file
# remembers its last 16 keys (docs/api.md), so a frame sent again after a drop (or a server's restart) is always
# one the server still knows if it applied it; with more in flight, the oldest ones' keys were forgotten and they
# ran twice
KEYED_IN_FLIGHT = 16
NOT_READY_WAIT_S = 1.0  # before a frame answered 503 goes again: the Retry-After of a restore (not sent in frames)
MESSAGE_TOO_BIG = 1009  # the close code of a server refusing a frame over its size limit
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)  # a non-blocking socket's "not now"


def _ws_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/v1/session"


def _too_big(op: str, nbytes: int) -> dict[str, Any]:
    """The answer for a frame the server refused for its size (it closes the connection, code 1009, before reading
    the frame: nothing was applied): the 413 REST answers for such a body."""
    return {"status": 413, "problem": {
        "type": "https://synapse-serve.dev/problems/body-too-large", "title": "Body too large", "status": 413,
        "detail": f"{op}: the frame ({nbytes} bytes) is over the server's size limit (SYNAPSE_MAX_BODY_BYTES); "
                  "nothing was applied: send less per call (a smaller batch, fewer steps or instances)"}}


def _largest(sizes: dict[int, int]) -> int | None:
    """Of the frames in flight when the server refused one for its size, the one it refused: the largest."""
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _lost(base_url: str, op: str, exc: BaseException, repeated: bool) -> dict[str, Any]:
    """A synthetic answer for a frame whose connection dropped."""
    return {"status": 0, "error": _connection_error(base_url, op, exc, repeated)}


def _overtaken(frame_id: int, keyed: bool, last_change: int, dropped: bool) -> bool:
    """Whether a frame must not be sent again because a frame that changes state was sent after it
    (``last_change``: the id of the last one sent; ids only grow): repeated, it would run after that one, which may
    have run — a compartment write repeated after an evolve undoes the evolve, a read shows the evolve's weights.
    After a drop a keyed frame may go again (run already, it is answered from the server's record of its key; not
    run, neither was anything sent after it, a connection's frames running in order); answered 503, nothing has been
    run, so none may."""
    return not (keyed and dropped) and last_change > frame_id


def _renumbered(data: bytes, frame_id: int) -> bytes:
    """A frame as first encoded, under a new id: what is sent again after a drop is what was sent, even if
    the caller has changed its arrays since (the tensors are read back from the bytes, not the arrays)."""
    return _codec.packb({**_codec.unpackb(data), "id": frame_id})


def _connection_error(base_url: str, what: str, exc: BaseException, repeated: bool,
                      overtaken: bool = False) -> APIConnectionError:
    if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
        return AuthenticationError(401, {"detail": "the server refused the session stream: send a valid token "
                                                   "(SynapseClient(url, token=...) or SYNAPSE_TOKEN)"}, None)
    tail = "" if repeated else " (not sent again: repeating it could apply it twice)"
    if overtaken:
        tail = (" (not sent again: a call that changes state was sent after it and may have run; repeated now, it "
                "would run after that call, undoing it or showing its effect: read the instance again before "
                "sending it again)")
    if isinstance(exc, TimeoutError):  # not "could apply it twice": it may have run, or still run, once
        return APITimeoutError(f"session at {base_url}: {what}: no answer in time (not sent again; it may still "
                               "run, or have run: read the instance's version before repeating an update, or "
                               "repeat it with the same idempotency_key)")
    return APIConnectionError(f"session at {base_url}: {what}: {type(exc).__name__}: {exc}{tail}")


class _Dropped(ConnectionError):
    """The WebSocket connection closed or broke."""


class _Wire:
    """A WebSocket on a non-blocking socket, driven in the caller's thread with websockets' sans-I/O protocol.

    No reader thread: an answer reaches the caller without a thread hop (websockets' own sync client
    reads in a background thread, which costs a hop per frame). Every wait is a poll for readable (and,
    while sending, writable): a send that the socket cannot take reads the answers that have arrived
    meanwhile, so a pipelining caller and a server blocked writing those answers never wait on each other."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float | None) -> None:
        uri = parse_uri(url)
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if uri.secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=uri.host)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._poll = select.poll() if hasattr(select, "poll") else None  # select() where there is no poll
        # read into one buffer, reused: sock.recv(n) allocates n bytes per call and shrinks them, and at
        # 1 MiB (an allocation the OS maps fresh) that cost ~20 µs a call, ~75 µs for a 131 KB answer
        self._inbox = memoryview(bytearray(INBOX_BYTES))
        self.protocol = ClientProtocol(uri, max_size=None)
        self.messages: collections.deque[bytes] = collections.deque()
        self._parts: list[bytes] = []
        self._out: collections.deque[memoryview] = collections.deque()  # bytes queued, not yet taken by the socket
        request = self.protocol.connect()
        request.headers.update(headers)
        self.handshake_done = False
        try:
            self.protocol.send_request(request)
            self._flush(timeout)
            while not self.handshake_done:
                self._fill(timeout)
        except BaseException:  # refused (e.g. a bad token) or broken: the socket is not left open
            sock.close()
            raise

    def send(self, data: bytes, timeout: float | None) -> None:
        """Send one binary message; reads arriving answers into ``messages`` while the socket is full.
        ``timeout``: the longest the socket may neither take bytes nor deliver any."""
        self.protocol.send_binary(data)
        self._flush(timeout)

    def poll(self) -> None:
        """Read what has already arrived, without waiting; raises _Dropped if the server closed the connection
        (its idle close) or it broke: checked before a frame is sent, so no frame goes out on a dead connection."""
        while self._read():
            pass
        self._flush(wait=False)  # a pong, if a read queued one: nothing to wait for

    def read(self, timeout: float | None) -> None:
        """Wait (up to ``timeout``) for bytes and read them into ``messages``; sends what the protocol answers
        (pongs)."""
        self._fill(timeout)

    def _fill(self, timeout: float | None) -> None:
        self._wait(False, timeout)  # first: an answer is rarely there already, a read would be one call more
        while not self._read():
            self._wait(False, timeout)
        self._flush(timeout)

    def _wait(self, write: bool, timeout: float | None) -> tuple[bool, bool]:
        """Until the socket is readable (or, with ``write``, writable): (readable, writable); TimeoutError after
        ``timeout`` seconds of neither."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True, False  # decrypted bytes wait in the TLS layer, invisible to poll
        if self._poll is None:
            readable, writable, _ = select.select([self.sock], [self.sock] if write else [], [], timeout)
            ready = bool(readable), bool(writable)
        else:
            self._poll.register(self.sock, select.POLLIN | (select.POLLOUT if write else 0))  # no system call
            events = self._poll.poll(None if timeout is None else max(0, math.ceil(timeout * 1000)))
            mask = events[0][1] if events else 0
            broken = mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL)  # the next read or send says why
            ready = bool(mask & select.POLLIN or broken), bool(mask & select.POLLOUT or broken)
        if not any(ready):
            raise TimeoutError("no answer in time")
        return ready

    def _read(self) -> bool:
        """One read of what the socket holds, into the protocol and ``messages``; False if it held nothing.
        Raises _Dropped once the server closed the connection (answers read before it are kept)."""
        try:
            count = self.sock.recv_into(self._inbox)
        except _WOULD_BLOCK:
            return False
        if count:
            self.protocol.receive_data(self._inbox[:count])  # copied into the protocol's own buffer
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                if self.protocol.handshake_exc is not None:
                    raise self.protocol.handshake_exc
                self.handshake_done = True
            elif event.opcode in (Opcode.BINARY, Opcode.CONT, Opcode.TEXT):
                self._parts.append(event.data)
                if event.fin:
                    self.messages.append(b"".join(self._parts))
                    self._parts.clear()
        if not count or self.protocol.close_rcvd is not None:
            raise _Dropped(f"the server closed the session ({self.protocol.close_rcvd or 'connection lost'})")
        return True

    def close_code(self) -> int | None:
        """The code of the close the server sent, reading what is left on the socket first (a send the server
        cut short breaks before its close frame is read), or None."""
        with contextlib.suppress(Exception):
            while self.protocol.close_rcvd is None and self._read():
                pass
        return None if self.protocol.close_rcvd is None else self.protocol.close_rcvd.code

    def _flush(self, timeout: float | None = None, wait: bool = True) -> None:
        """Send what the protocol queued. While the socket takes nothing, read: the server may be waiting for
        us to take its answers before it reads more of ours (its queue of unread frames is bounded).
        ``wait=False``: send what the socket takes now, the rest stays queued (sent before the next frame)."""
        out = self._out
        out.extend(memoryview(data) for data in self.protocol.data_to_send() if data)
        while out:
            try:
                sent = self.sock.send(out[0])
            except _WOULD_BLOCK:
                if not wait:
                    return
                readable, _ = self._wait(True, timeout)
                if readable:
                    self._read()
                    out.extend(memoryview(data) for data in self.protocol.data_to_send() if data)  # after ours
                continue
            if sent == len(out[0]):
                out.popleft()
            else:
                out[0] = out[0][sent:]

    def close(self) -> None:
        try:
            if not self._out:  # a frame cut short (a send that failed) is not completed now: it just ends
                with contextlib.suppress(websockets.exceptions.WebSocketException):
                    self.protocol.send_close()  # unless closing already: then the reply to the server's is queued
                self._flush(wait=False)
        except OSError:
            pass  # broken: the socket goes either way
        finally:
            self.sock.close()


class HandleHost:
    """What a handle (``Synapse``) asks of whatever made it beside ``request`` and ``submit``: the client's own
    request building. A session (or the in-process mode's) hosts handles as the client does."""

    client: Any

    def _op_body(self, tensors, returns, sequence=None):
        return self.client._op_body(tensors, returns, sequence)

    def _sequence_options(self, every, last):
        return self.client._sequence_options(every, last)

    def _op_headers(self, operation, if_version, idempotency_key):
        return self.client._op_headers(operation, if_version, idempotency_key)


class Pending:
    """A request sent on a session whose answer is read when asked for: ``result()``."""

    def __init__(self, wait) -> None:
        self._wait = wait

    def result(self) -> Any:
        """The answer (waits for it); raises its error as a call would."""
        return self._wait()


class Session(HandleHost):
    """Operations over one WebSocket; handles from ``get`` work exactly as the client's (blocking)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.base_url = client.base_url
        self.max_retries = client.max_retries
        self._ids = itertools.count(1)
        self._answers: dict[int, dict[str, Any]] = {}  # read, not yet asked for
        self._outstanding: dict[int, tuple[str, bytes, bool]] = {}  # sent, not yet answered: (op, bytes, retry)
        self._moved: dict[int, int] = {}  # a frame sent again after a drop: its old id -> its new one
        self._keyed: set[int] = set()  # the outstanding frames that carry an Idempotency-Key
        self._abandoned: set[int] = set()  # frames whose caller stopped waiting (a timeout): their answers are dropped
        # frames safe to repeat answered 503 (an instance still being restored after a restart): sent again once
        # their caller asks, after a wait, up to max_retries times: (op, bytes) and how often they were sent again
        self._unready: dict[int, tuple[str, bytes]] = {}
        self._tries: dict[int, int] = {}
        self._last_change = 0  # the id of the last frame sent that changes state (_overtaken)
        self._reconnects = 0
        self._closed = False
        self._ws: _Wire | None = None
        self._open()

    def _open(self) -> None:
        auth = {k: v for k, v in self.client.headers.items() if k == "Authorization"}
        try:
            self._ws = _Wire(_ws_url(self.base_url), auth, self.client.timeout.connect)
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise _connection_error(self.base_url, "cannot open", exc, True) from None

    # --- what handles call (and HandleHost's) ---

    def request(self, method: str, path: str, body: Any = None, *, retry: bool,
                headers: dict[str, str] | None = None, progress: str | None = None) -> Any:
        """Send one request as a frame and wait for its answer (what the stream does not carry goes over HTTP);
        ``progress``: a bar, shown done when the frame's answer arrives."""
        return _progress.finished(self.submit(method, path, body, retry=retry, headers=headers).result(), progress)

    def submit(self, method: str, path: str, body: Any = None, *, retry: bool,
               headers: dict[str, str] | None = None) -> Pending:
        """Send one request now; read its answer later with ``.result()`` (pipelining). The frame is encoded here:
        changing the tensors afterwards changes nothing sent, also after a reconnect."""
        frame = frame_of(method, path, body, headers)
        if frame is None:
            answer = self.client.request(method, path, body, retry=retry, headers=headers)
            return Pending(lambda: answer)
        frame_id, op = next(self._ids), frame["op"]
        data = _codec.packb({**frame, "id": frame_id})  # encoded once, here
        if "idempotency_key" in frame:
            self._make_room(op)
            self._keyed.add(frame_id)
        self._send(op, frame_id, data, retry)
        return Pending(lambda: self._receive(frame_id, op))

    def _make_room(self, op: str) -> None:
        """Read answers until fewer than KEYED_IN_FLIGHT keyed frames are unanswered."""
        while len(self._keyed) >= KEYED_IN_FLIGHT and self._ws is not None:
            try:
                self._ws.read(self.client.timeout.read)
            except TimeoutError as exc:
                raise _connection_error(self.base_url, op, exc, False) from None
            except (ConnectionClosed, OSError) as exc:
                self._recover(exc)
                continue
            self._take()

    def _send(self, op: str, frame_id: int, data: bytes, retry: bool) -> None:
        if self._ws is None:
            if self._closed:
                raise self._closed_error(op)
            self._open_retrying()  # the last connection was given up (see _recover): this frame gets a fresh one
        else:
            try:
                # a close the server sent while the session was idle (its routine idle close), or a dead socket,
                # is seen before this frame goes out: nothing of it was sent, it goes on a new connection
                self._ws.poll()
            except (ConnectionClosed, OSError) as exc:
                self._recover(exc, counted=bool(self._outstanding))  # routine when nothing was waiting
            else:
                self._take()
        self._outstanding[frame_id] = (op, data, retry)
        if op not in READ_ONLY_OPS:
            self._last_change = max(self._last_change, frame_id)
        try:
            self._ws.send(data, self.client.timeout.write)  # reads answers meanwhile: pipelining never deadlocks
        except (ConnectionClosed, OSError) as exc:
            self._recover(exc)
        else:
            self._take()

    def _take(self) -> None:
        """Move the answers the connection has read (also while sending) to ``_answers``, by id."""
        if self._ws is None:
            return
        messages = self._ws.messages
        while messages:
            answer = _codec.unpackb(messages.popleft(), writable=True)
            frame_id = answer.get("id")
            sent = self._outstanding.pop(frame_id, None)
            self._keyed.discard(frame_id)
            if sent is not None and sent[2] and answer.get("status") == 503:
                self._unready[frame_id] = sent[:2]
            if frame_id in self._abandoned:  # its caller has gone: kept, it would stay for the session's life
                self._abandoned.discard(frame_id)
            else:
                self._answers[frame_id] = answer
            self._reconnects = 0  # the connection works again

    def _receive(self, frame_id: int, op: str) -> Any:
        while True:
            frame_id = self._moved.pop(frame_id, frame_id)
            if frame_id in self._answers:
                answer, unready = self._answers.pop(frame_id), self._unready.pop(frame_id, None)
                tries = self._tries.pop(frame_id, 0)
                if unready is None or tries >= self.max_retries or \
                        _overtaken(frame_id, True, self._last_change, dropped=False):
                    return result_of(answer)
                time.sleep(NOT_READY_WAIT_S)  # not run (503): the same bytes again, under a new id
                self._moved[frame_id] = new_id = next(self._ids)
                self._tries[new_id] = tries + 1
                self._send(unready[0], new_id, _renumbered(unready[1], new_id), True)
                continue
            if self._ws is None:  # closed by the caller (a given-up connection left no frame unanswered)
                raise self._closed_error(op)
            try:
                self._ws.read(self.client.timeout.read)
            except TimeoutError as exc:
                # given up: not sent again after a drop, and its answer, if it comes, dropped
                self._outstanding.pop(frame_id, None)
                self._keyed.discard(frame_id)
                self._abandoned.add(frame_id)
                raise _connection_error(self.base_url, op, exc, False) from None
            except (ConnectionClosed, OSError) as exc:
                self._recover(exc)
                continue
            self._take()

    def _recover(self, exc: BaseException, counted: bool = True) -> None:
        """The connection dropped: re-open it and send again every unanswered frame that is safe to repeat;
        the others fail (they may have been applied). ``counted``: toward ``max_retries`` (not a close seen
        before anything was waiting)."""
        self._take()  # answers read before the drop are answers
        if self._ws is not None and self._outstanding and self._ws.close_code() == MESSAGE_TOO_BIG:
            refused = _largest({frame_id: len(entry[1]) for frame_id, entry in self._outstanding.items()})
            op, data, _ = self._outstanding.pop(refused)
            self._keyed.discard(refused)
            self._answers[refused] = _too_big(op, len(data))
            counted = False  # the server's answer to that frame, not a failing connection
        self._reconnects += counted
        if self._reconnects > self.max_retries:
            self._fail_outstanding(exc)
            self._reconnects = 0  # the next call tries a fresh connection, not this broken one
            self._discard()
            raise _connection_error(self.base_url, "the connection dropped", exc, True) from None
        self._discard()
        try:
            self._open_retrying()
        except APIConnectionError:
            self._fail_outstanding(exc)  # none was sent again: each waiting call learns it
            raise
        pending, self._outstanding = self._outstanding, {}
        last_change = self._last_change  # as sent before the drop: the frames sent again below do not count
        for frame_id, (op, data, retry) in pending.items():
            if retry and _overtaken(frame_id, frame_id in self._keyed, last_change, dropped=True):
                self._keyed.discard(frame_id)
                self._answers[frame_id] = {"status": 0, "error": _connection_error(self.base_url, op, exc, False,
                                                                                   overtaken=True)}
            elif retry:
                self._moved[frame_id] = new_id = next(self._ids)
                if frame_id in self._keyed:
                    self._keyed.discard(frame_id)
                    self._keyed.add(new_id)
                self._send(op, new_id, _renumbered(data, new_id), retry)
            else:
                self._keyed.discard(frame_id)
                self._answers[frame_id] = _lost(self.base_url, op, exc, False)

    def _open_retrying(self) -> None:
        """Open a new connection, trying up to ``max_retries`` more times with the client's backoff (a server
        restarting refuses connections for a moment)."""
        for attempt in itertools.count():
            try:
                return self._open()
            except APIConnectionError:
                if attempt >= self.max_retries:
                    raise
                time.sleep(self.client._backoff(attempt))

    def _fail_outstanding(self, exc: BaseException) -> None:
        for frame_id, (op, _, retry) in self._outstanding.items():
            self._answers[frame_id] = _lost(self.base_url, op, exc, retry)
        self._outstanding.clear()
        self._keyed.clear()

    def _discard(self) -> None:
        try:
            self._ws.close()
        except Exception:  # noqa: BLE001 - already broken
            pass
        self._ws = None
        self._abandoned.clear()  # no answer comes on another connection

    def _closed_error(self, op: str) -> APIConnectionError:
        return APIConnectionError(f"session at {self.base_url}: {op}: the session is closed")

    # --- the session's own calls ---

    def call_many(self, operation: str, calls: Any, *, returns: Any = None, idempotency_key: str | None = None,
                  owner: str | None = None) -> dict[str, dict[str, Any]]:
        """One operation on many instances, as one frame (see ``SynapseClient.call_many``)."""
        path, body, headers = self.client._packed_request(operation, calls, returns, idempotency_key, owner)
        answer = self.request("POST", path, body, retry="Idempotency-Key" in headers, headers=headers)
        return {result.pop("name"): result for result in answer["results"]}

    def call_stacked(self, operation: str, names: Any, tensors: dict[str, Any], *, returns: Any = None,
                     idempotency_key: str | None = None, owner: str | None = None) -> dict[str, Any]:
        """One operation on a population, as one frame (see ``SynapseClient.call_stacked``)."""
        path, body, headers = self.client._stacked_request(operation, names, tensors, returns, idempotency_key, owner)
        return self.request("POST", path, body, retry="Idempotency-Key" in headers, headers=headers)

    def get(self, name: str, *, owner: str | None = None):
        """The handle of an existing instance, its calls over this session (NotFoundError if there is none)."""
        from synapse_client._client import Synapse

        handle = Synapse(self, name, owner=owner)
        handle.describe()
        return handle

    def close(self) -> None:
        """Close the stream (the client it came from stays open); later calls on it raise APIConnectionError."""
        self._closed = True
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSession(HandleHost):
    """The asyncio twin of Session: ``async with client.session() as s``; concurrent calls are pipelined."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.base_url = client.base_url
        self.max_retries = client.max_retries
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._reopen_lock = asyncio.Lock()  # one reopen at a time, however many calls found the connection gone
        self._reopens = 0  # reopens tried: a call that waited for one that failed learns it, not tries again
        self._open_failed: APIConnectionError | None = None
        self._closed = False
        self._sizes: dict[int, int] = {}  # frames in flight: their bytes
        self._refused: int | None = None  # the frame the server refused for its size when it closed
        self._keyed_slots = asyncio.Semaphore(KEYED_IN_FLIGHT)  # keyed frames in flight, resends included
        self._last_change = 0  # the id of the last frame sent that changes state (_overtaken)

    async def _open(self) -> None:
        auth = {k: v for k, v in self.client.headers.items() if k == "Authorization"}
        try:
            self._ws = await async_connect(_ws_url(self.base_url), additional_headers=auth, max_size=None,
                                           compression=None, open_timeout=self.client.timeout.connect,
                                           close_timeout=5)
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise _connection_error(self.base_url, "cannot open", exc, True) from None
        self._reader = asyncio.get_running_loop().create_task(self._read(self._ws))

    async def _read(self, ws) -> None:
        try:
            async for data in ws:
                answer = _codec.unpackb(data, writable=True)
                future = self._waiting.pop(answer.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except ConnectionClosed:
            pass
        if ws.close_code == MESSAGE_TOO_BIG:
            self._refused = _largest(self._sizes)
        for future in self._waiting.values():  # the connection went: every waiting call learns it
            if not future.done():
                future.set_exception(ConnectionResetError("the session connection was closed"))
        self._waiting.clear()

    async def request(self, method: str, path: str, body: Any = None, *, retry: bool,
                      headers: dict[str, str] | None = None, progress: str | None = None) -> Any:
        """Send one request as a frame and wait for its answer (what the stream does not carry goes over HTTP);
        ``progress``: a bar, shown done when the frame's answer arrives."""
        return _progress.finished(await self._request(method, path, body, retry=retry, headers=headers), progress)

    async def _request(self, method: str, path: str, body: Any, *, retry: bool,
                       headers: dict[str, str] | None) -> Any:
        frame = frame_of(method, path, body, headers)
        if frame is None:
            return await self.client.request(method, path, body, retry=retry, headers=headers)
        return await self._exchange_counted("idempotency_key" in frame, self._encoded(frame), retry)

    async def _exchange_counted(self, keyed: bool, encoded: tuple[str, int, bytes], retry: bool) -> Any:
        """``_exchange``; a keyed frame only while fewer than KEYED_IN_FLIGHT others are in flight."""
        if not keyed:
            return await self._exchange(*encoded, retry, keyed)
        async with self._keyed_slots:
            return await self._exchange(*encoded, retry, keyed)

    def _encoded(self, frame: dict[str, Any]) -> tuple[str, int, bytes]:
        frame_id = next(self._ids)
        return frame["op"], frame_id, _codec.packb({**frame, "id": frame_id})

    async def _exchange(self, op: str, frame_id: int, data: bytes, retry: bool, keyed: bool) -> Any:
        attempt = reopened = 0
        not_ready = False
        while True:
            ws = self._ws
            if ws is None or ws.state is not State.OPEN:
                # closed before this frame went out (the server's idle close, a drop): nothing of it was sent, so
                # it waits for the new connection and goes on it, whatever its op (a few tries, not forever)
                if self._closed:
                    raise APIConnectionError(f"session at {self.base_url}: {op}: the session is closed")
                if reopened > self.max_retries:
                    raise _connection_error(self.base_url, op, ConnectionResetError("each new connection closed"),
                                            True)
                reopened += 1
                await self._reopen(ws)
                continue
            future = asyncio.get_running_loop().create_future()
            self._waiting[frame_id] = future
            self._sizes[frame_id] = len(data)
            if op not in READ_ONLY_OPS:
                self._last_change = max(self._last_change, frame_id)
            try:
                await ws.send(data)  # no await between the check above and the write: it goes on an open one
                answer = await asyncio.wait_for(future, self.client.timeout.read)
            except (ConnectionClosed, ConnectionResetError, OSError, TimeoutError) as exc:
                if self._refused == frame_id or (ws.close_code == MESSAGE_TOO_BIG and self._refused is None
                                                 and _largest(self._sizes) == frame_id):
                    self._refused = None
                    return result_of(_too_big(op, len(data)))
                if not retry or attempt == self.max_retries or isinstance(exc, TimeoutError):
                    raise _connection_error(self.base_url, op, exc, retry and attempt > 0) from None
                if _overtaken(frame_id, keyed, self._last_change, dropped=True):
                    raise _connection_error(self.base_url, op, exc, False, overtaken=True) from None
            else:
                if not (answer.get("status") == 503 and retry and attempt < self.max_retries) or \
                        _overtaken(frame_id, keyed, self._last_change, dropped=False):
                    return result_of(answer)
                not_ready = True  # not run (an instance still being restored): sent again after a wait
            finally:
                self._waiting.pop(frame_id, None)
                self._sizes.pop(frame_id, None)
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: a connection's end fails every waiting future, also this one
            attempt += 1
            if not_ready:
                not_ready = False
                await asyncio.sleep(NOT_READY_WAIT_S)
            else:
                await self._reopen(ws)
            frame_id = next(self._ids)
            data = _renumbered(data, frame_id)

    def submit(self, method: str, path: str, body: Any = None, *, retry: bool,
               headers: dict[str, str] | None = None) -> asyncio.Task:
        """Send one request; await the returned task for its answer (concurrent calls are pipelined). The frame
        is encoded here: changing the tensors afterwards changes nothing sent, also after a reconnect."""
        frame = frame_of(method, path, body, headers)
        if frame is None:
            return asyncio.get_running_loop().create_task(self.client.request(method, path, body, retry=retry,
                                                                              headers=headers))
        encoded = self._encoded(frame)  # now: the caller may change its arrays once this returns
        return asyncio.get_running_loop().create_task(self._exchange_counted("idempotency_key" in frame, encoded,
                                                                             retry))

    async def _reopen(self, broken) -> None:
        """Replace the connection ``broken``: once, however many calls found it broken; the others wait here and
        then use the new one (or raise what stopped it from opening)."""
        tried = self._reopens
        async with self._reopen_lock:
            if self._ws is not None and self._ws is not broken:
                return  # replaced while this call waited
            if self._closed:
                raise APIConnectionError(f"session at {self.base_url}: the session is closed")
            if self._reopens != tried and self._open_failed is not None:
                raise self._open_failed  # the reopen this call waited for failed just now
            self._reopens += 1
            await self._shut()
            for attempt in itertools.count():  # a server restarting refuses connections for a moment
                try:
                    await self._open()
                    break
                except APIConnectionError as exc:
                    if attempt >= self.max_retries:
                        self._open_failed = exc
                        raise
                    await asyncio.sleep(self.client._backoff(attempt))
            self._open_failed = None

    async def _shut(self) -> None:
        """Close the connection and wait for its reader (which fails the calls still waiting on it)."""
        ws, reader, self._ws, self._reader = self._ws, self._reader, None, None
        if ws is not None:
            await ws.close()
        if reader is not None:
            await reader

    async def call_many(self, operation: str, calls: Any, *, returns: Any = None,
                        idempotency_key: str | None = None, owner: str | None = None) -> dict[str, dict[str, Any]]:
        """One operation on many instances, as one frame (see ``SynapseClient.call_many``)."""
        path, body, headers = self.client._packed_request(operation, calls, returns, idempotency_key, owner)
        answer = await self.request("POST", path, body, retry="Idempotency-Key" in headers, headers=headers)
        return {result.pop("name"): result for result in answer["results"]}

    async def call_stacked(self, operation: str, names: Any, tensors: dict[str, Any], *, returns: Any = None,
                           idempotency_key: str | None = None, owner: str | None = None) -> dict[str, Any]:
        """One operation on a population, as one frame (see ``SynapseClient.call_stacked``)."""
        path, body, headers = self.client._stacked_request(operation, names, tensors, returns, idempotency_key, owner)
        return await self.request("POST", path, body, retry="Idempotency-Key" in headers, headers=headers)

    async def get(self, name: str, *, owner: str | None = None):
        """The handle of an existing instance, its calls over this session (NotFoundError if there is none)."""
        from synapse_client._client import AsyncSynapse

        handle = AsyncSynapse(self, name, owner=owner)
        await handle.describe()
        return handle

    async def close(self) -> None:
        """Close the stream (the client it came from stays open); later calls on it raise APIConnectionError."""
        self._closed = True
        async with self._reopen_lock:  # after a reopen under way, not during it
            await self._shut()

    async def __aenter__(self) -> AsyncSession:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
