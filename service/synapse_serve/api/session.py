"""The session stream: many operations over one WebSocket, no HTTP request per op.

``GET /v1/session`` upgrades to a WebSocket (authenticated once, by the upgrade's bearer token).
Each binary frame is one msgpack map, the same wire format as a REST body; each answer is one
frame, in the order the requests came, tagged with the request's ``id``::

    -> {"id": 7, "op": "call", "name": "enc", "operation": "forward", "tensors": {"inputs": <tensor>},
        "return": [...]?, "idempotency_key": "..."?, "if_match": 12?, "owner": "..."?}
    <- {"id": 7, "status": 200, "result": {"version": 13, "outputs": <tensor>}}
    -> {"id": 8, "op": "read", "name": "enc", "compartment": "weights"}
    <- {"id": 8, "status": 422, "problem": {"type", "title", "status", "detail", "request_id"}}

Frames and their ops are ``api/frames.py``'s (every REST request has one): the same backend call,
the same errors as problem documents, the same Idempotency-Key and If-Match behaviour, limits and
owner isolation. A client may send several
frames before reading answers (pipelining); they are run one after another. Bounded: a frame is at
most ``SYNAPSE_MAX_BODY_BYTES`` (uvicorn's ``ws_max_size``; no compression) of at most
``SYNAPSE_MAX_BODY_VALUES`` values; while a frame waits to be run uvicorn reads no further from the
socket, and an answer waits for the socket to take it (back-pressure: nothing dropped). A frame
whose tensors do not decode (over ``SYNAPSE_MAX_TENSOR_ELEMENTS``, data of the wrong length: what
REST answers with a 400) gets that 400 under its own id and the stream goes on; bytes that are not
a msgpack map with an id close the connection (1003/1007): a misbehaving client is disconnected,
the server goes on. One log line per connection when it ends. After each answer the loop
busy-polls a moment for the next frame (``api/polling.py``).

Idleness (``SYNAPSE_SESSION_IDLE_S``): a connection with a frame being run is never idle; otherwise
bytes of a frame arriving, or of answers draining to the client, are activity, and one with none for
that long is closed (1001): the timer starts when the last answer has gone out. A client that leaves
its answers unread that long (they wait in the server's send buffer) is cut off instead: the socket
is reset, as a close would wait behind the unsent bytes forever. A frame must arrive whole within
``SYNAPSE_BODY_TIMEOUT_S``, as a REST body must (else 1008). The watchdog looks every quarter of the
idle limit, so these hold to within that. uvicorn's ASGI interface shows an app whole frames only,
and no abort: the watchdog reads the buffers of uvicorn's ``websockets-sansio`` protocol under the
connection (``_Socket``); under another server it falls back to whole frames and a plain close. That
protocol is subclassed (``wsprotocol.py``): pongs under back-pressure and none once closing, fragments
counted against the frame limit, the keepalive's pong awaited while frames wait to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
import uuid
from typing import Any

import msgpack
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from synapse_client._codec import TooManyValues, WireError, packb, unpackb
from synapse_serve.api.bodies import ON_LOOP_VALUES, too_many_values, values_in
from synapse_serve.api.frames import internal_problem, problem_of, run_frame
from synapse_serve.api.server import Server, principal_of
from synapse_serve.errors import InvalidRequest, MalformedBody, SynapseServeError
from synapse_serve.settings import Settings

router = APIRouter()
log = logging.getLogger("synapse_serve.access")
_BY_CLIENT = "closed by the client"
NOT_READY_HOLD_S = 30.0  # how long a frame safe to repeat waits in place for the server to be ready
_READ_ONLY_OPS = frozenset({"read", "describe", "help", "list", "export", "snapshots", "evicted", "stats",
                            "history", "filters", "kinds", "kind_help"})


def safe_to_repeat(frame: dict[str, Any]) -> bool:
    """A frame that changes nothing, or carries an Idempotency-Key: run twice, it acts once."""
    op = frame.get("op")
    return (isinstance(op, str) and op in _READ_ONLY_OPS) or frame.get("idempotency_key") is not None


async def _when_ready(server: Server, principal: Any, frame: dict[str, Any], request_id: str,
                      answer: dict[str, Any]) -> dict[str, Any]:
    """A frame safe to repeat answered 503 (an instance still being restored after a restart, a shard coming back),
    run again in place until it is answered otherwise, for up to NOT_READY_HOLD_S: the frames behind it wait, so a
    pipelined stream is applied in the order it was sent. Answered 503 at once, the client sent such a frame again
    only when its answer was awaited, after the frames behind it had run."""
    deadline = time.monotonic() + NOT_READY_HOLD_S
    while answer["status"] == 503 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        answer = await run_frame(server, principal, frame, request_id)
    return answer


@router.websocket("/v1/session")
async def session(websocket: WebSocket) -> None:
    server: Server = websocket.app.state.server
    try:
        principal = principal_of(server.tokens, websocket.headers.get("authorization", ""))
    except SynapseServeError as exc:
        await websocket.close(code=1008, reason=exc.detail[:120])  # before accept: the handshake fails (403)
        return
    await websocket.accept()
    connection = uuid.uuid4().hex[:12]
    started, frames, errors = time.perf_counter(), 0, 0
    # phase: waiting for a frame, running one, or answering (what the watchdog counts as activity: see _watch)
    state = {"last": time.monotonic(), "received": 0.0, "phase": "waiting", "reason": _BY_CLIENT}
    watchdog = asyncio.create_task(_watch(websocket, server.settings, state))
    try:
        while True:
            message = await websocket.receive()
            state["last"] = state["received"] = time.monotonic()
            state["phase"] = "answering"
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("bytes")
            if raw is None:
                state["reason"] = "text frame"
                await websocket.close(code=1003, reason="send binary msgpack frames")
                break
            frames += 1
            try:
                frame = unpackb(raw, max_elements=server.settings.max_tensor_elements,
                                max_values=server.settings.max_body_values)
                if not isinstance(frame, dict):
                    raise WireError(f"a frame is a msgpack map, received {type(frame).__name__}")
                ident = frame.get("id")
                answer = None
                if not _usable_id(ident):  # answered in its place in the order, untagged; the stream goes on
                    answer = {"status": 422, "problem": problem_of(InvalidRequest(
                        f"id: expected a string of at most {MAX_ID_CHARS} characters, a number or null; received "
                        f"{_kind_of(ident)}", field="id"), f"{connection}:?")}
                    ident = None
            except Exception as exc:  # noqa: BLE001 - a decoder's bug answers that frame (500), never drops the rest
                ident = _id_of(raw)  # a map with an id whose tensors did not decode: a 400 to it, as REST answers
                request_id = f"{connection}:{'?' if ident is _NO_ID else ident}"
                if isinstance(exc, TooManyValues):
                    answer = {"status": 413, "problem": problem_of(
                        too_many_values(exc, server.settings.max_body_values), request_id)}
                elif isinstance(exc, WireError):
                    answer = {"status": 400, "problem": problem_of(MalformedBody(str(exc)), request_id)}
                else:
                    log.exception("frame %s did not decode", request_id)
                    answer = {"status": 500, "problem": internal_problem(request_id)}
                if ident is _NO_ID:  # nothing to tag an answer with: this client speaks something else
                    state["reason"] = "undecodable frame"
                    await websocket.send_bytes(packb({"id": None, **answer}))
                    await websocket.close(code=1007, reason="undecodable frame")
                    break
            if answer is None:
                state["phase"] = "running"
                answer = await run_frame(server, principal, frame, f"{connection}:{ident}")
                if answer["status"] == 503 and safe_to_repeat(frame):
                    answer = await _when_ready(server, principal, frame, f"{connection}:{ident}", answer)
                state["phase"] = "answering"
            errors += answer["status"] >= 400
            answer["id"] = ident
            await websocket.send_bytes(await _encoded(server, principal.owner, answer))
            server.answered()
            state["last"], state["phase"] = time.monotonic(), "waiting"
    except WebSocketDisconnect:
        if state["reason"] == _BY_CLIENT:  # not the watchdog's abort
            state["reason"] = "client went away"
    finally:
        watchdog.cancel()
        log.info("session %s ended (%s): %d frames, %d errors, %.1f s", connection, state["reason"], frames, errors,
                 time.perf_counter() - started,
                 extra={"fields": {"session": connection, "owner": principal.owner, "frames": frames,
                                   "errors": errors, "end": state["reason"]}})


_NO_ID = object()
MAX_ID_CHARS = 128  # as REST's X-Request-ID: an id is echoed in its answer and its request id, never amplified


def _usable_id(ident: Any) -> bool:
    return ident is None or isinstance(ident, (int, float)) or isinstance(ident, str) and len(ident) <= MAX_ID_CHARS


def _kind_of(value: Any) -> str:
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return "a bin" if isinstance(value, (bytes, memoryview)) else f"a {type(value).__name__}"


def _id_of(raw: bytes) -> Any:
    """The id of a frame that is a well-formed msgpack map with a str or number ``id`` (its values skipped, not
    decoded), else ``_NO_ID``."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(raw), 1))
    ident = _NO_ID
    try:
        unpacker.feed(raw)
        for _ in range(unpacker.read_map_header()):
            # only a string key or a scalar id is built: a frame refused for its values may hold millions in a key
            if _starts_scalar(raw, unpacker.tell()) and unpacker.unpack() == "id" and _starts_scalar(
                    raw, unpacker.tell()):
                ident = unpacker.unpack()
            else:
                unpacker.skip()
        if unpacker.tell() != len(raw):
            return _NO_ID
    except Exception:  # any defect of the bytes themselves (msgpack's errors are of several classes)
        return _NO_ID
    return ident if _usable_id(ident) and ident is not None else _NO_ID


ENCODE_ON_LOOP_BYTES = 1 << 20  # answers holding more bytes of tensors or files are encoded on the API's threads


async def _encoded(server: Server, owner: str, answer: dict[str, Any]) -> bytes:
    """An answer frame's bytes: a large one (a compartment read, an exported file: a copy of its bytes each) made on
    the API's threads within the owner's share, never on the event loop every connection shares."""
    result = answer.get("result")
    if values_in(result, ON_LOOP_VALUES, arrays=False) <= ON_LOOP_VALUES and \
            _payload_bytes(result, 0) <= ENCODE_ON_LOOP_BYTES:
        return packb(answer)
    return await server.threads.run(owner, packb, answer)


def _payload_bytes(value: Any, depth: int) -> int:
    """The bytes of the arrays and bytes in an answer's result (a packed call's: in its list of results)."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if depth < 3 and isinstance(value, dict):
        return sum(_payload_bytes(v, depth + 1) for v in value.values())
    if depth < 3 and isinstance(value, list):
        return sum(_payload_bytes(v, depth + 1) for v in value)
    return int(getattr(value, "nbytes", 0) or 0)


def _starts_scalar(raw: bytes, at: int) -> bool:
    """Whether the msgpack value at ``at`` is a number, a short string, nil or a bool (no map, array or bin)."""
    if at >= len(raw):
        return False
    b = raw[at]
    return b <= 0x7F or b >= 0xE0 or 0xA0 <= b <= 0xBF or b in (0xC0, 0xC2, 0xC3, 0xD9) or 0xCA <= b <= 0xD3


class _Socket:
    """What the watchdog reads of uvicorn's protocol under a WebSocket (``websockets-sansio``; ``receive`` is its
    bound method): the bytes of a frame begun but not whole, the answers' bytes not yet sent, and an abort."""

    def __init__(self, websocket: WebSocket) -> None:
        protocol = getattr(getattr(websocket, "_receive", None), "__self__", None)
        transport = getattr(protocol, "transport", None)
        usable = all(hasattr(transport, name) for name in ("abort", "get_write_buffer_size"))
        self.protocol, self.transport = (protocol, transport) if usable else (None, None)

    def arriving(self) -> int:
        try:  # the parser's buffer, and the parts of a fragmented message
            return len(self.protocol.conn.reader.buffer) + sum(map(len, self.protocol.frames))
        except (AttributeError, TypeError):
            return 0

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def abort(self) -> bool:
        if self.transport is None:
            return False
        sock = self.transport.get_extra_info("socket")
        try:  # a reset: the kernel drops the unsent bytes too, instead of holding them for a peer that reads nothing
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (AttributeError, OSError):
            pass
        self.transport.abort()
        return True


async def _watch(websocket: WebSocket, settings: Settings, state: dict) -> None:
    """Close the connection once idle for ``session_idle_s`` (one timer per connection, not per frame). Every quarter
    of that it looks: a frame being run is activity, and so are bytes that came in or drained out since its last look
    (the server's own writes are not: pings queue up for a client that reads nothing)."""
    idle_s, frame_s, wire = settings.session_idle_s, settings.body_timeout_s, _Socket(websocket)
    arriving = unsent = 0
    began = None  # when the frame now arriving was first seen (its clock runs only while the loop waits for it)
    while True:
        await asyncio.sleep(max(0.0, min(idle_s / 4, state["last"] + idle_s - time.monotonic())) + 0.01)
        now, was_arriving, was_unsent = time.monotonic(), arriving, unsent
        arriving, unsent = wire.arriving(), wire.unsent()
        if state["phase"] == "running" or arriving != was_arriving or unsent < was_unsent:
            state["last"] = now
        if state["phase"] != "waiting" or (began is not None and state["received"] > began):
            began = None  # a frame came whole since: the next one's clock starts afresh
        if arriving and began is None and state["phase"] == "waiting":
            began = now  # not reset by the parser's buffer emptying between a frame's header and its payload
        if began is not None and now - began >= frame_s:
            reason, code, text = "frame too slow", 1008, f"a frame took over {frame_s:g} s to arrive"
        elif now - state["last"] >= idle_s:
            reason, code, text = "idle", 1001, f"idle for {idle_s:g} s"
        else:
            continue
        if unsent and wire.abort():  # answers left unread: a close frame would wait behind them forever
            state["reason"] = "answers left unread"
            return
        state["reason"] = reason
        if websocket.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect):  # gone meanwhile
                await websocket.close(code=code, reason=text)
        if wire.unsent():  # not even the close frame went out: nobody reads this socket
            wire.abort()
        return
