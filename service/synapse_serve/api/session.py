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
most ``SYNAPSE_MAX_BODY_BYTES`` (uvicorn's ``ws_max_size``), at most ``SYNAPSE_SESSION_MAX_QUEUE``
frames wait unread (uvicorn's ``ws_max_queue``: then the server stops reading the socket), and a
connection idle for ``SYNAPSE_SESSION_IDLE_S`` is closed. A frame that is not a binary msgpack map
closes the connection (1003/1007): a misbehaving client is disconnected, the server goes on. One
log line per connection when it ends. After each answer the loop busy-polls a moment for the next
frame (``api/polling.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from synapse_client._codec import WireError, packb, unpackb
from synapse_serve.api.frames import problem_of, run_frame
from synapse_serve.api.server import Server, principal_of
from synapse_serve.errors import MalformedBody, SynapseServeError

router = APIRouter()
log = logging.getLogger("synapse_serve.access")


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
    state = {"last": time.monotonic(), "reason": "closed by the client"}
    watchdog = asyncio.create_task(_close_when_idle(websocket, server.settings.session_idle_s, state))
    try:
        while True:
            message = await websocket.receive()
            state["last"] = time.monotonic()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("bytes")
            if raw is None:
                state["reason"] = "text frame"
                await websocket.close(code=1003, reason="send binary msgpack frames")
                break
            frames += 1
            try:
                frame = unpackb(raw, max_elements=server.settings.max_tensor_elements)
                if not isinstance(frame, dict):
                    raise WireError(f"a frame is a msgpack map, received {type(frame).__name__}")
            except WireError as exc:
                state["reason"] = "undecodable frame"
                problem = problem_of(MalformedBody(str(exc)), f"{connection}:?")
                await websocket.send_bytes(packb({"id": None, "status": 400, "problem": problem}))
                await websocket.close(code=1007, reason="undecodable frame")
                break
            answer = await run_frame(server, principal, frame, f"{connection}:{frame.get('id')}")
            errors += answer["status"] >= 400
            answer["id"] = frame.get("id")
            await websocket.send_bytes(packb(answer))
            server.answered()
            state["last"] = time.monotonic()
    except WebSocketDisconnect:
        state["reason"] = "client went away"
    finally:
        watchdog.cancel()
        log.info("session %s ended (%s): %d frames, %d errors, %.1f s", connection, state["reason"], frames, errors,
                 time.perf_counter() - started,
                 extra={"fields": {"session": connection, "owner": principal.owner, "frames": frames,
                                   "errors": errors, "end": state["reason"]}})


async def _close_when_idle(websocket: WebSocket, idle_s: float, state: dict) -> None:
    """Close the connection once nothing came or went for ``idle_s`` (one timer per connection, not per frame)."""
    while True:
        await asyncio.sleep(max(0.0, state["last"] + idle_s - time.monotonic()) + 0.01)
        if time.monotonic() - state["last"] >= idle_s:
            state["reason"] = "idle"
            if websocket.application_state == WebSocketState.CONNECTED:
                await websocket.close(code=1001, reason=f"idle for {idle_s:g} s")
            return
