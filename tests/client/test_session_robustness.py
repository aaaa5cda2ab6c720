"""The client's session stream when the connection is not simply there: pipelining past the server's bounded
queue, the server's routine idle close, a connection dropped under concurrent calls.

Against a real server process (``ServerProcess``: its own GIL, as in production) with a short idle timeout
and a small queue of unread frames, so each case takes seconds.
"""

from __future__ import annotations

import asyncio
import gc
import select
import socket
import time

import numpy as np
import pytest

from synapse_client import APIConnectionError, AsyncSynapseClient, SynapseClient
from synapse_serve.testing import ServerProcess
from websockets.protocol import State

IDLE_S = 1.0  # SYNAPSE_SESSION_IDLE_S: the server closes a stream idle this long
SMALL = {"shape": [3, 2], "eta": 0.1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("robust") / "state", session_idle_s=IDLE_S,
                       max_body_bytes=8 << 20, compilation_cache="false",
                       busy_poll_us=0) as live:
        yield live


def created(server, name: str, config: dict = SMALL) -> None:
    with SynapseClient(server.url) as client:
        client.create(name, kind="HebbianSynapse", config=config)


def described(server, name: str) -> dict:
    with SynapseClient(server.url) as client:
        return client.get(name).describe()


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The URLs of the connections async sessions open."""
    from synapse_client import _session

    urls, connect = [], _session.async_connect

    def counted(url, **options):
        urls.append(url)
        return connect(url, **options)

    monkeypatch.setattr(_session, "async_connect", counted)
    return urls


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


X, Y = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)


def test_pipelining_large_frames_before_reading_any_answer_does_not_deadlock(server):
    """32 forwards of 2 MiB each way, all submitted before one answer is read: far more than the server's queue
    and the sockets' buffers hold (loopback buffers grow to several MiB each way: 24 of 1 MiB could fit). The
    client reads answers while it sends, so none waits on the other."""
    created(server, "piped", {"shape": [1024, 1024], "eta": 0.01})
    xs = [np.full((512, 1024), i + 1, np.float32) for i in range(32)]
    with SynapseClient(server.url, timeout=5) as client, client.session() as session:
        syn = session.get("piped")
        started = time.monotonic()
        pending = [syn.submit("forward", inputs=x) for x in xs]
        answers = [p.result() for p in pending]
        assert time.monotonic() - started < 5
        assert [a["version"] for a in answers] == list(range(2, 34))  # in order, each applied once
        rest = client.get("piped")
        for i in (0, 11, 31):
            np.testing.assert_array_equal(answers[i]["outputs"], rest.forward(xs[i]))
        assert syn.forward(xs[0]).shape == (512, 1024)  # the stream goes on
    assert described(server, "piped")["version"] == 37


def test_a_blocking_session_idle_closed_by_the_server_sends_its_next_call_on_a_new_connection(server):
    """The idle close is routine: the next call, even one not safe to repeat, goes out on a new connection."""
    created(server, "idle-sync")
    with SynapseClient(server.url) as client, client.session() as session:
        syn = session.get("idle-sync")
        syn.forward(X)
        first = session._ws
        time.sleep(IDLE_S)
        wait_until(lambda: select.select([first.sock], [], [], 0)[0])  # the server's close frame is here
        assert syn.forward(X).shape == (2, 2)  # unkeyed: it was never sent on the closed connection
        assert session._ws is not first
        assert syn.forward(X).shape == (2, 2)
    assert described(server, "idle-sync")["version"] == 4


def run_watched(main) -> list[dict]:
    """Run ``main()`` on a fresh loop; what the loop reported on the way (unretrieved future exceptions and the
    like: none is expected)."""
    problems: list[dict] = []

    async def watched():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context))
        await main()
        gc.collect()  # a future dropped with its exception unretrieved reports it when collected

    asyncio.run(watched())
    return problems


def test_concurrent_async_calls_after_the_idle_close_share_one_reopen(server, opened):
    created(server, "idle-async")

    async def main():
        async with AsyncSynapseClient(server.url) as client, client.session() as session:
            syn = await session.get("idle-async")
            await asyncio.sleep(IDLE_S)
            while session._ws.state is State.OPEN:  # until the server's close has been read
                await asyncio.sleep(0.02)
            results = await asyncio.gather(*[syn.evolve(X, Y) for _ in range(8)], *[syn.forward(X) for _ in range(4)],
                                           return_exceptions=True)
            assert [r for r in results if isinstance(r, BaseException)] == []

    assert run_watched(main) == []
    assert len(opened) == 2  # the first connection, one reopen
    assert described(server, "idle-async")["version"] == 13


def test_concurrent_async_calls_on_a_dropped_connection_follow_the_retry_rules(server, opened):
    """Keyed calls sent before the drop are sent again, once, on one new connection; unkeyed ones fail with
    APIConnectionError (they may have been applied); no AttributeError, no unretrieved future."""
    created(server, "drop-async")

    async def main():
        async with AsyncSynapseClient(server.url) as client, client.session() as session:
            syn = await session.get("drop-async")
            tasks = [asyncio.create_task(syn.evolve(X, Y)) for _ in range(8)]
            tasks += [asyncio.create_task(syn.forward(X)) for _ in range(4)]
            while len(session._waiting) < len(tasks):  # every frame is sent
                await asyncio.sleep(0)
            session._ws.transport.abort()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results[8:]:
                assert not isinstance(r, BaseException) or isinstance(r, APIConnectionError), repr(r)
            assert [r for r in results[:8] if isinstance(r, BaseException)] == []
            assert (await syn.forward(X)).shape == (2, 2)  # the session works on

    assert run_watched(main) == []
    assert len(opened) == 2  # the first connection, one reopen for all the calls
    assert described(server, "drop-async")["counters"]["evolve"] == 8  # each keyed evolve applied once


def test_a_blocking_session_that_gave_up_on_a_connection_opens_a_new_one_for_the_next_call(server):
    created(server, "given-up")
    with SynapseClient(server.url, max_retries=0) as client, client.session() as session:
        syn = session.get("given-up")
        pending = syn.submit("forward", inputs=X)
        session._ws.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(APIConnectionError):
            pending.result()
        assert syn.forward(X).shape == (2, 2)


def test_calls_on_a_closed_session_raise_the_documented_error(server):
    created(server, "closed")
    with SynapseClient(server.url) as client:
        session = client.session()
        syn = session.get("closed")
        session.close()
        with pytest.raises(APIConnectionError, match="closed"):
            syn.forward(X)

    async def main():
        async with AsyncSynapseClient(server.url) as client:
            async with client.session() as session:
                syn = await session.get("closed")
            with pytest.raises(APIConnectionError, match="closed"):
                await syn.forward(X)

    asyncio.run(main())
