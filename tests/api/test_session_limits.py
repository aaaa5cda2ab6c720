"""The session stream's limits against a real uvicorn server: idleness while work is in flight, a client that reads
none of its answers, a frame that takes long to arrive, and a frame whose tensor the limits refuse.

A short idle limit (``IDLE``) keeps each test to a few seconds. Raw sockets stand in for clients that dribble a frame
or read nothing (websockets' client would read for us); websockets' own client sends the well-behaved frames.
"""

from __future__ import annotations

import asyncio
import base64
import os
import select
import socket
import threading
import time

import httpx
import msgpack
import pytest
from websockets.exceptions import ConnectionClosed
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.sync.client import connect

from conftest import LiveServer
from synapse_client import SynapseClient, packb, unpackb

IDLE = 0.5  # SYNAPSE_SESSION_IDLE_S
FRAME_S = 2.5  # SYNAPSE_BODY_TIMEOUT_S: the longest a frame may take to arrive
LIMIT = 1000  # SYNAPSE_MAX_TENSOR_ELEMENTS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(state_dir=tmp_path_factory.mktemp("limits"), session_idle_s=IDLE,
                    body_timeout_s=FRAME_S, max_tensor_elements=LIMIT) as live:
        yield live


def stream(server):
    return connect(server.url.replace("http://", "ws://") + "/v1/session", max_size=None)


def created(server, name: str, shape: list[int]) -> None:
    with SynapseClient(server.url) as client:
        client.create(name, kind="HebbianSynapse", config={"shape": shape, "eta": 0.1})


def described(server, name: str) -> int:
    with stream(server) as ws:  # the next client is served
        ws.send(packb({"id": 1, "op": "describe", "name": name}))
        return unpackb(ws.recv(timeout=10))["status"]


def raw_stream(server, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket opened by hand: nothing reads it but the test."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    sock.settimeout(10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /v1/session HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = b""
    while not response.endswith(b"\r\n\r\n"):  # a byte at a time: nothing after the handshake is read
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def ws_frame(payload: bytes) -> bytes:
    """One binary frame as a client sends it: masked, with a zero key (the payload as is)."""
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return b"\x82" + length + b"\0\0\0\0" + payload


def read_frame(sock: socket.socket, pause: float = 0.0) -> tuple[int, bytes]:
    """The server's next frame (unmasked): its opcode and payload, read at most 128 KiB per ``pause`` seconds."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(min(n - len(data), 128 << 10))
            if not chunk:
                raise ConnectionError("the server closed the socket")
            data += chunk
            time.sleep(pause)
        return data

    first, second = exactly(2)
    n = second & 0x7F
    n = int.from_bytes(exactly(2 if n == 126 else 8), "big") if n >= 126 else n
    return first & 0x0F, exactly(n)


def ws_connections(server) -> list:
    return [c for c in server.server.server_state.connections if isinstance(c, WebSocketsSansIOProtocol)]


def slowly(sock: socket.socket, data: bytes, pieces: int, pause: float) -> None:
    """Send ``data`` in ``pieces`` parts, ``pause`` seconds apart."""
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        sock.sendall(data[i:i + step])
        time.sleep(pause)


# --- idleness ---


def test_a_client_that_reads_none_of_its_answers_is_cut_off(server):
    """Answers far beyond the socket buffers, none read: the send that cannot progress does not hold the connection
    (and its answers) open; within about the idle limit the socket is gone."""
    created(server, "unread", [1024, 1024])  # 4 MiB weights
    sock = raw_stream(server, rcvbuf=4096)
    port = sock.getsockname()[1]
    try:
        for i in range(12):  # 48 MiB of answers
            sock.sendall(ws_frame(packb({"id": i, "op": "read", "name": "unread", "compartment": "weights"})))
        deadline = time.monotonic() + 6 * IDLE + 3
        while any(c.client and c.client[1] == port for c in ws_connections(server)):
            assert time.monotonic() < deadline, "the server still holds the connection of a client that reads nothing"
            time.sleep(0.05)
    finally:
        sock.close()
    assert described(server, "unread") == 200


def test_a_client_that_reads_its_answers_slowly_is_served_whole(server):
    """Answers that take several idle limits to drain, read steadily: the bytes leaving are activity."""
    created(server, "paced", [1024, 1024])  # 4 MiB weights
    sock = raw_stream(server, rcvbuf=64 << 10)
    try:
        for i in range(2):
            sock.sendall(ws_frame(packb({"id": i, "op": "read", "name": "paced", "compartment": "weights"})))
        began = time.monotonic()
        for i in range(2):
            opcode, payload = read_frame(sock, pause=0.02)
            assert opcode == 0x2, (opcode, payload[:40])
            assert unpackb(payload)["id"] == i
        assert time.monotonic() - began > 2 * IDLE  # it did take longer than the idle limit
    finally:
        sock.close()


def test_a_frame_that_runs_longer_than_the_idle_limit_is_answered_and_the_timer_starts_after(server, monkeypatch):
    created(server, "slow", [4, 2])
    backend = server.app.state.server.backend
    describe = backend.describe

    async def slow_describe(key):
        await asyncio.sleep(3 * IDLE)
        return await describe(key)

    monkeypatch.setattr(backend, "describe", slow_describe)
    with stream(server) as ws:
        ws.send(packb({"id": 5, "op": "describe", "name": "slow"}))
        answer = unpackb(ws.recv(timeout=10))
        answered = time.monotonic()
        assert (answer["id"], answer["status"]) == (5, 200)
        with pytest.raises(ConnectionClosed) as info:  # idle from the answer on
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 1001 and time.monotonic() - answered >= 0.9 * IDLE


def test_a_frame_still_arriving_is_not_idle(server):
    """Its bytes come slower than the idle limit allows for the whole frame, each part within it."""
    created(server, "dribbled", [4, 2])
    sock = raw_stream(server)
    try:
        slowly(sock, ws_frame(packb({"id": "d", "op": "describe", "name": "dribbled"})), pieces=10, pause=0.15)
        opcode, payload = read_frame(sock)
        assert opcode == 0x2, (opcode, payload)  # an answer, not a close
        answer = unpackb(payload)
        assert (answer["id"], answer["status"]) == ("d", 200)
    finally:
        sock.close()


def test_a_frame_must_arrive_within_the_body_timeout(server):
    """Bytes that never stop coming, never finishing a frame: closed once the frame has taken FRAME_S."""
    sock = raw_stream(server)
    frame = ws_frame(packb({"id": 1, "op": "kinds", "padding": "x" * 100}))
    began = time.monotonic()
    try:
        for byte in frame[:-1]:
            if select.select([sock], [], [], 0.2)[0]:  # the server spoke
                break
            sock.sendall(bytes([byte]))
        opcode, payload = read_frame(sock)
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1008, (opcode, payload)
        assert FRAME_S <= time.monotonic() - began < FRAME_S + 1.5
    finally:
        sock.close()


def test_frames_that_keep_coming_are_each_timed_alone(server):
    """The arrival limit is per frame: a stream of small frames outlasting it goes on."""
    with stream(server) as ws:
        began = time.monotonic()
        for i in range(int(FRAME_S / 0.2) + 3):
            ws.send(packb({"id": i, "op": "kinds"}))
            assert unpackb(ws.recv(timeout=10))["status"] == 200
            time.sleep(0.2)
        assert time.monotonic() - began > FRAME_S


# --- a frame whose tensor the limits refuse ---

OVER_LIMIT = {"dtype": "float32", "shape": [200, 10], "data": b"\0" * 8000}
WRONG_LENGTH = {"dtype": "float32", "shape": [1, 10], "data": b"\0" * 39}


@pytest.mark.parametrize("tensor", [OVER_LIMIT, WRONG_LENGTH], ids=["over-the-limit", "wrong-length"])
def test_a_frame_with_a_bad_tensor_is_a_400_under_its_id_and_the_stream_goes_on(server, tensor):
    created(server, name := f"lim-{len(tensor['data'])}", [10, 2])
    with stream(server) as ws:
        ws.send(packb({"id": "A", "op": "describe", "name": name}))
        ws.send(msgpack.packb({"id": "B", "op": "call", "name": name, "operation": "forward",
                               "tensors": {"inputs": tensor}}))
        ws.send(packb({"id": "C", "op": "describe", "name": name}))
        answers = [unpackb(ws.recv(timeout=10)) for _ in range(3)]
    assert [(a["id"], a["status"]) for a in answers] == [("A", 200), ("B", 400), ("C", 200)]
    rest = httpx.post(f"{server.url}/v1/synapses/{name}/forward", content=msgpack.packb({"inputs": tensor}),
                      headers={"Content-Type": "application/msgpack"})
    assert rest.status_code == 400
    problem = answers[1]["problem"]
    for field in ("type", "title", "status", "detail"):
        assert problem[field] == rest.json()[field], (field, problem, rest.json())
    assert problem["request_id"].endswith(":B")


@pytest.mark.parametrize("raw", [
    b"\xc1 not msgpack",
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"op": "call", "name": "x", "operation": "forward", "tensors": {"inputs": OVER_LIMIT}}),
    msgpack.packb({"id": [1], "op": "call", "name": "x", "operation": "forward", "tensors": {"inputs": OVER_LIMIT}}),
    msgpack.packb({"id": 1, "op": "call", "name": "x", "operation": "forward", "tensors": {"inputs": OVER_LIMIT}})
    + b"\x00",
], ids=["not-msgpack", "not-a-map", "no-id", "unusable-id", "bytes-after-the-map"])
def test_bytes_with_no_id_to_answer_still_close_the_connection(server, raw):
    with stream(server) as ws:
        ws.send(raw)
        answer = unpackb(ws.recv(timeout=10))
        assert (answer["id"], answer["status"]) == (None, 400)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 1007


@pytest.mark.parametrize("ident", [b"\0" * 300_000, "i" * 129, [1, 2], {"a": 1}],
                         ids=["a-bin", "a-long-string", "a-list", "a-map"])
def test_an_id_that_is_no_short_string_or_number_is_refused_in_its_place_and_never_echoed(server, ident):
    """A red-team run: a frame's id could be any value and came back in its answer and its request id (its repr: a
    50 MB bin of zeros made a 250 MB answer, and a 200 MB one held the event loop 3.5 s). An id is a string of at
    most 128 characters (as REST's X-Request-ID), a number or null; another is a 422 answered in the frame's place,
    untagged, and the stream goes on."""
    created(server, name := f"ids-{len(ident)}", [2, 2])
    with stream(server) as ws:
        ws.send(packb({"id": 1, "op": "describe", "name": name}))
        ws.send(msgpack.packb({"id": ident, "op": "describe", "name": name}))
        ws.send(packb({"id": "x" * 128, "op": "describe", "name": name}))
        raw = [ws.recv(timeout=10) for _ in range(3)]
    answers = [unpackb(r) for r in raw]
    assert [(a["id"], a["status"]) for a in answers] == [(1, 200), (None, 422), ("x" * 128, 200)]
    problem = answers[1]["problem"]
    assert problem["detail"].startswith("id: expected a string of at most 128 characters, a number or null")
    assert problem["request_id"].endswith(":?") and len(raw[1]) < 1000


def control_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked frame of ``opcode`` (zero key) with a payload under 126 bytes."""
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def test_pings_whose_pongs_are_never_read_stop_being_read_instead_of_piling_up(tmp_path):
    """A red-team run: a client sending pings and reading nothing made the server queue every pong (196 MB of pings
    in 8 s: +180 MB, held until the idle limit) and starved other clients. Once the socket takes no more, pongs are
    not queued and the connection is no longer read: the client's sends block, as TCP slows any client."""
    with LiveServer(state_dir=tmp_path) as live:
        created(live, "pinged", [2, 2])
        sock = raw_stream(live, rcvbuf=4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # the test's own kernel buffers hold few pings
        try:
            (protocol,) = ws_connections(live)
            ping = control_frame(0x9, b"p" * 125) * 512  # 64 KiB of pings a send
            sock.settimeout(1.0)
            sent = 0
            try:
                while sent < 64 << 20:
                    sent += sock.send(ping[sent % len(ping):])
            except TimeoutError:
                pass
            rest = ping[sent % len(ping):] if sent % len(ping) else b""  # the frame a send stopped in, finished
            assert sent < 64 << 20, "the server kept reading pings whose pongs nobody read"
            assert protocol.transport.get_write_buffer_size() < 1 << 20  # what waits for the client: bounded
            started = time.monotonic()
            assert httpx.get(f"{live.url}/healthz", timeout=5).status_code == 200
            assert time.monotonic() - started < 1
            sock.settimeout(10)  # reading the pongs lets the server read again: the frame after the pings is answered
            sending = threading.Thread(target=sock.sendall,
                                       args=(rest + ws_frame(packb({"id": 9, "op": "describe", "name": "pinged"})),))
            sending.start()  # (behind the pings still unread: sent while the pongs are read)
            received, at = bytearray(), 0
            while True:
                while len(received) - at < 4:
                    received += sock.recv(1 << 20)
                opcode, n = received[at] & 0x0F, received[at + 1] & 0x7F
                width = {126: 2, 127: 8}.get(n, 0)
                n = int.from_bytes(received[at + 2:at + 2 + width], "big") if width else n
                while len(received) < at + 2 + width + n:
                    received += sock.recv(1 << 20)
                if opcode != 0xA:
                    break
                at += 2 + width + n
            assert opcode == 0x2 and unpackb(bytes(received[at + 2 + width:at + 2 + width + n]))["status"] == 200
            sending.join(10)
        finally:
            sock.close()


def test_a_closing_connection_answers_no_pings_and_goes_when_its_close_time_is_up(tmp_path):
    """A red-team run: once the server had sent its close (a text frame answered 1003), pongs were written whatever
    the client read (+190 MB for pings sent to a connection the client kept open, reading nothing), and the close
    waited for them to drain, for ever. A closing connection answers no ping, and goes at the close timeout."""
    with LiveServer(state_dir=tmp_path) as live:
        sock = raw_stream(live, rcvbuf=4096)
        try:
            (protocol,) = ws_connections(live)
            protocol.close_timeout = 3.0
            sock.sendall(control_frame(0x1, b"text"))  # closed with 1003
            time.sleep(0.3)
            sock.settimeout(5)
            waiting = []
            try:  # up to 32 MiB of pings (more than the kernel's buffers take of their pongs), none read
                for _ in range(512):
                    sock.sendall(control_frame(0x9, b"p" * 125) * 512)
                    waiting.append(protocol.transport.get_write_buffer_size())
            except (ConnectionResetError, BrokenPipeError):
                pass  # the close timeout came first
            assert waiting and max(waiting) < 4096, max(waiting)
            deadline = time.monotonic() + 8
            while protocol in ws_connections(live) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert protocol not in ws_connections(live)
        finally:
            sock.close()


def test_a_frame_running_past_the_keepalive_keeps_its_connection_and_its_answer(tmp_path, monkeypatch):
    """A red-team run: uvicorn pings every 20 s and fails the connection when no pong comes in 20 s more, but it reads
    nothing while a frame waits behind a running one; a pipelined stream whose frame ran past that lost its connection
    and its answers, and the session's send raised RuntimeError into the log. Here the keepalive's timeout is 0.2 s
    and a frame runs 1.5 s."""
    from synapse_serve.api import session as session_module

    real = session_module.run_frame

    async def slow(*args, **kwargs):
        await asyncio.sleep(1.5)
        return await real(*args, **kwargs)

    monkeypatch.setattr(session_module, "run_frame", slow)
    with LiveServer(state_dir=tmp_path) as live:
        created(live, "slow", [2, 2])
        with stream(live) as ws:
            ws.send(packb({"id": 1, "op": "describe", "name": "slow"}))
            ws.send(packb({"id": 2, "op": "describe", "name": "slow"}))  # pipelined: waits, unread socket behind it
            (protocol,) = ws_connections(live)
            protocol.ping_timeout = 0.2
            time.sleep(0.3)  # the first frame is running, the second waiting: the socket is not read
            assert protocol.read_paused
            protocol.loop.call_soon_threadsafe(protocol.send_keepalive_ping)
            assert [unpackb(ws.recv(timeout=10))["id"] for _ in range(2)] == [1, 2]
            ws.send(packb({"id": 3, "op": "describe", "name": "slow"}))
            assert unpackb(ws.recv(timeout=10))["id"] == 3


def test_empty_fragments_count_against_the_frame_limit(tmp_path):
    """A red-team run: a binary fragment followed by endless empty continuations added a list entry each that the
    size limit (payload bytes) did not count: 3 million in 9 s held 25 MB. Each counts 64 bytes now, and a message
    past the limit is closed with 1009 as an oversized one is."""
    with LiveServer(state_dir=tmp_path, max_body_bytes=64 << 10) as live:
        sock = raw_stream(live)
        sock.sendall(control_frame(0x2, b"\x81", fin=False) + control_frame(0x0, b"", fin=False) * 2000)
        opcode, payload = read_frame(sock)
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1009, payload
        assert not live.server.server_state.connections or all(
            not c.frames for c in ws_connections(live))
        sock.close()
        sock = raw_stream(live)  # a message of a few fragments is one frame, as before
        body = packb({"id": 5, "op": "list"})
        sock.sendall(control_frame(0x2, body[:3], fin=False) + control_frame(0x0, b"", fin=False)
                     + control_frame(0x0, body[3:]))
        opcode, payload = read_frame(sock)
        assert opcode == 0x2 and unpackb(payload)["id"] == 5
        sock.close()
