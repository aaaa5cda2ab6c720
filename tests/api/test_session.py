"""The session stream against a real uvicorn server: auth once, isolation, pipelining, limits, misbehaving clients.

Raw frames go through websockets' own client (what any language's client would send); the
Python client's ``Session`` is exercised for reconnects and keyed retries. Every refusal must
leave the server serving and the instances untouched.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import LiveServer
from synapse_client import APIConnectionError, AsyncSynapseClient, AuthenticationError, SynapseClient, packb, unpackb

ALICE, BOB = "alice-" + "a" * 24, "bob-" + "b" * 24
KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [2, 2, 1, 2], "x_shape": [4, 4], "eta": 0.1}
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(state_dir=tmp_path_factory.mktemp("session"), tokens=f"alice:{ALICE},bob:{BOB}",
                    max_body_bytes=MAX_BODY) as live:
        yield live


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/session"


def stream(server, token: str = ALICE, **options):
    return connect(ws_url(server), additional_headers={"Authorization": f"Bearer {token}"}, max_size=None,
                   **options)


def ask(ws, frame: dict) -> dict:
    ws.send(packb(frame))
    return unpackb(ws.recv(timeout=30))


def inputs(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 4, 4, 1)).astype(np.float32)


def alive(server) -> bool:
    return httpx.get(f"{server.url}/readyz").status_code == 200


def created(server, name: str, token: str = ALICE):
    with SynapseClient(server.url, token=token) as client:
        return client.create(name, kind=KIND, config=CONFIG)


def version(server, name: str, token: str = ALICE) -> int:
    with SynapseClient(server.url, token=token) as client:
        return client.get(name).describe()["version"]


def test_the_stream_needs_a_valid_token(server):
    for headers in ({}, {"Authorization": "Bearer not-a-token-at-all-xx"}, {"Authorization": f"Basic {ALICE}"}):
        with pytest.raises(InvalidStatus) as info:
            connect(ws_url(server), additional_headers=headers).close()
        assert info.value.response.status_code == 403
    with SynapseClient(server.url, token="wrong-" + "x" * 20) as client, pytest.raises(AuthenticationError):
        client.session()
    assert alive(server)


def test_owners_stay_isolated_on_the_stream(server):
    created(server, "secret-one")
    with stream(server, BOB) as ws:
        for frame in ({"op": "describe", "name": "secret-one"},
                      {"op": "describe", "name": "secret-one", "owner": "alice"},
                      {"op": "call", "name": "secret-one", "operation": "forward", "owner": "alice",
                       "tensors": {"inputs": inputs(0)}},
                      {"op": "call_many", "operation": "forward", "owner": "alice",
                       "calls": [{"name": "secret-one", "tensors": {"inputs": inputs(0)}}]},
                      {"op": "call_many", "operation": "forward", "owner": "alice", "names": ["secret-one"],
                       "tensors": {"inputs": inputs(0)[None]}},
                      {"op": "list", "owner": "alice"}):
            answer = ask(ws, {"id": 1, **frame})
            assert answer["status"] == 404, (frame, answer)
            assert "alice" not in answer["problem"]["detail"]
        assert ask(ws, {"id": 2, "op": "list"}) == {"id": 2, "status": 200, "result": {"synapses": []}}
    assert version(server, "secret-one") == 1


def test_pipelined_frames_are_answered_in_order_each_tagged_with_its_id(server):
    created(server, "piped")
    created(server, "piped-twin")
    with stream(server) as ws, SynapseClient(server.url, token=ALICE) as client:
        twin = client.get("piped-twin")
        for i in range(20):  # all sent before any answer is read
            ws.send(packb({"id": 100 + i, "op": "call", "name": "piped", "operation": "forward",
                           "tensors": {"inputs": inputs(i)}}))
        answers = [unpackb(ws.recv(timeout=30)) for _ in range(20)]
        assert [a["id"] for a in answers] == list(range(100, 120))
        assert [a["result"]["version"] for a in answers] == list(range(2, 22))
        for i, answer in enumerate(answers):
            assert np.array_equal(answer["result"]["outputs"], twin.forward(inputs(i)))


def test_answers_larger_than_the_clients_read_buffer_arrive_whole_and_in_order(server):
    """The client reads into one buffer it reuses (INBOX_BYTES); answers of several reads each, and several
    answers in one read, must come out intact."""
    from synapse_client._session import INBOX_BYTES

    wide = {"shape": [16, INBOX_BYTES // 4 // 24 * 3], "eta": 0.1}  # (24, n) float32 answers: ~3x the buffer
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(24, 16)).astype(np.float32) for _ in range(4)]
    with SynapseClient(server.url, token=ALICE) as client, client.session() as session:
        client.create("wide", kind="HebbianSynapse", config=wide)
        syn = session.get("wide")
        pending = [syn.submit("forward", inputs=x) for x in xs]  # all sent before any answer is read
        answers = [p.result()["outputs"] for p in pending]
        small = [syn.submit("forward", inputs=x[:1]) for x in xs]  # small ones: several in one read
        small_answers = [p.result()["outputs"] for p in small]
        rest = client.get("wide")
        for x, answer, small_answer in zip(xs, answers, small_answers):
            assert answer.nbytes > 2 * INBOX_BYTES
            np.testing.assert_array_equal(answer, rest.forward(x))
            np.testing.assert_array_equal(small_answer, rest.forward(x[:1]))


def test_a_client_that_floods_the_stream_is_slowed_not_harmed(server):
    """The server stops reading the socket while a frame waits to be run; none is lost or reordered."""
    created(server, "flooded")
    with stream(server) as ws:
        for i in range(200):
            ws.send(packb({"id": i, "op": "call", "name": "flooded", "operation": "forward",
                           "tensors": {"inputs": inputs(i % 7)}}))
        assert [unpackb(ws.recv(timeout=60))["id"] for _ in range(200)] == list(range(200))
    assert version(server, "flooded") == 201 and alive(server)


def test_a_frame_gets_the_problem_the_rest_route_gives(server):
    created(server, "errors")
    cases = [
        ({"op": "describe", "name": "nothing-here"}, "GET", "/v1/synapses/nothing-here", None, {}),
        ({"op": "call", "name": "errors", "operation": "forward", "tensors": {"inputs": np.ones((2, 3, 3, 1))}},
         "POST", "/v1/synapses/errors/forward", {"inputs": np.ones((2, 3, 3, 1))}, {}),
        ({"op": "call", "name": "errors", "operation": "fly"}, "POST", "/v1/synapses/errors/fly", {}, {}),
        ({"op": "read", "name": "errors", "compartment": "wieghts"}, "GET",
         "/v1/synapses/errors/compartments/wieghts", None, {}),
        ({"op": "call", "name": "errors", "operation": "forward", "if_match": 99,
          "tensors": {"inputs": inputs(0)}}, "POST", "/v1/synapses/errors/forward", {"inputs": inputs(0)},
         {"If-Match": '"99"'}),
        ({"op": "create", "body": {"name": "errors", "kind": KIND, "config": CONFIG}}, "POST", "/v1/synapses",
         {"name": "errors", "kind": KIND, "config": CONFIG}, {}),
        ({"op": "create", "body": {"name": "bad name!", "kind": KIND, "config": CONFIG}}, "POST", "/v1/synapses",
         {"name": "bad name!", "kind": KIND, "config": CONFIG}, {}),
        ({"op": "call", "name": "errors", "operation": "forward", "sequence": {"every": 9},
          "tensors": {"inputs": np.ones((3, 2, 4, 4, 1))}}, "POST", "/v1/synapses/errors/forward",
         {"inputs": np.ones((3, 2, 4, 4, 1)), "sequence": {"every": 9}}, {}),
        *(({"op": "call", "name": "errors", "operation": "forward", "sequence": options,  # once a 500 (unhashable)
            "tensors": {"inputs": np.ones((3, 2, 4, 4, 1))}}, "POST", "/v1/synapses/errors/forward",
           {"inputs": np.ones((3, 2, 4, 4, 1)), "sequence": options}, {})
          for options in ({"every": [1, 2]}, {"every": {"a": 1}}, {"last": "yes"}, {"every": 1, "last": True,
                                                                                    "more": 2})),
    ]
    with stream(server) as ws:
        for frame, method, path, body, headers in cases:
            answer = ask(ws, {"id": 7, **frame})
            rest = httpx.request(method, f"{server.url}{path}", content=None if body is None else packb(body),
                                 headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/msgpack",
                                          **headers})
            problem = rest.json()
            assert answer["status"] == rest.status_code, (frame, answer, problem)
            for field in ("type", "title", "status", "detail"):
                assert answer["problem"][field] == problem[field], (field, answer["problem"], problem)
            assert answer["problem"]["request_id"].endswith(":7")
        with_ref = {"name": "from-ref", "kind": KIND, "config": CONFIG, "init": {"weights": {"ref": "weights",
                                                                                        "instance": "errors"}}}
        refused = ask(ws, {"id": 9, "op": "create", "body": with_ref})
        rest = httpx.post(f"{server.url}/v1/synapses", content=packb(with_ref),
                          headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/msgpack"})
        assert refused["status"] == rest.status_code == 422, (refused, rest.text)
        assert refused["problem"]["detail"] == rest.json()["detail"] == (
            "init.weights: a create takes tensors, not references (read the compartment and send it)")
        for too_long in (10 ** 18, 2 ** 64 - 1):  # REST's If-Match takes 18 digits at most: the same 400 (a 412 here)
            over = ask(ws, {"id": 8, "op": "call", "name": "errors", "operation": "forward", "if_match": too_long,
                            "tensors": {"inputs": inputs(0)}})
            rest = httpx.post(f"{server.url}/v1/synapses/errors/forward", content=packb({"inputs": inputs(0)}),
                              headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/msgpack",
                                       "If-Match": f'"{too_long}"'})
            assert over["status"] == rest.status_code == 400 and over["problem"]["detail"].startswith("if_match:")
    assert version(server, "errors") == 1


@pytest.mark.parametrize(("send", "code", "answered"), [
    (lambda ws: ws.send("a text frame"), 1003, None),
    (lambda ws: ws.send(b"\xc1 not msgpack"), 1007, 400),
    (lambda ws: ws.send(msgpack.packb([1, 2, 3])), 1007, 400),
    # a tensor that does not decode in a frame with no id: nothing to tag an answer with (with one: a 400, below)
    (lambda ws: ws.send(msgpack.packb({"op": "call", "name": "x", "operation": "forward",
                                       "tensors": {"inputs": {"dtype": "float32", "shape": [1 << 40],
                                                              "data": b""}}})), 1007, 400),
])
def test_garbage_closes_that_connection_and_nothing_else(server, send, code, answered, unique_name):
    created(server, unique_name)
    with stream(server) as ws:
        send(ws)
        if answered is not None:
            assert unpackb(ws.recv(timeout=30))["status"] == answered
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=30)
        assert info.value.rcvd.code == code
    with stream(server) as ws:  # the next client is served
        assert ask(ws, {"id": 1, "op": "describe", "name": unique_name})["status"] == 200
    assert alive(server)


@pytest.mark.parametrize("frame", [
    {"op": "explode", "name": "x"},
    {"op": "call", "name": "x"},
    {"op": "read", "name": "x", "compartment": "weights", "extra": 1},
    {"op": "call", "name": ["x"], "operation": "forward"},
    {"op": "call", "name": "x", "operation": "forward", "tensors": [1, 2]},
    {"op": "call", "name": "x", "operation": "forward", "idempotency_key": "\n"},
    {"op": "call_many", "operation": "forward", "calls": "everything"},
    {"op": "call_many", "operation": "forward"},
    {"op": "call_many", "operation": "forward", "calls": [], "names": ["x"], "tensors": {}},
    {"op": "call_many", "operation": "forward", "names": ["x"]},
    {"op": "call_many", "operation": "forward", "names": "x", "tensors": {"inputs": np.ones((1, 1), np.float32)}},
    {"op": "call_many", "operation": "forward", "names": ["x"], "tensors": {"inputs": {"ref": "inputs"}}},
    {"op": 7},
    {"op": np.ones((1, 2), np.float32)},  # a tensor as the op: compared with names, it had dropped the connection
    {"op": ["call", "call_many"], "idempotency_key": "k"},
    {"op": "call", "name": "x", "operation": ["forward"]},  # anything msgpack holds, counted in the metrics too
    {"op": "call", "name": "x", "operation": {"forward": 1}},
    {"op": "call_many", "operation": {"a": 1}, "calls": []},
    {"op": "call_many", "operation": ["forward"], "names": ["x"], "tensors": {}},
    {"op": "call", "name": "x", "operation": "forward",  # a tensor over max_tensor_elements: REST's 400
     "tensors": {"inputs": {"dtype": "float32", "shape": [1 << 40], "data": b""}}},
])
def test_a_bad_frame_is_a_problem_answer_and_the_stream_goes_on(server, frame):
    with stream(server) as ws:
        answer = ask(ws, {"id": "q", **frame})
        assert answer["id"] == "q" and 400 <= answer["status"] < 500, answer
        assert answer["problem"]["detail"]
        assert ask(ws, {"id": 2, "op": "kinds"})["status"] == 200


def test_an_oversized_frame_closes_the_connection(server):
    created(server, "big")
    with stream(server) as ws:
        ws.send(packb({"id": 1, "op": "call", "name": "big", "operation": "forward",
                       "tensors": {"inputs": np.zeros((MAX_BODY // 64 + 1, 4, 4, 1), np.float32)}}))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=30)
        assert info.value.rcvd.code == 1009  # message too big
    assert version(server, "big") == 1 and alive(server)


def test_a_client_that_vanishes_mid_frame_changes_nothing(server):
    created(server, "vanish")
    frame = packb({"id": 1, "op": "call", "name": "vanish", "operation": "forward",
                   "tensors": {"inputs": inputs(0, batch=64)}})
    ws = stream(server)
    header = bytes([0x82, 0x80 | 127]) + len(frame).to_bytes(8, "big") + b"\0\0\0\0"  # binary, masked (key 0)
    ws.socket.sendall(header + frame[: len(frame) // 2])
    ws.socket.shutdown(socket.SHUT_RDWR)
    ws.socket.close()
    time.sleep(0.3)
    assert version(server, "vanish") == 1 and alive(server)


def test_an_idle_stream_is_closed(tmp_path):
    with LiveServer(state_dir=tmp_path, session_idle_s=0.3) as live:
        with connect(ws_url(live)) as ws:
            assert ask(ws, {"id": 1, "op": "kinds"})["status"] == 200
            time.sleep(0.8)
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=5)
            assert info.value.rcvd.code == 1001


def _drop(session) -> None:
    """Break the session's connection under it, as a network would."""
    session._ws.sock.shutdown(socket.SHUT_RDWR)


def test_a_keyed_call_is_applied_once_when_the_connection_drops_before_its_answer(server):
    created(server, "keyed")
    x, post = inputs(1), np.ones((2, 4, 4, 2), np.float32)
    with SynapseClient(server.url, token=ALICE) as client, client.session() as session:
        syn = session.get("keyed")
        pending = syn.submit("evolve", pre=x, post=post, idempotency_key="evolve-once")
        _drop(session)
        assert pending.result()["version"] == 2  # sent again on a new connection, with its key
        assert syn.evolve(x, post, returns=()) == {"version": 3}  # the stream works again
        again = syn.call("evolve", pre=x, post=post, idempotency_key="evolve-once")
        assert again["version"] == 2  # the first answer, not a third update
    with SynapseClient(server.url, token=ALICE) as client:
        assert client.get("keyed").describe()["counters"] == {"evolve": 2}


def test_an_unkeyed_call_is_not_sent_again_after_a_drop(server):
    created(server, "unkeyed")
    with SynapseClient(server.url, token=ALICE) as client, client.session() as session:
        syn = session.get("unkeyed")
        # a sequence of 4,000 steps (compiled first): its answer cannot be back before the drop below
        pending = syn.submit("forward", inputs=np.repeat(inputs(2)[None], 4000, axis=0), sequence={"last": True})
        _drop(session)
        with pytest.raises(APIConnectionError, match="not sent again"):
            pending.result()
        assert syn.forward(inputs(3)).shape == (2, 4, 4, 2)  # the session reconnected
    assert version(server, "unkeyed") in (2, 3)  # the lost forward may or may not have run: never twice


def _twin_evolved(server, name: str, pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """The weights an instance created like the others has after one evolve on these tensors, over REST."""
    with SynapseClient(server.url, token=ALICE) as client:
        twin = client.create(name, kind=KIND, config=CONFIG)
        twin.evolve(pre, post)
        return twin.weights


def test_a_frame_sent_again_after_a_drop_is_the_one_first_sent_not_the_arrays_as_they_are_now(server):
    x, post = inputs(4), np.ones((2, 4, 4, 2), np.float32)
    expected = _twin_evolved(server, "resent-twin", x.copy(), post.copy())
    created(server, "resent")
    with SynapseClient(server.url, token=ALICE) as client, client.session() as session:
        syn = session.get("resent")
        pending = syn.submit("evolve", pre=x, post=post, idempotency_key="resent-once")
        x[...] = 9.0  # the caller's next step, in place, before the answer
        post[...] = 9.0
        _drop(session)
        assert pending.result()["version"] == 2
        np.testing.assert_array_equal(syn.get("pre"), inputs(4))
        np.testing.assert_array_equal(syn.weights, expected)


def test_an_async_session_encodes_a_frame_when_it_is_submitted(server):
    x, post = inputs(5), np.ones((2, 4, 4, 2), np.float32)
    expected = _twin_evolved(server, "async-resent-twin", x.copy(), post.copy())
    created(server, "async-resent")

    async def main():
        async with AsyncSynapseClient(server.url, token=ALICE) as client, client.session() as session:
            syn = await session.get("async-resent")
            task = syn.submit("evolve", pre=x, post=post, idempotency_key="async-resent-once")
            x[...] = 9.0  # before the task has run at all
            post[...] = 9.0
            session._ws.transport.abort()  # and its first send meets a broken connection
            assert (await task)["version"] == 2
            np.testing.assert_array_equal(await syn.get("pre"), inputs(5))
            np.testing.assert_array_equal(await syn.weights, expected)

    asyncio.run(main())


def test_large_answers_are_encoded_off_the_event_loop(server, monkeypatch):
    """A red-team reading (2026-11-30): a frame's answer was encoded on the event loop every connection shares, and
    an export frame joined the whole file there (REST streams both): a copy of up to the instance's size each time.
    Answers holding over a megabyte are made on the API's threads, within the owner's share."""
    import threading

    from synapse_serve.api import session

    made = []
    real_packb = session.packb

    def recording(answer):
        made.append((threading.current_thread().name, len(real_packb(answer))))
        return real_packb(answer)

    monkeypatch.setattr(session, "packb", recording)
    with SynapseClient(server.url, token=ALICE) as client:
        client.create("wide-answers", kind="HebbianSynapse", config={"shape": [512, 1024]})  # 2 MiB of weights
    with stream(server) as ws:
        small = ask(ws, {"id": 1, "op": "describe", "name": "wide-answers"})
        read = ask(ws, {"id": 2, "op": "read", "name": "wide-answers", "compartment": "weights"})
        exported = ask(ws, {"id": 3, "op": "export", "name": "wide-answers"})
    assert small["status"] == read["status"] == exported["status"] == 200
    assert read["result"]["value"].shape == (512, 1024) and len(exported["result"]) > 2 << 20
    (small_thread, _), (read_thread, read_size), (export_thread, _) = made
    assert not small_thread.startswith("synapse-api") and read_size > 2 << 20
    assert read_thread.startswith("synapse-api") and export_thread.startswith("synapse-api"), made
