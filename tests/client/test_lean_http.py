"""The clients' lean HTTP path (client/synapse_client/_http.py), against a scripted server.

A real uvicorn server answers every other client test through this path (tests/client/
test_transports.py runs them through httpx too); here a scripted HTTP server on a loopback socket
produces what uvicorn rarely does: idle connections closed under the client, chunked, gzip and
close-delimited bodies, broken or truncated answers, silence. Each case checks the answer or the
client's error, and whether the connection was reused, for the blocking client and for the
asyncio one (``AsyncLeanHTTP``), driven here from a loop of its own.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from synapse_client import APIConnectionError, APITimeoutError, AsyncSynapseClient, SynapseClient, _codec
from synapse_client._http import lean_usable


class ScriptedServer:
    """HTTP/1.1 on 127.0.0.1: each request is answered with ``answer(index, method, path, headers, body)``'s bytes
    (None: close the connection without answering; ``(bytes, "close")``: answer, then close). With
    ``close_idle_after``, a connection is closed that many seconds after each answer, without a word (as
    uvicorn closes connections idle for 5 s). Counts connections and requests."""

    def __init__(self, answer, close_idle_after: float | None = None) -> None:
        self.answer = answer
        self.close_idle_after = close_idle_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                length = int(headers.get("content-length", 0))
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                body, buffer = buffer[:length], buffer[length:]
                with self.lock:
                    index = len(self.requests)
                    self.requests.append((method, path, headers, body))
                reply = self.answer(index, method, path, headers, body)
                if reply is None:
                    return
                if isinstance(reply, tuple):
                    conn.sendall(reply[0])
                    return
                conn.sendall(reply)
                if self.close_idle_after is not None:
                    threading.Timer(self.close_idle_after, conn.shutdown, (socket.SHUT_RDWR,)).start()

    def close(self) -> None:
        self.listener.close()


class Client:
    """The blocking client, or the asyncio client run on a loop of its own, behind the same calls."""

    def __init__(self, flavor: str, url: str, **options) -> None:
        self.loop = asyncio.new_event_loop() if flavor == "asyncio" else None
        if self.loop is None:
            self.client = SynapseClient(url, **options)
        else:
            if isinstance(options.get("transport"), httpx.HTTPTransport):
                options["transport"] = httpx.AsyncHTTPTransport()
            self.client = AsyncSynapseClient(url, **options)
        self._lean = self.client._lean

    def request(self, *args, **options):
        if self.loop is None:
            return self.client.request(*args, **options)
        return self.loop.run_until_complete(self.client.request(*args, **options))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is None:
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.close())
            self.loop.close()


@pytest.fixture(params=["blocking", "asyncio"])
def flavor(request) -> str:
    return request.param


def msgpack_answer(value, extra: str = "") -> bytes:
    body = _codec.packb(value)
    return (f"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


@pytest.fixture
def scripted():
    servers = []

    def start(answer, **options) -> ScriptedServer:
        servers.append(ScriptedServer(answer, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_requests_reuse_one_kept_alive_connection_and_send_what_httpx_sends(scripted, flavor):
    server = scripted(lambda i, method, path, headers, body: msgpack_answer({"i": i, "echo": _codec.unpackb(body)}))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with Client(flavor, server.url, token="secret-token") as client:
        assert client._lean is not None
        for i in range(5):
            answer = client.request("POST", "/v1/synapses/a/forward", {"inputs": x}, retry=False,
                                    headers={"Idempotency-Key": f"k{i}"})
            assert answer["i"] == i and np.array_equal(answer["echo"]["inputs"], x)
    assert server.connections == 1
    method, path, headers, _ = server.requests[-1]
    assert (method, path) == ("POST", "/v1/synapses/a/forward")
    assert headers["host"] == server.url.removeprefix("http://")
    assert headers["authorization"] == "Bearer secret-token"
    assert headers["content-type"] == "application/msgpack" and headers["accept"] == "application/msgpack"
    assert headers["idempotency-key"] == "k4"


def test_an_idle_connection_the_server_closed_is_replaced_before_a_call_that_must_not_be_repeated(scripted, flavor):
    server = scripted(lambda i, method, path, headers, body: msgpack_answer({"i": i}), close_idle_after=0.2)
    with Client(flavor, server.url, max_retries=0) as client:
        for i in range(3):
            assert client.request("POST", "/v1/synapses/a/forward", {}, retry=False) == {"i": i}  # never retried
            time.sleep(0.5)  # the server has closed the idle connection by now
    assert server.connections == 3 and len(server.requests) == 3


def test_an_answer_nobody_asked_for_is_never_the_next_requests_answer(scripted, flavor):
    # a misbehaving server or proxy sends a second answer in the same write as the first: the next request must not
    # read it as its own (the connection is discarded, the request goes out on a fresh one)
    def answer(i, method, path, headers, body):
        return msgpack_answer({"i": i}) + msgpack_answer({"i": 666}) if i == 0 else msgpack_answer({"i": i})

    server = scripted(answer)
    with Client(flavor, server.url, max_retries=0) as client:
        assert client.request("POST", "/v1/synapses/a/forward", {}, retry=False) == {"i": 0}
        time.sleep(0.2)  # the unasked answer has arrived with the first (one write)
        assert client.request("POST", "/v1/synapses/a/forward", {}, retry=False) == {"i": 1}
    assert server.connections == 2


@pytest.mark.parametrize("framing", ["chunked", "gzip", "close-delimited"])
def test_answers_framed_every_way_http_allows_are_read_whole(scripted, framing, flavor):
    x = np.random.default_rng(0).normal(size=(300, 100)).astype(np.float32)  # 120 KB: several reads
    body = _codec.packb({"outputs": x})

    def answer(i, method, path, headers, request_body):
        if framing == "chunked":
            chunks = b"".join(f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
                              for part in (body[:7], body[7:70000], body[70000:]))
            return (b"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\ntransfer-encoding: chunked\r\n\r\n"
                    + chunks + b"0\r\nx-trailer: 1\r\n\r\n")
        if framing == "gzip":
            packed = gzip.compress(body)
            return (f"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\ncontent-encoding: gzip\r\n"
                    f"content-length: {len(packed)}\r\n\r\n").encode() + packed
        return b"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\nconnection: close\r\n\r\n" + body

    server = scripted(lambda *args: (answer(*args), "close") if framing == "close-delimited" else answer(*args))
    with Client(flavor, server.url, max_retries=0, timeout=5) as client:
        for _ in range(2):
            assert np.array_equal(client.request("POST", "/v1/synapses/a/forward", {}, retry=False)["outputs"], x)
    assert server.connections == (2 if framing == "close-delimited" else 1)


def test_large_bodies_go_out_and_come_back_whole(scripted, flavor):
    server = scripted(lambda i, method, path, headers, body: msgpack_answer(_codec.unpackb(body)))
    w = np.random.default_rng(1).normal(size=(1024, 1024)).astype(np.float32)  # 4 MiB each way
    with Client(flavor, server.url) as client:
        answer = client.request("PUT", "/v1/synapses/a/compartments/weights", {"value": w}, retry=True)
    assert np.array_equal(answer["value"], w) and answer["value"].flags.writeable


@pytest.mark.parametrize("defect", ["garbage", "truncated", "silence", "refused"])
def test_a_broken_answer_is_the_clients_connection_error_and_a_safe_call_is_retried(scripted, defect, flavor):
    good = msgpack_answer({"ok": True})

    def answer(i, method, path, headers, body):
        if i % 2:
            return good  # every second request: the retry
        if defect == "garbage":
            return b"SPDY/9 what\r\n\r\n"
        if defect == "truncated":
            return good[:-3], "close"  # the connection ends inside the body
        time.sleep(1.0)  # silence: longer than the read timeout
        return good

    if defect == "refused":
        probe = socket.create_server(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        probe.close()
    else:
        server = scripted(answer)
        url = server.url
    with Client(flavor, url, timeout=httpx.Timeout(0.3), max_retries=1) as client:
        error = APITimeoutError if defect == "silence" else APIConnectionError
        with pytest.raises(error) as raised:  # a call not safe to repeat: one attempt, then the error
            client.request("POST", "/v1/synapses/a/forward", {}, retry=False)
        if defect == "refused":
            assert "cannot connect" in str(raised.value) and "2 attempts" in str(raised.value)
            return
        assert "not retried" in str(raised.value) and len(server.requests) == 1
        server.requests.clear()
        assert client.request("GET", "/v1/synapses/a/compartments/w", retry=True) == {"ok": True}  # retried
        assert len(server.requests) == 2


def test_threads_share_one_client(scripted):
    server = scripted(lambda i, method, path, headers, body: msgpack_answer({"path": path}))
    with SynapseClient(server.url) as client:
        failures = []

        def work(t: int) -> None:
            for i in range(40):
                path = f"/v1/synapses/t{t}-{i}"
                if client.request("GET", path, retry=True) != {"path": path}:
                    failures.append(path)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures and len(server.requests) == 240
    assert server.connections <= 6  # connections are reused, at most one per thread at a time


def test_https_a_proxy_or_a_custom_transport_go_through_httpx(monkeypatch):
    assert lean_usable("http://127.0.0.1:8000")
    assert not lean_usable("https://gpu.example.org")
    with SynapseClient("http://127.0.0.1:9", transport=httpx.HTTPTransport()) as client:
        assert client._lean is None
    assert AsyncSynapseClient("http://127.0.0.1:9", transport=httpx.AsyncHTTPTransport())._lean is None
    assert AsyncSynapseClient("http://127.0.0.1:9")._lean is not None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.org:3128")
    assert not lean_usable("http://127.0.0.1:8000")
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("all_proxy", "socks5://proxy.example.org:1080")
    assert not lean_usable("http://127.0.0.1:8000")


def test_a_header_http_does_not_allow_goes_through_httpx_and_its_error(scripted, flavor):
    server = scripted(lambda i, method, path, headers, body: msgpack_answer({"ok": True}))
    with Client(flavor, server.url, max_retries=0) as client:
        assert client._lean.takes("/v1/x", {"X-Ok": "fine"})
        assert not client._lean.takes("/v1/x", {"X-Bad": "split\r\nInjected: yes"})
        with pytest.raises(Exception):  # httpx refuses it; nothing reaches the server
            client.request("GET", "/v1/x", retry=False, headers={"X-Bad": "split\r\nInjected: yes"})
    assert all("injected" not in headers for _, _, headers, _ in server.requests)


def test_tasks_share_one_asyncio_client(scripted):
    server = scripted(lambda i, method, path, headers, body: msgpack_answer({"path": path}))

    async def main() -> list[str]:
        async with AsyncSynapseClient(server.url) as client:
            async def work(t: int) -> list[str]:
                wrong = []
                for i in range(40):
                    path = f"/v1/synapses/t{t}-{i}"
                    if await client.request("GET", path, retry=True) != {"path": path}:
                        wrong.append(path)
                return wrong
            return [path for wrong in await asyncio.gather(*(work(t) for t in range(6))) for path in wrong]

    assert asyncio.run(main()) == [] and len(server.requests) == 240
    assert server.connections <= 6  # connections are reused, at most one per task at a time


def test_a_cancelled_asyncio_call_does_not_leave_its_connection_to_the_next(scripted):
    def answer(i, method, path, headers, body):
        if i == 0:
            time.sleep(0.5)  # the first call is cancelled while it waits for this
        return msgpack_answer({"i": i})

    server = scripted(answer)

    async def main():
        async with AsyncSynapseClient(server.url) as client:
            call = asyncio.ensure_future(client.request("GET", "/v1/a", retry=True))
            await asyncio.sleep(0.1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            return await client.request("GET", "/v1/b", retry=True)  # never the first call's late answer

    assert asyncio.run(main()) == {"i": 1}
    assert server.connections == 2
