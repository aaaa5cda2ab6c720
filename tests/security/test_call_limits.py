"""Limits that cannot be bypassed: every path that can allocate is checked before it runs (issue 11, items 9-17)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import LiveServer
from synapse_client import (
    ConflictError,
    NotAcceptableError,
    PermissionDeniedError,
    Ref,
    SynapseClient,
    UnprocessableEntityError,
)
from synapse_serve.local.registry import Registry

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [3, 3, 1, 4], "x_shape": [8, 8], "eta": 0.1}


def sizes(syn) -> tuple[int, int, dict]:
    description = syn.describe()
    return description["state_bytes"], description["version"], description["counters"]


def test_a_call_that_would_grow_the_state_past_the_quota_is_refused_before_it_runs(tmp_path):
    """Item 9: a small body turned into a large state (a big batch) past the owner's quota."""
    with LiveServer(state_dir=tmp_path / "probe", durability="off") as server, SynapseClient(server.url) as client:
        one = client.create("probe", kind=KIND, config=CONFIG).describe()["state_bytes"]
    quota = 3 * one
    with LiveServer(state_dir=tmp_path / "s", max_state_bytes_per_owner=quota) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("grow", kind=KIND, config=CONFIG)
        syn.forward(np.ones((2, 8, 8, 1), np.float32))  # a little growth fits
        before = sizes(syn)
        for call in (lambda: syn.forward(np.ones((64, 8, 8, 1), np.float32)),
                     lambda: syn.evolve(np.ones((64, 8, 8, 1)), np.ones((64, 8, 8, 4))),
                     lambda: syn.set("post", np.ones((64, 8, 8, 4), np.float32)),
                     lambda: syn.step(np.ones((64, 8, 8, 1)), np.ones((64, 8, 8, 4)))):
            with pytest.raises(PermissionDeniedError, match="max_state_bytes_per_owner") as info:
                call()
            assert info.value.problem["quota"] == "max_state_bytes_per_owner"
            assert sizes(syn) == before  # nothing changed
        syn.reset()  # back to the configured batch: the signals no longer count
        assert sizes(syn)[0] == one


def test_a_call_that_would_go_over_the_device_budget_is_refused(tmp_path):
    with LiveServer(state_dir=tmp_path / "probe", durability="off") as server, SynapseClient(server.url) as client:
        one = client.create("probe", kind=KIND, config=CONFIG).describe()["state_bytes"]
    with LiveServer(state_dir=tmp_path / "s", device_budget_bytes=2 * one) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("grow", kind=KIND, config=CONFIG)
        with pytest.raises(ConflictError, match="device budget"):
            syn.forward(np.ones((64, 8, 8, 1), np.float32))
        assert sizes(syn)[1:] == (1, {})
        client.create("second", kind=KIND, config=CONFIG)  # the refused call reserved nothing


def test_stored_signals_obey_max_batch(tmp_path):
    """Item 9, second half: a compartment PUT of post at batch 64 was accepted with max_batch 4."""
    with LiveServer(state_dir=tmp_path, max_batch=4) as server, SynapseClient(server.url) as client:
        syn = client.create("b", kind=KIND, config=CONFIG)
        with pytest.raises(UnprocessableEntityError, match="post: batch 64 is over the server's max_batch of 4"):
            syn.set("post", np.ones((64, 8, 8, 4), np.float32))
        syn.set("post", np.ones((4, 8, 8, 4), np.float32))
        assert syn.describe()["counters"] == {} and syn.describe()["version"] == 2


def test_a_rollback_obeys_max_batch_as_an_import_does(tmp_path):
    """A red-team run (2026-11-30, by reading): a rollback brought back a snapshot's signals whatever their batch,
    where an import or a restore of the same file checks it against max_batch: a snapshot taken before the limit
    was lowered came back over it. It is refused, and nothing changes."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        syn = client.create("b", kind=KIND, config=CONFIG)
        syn.forward(np.ones((8, 8, 8, 1), np.float32))
        syn.snapshot("wide")
        syn.reset()
    with LiveServer(state_dir=tmp_path, max_batch=4) as server, SynapseClient(server.url) as client:
        syn = client.get("b")
        before = syn.describe()
        with pytest.raises(UnprocessableEntityError, match="max_batch of 4"):
            syn.restore("wide")
        after = syn.describe()
        assert (after["version"], after["state_bytes"]) == (before["version"], before["state_bytes"])


def test_reset_returns_the_signals_to_the_configured_batch(client, unique_name):
    """Item 10: one batch-1024 forward used to leave its signals resident through reset, flushes and exports."""
    syn = client.create(unique_name, kind=KIND, config={**CONFIG, "batch_size": 2})
    fresh = syn.describe()["state_bytes"]
    syn.forward(np.ones((512, 8, 8, 1), np.float32))
    assert syn.describe()["state_bytes"] > 10 * fresh
    syn.reset()
    description = syn.describe()
    assert description["state_bytes"] == fresh and description["compartments"]["inputs"]["shape"] == [2, 8, 8, 1]


def test_timed_filter_update_does_no_work_before_the_checks(tmp_path, monkeypatch):
    """Item 11: filter_update="timed" compiled and ran 12 evolves before any name, quota or budget check."""
    from synapse_serve.kinds import hebbian_deconv

    timed = []
    real = hebbian_deconv.time_filter_updates
    monkeypatch.setattr(hebbian_deconv, "time_filter_updates", lambda *a, **k: (timed.append(1), real(*a, **k))[1])
    config = {**CONFIG, "stride": 2, "filter_update": "timed"}
    with LiveServer(state_dir=tmp_path, max_instances_per_owner=1) as server, SynapseClient(server.url) as client:
        client.create("taken", kind=KIND, config=CONFIG)
        with pytest.raises(ConflictError):
            client.create("taken", kind=KIND, config=config)
        with pytest.raises(PermissionDeniedError, match="max_instances_per_owner"):
            client.create("over", kind=KIND, config=config)
        assert timed == []  # refused before any timing
        client.get("taken").delete()
        assert client.create("ok", kind=KIND, config=config).describe()["config"]["filter_update"] in ("vjp", "adjoint")
        assert timed == [1]


def test_snapshots_count_against_their_owners_snapshot_quota(tmp_path):
    """Item 13: one owner filled the disk with snapshots, and another's sync evolve then failed with 507."""
    with LiveServer(state_dir=tmp_path / "probe") as server, SynapseClient(server.url) as client:
        size = client.create("p", kind=KIND, config=CONFIG).snapshot("s")["version"] and \
            (tmp_path / "probe" / "snapshots" / "local" / "p" / "s.safetensors").stat().st_size
    alice, bob = "alice-" + "a" * 24, "bob-" + "b" * 24
    with LiveServer(state_dir=tmp_path / "s", auth="on", tokens=f"alice:{alice},bob:{bob}",
                    max_snapshot_bytes_per_owner=2 * size) as server, \
            SynapseClient(server.url, token=alice) as a, SynapseClient(server.url, token=bob) as b:
        syn = a.create("x", kind=KIND, config=CONFIG)
        syn.snapshot("one")
        syn.snapshot("two")
        with pytest.raises(PermissionDeniedError, match="max_snapshot_bytes_per_owner"):
            syn.snapshot("three")
        assert [s["snapshot"] for s in syn.snapshots()] == ["one", "two"]
        b.create("y", kind=KIND, config=CONFIG).snapshot("bobs")  # bob's quota is his own
        syn.delete_snapshot("one")
        syn.snapshot("three")  # room again
    with LiveServer(state_dir=tmp_path / "s", auth="on", tokens=f"alice:{alice}",
                    max_snapshot_bytes_per_owner=2 * size) as server, SynapseClient(server.url, token=alice) as a:
        with pytest.raises(PermissionDeniedError, match="max_snapshot_bytes_per_owner"):
            a.get("x").snapshot("four")  # counted again from the files at start-up


def test_stored_idempotency_answers_are_bounded_by_bytes(tmp_path):
    """Item 14: keyed calls with large answers grew the server without bound; a dropped answer never reruns."""
    budget = 1 << 20
    with LiveServer(state_dir=tmp_path, idempotency_answer_bytes=budget) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("big", kind=KIND, config={**CONFIG, "x_shape": [64, 64]})
        x = np.ones((16, 64, 64, 1), np.float32)  # 1 MiB of outputs per answer
        for i in range(12):
            syn.call("forward", inputs=x, idempotency_key=f"k{i}")
        assert server.registry.answers.used <= budget
        again = syn.call("forward", inputs=x, idempotency_key="k11")  # the newest is kept
        assert again["outputs"].shape == (16, 64, 64, 4)
        with pytest.raises(ConflictError, match="no longer kept") as info:
            syn.call("forward", inputs=x, idempotency_key="k0")
        assert info.value.problem["version"] == 2
        assert syn.describe()["counters"] == {"forward": 12}  # never run twice


def test_one_owners_keyed_answers_never_push_out_a_smaller_owners(tmp_path):
    """A red-team run (2026-11-30): the stored answers were one budget dropped oldest first across owners, so
    alice's three keyed forwards cost bob the answer his retry needed (409). Over the budget, the owner who keeps
    the most bytes loses its oldest answers first: bob's stays while he keeps less than alice."""
    alice, bob = "alice-" + "a" * 24, "bob-" + "b" * 24
    with LiveServer(state_dir=tmp_path, auth="on", tokens=f"alice:{alice},bob:{bob}",
                    idempotency_answer_bytes=64 << 10) as server, \
            SynapseClient(server.url, token=alice) as a, SynapseClient(server.url, token=bob) as b:
        mine = b.create("net", kind="HebbianSynapse", config={"shape": [8, 64]})
        theirs = a.create("net", kind="HebbianSynapse", config={"shape": [8, 512]})
        x = np.ones((2, 8), np.float32)
        first = mine.call("forward", inputs=x, idempotency_key="bob-1")  # 512 bytes of outputs
        wide = np.ones((16, 8), np.float32)  # 32 KiB of outputs an answer: three are over the 64 KiB budget
        for i in range(3):
            theirs.call("forward", inputs=wide, idempotency_key=f"alice-{i}")
        again = mine.call("forward", inputs=x, idempotency_key="bob-1")
        np.testing.assert_array_equal(again["outputs"], first["outputs"])
        assert again["version"] == first["version"] and mine.describe()["counters"] == {"forward": 1}
        with pytest.raises(ConflictError, match="no longer kept"):  # alice's own oldest went
            theirs.call("forward", inputs=wide, idempotency_key="alice-0")
        assert theirs.call("forward", inputs=wide, idempotency_key="alice-2")["outputs"].shape == (16, 512)
        assert server.registry.answers.used <= 64 << 10
        assert theirs.describe()["counters"] == {"forward": 3}


def record_device_threads(monkeypatch) -> list[threading.Thread]:
    import synapse_serve.local.registry as registry_module

    threads, original = [], registry_module.device_call

    def recording(fn, *args):
        threads.append(threading.current_thread())
        return original(fn, *args)

    monkeypatch.setattr(registry_module, "device_call", recording)
    return threads


def test_a_quick_call_measured_at_one_batch_never_runs_inline_at_another(tmp_path, monkeypatch):
    """Item 15: the cost key ignored a batch that came from a stored compartment or a reference.

    The server's inline bound is raised far above any call here, so that batch 1 runs on the loop once
    measured whatever the machine's load; a batch never measured must still go to a worker first."""
    with LiveServer(state_dir=tmp_path, inline_call_us=1e6) as live_server, \
            SynapseClient(live_server.url) as client:
        syn = client.create("quick", kind=KIND, config={**CONFIG, "x_shape": [16, 16]})
        x1, post1 = np.ones((1, 16, 16, 1), np.float32), np.ones((1, 16, 16, 4), np.float32)
        syn.evolve(x1, post1)
        threads = record_device_threads(monkeypatch)
        for _ in range(3):
            syn.backtransmit()  # the stored post, batch 1: measured once, then run on the loop
            syn.backtransmit(Ref("post"))
        assert live_server.thread in threads
        syn.evolve(np.ones((320, 16, 16, 1), np.float32), np.ones((320, 16, 16, 4), np.float32))
        threads.clear()
        syn.backtransmit()  # the stored post is now batch 320: a new cost, measured on a worker
        syn.backtransmit(Ref("post"))
        assert len(threads) == 2 and live_server.thread not in threads


@pytest.mark.parametrize("what", ["evolve", "put", "snapshot", "create", "delete", "restore"])
def test_an_unacceptable_accept_is_refused_before_anything_changes(client, live_server, unique_name, what):
    """Item 16: a 406 was answered after the change was applied."""
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    syn.snapshot("s")
    headers = {"Accept": "text/html"}
    x = np.ones((1, 8, 8, 1), np.float32)
    requests = {
        "evolve": lambda c: c.request("POST", f"/v1/synapses/{unique_name}/evolve",
                                      {"pre": x, "post": np.ones((1, 8, 8, 4), np.float32)}, retry=False,
                                      headers=headers),
        "put": lambda c: c.request("PUT", f"/v1/synapses/{unique_name}/compartments/weights",
                                   {"value": np.zeros((3, 3, 1, 4), np.float32)}, retry=False, headers=headers),
        "snapshot": lambda c: c.request("POST", f"/v1/synapses/{unique_name}/snapshots", {"snapshot": "t"},
                                        retry=False, headers=headers),
        "create": lambda c: c.request("POST", "/v1/synapses", {"name": unique_name + "-new", "kind": KIND,
                                                               "config": CONFIG}, retry=False, headers=headers),
        "delete": lambda c: c.request("DELETE", f"/v1/synapses/{unique_name}", retry=False, headers=headers),
        "restore": lambda c: c.request("POST", f"/v1/synapses/{unique_name}/snapshots/s/restore", retry=False,
                                       headers=headers),
    }
    before = syn.describe()
    with pytest.raises(NotAcceptableError, match="text/html"):
        requests[what](client)
    after = syn.describe()
    assert (after["version"], after["counters"]) == (before["version"], before["counters"])
    assert [s["snapshot"] for s in syn.snapshots()] == ["s"]
    assert unique_name + "-new" not in {d["name"] for d in client.list()}


def test_a_slow_body_is_cut_off(tmp_path):
    """Item 17: a slow authenticated body held a connection and its buffer forever."""
    with LiveServer(state_dir=tmp_path, body_idle_timeout_s=0.5, body_timeout_s=2) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/synapses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"name\"")  # ...and then nothing more
            started = time.monotonic()
            answer = s.recv(65536).decode("latin-1")
            assert answer.startswith("HTTP/1.1 408") and "did not arrive in time" in answer
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a trickle: the total limit
            s.sendall(b"POST /v1/synapses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n")
            started = time.monotonic()
            s.settimeout(0.3)
            answer = ""
            while not answer and time.monotonic() - started < 8:
                try:
                    s.sendall(b" ")
                    answer = s.recv(65536).decode("latin-1")
                except TimeoutError:
                    pass
            assert answer.startswith("HTTP/1.1 408") and 1.5 < time.monotonic() - started < 6
        assert httpx.get(f"{server.url}/healthz").status_code == 200


def _answer_to(port: int, sent: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """What the server writes back to ``sent`` (nothing sent: a connection that stays silent), and how long it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            if sent:
                s.sendall(sent)
        except (BrokenPipeError, ConnectionResetError):  # refused before it was all sent
            pass
        started, answer = time.monotonic(), b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:  # closed with the rest of a refused head unread
            pass
        return answer, time.monotonic() - started


@pytest.mark.parametrize("where", ["header", "url"])
def test_a_head_of_more_than_64_kib_is_refused_as_it_arrives(tmp_path, where):
    """A red-team run: one request of a 64 MiB header, no token needed, held the event loop ~4 s (uvicorn and
    httptools join a head a read at a time: the cost grows with the square of its size); nothing bounded a head."""
    huge = b"a" * (8 << 20)  # and never finished: refused as it comes, not once it is all joined
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + huge if where == "header" else b"GET /healthz?x=" + huge
    with LiveServer(state_dir=tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        answer, _ = _answer_to(port, head)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"x-content-type-options: nosniff" in answer and b"at most 65536 bytes" in answer
        fine = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 60_000 + b"\r\nConnection: close\r\n\r\n"
        assert _answer_to(port, fine)[0].startswith(b"HTTP/1.1 200 ")  # within the bound: served
        assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_head_that_does_not_arrive_in_time_is_closed_and_uvicorns_refusals_are_not_sniffed(tmp_path):
    """A red-team run: a connection that sent part of its head, or nothing, was never closed (520 of them took a
    server's file descriptors, no token needed); and uvicorn's own 400 carried no nosniff."""
    with LiveServer(state_dir=tmp_path, head_timeout_s=0.5) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for sent in (b"", b"GET /healthz HTTP/1.1\r\nHost"):
            answer, seconds = _answer_to(port, sent)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"within 0.5 s" in answer, answer[:200]
            assert 0.4 < seconds < 5
        answer, _ = _answer_to(port, b"NO HTTP AT ALL\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ") and b"x-content-type-options: nosniff" in answer, answer
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # kept alive: idle between requests
            for _ in range(2):
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
                time.sleep(1.0)  # longer than a head may take: the time between requests is not a head's
            s.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # the next head, left unfinished: timed from its first byte
            started = time.monotonic()
            assert s.recv(65536).startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 5


def test_a_head_of_more_than_64_kib_that_arrives_in_one_read_is_refused_too(tmp_path):
    """A red-team run: the bound was checked once a read had been parsed, and a whole head in one read had been
    handed to the route by then (a 100 KiB header answered 200)."""
    with LiveServer(state_dir=tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (100 << 10) + b"\r\n\r\n")
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


@pytest.mark.parametrize("shape", ["one long field", "many short fields"])
def test_trailer_fields_after_a_chunked_body_count_against_the_head_bound(tmp_path, shape):
    """A red-team run: the trailer fields after a chunked body were bounded by nothing, no token needed (a 64 MiB
    field held the event loop 2.6 s, 200 MiB of short ones grew the server by 850 MB); small ones still pass."""
    with LiveServer(state_dir=tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        request = b"POST /v1/synapses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
                  b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        body = b'{"name": "enc", "kind": "HebbianSynapse", "config": {"shape": [4, 3]}}'
        chunked = b"%x\r\n%s\r\n0\r\n" % (len(body), body)
        answer, _ = _answer_to(port, request + chunked + b"X-Checksum: 1\r\n\r\n")  # a small trailer: served
        assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")  # kept alive
            sent, refused = 0, False
            field = b"X-T: " if shape == "one long field" else b""
            try:
                while sent < (16 << 20) and not refused:
                    s.sendall(field + (b"a" * 65536 if shape == "one long field" else b"X-T: aaaaaaaa\r\n" * 4096))
                    sent += 65536
                    field = b""
            except (BrokenPipeError, ConnectionResetError):
                refused = True
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                refused = True
        assert refused or b"HTTP/1.1 431 " in answer, answer[-300:]
        assert sent < (4 << 20), f"{sent} bytes of trailer fields read before the refusal"
        assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_requests_pipelined_far_ahead_of_their_answers_close_the_connection(tmp_path):
    """A red-team run: one connection sending tiny requests without pause grew a server by 2.4 GB in 20 s (each
    answer let another read of thousands of requests be parsed and queued); a few pipelined are answered in order."""
    with LiveServer(state_dir=tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        answer, _ = _answer_to(port, request * 8 + request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        assert answer.count(b"HTTP/1.1 200 ") == 9
        answer, seconds = _answer_to(port, request * 2000)
        assert answer.count(b"HTTP/1.1 200 ") <= 40 and seconds < 5  # at most the bound ahead, then closed
        assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_bytes_between_requests_are_a_head_and_are_timed_as_one(tmp_path):
    """A red-team run: a bare line break every 1.5 s after a request kept its connection open for good (it starts no
    request, and each read put off uvicorn's keep-alive timeout)."""
    with LiveServer(state_dir=tmp_path, head_timeout_s=0.5) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            started, answer = time.monotonic(), b""
            try:
                while time.monotonic() - started < 5:
                    s.sendall(b"\r\n")
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
            s.settimeout(5)
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert time.monotonic() - started < 3


def test_a_websocket_handshake_with_a_body_or_left_unanswered_does_not_hold_its_connection(tmp_path, monkeypatch):
    """A red-team run: an upgrade request carrying a body was handed to uvicorn's WebSocket protocol, which never
    answers such a handshake nor closes it: 40 of them held 40 descriptors for good, no token needed."""
    import base64
    import os

    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    upgrade = (b"GET /v1/session HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n")
    with LiveServer(state_dir=tmp_path, head_timeout_s=0.5) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for body in (b"Content-Length: 5\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"):
            answer, seconds = _answer_to(port, upgrade + body)
            assert answer.startswith(b"HTTP/1.1 400 ") and b"handshake carries no body" in answer and seconds < 2
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a handshake answered: the stream stays
            s.sendall(upgrade + b"\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 101 ")
            time.sleep(1.0)  # longer than a head may take
            s.sendall(b"\x88\x80\x00\x00\x00\x00")  # a masked close frame: answered with its own
            assert s.recv(4096)[:1] == b"\x88"
        monkeypatch.setattr(WebSocketsSansIOProtocol, "data_received", lambda self, data: None)  # never answers
        answer, seconds = _answer_to(port, upgrade + b"\r\n")
        assert answer == b"" and 0.4 < seconds < 3  # cut once the head timeout passed


def test_the_rest_of_a_body_no_route_reads_must_arrive_in_time_too(tmp_path):
    """A red-team run: a route that answered without reading its declared body (a 401, /healthz) left the
    connection open for as long as a byte of that body arrived now and then: the body timeouts are the routes'."""
    tokens = "alice:aliceTOKEN0123456789abcd"
    with LiveServer(state_dir=tmp_path, tokens=tokens, body_timeout_s=1.0, body_idle_timeout_s=0.5) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for head in (b"POST /v1/synapses HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
                     b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(head)
                started, answer = time.monotonic(), s.recv(65536)
                assert answer.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 200 ")), answer[:200]
                closed = False
                try:
                    while time.monotonic() - started < 6 and not closed:
                        s.sendall(b"a")  # a byte now and then: never idle for the idle timeout
                        time.sleep(0.2)
                        s.settimeout(0.01)
                        try:
                            closed = s.recv(65536) == b""
                        except TimeoutError:
                            pass
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                assert closed and time.monotonic() - started < 4


def test_a_pipelined_head_behind_a_long_answer_does_not_cut_that_answer(tmp_path, monkeypatch):
    """A request's head is timed from its first byte; one pipelined behind a request still being answered must not
    close the connection under that answer when its time is up, only once the answer is out."""
    with LiveServer(state_dir=tmp_path, head_timeout_s=0.3) as server:
        backend = server.app.state.server.backend
        answered = backend.devices

        async def slow_devices():
            await asyncio.sleep(1.0)  # longer than a head may take
            return await answered()

        monkeypatch.setattr(backend, "devices", slow_devices)
        port = int(server.url.rsplit(":", 1)[1])
        answer, seconds = _answer_to(port, b"GET /v1/devices HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
        assert answer.startswith(b"HTTP/1.1 200 ") and b"devices" in answer, answer[:300]
        assert b"HTTP/1.1 408 " in answer and seconds >= 1.0  # then the unfinished head's own time ran out


def test_connections_over_the_bound_are_answered_503_and_closed_and_the_rest_keep_working(tmp_path, caplog):
    """A red-team run: connections opened faster than the head timeout closes them each held a descriptor, with
    nothing bounding how many; enough of them leave the state directory none to write what a call acknowledges."""
    from synapse_serve.protocol import connection_bound

    assert connection_bound(0, 1024) == 768 and connection_bound(0, 200) == 72 and connection_bound(0, 100) == 16
    assert connection_bound(5, 1024) == 5 and connection_bound(0, None) == 1 << 20
    with LiveServer(state_dir=tmp_path, max_connections=4, head_timeout_s=30) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("enc", kind=KIND, config=CONFIG)  # the client's kept-alive connection: one of the four
        port = int(server.url.rsplit(":", 1)[1])
        with client.session() as session:  # a session stream counts as one too
            stream = session.get("enc")
            idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
            time.sleep(0.2)  # all four seen by the server
            with caplog.at_level(logging.WARNING, logger="synapse_serve.protocol"):
                answer, seconds = _answer_to(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower(), answer[:300]
            assert b"4 connections open" in answer and seconds < 5
            assert "connections refused: 4 open, at most 4" in caplog.text
            x = np.ones((1, 8, 8, 1), np.float32)
            assert stream.forward(x).shape == (1, 8, 8, 4)  # the open ones are served as before
            version = syn.evolve(x, np.ones((1, 8, 8, 4), np.float32))["version"]
            for s in idle:
                s.close()
        time.sleep(0.2)
        with httpx.Client(base_url=server.url) as other:  # room again: a new connection is served
            assert other.get("/v1/synapses/enc").json()["version"] == version


def test_an_answer_its_client_stops_reading_is_cut_after_the_idle_timeout(tmp_path, monkeypatch):
    """An answer waiting on a socket whose client stopped reading waited for good, holding its memory (a compartment's
    copy, an export) and its connection; now the client has the body idle timeout to read on (and as long again as
    what waits takes at the slowest rate a reader is granted)."""
    from synapse_serve import protocol

    monkeypatch.setattr(protocol, "SLOW_READ_BYTES_S", 1 << 30)  # a fast reader's grace: the idle timeout alone
    with LiveServer(state_dir=tmp_path, body_idle_timeout_s=0.5) as server, SynapseClient(server.url) as client:
        client.create("wide", kind="HebbianSynapse", config={"shape": [1024, 2048]})  # 8 MiB of weights
        port = int(server.url.rsplit(":", 1)[1])
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server's side fills at once
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /v1/synapses/wide/compartments/weights HTTP/1.1\r\nHost: x\r\n"
                      b"Accept: application/msgpack\r\n\r\n")
            time.sleep(2.0)  # reads nothing meanwhile
            received = b""
            try:
                while chunk := s.recv(1 << 20):
                    received += chunk
            except ConnectionResetError:
                pass
        assert received.startswith(b"HTTP/1.1 200 ")
        assert len(received) < 1024 * 2048 * 4, "the whole answer waited for a reader that had stopped"
        weights = client.get("wide").weights  # a client that reads is served whole
        assert weights.shape == (1024, 2048)
        # a red-team run: a reader slow but steady was cut too, once one large part took longer than the timeout to
        # go out (the event loop sees a part leave only once all of it has)
        monkeypatch.undo()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /v1/synapses/wide/compartments/weights HTTP/1.1\r\nHost: x\r\n"
                      b"Accept: application/msgpack\r\nConnection: close\r\n\r\n")
            started, received = time.monotonic(), bytearray()
            while chunk := s.recv(32768):
                received += chunk
                time.sleep(0.004)  # ~8 MB/s at most: the 8 MiB take longer than the timeout, read all along
        assert time.monotonic() - started > 1.0 and len(received) > 1024 * 2048 * 4, len(received)


def test_a_client_that_leaves_mid_body_is_no_server_error(tmp_path, caplog):
    """A red-team run: a client that closed its connection halfway through its body was logged as an unexpected error
    with its traceback and counted as a 500 (any token holder could fill the error log and raise the 5xx rate the
    alerts watch), on every route with a body."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        client.create("gone", kind=KIND, config=CONFIG)
        port = int(server.url.rsplit(":", 1)[1])
        for method, path in (("POST", "/v1/synapses/gone/forward"), ("POST", "/v1/synapses"),
                             ("PUT", "/v1/synapses/gone/compartments/weights"), ("POST", "/v1/packed/forward"),
                             ("POST", "/v1/synapses/import?name=other")):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          "Content-Length: 1000\r\n\r\n{\"inputs\"".encode())
                time.sleep(0.2)  # the route is reading the body when the client leaves
        deadline = time.monotonic() + 10
        metrics = ""
        while time.monotonic() < deadline and metrics.count('status="400"') < 1:
            metrics = httpx.get(f"{server.url}/metrics").text
            time.sleep(0.1)
        time.sleep(0.3)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'status="500"' not in metrics
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
        assert client.get("gone").describe()["version"] == 1


def test_every_check_happens_in_the_registry_too(tmp_path):
    """The same limits hold for callers of the registry itself (the session stream and the in-process mode
    will call it directly): the quota on a call is not an API feature."""
    from synapse_serve.local.capacity import Capacity, Limits
    from synapse_serve.names import InstanceKey

    registry = Registry(Capacity(Limits(max_state_bytes_per_owner=20_000)))
    key = InstanceKey("local", "r")
    registry.create(key, kind=KIND, config=CONFIG)
    from synapse_serve.errors import QuotaExceeded

    with pytest.raises(QuotaExceeded):
        registry.call(key, "forward", {"inputs": np.ones((64, 8, 8, 1), np.float32)})
    assert registry.describe(key)["version"] == 1
