"""The transport floor: a bare ASGI app that decodes a msgpack body and re-encodes it, nothing else.

Served by uvicorn exactly as the service is (``bench/suite.py`` starts it), it
answers ``{"version": 1, "outputs": <the received "inputs" tensor>}`` with the
same codec, so the service's forward round trip can be compared with the cost
of moving the same bytes through the same client, server and codec.
"""

from __future__ import annotations

from synapse_client._codec import packb, unpackb


async def app(scope, receive, send) -> None:
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
