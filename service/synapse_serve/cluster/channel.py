"""The direct channel: the per-step calls of a front to a shard over one TCP connection, not Ray's RPC.

Ray places the shards, restarts them and carries everything else (creates, lists, files); the
calls a loop makes on every step — ``call``, ``call_many``, ``call_stacked``, ``read``, ``write`` —
go over a plain socket from the front to the shard's listener, because Ray's actor call alone
costs about 0.8 ms on a small CPU host, longer than a whole local call (docs/scaling.md). The same
split as the systems that use Ray for placement and their own transport for data.

Wire: each frame is an 8-byte little-endian length and a msgpack body (the service's codec:
arrays as wire tensors, large ones sent without copies). A request is ``{"method", "keys",
"kwargs"}``; an answer is the shard's outcome, ``["ok", value]`` or ``["error", class, detail,
extra, headers]``, or ``["refused", why]`` for a frame the shard could not decode within its limits (a
value nested deeper than the codec reads, a tensor over its element bound: settings the front may not
share): nothing ran, and the front sends that call through Ray instead, whose answer is the local
engine's. One call at a time per connection, in order; a front keeps a small pool of connections per
shard, so calls on different instances run side by side.

Security: a connection's first 32 bytes must be the shard's secret, a random value the shard
makes at start and gives only to callers of its actor (through Ray, token-authenticated); the
shard accepts it with one byte, and only then does a front send a call (so a connection refused
at the door — a wrong shard, a shard at its connection limit — is never a call lost). The
listener binds the node's cluster address only, like Ray's own ports; frames over the size cap and
wrong secrets close that connection and nothing else, and a connection has ``AUTH_TIMEOUT_S`` in all
to present its secret (a byte now and then does not hold one open).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from synapse_client._codec import WireError, packb_parts, unpackb
from synapse_serve.names import CompartmentRef, InstanceKey

log = logging.getLogger("synapse_serve")

# the Backend methods a front sends over the channel: those a loop calls on every step
DIRECT_METHODS = frozenset({"call", "call_many", "call_stacked", "read", "write"})
PACKED_METHODS = frozenset({"call_many", "call_stacked"})  # their first argument is a list of instance keys
SECRET_BYTES = 32
HEADER = struct.Struct("<Q")
AUTH_TIMEOUT_S = 5.0
ACCEPTED = b"\x01"  # the shard's answer to a right secret
# the front trusts an authenticated shard's answers (they are its own state): bounds only against a stream out of step
ANSWER_MAX_BYTES = ANSWER_MAX_ELEMENTS = 1 << 40


class ChannelLost(Exception):
    """The connection failed. ``sent``: whether the request may have reached the shard (then it may have run)."""

    def __init__(self, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.sent = sent


# --- the body of a frame ---


def _tensors_out(tensors: Mapping[str, Any]) -> dict[str, Any]:
    return {name: {"$ref": [value.compartment, value.instance]} if isinstance(value, CompartmentRef) else value
            for name, value in tensors.items()}


def _tensors_in(tensors: Mapping[str, Any]) -> dict[str, Any]:
    return {name: CompartmentRef(*value["$ref"]) if isinstance(value, dict) and "$ref" in value else value
            for name, value in tensors.items()}


def request_parts(method: str, args: tuple, kwargs: Mapping[str, Any]) -> list[bytes | memoryview]:
    """A Backend method call as a frame's parts (its header first)."""
    keys = args[0] if method in PACKED_METHODS else args[:1]
    kwargs = dict(kwargs)
    if method in ("call", "call_stacked"):
        kwargs["tensors"] = _tensors_out(kwargs["tensors"])
    elif method == "call_many":
        kwargs["tensors"] = [_tensors_out(t) for t in kwargs["tensors"]]
    return _framed(packb_parts({"method": method, "keys": [list(key) for key in keys], "kwargs": kwargs}))


def decode_request(payload: bytes | bytearray | memoryview, max_elements: int) -> tuple[str, tuple, dict[str, Any]]:
    """A request frame's body as (method, args, kwargs); WireError if it is not one."""
    body = unpackb(payload, max_elements, bound_keys=True)  # a client's keys, passed on by the front
    if not isinstance(body, dict) or body.keys() != {"method", "keys", "kwargs"}:
        raise WireError("a request is a map of method, keys and kwargs")
    method, keys, kwargs = body["method"], body["keys"], body["kwargs"]
    if method not in DIRECT_METHODS or not isinstance(kwargs, dict) or not isinstance(keys, list) or not all(
            isinstance(key, list) and len(key) == 2 and all(isinstance(part, str) for part in key) for key in keys):
        raise WireError(f"not a request the channel carries: {str(method)[:40]!r}")
    instance_keys = [InstanceKey(*key) for key in keys]
    if method in PACKED_METHODS:
        args: tuple = (instance_keys,)
        tensors = kwargs.get("tensors", [] if method == "call_many" else {})
        kwargs["tensors"] = [_tensors_in(t) for t in tensors] if method == "call_many" else _tensors_in(tensors)
    else:
        if len(instance_keys) != 1:
            raise WireError(f"{method} names one instance")
        args = (instance_keys[0],)
        if method == "call":
            kwargs["tensors"] = _tensors_in(kwargs.get("tensors", {}))
    return method, args, kwargs


def _framed(parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    return [HEADER.pack(sum(len(part) if isinstance(part, bytes) else part.nbytes for part in parts)), *parts]


def answer_parts(outcome: tuple) -> list[bytes | memoryview]:
    """A shard's outcome as a frame's parts."""
    return _framed(packb_parts(list(outcome)))


def refusal_parts(why: str) -> list[bytes | memoryview]:
    """The answer to a frame the shard could not decode: nothing ran (the front sends the call through Ray)."""
    return answer_parts(("refused", why[:300]))


def decode_answer(method: str, payload: bytes) -> tuple:
    """An answer frame's body as the shard's outcome tuple (a read's value is its (array, version) pair again)."""
    outcome = unpackb(payload, ANSWER_MAX_ELEMENTS)
    if outcome[0] == "ok" and method == "read":
        return ("ok", tuple(outcome[1]))
    return tuple(outcome)


# --- the shard's side ---


class Listener:
    """A shard's socket: a thread accepting connections, a thread per connection running its calls in order."""

    def __init__(self, handle: Callable[[str, tuple, dict[str, Any]], tuple], *, host: str, port: int,
                 max_frame_bytes: int, max_elements: int, max_connections: int = 1024) -> None:
        self.handle, self.max_frame_bytes, self.max_elements = handle, max_frame_bytes, max_elements
        self.max_connections = max_connections
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self.frames = self.refused = 0  # calls answered; connections closed for a wrong secret or a bad frame
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._socket = socket.create_server((host, port), backlog=256)
        self.address = self._socket.getsockname()[:2]
        threading.Thread(target=self._accept, name="shard-channel", daemon=True).start()

    def close(self) -> None:
        """Stop listening (a blocked accept wakes only on shutdown, not on close) and end every connection."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._socket.close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError as exc:
                if self._closed:
                    return
                # out of descriptors or buffers for a moment: the listener must outlive it (returning here had left
                # every later front connection refused for the shard's whole life)
                log.warning("shard channel: accept failed (%s); trying again", exc)
                time.sleep(0.1)
                continue
            with self._lock:
                if len(self._connections) >= self.max_connections:
                    connection.close()
                    self.refused += 1
                    continue
                self._connections.add(connection)
            threading.Thread(target=self._serve, args=(connection,), name="shard-channel-conn", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            _keepalive(connection)
            presented = _receive(connection, SECRET_BYTES, deadline=time.monotonic() + AUTH_TIMEOUT_S)
            if not hmac.compare_digest(presented or b"", self.secret):
                self.refused += 1
                return
            connection.settimeout(None)
            connection.sendall(ACCEPTED)  # the front sends no call before this: a closed door is never a lost call
            while True:
                header = _receive(connection, HEADER.size)
                if header is None:
                    return  # the front closed it between calls
                (length,) = HEADER.unpack(header)
                if length > self.max_frame_bytes:
                    log.warning("shard channel: a frame of %d bytes is over the cap (%d); closing the connection",
                                length, self.max_frame_bytes)
                    self.refused += 1
                    return
                payload = _receive(connection, length)
                if payload is None:
                    return
                try:
                    method, args, kwargs = decode_request(payload, self.max_elements)
                except (WireError, TypeError, ValueError) as exc:  # read whole: the stream is still in step
                    log.info("shard channel: a frame it cannot decode (%s); the front sends it through Ray",
                             str(exc)[:200])
                    self.refused += 1
                    _send(connection, refusal_parts(str(exc)))
                    continue
                try:
                    outcome = self.handle(method, args, kwargs)
                except Exception as exc:  # a bug, not the caller's: a 500 at the front (as through Ray), not a lost shard
                    log.exception("shard channel: %s failed", method)
                    outcome = ("error", "SynapseServeError", f"the shard failed: {type(exc).__name__}: {exc}"[:500],
                               {}, {})
                self.frames += 1  # before the answer goes: whoever reads the count after it sees this call
                _send(connection, answer_parts(outcome))
        except OSError:
            return  # the front went away, or a frame arrived half (the front's call fails with ChannelLost)
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()


def _keepalive(connection: socket.socket) -> None:
    """Find a peer that vanished (host down, cable out) within about half a minute, not TCP's two hours."""
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            connection.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _receive(connection: socket.socket, length: int, deadline: float | None = None) -> bytearray | None:
    """Exactly ``length`` bytes, or None at a clean end of stream before the first; a cut mid-way is an OSError, and
    so is ``deadline`` (``time.monotonic()``) passing first."""
    buffer = bytearray(length)
    view, got = memoryview(buffer), 0
    while got < length:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the peer took too long")
            connection.settimeout(left)
        n = connection.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ConnectionResetError("the peer closed the connection mid-frame")
        got += n
    return buffer


def _send(connection: socket.socket, parts: list[bytes | memoryview]) -> None:
    pending = [memoryview(part).cast("B") for part in parts]
    while pending:
        sent = connection.sendmsg(pending[:512])
        while sent and pending:
            if sent >= pending[0].nbytes:
                sent -= pending[0].nbytes
                pending.pop(0)
            else:
                pending[0] = pending[0][sent:]
                sent = 0


# --- the front's side ---


class Channel:
    """A front's connections to one shard: up to ``size`` at a time, each carrying one call at a time.

    ``locate`` asks the shard (through Ray) for its listener's ``(host, port, secret)``; it is asked again
    after any connection fails, since a restarted shard listens elsewhere.
    """

    def __init__(self, locate: Callable[[], Awaitable[tuple[str, int, bytes]]], *, size: int) -> None:
        self.locate, self.size = locate, size
        self._where: tuple[str, int, bytes] | None = None
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots: asyncio.Semaphore | None = None
        self.suspended_until = 0.0  # when Ray reaches the shard but this channel cannot: Ray carries the calls

    def usable(self) -> bool:
        return time.monotonic() >= self.suspended_until

    def suspend(self, seconds: float) -> None:
        self.suspended_until = time.monotonic() + seconds
        self.forget()

    def forget(self) -> None:
        """Drop the address and the idle connections (the shard restarted, or a connection failed)."""
        self._where = None
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def call(self, parts: list[bytes | memoryview]) -> bytes:
        """The answer's body to one request frame (``request_parts``); ChannelLost if the connection failed
        (``sent`` says whether the request may have been applied)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.size)
        async with self._slots:
            reader, writer = await self._connection()
            try:
                writer.writelines(parts)
                await writer.drain()
                (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                if length > ANSWER_MAX_BYTES:  # not a frame: the stream is out of step
                    raise ConnectionError(f"an answer frame of {length} bytes")
                payload = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError) as exc:
                writer.close()
                self.forget()
                raise ChannelLost(f"the connection to the shard failed mid-call ({type(exc).__name__})",
                                  sent=True) from None
            except BaseException:  # cancelled mid-call: the answer still due makes this connection unusable
                writer.close()
                raise
            self._idle.append((reader, writer))
        return payload

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer = self._idle.pop()
            if not (writer.is_closing() or reader.at_eof()):  # a shard that died closed its end
                return reader, writer
            writer.close()
        try:
            if self._where is None:
                self._where = await self.locate()
            host, port, secret = self._where
            reader, writer = await asyncio.open_connection(host, port)
        except Exception as exc:  # noqa: BLE001 - whatever failed, nothing was sent
            self._where = None
            raise ChannelLost(f"cannot reach the shard's channel ({type(exc).__name__}: {exc})"[:300],
                              sent=False) from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            _keepalive(sock)
        try:  # a shard at its connection limit (or not this shard) closes the door before any call is sent
            writer.write(secret)
            accepted = await asyncio.wait_for(reader.readexactly(len(ACCEPTED)), AUTH_TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            writer.close()
            self._where = None
            raise ChannelLost(f"the shard's channel did not accept the connection ({type(exc).__name__})",
                              sent=False) from None
        if accepted != ACCEPTED:
            writer.close()
            raise ChannelLost("the shard's channel answered the secret with something else", sent=False)
        return reader, writer
