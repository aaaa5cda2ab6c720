"""The session stream's WebSocket protocol: uvicorn's ``websockets-sansio``, bounded where it was not.

Red-team runs (2026-12-01) found ways one client with a token could make the server hold memory that no
limit counted, or lose its answers:

- **pings it never reads the pongs of.** uvicorn writes each pong straight to the socket, and pings are no
  messages, so reading never paused: 196 MB of pings in 8 s grew the server by 180 MB (held until the idle limit)
  and slowed every other client's requests to seconds. Now, while the client reads too little for the socket to
  take more, a pong is not queued (RFC 6455 5.5.3 lets an endpoint answer only the latest ping) and the
  connection is read no further until it drains: TCP slows the client, as it does a client sending frames.
  Once the server has sent its close, pings are not answered at all, and when the close handshake's time is up
  a socket whose client still reads nothing is aborted (a close would wait for it for ever): a later run had
  the pongs of a closing connection pile up (+190 MB) for as long as the client kept it open.
- **the keepalive while a frame runs.** uvicorn pings every 20 s and fails the connection when no pong comes in
  20 s more, but it does not read the socket while a frame waits for the app (one pipelined behind a running
  one): a frame running past that lost its connection and the answers (and the app's send then raised
  RuntimeError into the log). The pong is waited for again while reading waits on the app; a send after a close
  the app did not make is a disconnection.
- **empty continuation fragments.** Each one added a list entry the size limit did not count (it counts
  payload bytes): 3 million in 9 s held 25 MB. Each fragment now counts ``FRAGMENT_COST`` bytes besides its
  payload against ``ws_max_size``, and a message past it is closed with 1009, as an oversized one is.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import CloseCode, Frame
from websockets.protocol import State

FRAGMENT_COST = 64  # bytes a fragment counts besides its payload (a list entry, and its bytes object when not empty)


class SessionWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with pongs under back-pressure and fragments counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held_for_pongs = False  # reading stopped until the socket drains (pings come faster than it is read)
        self.message_cost = 0  # the message being received: its fragments' payload and FRAGMENT_COST each
        self.own_close_timer: Any = None

    # --- pings ---

    def handle_ping(self) -> None:
        output = self.conn.data_to_send()
        if self.close_sent or self.conn.state is not State.OPEN:
            return  # closing: a pong answers nothing now, and would wait behind a client that reads nothing
        if self.writable.is_set():
            self.transport.write(b"".join(output))
            return
        if not self.held_for_pongs:  # the pong is dropped (a later ping's is answered) and reading stops
            self.held_for_pongs = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.held_for_pongs:
            self.held_for_pongs = False
            if not self.read_paused:  # (else the app's next receive resumes it)
                self.transport.resume_reading()

    async def send(self, message: Any) -> None:
        if message.get("type") == "websocket.send" and self.close_sent and self.handshake_complete:
            # closed under the app (the keepalive gave up): what it sends now goes nowhere, as to a client gone
            raise ClientDisconnected()
        await super().send(message)
        if self.close_timer is not None and self.close_timer is not self.own_close_timer:
            # the close handshake's time is up: the socket goes then, not once a client that reads nothing has
            # taken what waits for it (a close waits for that: for ever)
            self.close_timer.cancel()
            self.close_timer = self.own_close_timer = self.loop.call_later(self.close_timeout, self.close_or_abort)

    def keepalive_timeout(self) -> None:
        if self.read_paused and not self.held_for_pongs and not self.close_sent:
            # a frame waits for the app, and the socket is not read meanwhile: the pong may be there, unread (a
            # frame running past the ping's 20 s and its 20 s timeout had its connection failed, its answers lost)
            self.pong_timer = self.loop.call_later(self.ping_timeout, self.keepalive_timeout)
            return
        super().keepalive_timeout()

    def close_or_abort(self) -> None:
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    async def receive(self) -> Any:
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if not self.held_for_pongs:
                self.transport.resume_reading()
        return message

    # --- fragments ---

    def handle_text(self, event: Frame) -> None:
        self.message_cost = len(event.data) + FRAGMENT_COST
        super().handle_text(event)

    def handle_bytes(self, event: Frame) -> None:
        self.message_cost = len(event.data) + FRAGMENT_COST
        super().handle_bytes(event)

    def handle_cont(self, event: Frame) -> None:
        if self.close_sent:
            return
        self.message_cost += len(event.data) + FRAGMENT_COST
        limit = self.config.ws_max_size
        if limit and self.message_cost > limit:
            self.frames = []
            self.conn.fail(CloseCode.MESSAGE_TOO_BIG, f"a message's fragments count over {limit} bytes")
            self.handle_parser_exception()
            return
        super().handle_cont(event)
