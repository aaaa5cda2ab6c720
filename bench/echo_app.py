"""The transport floor: a bare ASGI app that decodes a msgpack body and re-encodes it, nothing else.

Served by uvicorn exactly as the service is (``bench/suite.py`` starts it), it
answers ``{"version": 1, "outputs": <the received "inputs" tensor>}`` with the
same codec, so the service's forward round trip can be compared with the cost
of moving the same bytes through the same client, server and codec. On a WebSocket
(``/v1/session``) it answers each session frame the same way, as
``{"id", "status": 200, "result": {...}}``: the session stream's floor.
"""

from __future__ import annotations

from synapse_client._codec import packb, unpackb


async def app(scope, receive, send) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = unpackb(message["bytes"])
            answer = {"version": 1, "outputs": (frame.get("tensors") or {}).get("inputs")}
            await send({"type": "websocket.send", "bytes": packb({"id": frame.get("id"), "status": 200,
                                                                   "result": answer})})
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    raw = b"".join(chunks)
    body = unpackb(raw) if raw else {}
    answer = packb({"version": 1, "outputs": body.get("inputs")})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/msgpack"),
                            (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})
