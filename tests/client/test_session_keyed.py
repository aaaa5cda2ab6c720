"""The session stream when answers are lost on the way, the server cannot be reached for a moment, or a caller
stops waiting: keyed calls applied exactly once, connections opened again with backoff, nothing kept for a
caller that has gone.

Found by a red-team run (2026-11-30): 200 pipelined evolves whose answers were lost and whose connection then
dropped were each applied twice (the server remembers an instance's last 128 keys, 16 in its file, and the
oldest frames sent again had been forgotten); a session gave up at once when the server refused its new
connection while restarting; a blocking session kept every timed-out call's late answer for its whole life.
A proxy between client and server loses answers and refuses connections on cue.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from synapse_client import APIConnectionError, AsyncSynapseClient, SynapseClient
from synapse_client._session import KEYED_IN_FLIGHT
from synapse_serve.testing import ServerProcess

SMALL = {"shape": [3, 2], "eta": 0.1}


class Proxy:
    """A loopback TCP proxy to ``port``. ``lose_answers_for(s)``: the server's bytes are dropped for ``s`` seconds,
    then every connection is reset. ``refuse_for(s)``: connections live now are reset and new ones closed at once
    for ``s`` seconds."""

    def __init__(self, port: int) -> None:
        self.port, self.listener = port, socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.losing_until = self.refusing_until = 0.0
        self.generation = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_answers_for(self, seconds: float) -> None:
        self.losing_until = time.monotonic() + seconds
        threading.Timer(seconds, self._reset).start()

    def refuse_for(self, seconds: float) -> None:
        self.refusing_until = time.monotonic() + seconds
        self._reset()
        time.sleep(0.1)  # the live connections are closed by now

    def _reset(self) -> None:
        self.generation += 1

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.refusing_until:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        server, generation = socket.create_connection(("127.0.0.1", self.port)), self.generation
        client.settimeout(0.02)
        server.settimeout(0.02)
        try:
            while self.generation == generation:
                for source, sink in ((client, server), (server, client)):
                    try:
                        data = source.recv(1 << 16)
                    except TimeoutError:
                        continue
                    if not data:
                        return
                    if source is server and time.monotonic() < self.losing_until:
                        continue  # an answer lost on the way
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("keyed") / "state", durability="sync", compilation_cache="false",
                       busy_poll_us=0) as live:
        yield live


@pytest.fixture
def proxy(server):
    proxied = Proxy(server.port)
    yield proxied
    proxied.close()


def created(server, name: str) -> None:
    with SynapseClient(server.url) as client:
        client.create(name, kind="HebbianSynapse", config=SMALL)


def evolves(server, name: str) -> int:
    with SynapseClient(server.url) as client:
        return client.get(name).describe()["counters"].get("evolve", 0)


def pair(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    return rng.normal(size=(1, 3)).astype(np.float32), rng.normal(size=(1, 2)).astype(np.float32)


CALLS = 200  # more than the keys an instance remembers (128): before the bound, the oldest ran twice


def test_pipelined_evolves_whose_answers_were_lost_are_applied_once_each(server, proxy):
    created(server, "lost-answers")
    with SynapseClient(proxy.url, max_retries=5) as client, client.session() as session:
        syn = session.get("lost-answers")
        proxy.lose_answers_for(1.0)
        pending = [syn.submit("evolve", pre=pre, post=post) for pre, post in map(pair, range(CALLS))]
        assert len(session._keyed) <= KEYED_IN_FLIGHT
        versions = [p.result()["version"] for p in pending]
    assert sorted(versions) == list(range(2, CALLS + 2))
    assert evolves(server, "lost-answers") == CALLS


def test_concurrent_async_evolves_whose_answers_were_lost_are_applied_once_each(server, proxy):
    created(server, "lost-answers-async")

    async def run() -> list[int]:
        async with AsyncSynapseClient(proxy.url, max_retries=5) as client, client.session() as session:
            syn = await session.get("lost-answers-async")
            proxy.lose_answers_for(1.0)
            answers = await asyncio.gather(*(syn.evolve(pre, post) for pre, post in map(pair, range(CALLS))))
            return [answer["version"] for answer in answers]

    assert sorted(asyncio.run(run())) == list(range(2, CALLS + 2))
    assert evolves(server, "lost-answers-async") == CALLS


def test_a_session_opens_again_with_backoff_while_connections_are_refused(server, proxy):
    created(server, "refused")
    pre, post = pair(0)
    with SynapseClient(proxy.url, max_retries=4) as client, client.session() as session:
        syn = session.get("refused")
        proxy.refuse_for(0.6)  # backoff 0.25 + 0.5 s: the third try gets through
        assert syn.evolve(pre, post)["version"] == 2
    with SynapseClient(proxy.url, max_retries=0) as client, client.session() as session:
        syn = session.get("refused")
        proxy.refuse_for(0.6)
        with pytest.raises(APIConnectionError, match="cannot open"):  # no retries asked: at once
            syn.evolve(pre, post)
    time.sleep(0.6)  # the proxy takes connections again

    async def run() -> int:
        async with AsyncSynapseClient(proxy.url, max_retries=4) as client, client.session() as session:
            syn = await session.get("refused")
            proxy.refuse_for(0.6)
            return (await syn.evolve(pre, post))["version"]

    assert asyncio.run(run()) == 3
    assert evolves(server, "refused") == 2


def test_a_blocking_session_keeps_nothing_for_a_call_that_timed_out(server):
    created(server, "timed-out")
    xs = np.ones((3000, 1, 3), np.float32)
    with SynapseClient(server.url, timeout=httpx.Timeout(30, read=0.05)) as client, client.session() as session:
        syn = session.get("timed-out")
        with pytest.raises(APIConnectionError):
            syn.forward(xs)  # a 3,000-step sequence: longer than the read timeout (and compiled first)
        with SynapseClient(server.url) as other:
            deadline = time.monotonic() + 60
            while other.get("timed-out").describe()["counters"].get("forward", 0) < 1:  # done on the server
                assert time.monotonic() < deadline
                time.sleep(0.1)
        syn.describe()  # reads the late answer first, and drops it
        assert session._answers == {} and not session._abandoned
        client.timeout = httpx.Timeout(30)  # a sync-mode call writes its file: longer than 50 ms on a slow disk
        assert syn.forward(np.ones((1, 3), np.float32)).shape == (1, 2)


def _written_then_evolved(server, name: str, weights: np.ndarray, pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """The weights of an instance made like the others after ``weights`` are written and one evolve, over REST."""
    with SynapseClient(server.url) as client:
        twin = client.create(name, kind="HebbianSynapse", config=SMALL)
        twin.set("weights", weights)
        twin.evolve(pre, post)
        return twin.weights


def test_a_write_is_not_sent_again_after_a_drop_when_a_later_call_may_have_run(server, proxy):
    """Found by a red-team run (2026-11-30): a compartment write and a keyed evolve pipelined after it both ran,
    their answers were lost, the connection dropped, and the session sent both again: the write ran a second time,
    after the evolve (whose retry was answered from its key), and undid an acknowledged evolve. Now a frame that
    changes state is not sent again once a later one that changes state has been sent: the write fails (it may
    have run), the evolve is answered once, and the server holds the write, then the evolve."""
    weights, (pre, post) = np.full((3, 2), 0.25, np.float32), pair(7)
    expected = _written_then_evolved(server, "write-then-evolve-twin", weights, pre, post)
    created(server, "write-then-evolve")
    with SynapseClient(proxy.url, max_retries=5) as client, client.session() as session:
        syn = session.get("write-then-evolve")
        proxy.lose_answers_for(1.0)
        written = session.submit("PUT", "/v1/synapses/write-then-evolve/compartments/weights", {"value": weights},
                                 retry=True)
        evolved = syn.submit("evolve", pre=pre, post=post)
        with pytest.raises(APIConnectionError, match="a call that changes state was sent after it"):
            written.result()
        assert evolved.result()["version"] == 3
        np.testing.assert_array_equal(syn.weights, expected)  # the evolve stays
        # a write with nothing sent after it is still sent again
        proxy.lose_answers_for(1.0)
        assert session.submit("PUT", "/v1/synapses/write-then-evolve/compartments/weights", {"value": weights},
                              retry=True).result()["version"] >= 4
        np.testing.assert_array_equal(syn.weights, weights)

    async def run() -> list:
        async with AsyncSynapseClient(proxy.url, max_retries=5) as client, client.session() as session:
            syn = await session.get("write-then-evolve-async")
            proxy.lose_answers_for(1.0)
            written = asyncio.create_task(syn.set("weights", weights))
            await asyncio.sleep(0)  # the write goes out first
            results = await asyncio.gather(written, syn.evolve(pre, post), return_exceptions=True)
            return [*results, await syn.get("weights")]

    created(server, "write-then-evolve-async")
    write_result, evolve_result, after = asyncio.run(run())
    assert isinstance(write_result, APIConnectionError) and "sent after it" in str(write_result)
    assert evolve_result["version"] == 3
    np.testing.assert_array_equal(after, expected)


def test_a_read_is_not_sent_again_after_a_drop_when_a_later_call_may_have_run(server, proxy):
    """A red-team run (2026-11-30): a read pipelined before an evolve, both answers lost, the read sent again
    after the drop answered with the evolve's weights: the answer of a frame showed a frame sent after it. It
    fails instead, as an overtaken write does; a read with nothing after it that changes state goes again."""
    created(server, "read-then-evolve")
    pre, post = pair(8)
    with SynapseClient(proxy.url, max_retries=5) as client, client.session() as session:
        syn = session.get("read-then-evolve")
        before = syn.weights
        proxy.lose_answers_for(1.0)
        read = session.submit("GET", "/v1/synapses/read-then-evolve/compartments/weights", retry=True)
        evolved = syn.submit("evolve", pre=pre, post=post)
        with pytest.raises(APIConnectionError, match="a call that changes state was sent after it"):
            read.result()
        assert evolved.result()["version"] == 2
        proxy.lose_answers_for(1.0)
        after = session.submit("GET", "/v1/synapses/read-then-evolve/compartments/weights", retry=True).result()
        assert after["version"] == 2 and not np.array_equal(after["value"], before)


def test_async_calls_cut_by_a_drop_go_again_in_the_order_they_were_first_sent(server, proxy):
    """Concurrent asyncio calls cut by one drop: each learns of the drop before any is sent again, so a read pipelined
    after a keyed evolve is not taken as overtaken by the evolve's resend (a new id, sent after it) and goes again;
    a read pipelined before a write, both cut, is overtaken by the write, and the write stays."""
    created(server, "async-order")
    pre, post = pair(9)
    weights = np.full((3, 2), 0.5, np.float32)

    async def run() -> list:
        async with AsyncSynapseClient(proxy.url, max_retries=5) as client, client.session() as session:
            syn = await session.get("async-order")
            proxy.lose_answers_for(1.0)
            calls = [syn.evolve(pre, post), syn.get("weights"), syn.describe()]
            first = await asyncio.gather(*calls, return_exceptions=True)
            proxy.lose_answers_for(1.0)
            read = asyncio.create_task(syn.get("weights"))
            await asyncio.sleep(0)  # the read goes out first
            second = await asyncio.gather(read, syn.set("weights", weights), return_exceptions=True)
            return [*first, *second, await syn.get("weights")]

    evolved, read, described, overtaken_read, written, after = asyncio.run(run())
    assert evolved["version"] == 2 and described["version"] == 2, (evolved, described)
    assert not isinstance(read, BaseException), read
    with SynapseClient(server.url) as client:
        assert client.get("async-order").describe()["counters"]["evolve"] == 1
    assert isinstance(overtaken_read, APIConnectionError) and "sent after it" in str(overtaken_read)
    assert written >= 3  # a write cut by a drop with nothing after it goes again: it may have run twice
    np.testing.assert_array_equal(after, weights)
