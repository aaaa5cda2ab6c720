"""The session stream, client side: the same handles, their operations over one WebSocket.

``client.session()`` opens ``/v1/session`` (authenticated once) and returns a ``Session`` whose
handles (``session.get(name)``) are the ordinary ``Synapse`` handles: each request a handle makes
(operations, compartments, describe, help, snapshots, export, delete) becomes one msgpack frame
instead of an HTTP request, with the same answers and the same errors (``_frames.py``). ``handle.submit(...)`` sends a frame without
waiting for its answer (pipelining); ``.result()`` waits for it.

A dropped connection is re-opened; the call is sent again only if repeating it cannot apply it
twice (reads, compartment writes, keyed calls: ``evolve`` and ``step`` always carry a key).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import connect as async_connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from synapse_client import _codec
from synapse_client._exceptions import APIConnectionError, APITimeoutError, AuthenticationError
from synapse_client import _progress
from synapse_client._frames import frame_of, result_of

INBOX_BYTES = 1 << 20  # the most a session reads from its socket at once


def _ws_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/v1/session"


def _lost(base_url: str, op: str, exc: BaseException, repeated: bool) -> dict[str, Any]:
    """A synthetic answer for a frame whose connection dropped."""
    return {"status": 0, "error": _connection_error(base_url, op, exc, repeated)}


def _renumbered(data: bytes, frame_id: int) -> bytes:
    """A frame as first encoded, under a new id: what is sent again after a drop is what was sent, even if
    the caller has changed its arrays since (the tensors are read back from the bytes, not the arrays)."""
    return _codec.packb({**_codec.unpackb(data), "id": frame_id})


def _connection_error(base_url: str, what: str, exc: BaseException, repeated: bool) -> APIConnectionError:
    if isinstance(exc, InvalidStatus) and exc.response.status_code in (401, 403):
        return AuthenticationError(401, {"detail": "the server refused the session stream: send a valid token "
                                                   "(SynapseClient(url, token=...) or SYNAPSE_TOKEN)"}, None)
    tail = "" if repeated else " (not sent again: repeating it could apply it twice)"
    if isinstance(exc, TimeoutError):
        return APITimeoutError(f"session at {base_url}: {what}: no answer in time{tail}")
    return APIConnectionError(f"session at {base_url}: {what}: {type(exc).__name__}: {exc}{tail}")


class _Dropped(ConnectionError):
    """The WebSocket connection closed or broke."""


class _Wire:
    """A WebSocket on a blocking socket, driven in the caller's thread with websockets' sans-I/O protocol.

    No reader thread: an answer reaches the caller without a thread hop (websockets' own sync client
    reads in a background thread, which costs a hop per frame)."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float | None) -> None:
        uri = parse_uri(url)
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if uri.secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=uri.host)
        self.sock = sock
        self._timeout: float | None = sock.gettimeout()
        # read into one buffer, reused: sock.recv(n) allocates n bytes per call and shrinks them, and at
        # 1 MiB (an allocation the OS maps fresh) that cost ~20 µs a call, ~75 µs for a 131 KB answer
        self._inbox = memoryview(bytearray(INBOX_BYTES))
        self.protocol = ClientProtocol(uri, max_size=None)
        self.messages: collections.deque[bytes] = collections.deque()
        self._parts: list[bytes] = []
        request = self.protocol.connect()
        request.headers.update(headers)
        self.handshake_done = False
        try:
            self.protocol.send_request(request)
            self._flush()
            while not self.handshake_done:
                self._fill(timeout)
        except BaseException:  # refused (e.g. a bad token) or broken: the socket is not left open
            sock.close()
            raise

    def send(self, data: bytes) -> None:
        self.protocol.send_binary(data)
        self._flush()

    def recv(self, timeout: float | None) -> bytes:
        while not self.messages:
            self._fill(timeout)
        return self.messages.popleft()

    def _fill(self, timeout: float | None) -> None:
        if timeout != self._timeout:  # a system call each time: only when it changes
            self.sock.settimeout(timeout)
            self._timeout = timeout
        try:
            count = self.sock.recv_into(self._inbox)
        except (TimeoutError, socket.timeout):
            raise TimeoutError("no answer in time") from None
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
        self._flush()  # pongs and close frames the protocol queued
        if not count or self.protocol.close_rcvd is not None:
            raise _Dropped(f"the server closed the session ({self.protocol.close_rcvd or 'connection lost'})")

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.protocol.send_close()
            self._flush()
        except (OSError, websockets.exceptions.WebSocketException):
            pass  # already closing, or broken: the socket goes either way
        finally:
            self.sock.close()


class Pending:
    """A request sent on a session whose answer is read when asked for: ``result()``."""

    def __init__(self, wait) -> None:
        self._wait = wait

    def result(self) -> Any:
        """The answer (waits for it); raises its error as a call would."""
        return self._wait()


class Session:
    """Operations over one WebSocket; handles from ``get`` work exactly as the client's (blocking)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.base_url = client.base_url
        self.max_retries = client.max_retries
        self._ids = itertools.count(1)
        self._answers: dict[int, dict[str, Any]] = {}  # read, not yet asked for
        self._outstanding: dict[int, tuple[str, bytes, bool]] = {}  # sent, not yet answered: (op, bytes, retry)
        self._moved: dict[int, int] = {}  # a frame sent again after a drop: its old id -> its new one
        self._reconnects = 0
        self._ws = None
        self._open()

    def _open(self) -> None:
        auth = {k: v for k, v in self.client.headers.items() if k == "Authorization"}
        try:
            self._ws = _Wire(_ws_url(self.base_url), auth, self.client.timeout.connect)
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise _connection_error(self.base_url, "cannot open", exc, True) from None

    # --- what handles call ---

    def _op_body(self, tensors, returns, sequence=None):
        return self.client._op_body(tensors, returns, sequence)

    def _sequence_options(self, every, last):
        return self.client._sequence_options(every, last)

    def _op_headers(self, operation, if_version, idempotency_key):
        return self.client._op_headers(operation, if_version, idempotency_key)

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
        self._send(op, frame_id, _codec.packb({**frame, "id": frame_id}), retry)  # encoded once, here
        return Pending(lambda: self._receive(frame_id, op))

    def _send(self, op: str, frame_id: int, data: bytes, retry: bool) -> None:
        self._outstanding[frame_id] = (op, data, retry)
        try:
            self._ws.send(data)
        except (ConnectionClosed, OSError) as exc:
            self._recover(exc)

    def _receive(self, frame_id: int, op: str) -> Any:
        while True:
            frame_id = self._moved.pop(frame_id, frame_id)
            if frame_id in self._answers:
                return result_of(self._answers.pop(frame_id))
            try:
                data = self._ws.recv(self.client.timeout.read)
            except TimeoutError as exc:
                raise _connection_error(self.base_url, op, exc, False) from None
            except (ConnectionClosed, OSError) as exc:
                self._recover(exc)
                continue
            answer = _codec.unpackb(data, writable=True)
            self._outstanding.pop(answer.get("id"), None)
            self._answers[answer.get("id")] = answer
            self._reconnects = 0  # the connection works again

    def _recover(self, exc: BaseException) -> None:
        """The connection dropped: re-open it and send again every unanswered frame that is safe to repeat;
        the others fail (they may have been applied)."""
        self._reconnects += 1
        if self._reconnects > self.max_retries:
            for frame_id, (op, _, retry) in self._outstanding.items():
                self._answers[frame_id] = _lost(self.base_url, op, exc, retry)
            self._outstanding.clear()
            raise _connection_error(self.base_url, "the connection dropped", exc, True) from None
        try:
            self._ws.close()
        except Exception:  # noqa: BLE001 - already broken
            pass
        self._open()
        pending, self._outstanding = self._outstanding, {}
        for frame_id, (op, data, retry) in pending.items():
            if retry:
                self._moved[frame_id] = new_id = next(self._ids)
                self._send(op, new_id, _renumbered(data, new_id), retry)
            else:
                self._answers[frame_id] = _lost(self.base_url, op, exc, False)

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
        """Close the stream (the client it came from stays open)."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSession:
    """The asyncio twin of Session: ``async with client.session() as s``; concurrent calls are pipelined."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.base_url = client.base_url
        self.max_retries = client.max_retries
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._ws = None
        self._reader: asyncio.Task | None = None
        self._send_lock: asyncio.Lock | None = None

    async def _open(self) -> None:
        auth = {k: v for k, v in self.client.headers.items() if k == "Authorization"}
        try:
            self._ws = await async_connect(_ws_url(self.base_url), additional_headers=auth, max_size=None,
                                           compression=None, open_timeout=self.client.timeout.connect,
                                           close_timeout=5)
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise _connection_error(self.base_url, "cannot open", exc, True) from None
        self._send_lock = asyncio.Lock()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for data in self._ws:
                answer = _codec.unpackb(data, writable=True)
                future = self._waiting.pop(answer.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except ConnectionClosed:
            pass
        for future in self._waiting.values():  # the connection went: every waiting call learns it
            if not future.done():
                future.set_exception(ConnectionResetError("the session connection was closed"))
        self._waiting.clear()

    def _op_body(self, tensors, returns, sequence=None):
        return self.client._op_body(tensors, returns, sequence)

    def _sequence_options(self, every, last):
        return self.client._sequence_options(every, last)

    def _op_headers(self, operation, if_version, idempotency_key):
        return self.client._op_headers(operation, if_version, idempotency_key)

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
        return await self._exchange(*self._encoded(frame), retry)

    def _encoded(self, frame: dict[str, Any]) -> tuple[str, int, bytes]:
        frame_id = next(self._ids)
        return frame["op"], frame_id, _codec.packb({**frame, "id": frame_id})

    async def _exchange(self, op: str, frame_id: int, data: bytes, retry: bool) -> Any:
        for attempt in range(self.max_retries + 1):
            if attempt:
                frame_id = next(self._ids)
                data = _renumbered(data, frame_id)
            future = asyncio.get_running_loop().create_future()
            self._waiting[frame_id] = future
            try:
                async with self._send_lock:
                    await self._ws.send(data)
                answer = await asyncio.wait_for(future, self.client.timeout.read)
                return result_of(answer)
            except (ConnectionClosed, ConnectionResetError, OSError, TimeoutError) as exc:
                self._waiting.pop(frame_id, None)
                if not retry or attempt == self.max_retries or isinstance(exc, TimeoutError):
                    raise _connection_error(self.base_url, op, exc, retry and attempt > 0) from None
                await self._reopen()
        raise AssertionError("unreachable")

    def submit(self, method: str, path: str, body: Any = None, *, retry: bool,
               headers: dict[str, str] | None = None) -> asyncio.Task:
        """Send one request; await the returned task for its answer (concurrent calls are pipelined). The frame
        is encoded here: changing the tensors afterwards changes nothing sent, also after a reconnect."""
        frame = frame_of(method, path, body, headers)
        if frame is None:
            return asyncio.get_running_loop().create_task(self.client.request(method, path, body, retry=retry,
                                                                              headers=headers))
        return asyncio.get_running_loop().create_task(self._exchange(*self._encoded(frame), retry))

    async def _reopen(self) -> None:
        await self.close()
        await self._open()

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
        """Close the stream (the client it came from stays open)."""
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._reader is not None:
            await self._reader
            self._reader = None

    async def __aenter__(self) -> AsyncSession:
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
