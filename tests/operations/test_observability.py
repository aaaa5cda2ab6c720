"""Operations: metrics that count what was sent, JSON access logs, readiness transitions, admin views."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from conftest import LiveServer, metric, metrics_of
from synapse_client import NotFoundError, SynapseClient, UnprocessableEntityError, packb, unpackb
from synapse_serve.logs import JsonFormatter
from synapse_serve.names import InstanceKey

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [3, 3, 1, 2], "x_shape": [5, 5], "eta": 0.1}
ADMIN, ALICE, BOB = "root-" + "r" * 24, "alice-" + "a" * 24, "bob-" + "b" * 24


def scrape(url: str) -> dict:
    return metrics_of(httpx.get(f"{url}/metrics").text)


def test_metrics_count_the_operations_sent(tmp_path):
    with LiveServer(state_dir=tmp_path, durability="off") as server, SynapseClient(server.url) as client:
        syn = client.create("m", kind=KIND, config=CONFIG)
        x = np.ones((2, 5, 5, 1), np.float32)
        for _ in range(7):
            syn.forward(x)
        for _ in range(3):
            syn.evolve(x, np.ones((2, 5, 5, 2), np.float32))
        for _ in range(2):
            with pytest.raises(UnprocessableEntityError):
                syn.forward(np.ones((2, 4, 4, 1), np.float32))
        with pytest.raises(UnprocessableEntityError):
            syn.call("no-such-op")
        state_bytes = syn.describe()["state_bytes"]
        samples = scrape(server.url)
    assert metric(samples, "synapse_operations_total", operation="forward", status="200") == 7
    assert metric(samples, "synapse_operations_total", operation="forward", status="422") == 2
    assert metric(samples, "synapse_operations_total", operation="evolve", status="200") == 3
    assert metric(samples, "synapse_operations_total", operation="unknown", status="422") == 1
    assert metric(samples, "synapse_operation_duration_seconds_count", operation="forward") == 9
    assert metric(samples, "synapse_operation_duration_seconds_bucket", operation="evolve", le="+Inf") == 3
    route = {"method": "POST", "route": "/v1/synapses/{name}/{operation}"}
    assert metric(samples, "synapse_requests_total", **route, status="200") == 10
    assert metric(samples, "synapse_requests_total", **route, status="422") == 3
    assert metric(samples, "synapse_instances", kind=KIND, owner="local") == 1
    assert sum(v for (name, _), v in samples.items() if name == "synapse_state_bytes") == state_bytes
    assert metric(samples, "synapse_compilations_total") >= 1 and metric(samples, "synapse_compile_seconds_total") > 0
    assert metric(samples, "synapse_storage_failing") == 0


def test_stream_frames_naming_no_operation_string_are_counted_as_unknown(tmp_path):
    # a frame's operation is whatever msgpack holds: a list or a map is counted under "unknown", answered with a 400
    with LiveServer(state_dir=tmp_path, durability="off") as server:
        with connect(server.url.replace("http", "ws", 1) + "/v1/session") as ws:
            for ident, frame in enumerate([{"op": "call", "name": "m", "operation": ["forward"]},
                                           {"op": "call_many", "operation": {"forward": 1}, "calls": []},
                                           {"op": "call", "name": "m", "operation": 7}]):
                ws.send(packb({"id": ident, **frame}))
                answer = unpackb(ws.recv(timeout=30))
                assert answer["id"] == ident and answer["status"] == 400, answer
        samples = scrape(server.url)
    assert metric(samples, "synapse_operations_total", operation="unknown", status="400") == 3


def test_methods_the_api_does_not_use_are_one_label(tmp_path):
    """A red-team sweep without a token sent 49 methods to 12 paths: uvicorn answers ~30 of them (WebDAV's too), and
    each became a label value of its own — the scrape went from 560 lines to 8,095. They are ``other`` now."""
    with LiveServer(state_dir=tmp_path, durability="off") as server, httpx.Client(base_url=server.url) as client:
        for method in ("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "COPY", "MOVE", "REPORT", "PURGE", "CONNECTX"):
            client.request(method, "/v1/synapses")
        client.get("/v1/synapses")
        samples = scrape(server.url)
    methods = {dict(labels).get("method") for name, labels in samples if name == "synapse_requests_total"}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert "other" in methods and "GET" in methods


def test_queue_depth_shows_calls_waiting_for_an_instance(tmp_path):
    with LiveServer(state_dir=tmp_path, durability="off") as server, SynapseClient(server.url) as client:
        syn = client.create("busy", kind=KIND, config=CONFIG)
        x = np.ones((1, 5, 5, 1), np.float32)
        syn.forward(x)
        instance = server.registry._get(InstanceKey("local", "busy"))
        with instance.lock:  # the instance is busy: the next calls queue
            waiters = [threading.Thread(target=syn.forward, args=(x,)) for _ in range(2)]
            for t in waiters:
                t.start()
            deadline = time.monotonic() + 10
            # one waits for the lock on a worker, the other for its turn on the event loop: both are counted
            while (depth := metric(metrics_of(text := httpx.get(f"{server.url}/metrics").text),
                                   "synapse_queue_depth", owner="local")) != 2:
                assert time.monotonic() < deadline, depth
                time.sleep(0.01)
            assert instance.waiting == 1
            assert "busy" not in text  # instance names never become labels
        for t in waiters:
            t.join(10)
        assert not any(name == "synapse_queue_depth" for name, _ in scrape(server.url))


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_one_json_log_line_per_request_with_its_id_and_owner(tmp_path):
    captured = Captured()
    access = logging.getLogger("synapse_serve.access")
    access.addHandler(captured)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        with LiveServer(state_dir=tmp_path, auth="on", tokens=f"alice:{ALICE}") as server, \
                SynapseClient(server.url, token=ALICE) as client:
            syn = client.create("logged", kind=KIND, config=CONFIG)
            syn.forward(np.full((1, 5, 5, 1), 123.25, np.float32))
            bad = httpx.post(f"{server.url}/v1/synapses/logged/forward", json={"inputs": [[1]]},
                             headers={"Authorization": f"Bearer {ALICE}", "X-Request-ID": "my-own-id-1"})
            anonymous = httpx.get(f"{server.url}/v1/synapses")
    finally:
        access.removeHandler(captured)
        access.setLevel(old_level)
    lines = [json.loads(line) for line in captured.lines]
    by_path = [(entry["method"], entry["route"], entry["status"]) for entry in lines]
    assert by_path == [("POST", "/v1/synapses", 201), ("POST", "/v1/synapses/{name}/{operation}", 200),
                       ("POST", "/v1/synapses/{name}/{operation}", 422), ("GET", "/v1/synapses", 401)]
    for entry in lines:
        assert set(entry) >= {"time", "level", "method", "route", "path", "status", "duration_ms", "request_id",
                              "owner"}
        assert entry["duration_ms"] > 0 and len(entry["request_id"]) >= 8
    assert [e["owner"] for e in lines] == ["alice"] * 3 + [None]
    assert lines[2]["request_id"] == "my-own-id-1" == bad.headers["x-request-id"]
    assert lines[3]["request_id"] == anonymous.headers["x-request-id"]
    assert not any("123.25" in line for line in captured.lines)  # no tensor values in logs


def test_readiness_follows_restore_and_warm_up_and_the_device(tmp_path, monkeypatch):
    from synapse_serve.local.registry import Registry

    release = threading.Event()
    real_load = Registry.load_stored
    monkeypatch.setattr(Registry, "load_stored", lambda self: (release.wait(30), real_load(self))[1])
    server = LiveServer(state_dir=tmp_path).start()
    try:
        deadline = time.monotonic() + 30
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503 and "restoring instances" in r.json()["detail"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # alive: no restart wanted
        release.set()
        while httpx.get(f"{server.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # a device that stops computing makes the server unready, still alive
        monkeypatch.setattr(server.registry.capacity, "probe", lambda: 1 / 0)
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503 and "device is unusable" in r.json()["detail"]
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    finally:
        release.set()
        server.__exit__()


@pytest.fixture
def admin_server(tmp_path):
    with LiveServer(state_dir=tmp_path, auth="on", tokens=f"root:{ADMIN}:admin,alice:{ALICE},bob:{BOB}") as server:
        yield server


def test_admins_list_every_instance_with_owner_device_bytes_and_last_use(admin_server):
    with SynapseClient(admin_server.url, token=ALICE) as alice, SynapseClient(admin_server.url, token=ADMIN) as root:
        alice.create("a1", kind=KIND, config=CONFIG)
        root.create("r1", kind=KIND, config=CONFIG)
        rows = root.request("GET", "/v1/admin/instances", retry=True)["instances"]
        assert [(r["owner"], r["name"]) for r in rows] == [("alice", "a1"), ("root", "r1")]
        assert all(r["device"] and r["state_bytes"] > 0 and r["last_used_at"] > 0 for r in rows)
        with pytest.raises(NotFoundError):
            alice.request("GET", "/v1/admin/instances", retry=True)
        with pytest.raises(NotFoundError):
            alice.request("POST", "/v1/admin/evict", {"idle_s": 0}, retry=False)
    # as every answer, in the type asked (a red-team run: always JSON, and written by FastAPI on the event loop)
    headers = {"Authorization": f"Bearer {ADMIN}", "Accept": "application/msgpack"}
    for path in ("/v1/admin/instances", "/v1/admin/storage", "/v1/devices"):
        answer = httpx.get(f"{admin_server.url}{path}", headers=headers)
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/msgpack", path
        assert unpackb(answer.content)


def test_evict_exports_then_deletes_only_idle_instances(admin_server, tmp_path):
    with SynapseClient(admin_server.url, token=ALICE) as alice, SynapseClient(admin_server.url, token=ADMIN) as root:
        idle = alice.create("idle", kind=KIND, config=CONFIG)
        busy = alice.create("busy", kind=KIND, config=CONFIG)
        x = np.ones((1, 5, 5, 1), np.float32)
        idle.evolve(x, np.ones((1, 5, 5, 2), np.float32))
        weights = idle.weights
        time.sleep(1.6)
        busy.forward(x)  # used within the last 1.5 s, however slowly a loaded machine brings the evict in
        evicted = root.request("POST", "/v1/admin/evict", {"idle_s": 1.5}, retry=False)["evicted"]
        assert [(e["owner"], e["name"]) for e in evicted] == [("alice", "idle")]
        with pytest.raises(NotFoundError):
            idle.describe()
        busy.describe()
        assert [e["name"] for e in alice.evicted()] == ["idle"]  # its owner sees it
        with SynapseClient(admin_server.url, token=BOB) as bob:
            assert bob.evicted() == []  # and no one else does
            with pytest.raises(NotFoundError):
                bob.restore_evicted("idle")
            with pytest.raises(NotFoundError):
                bob.discard_evicted("idle")  # nor discards it
        file = next((tmp_path / "evicted" / "alice").glob("idle.*.safetensors"))
        back = alice.restore_evicted("idle")  # brought back exactly, and the file is gone
        np.testing.assert_array_equal(back.weights, weights)
        assert back.describe()["counters"] == {"evolve": 1} and back.describe()["version"] == 2
        assert not file.exists() and alice.evicted() == []
        with pytest.raises(NotFoundError, match="no evicted instance"):
            alice.restore_evicted("idle")
        with pytest.raises(UnprocessableEntityError, match="idle_s"):
            root.request("POST", "/v1/admin/evict", {"idle_s": -1}, retry=False)
        r = httpx.post(f"{admin_server.url}/v1/admin/evict", content=b'{"idle_s": 1' + b"0" * 400 + b"}",
                       headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
        assert r.status_code == 422 and "idle_s" in r.json()["detail"]  # a JSON integer beyond any float


def test_idle_instances_are_evicted_automatically(tmp_path):
    with LiveServer(state_dir=tmp_path, evict_idle_after_s=0.4) as server, SynapseClient(server.url) as client:
        client.create("soon-gone", kind=KIND, config=CONFIG)
        deadline = time.monotonic() + 20
        while any(d["name"] == "soon-gone" for d in client.list()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert list((tmp_path / "evicted" / "local").glob("soon-gone.*.safetensors"))
        assert [e["name"] for e in client.evicted()] == ["soon-gone"]


def test_an_owner_keeps_one_evicted_copy_a_name_and_its_copies_count_against_the_snapshot_quota(tmp_path):
    """A red-team probe created an instance, let it be evicted, and again: six evicted copies, 11.3 MB, against a
    2 MB state quota and a 0.5 MB snapshot quota. An owner keeps the latest copy of a name (the one a restore brings
    back), and the copies count against the snapshot quota as the files they are: an instance whose copy would not
    fit stays where it is."""
    with LiveServer(state_dir=tmp_path / "probe") as probe, SynapseClient(probe.url) as client:
        size = client.create("p", kind=KIND, config=CONFIG).export(tmp_path / "p.safetensors").stat().st_size
    quota = int(2.5 * size)

    def evict(client: SynapseClient) -> list[str]:
        return [e["name"] for e in client.request("POST", "/v1/admin/evict", {"idle_s": 0}, retry=False)["evicted"]]

    with LiveServer(state_dir=tmp_path / "s", max_snapshot_bytes_per_owner=quota) as server, \
            SynapseClient(server.url) as client:
        for seed in (1, 2):
            weights = client.create("x", kind=KIND, config=CONFIG, seed=seed).weights
            assert evict(client) == ["x"]
        assert [e["name"] for e in client.evicted()] == ["x"]  # the latest copy only
        assert len(list((tmp_path / "s" / "evicted" / "local").glob("x.*.safetensors"))) == 1
        client.create("y", kind=KIND, config=CONFIG)
        client.create("z", kind=KIND, config=CONFIG)
        evicted = evict(client)
        assert len(evicted) == 1  # one copy fits beside x's, not two
        (stays,) = {"y", "z"} - set(evicted)
        assert client.get(stays).describe()["version"] == 1  # still here, as it was
        assert sorted(e["name"] for e in client.evicted()) == sorted(["x", *evicted])
        back = client.restore_evicted("x")  # its copy goes, and with it what it counted
        np.testing.assert_array_equal(back.weights, weights)
        back.delete()
        assert evict(client) == [stays]
    with LiveServer(state_dir=tmp_path / "s", max_snapshot_bytes_per_owner=quota) as server, \
            SynapseClient(server.url) as client:  # after a restart the copies on disk are counted again
        assert sorted(e["name"] for e in client.evicted()) == ["y", "z"]
        client.create("w", kind=KIND, config=CONFIG)
        assert evict(client) == []
        assert [d["name"] for d in client.list()] == ["w"]


def test_an_instance_whose_evicted_copy_would_not_fit_is_never_written_out(tmp_path, monkeypatch):
    """A red-team run (2026-11-30): for an owner whose snapshot quota was full, every pass of the evictor wrote and
    fsynced a whole copy of each idle instance, found it did not fit, and deleted it again. The copy's size is known
    before it is written (its record's), and checked then."""
    from synapse_serve.store import Store

    written = []
    real_save = Store.save_evicted
    monkeypatch.setattr(Store, "save_evicted", lambda self, key, record: (written.append(key),
                                                                          real_save(self, key, record))[1])
    with LiveServer(state_dir=tmp_path, max_snapshot_bytes_per_owner=1000) as server, \
            SynapseClient(server.url) as client:
        client.create("big", kind="HebbianSynapse", config={"shape": [40, 40], "optim_type": "adam"})
        for _ in range(3):
            swept = client.request("POST", "/v1/admin/evict", {"idle_s": 0}, retry=False)
            assert swept["evicted"] == [] and [(s["owner"], s["name"]) for s in swept["stayed"]] == [("local", "big")]
            assert swept["stayed"][0]["reason"].startswith("its evicted copy would not fit its owner's snapshot quota")
        assert written == [] and [d["name"] for d in client.list()] == ["big"]
        assert server.registry.capacity.owner_usage("local")["snapshot_bytes"] == 0
        assert not list((tmp_path / "evicted").rglob("*.safetensors"))


def test_an_eviction_that_cannot_be_written_says_why_the_instance_stays(tmp_path, monkeypatch):
    """An operator's sweep on a full disk answered ``{"evicted": []}`` with no word of why: each idle instance that
    stays is listed with its reason, and is untouched."""
    import errno

    from synapse_serve.store import Store

    def full(self, key, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        syn = client.create("kept", kind=KIND, config=CONFIG)
        before = syn.weights
        monkeypatch.setattr(Store, "save_evicted", full)
        swept = client.request("POST", "/v1/admin/evict", {"idle_s": 0}, retry=False)
        assert swept == {"evicted": [], "stayed": [{"owner": "local", "name": "kept", "reason":
                                                    "its evicted copy could not be written (No space left on device)"}]}
        np.testing.assert_array_equal(syn.weights, before)
        assert client.evicted() == [] and server.registry.capacity.owner_usage("local")["snapshot_bytes"] == 0
        monkeypatch.undo()
        assert client.request("POST", "/v1/admin/evict", {"idle_s": 0}, retry=False)["stayed"] == []


def test_devices_route_shows_load_and_budget(tmp_path):
    with LiveServer(state_dir=tmp_path, device_budget_bytes=10**7) as server, SynapseClient(server.url) as client:
        syn = client.create("d", kind=KIND, config=CONFIG)
        devices = client.request("GET", "/v1/devices", retry=True)["devices"]
        assert devices[0]["budget_bytes"] == 10**7
        assert sum(d["state_bytes"] for d in devices) == syn.describe()["state_bytes"]
        assert re.fullmatch(r"cpu:\d+", syn.describe()["device"])


def test_memory_settings_default_for_a_shared_host_and_yield_to_the_environment(monkeypatch):
    from synapse_serve.local.backend import apply_memory_settings
    from synapse_serve.settings import Settings

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    apply_memory_settings(Settings(gpu_memory_fraction=0.5))
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # on demand: a shared GPU
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")  # the operator's own setting wins
    apply_memory_settings(Settings(gpu_preallocate=False))
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


def test_the_access_log_can_be_turned_off_alone(tmp_path):
    """Item 34: one access line per call with no way to turn just that off."""
    captured = Captured()
    access, server_log = logging.getLogger("synapse_serve.access"), logging.getLogger("synapse_serve")
    access.addHandler(captured)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        with LiveServer(state_dir=tmp_path, access_log=False) as server, SynapseClient(server.url) as client:
            client.create("quiet", kind=KIND, config=CONFIG).forward(np.ones((1, 5, 5, 1), np.float32))
            assert server_log.isEnabledFor(logging.ERROR)  # the rest of the logging is untouched
    finally:
        access.removeHandler(captured)
        access.setLevel(old_level)
    assert captured.lines == []


def test_an_evicted_copy_discarded_is_gone_for_good_and_leaves_the_snapshot_quota(tmp_path):
    """``DELETE /v1/evicted/{name}``: the copy can no longer be restored, its file is deleted and its bytes no
    longer count against the owner's snapshot quota (a copy that did not fit beside it now does); a live instance
    of the name is not touched; the session stream and the in-process mode carry the same operation."""
    with LiveServer(state_dir=tmp_path / "probe") as probe, SynapseClient(probe.url) as client:
        size = client.create("p", kind=KIND, config=CONFIG).export(tmp_path / "p.safetensors").stat().st_size
    quota = int(1.5 * size)  # one evicted copy fits, not two

    def evict(client: SynapseClient) -> list[str]:
        return [e["name"] for e in client.request("POST", "/v1/admin/evict", {"idle_s": 0}, retry=False)["evicted"]]

    with LiveServer(state_dir=tmp_path / "s", max_snapshot_bytes_per_owner=quota) as server, \
            SynapseClient(server.url) as client:
        client.create("x", kind=KIND, config=CONFIG)
        assert evict(client) == ["x"]
        client.create("y", kind=KIND, config=CONFIG)
        assert evict(client) == []  # y's copy does not fit beside x's
        weights = client.create("x", kind=KIND, config=CONFIG, seed=7).weights  # the name again, beside its copy
        with pytest.raises(NotFoundError, match="no evicted instance"):
            client.discard_evicted("y")
        client.discard_evicted("x")
        assert client.evicted() == [] and not list((tmp_path / "s" / "evicted").rglob("*.safetensors"))
        np.testing.assert_array_equal(client.get("x").weights, weights)  # the live one is untouched
        with pytest.raises(NotFoundError, match="no evicted instance"):
            client.restore_evicted("x")
        with pytest.raises(NotFoundError, match="no evicted instance"):
            client.discard_evicted("x")
        client.get("x").delete()
        assert evict(client) == ["y"]  # its bytes were released: y's copy fits now
        with client.session() as session:  # the same operation as a frame
            session.request("DELETE", "/v1/evicted/y", retry=False)
            with pytest.raises(NotFoundError, match="no evicted instance"):
                session.request("DELETE", "/v1/evicted/y", retry=False)
        assert client.evicted() == []
        with pytest.raises(UnprocessableEntityError):
            client.request("DELETE", "/v1/evicted/" + "n" * 300, retry=False)  # a name no instance can have
        client.create("z", kind=KIND, config=CONFIG)
        assert evict(client) == ["z"]
    with SynapseClient(f"local:{tmp_path / 's'}") as local:  # the in-process mode, on the server's directory
        assert [e["name"] for e in local.evicted()] == ["z"]
        local.discard_evicted("z")
        assert local.evicted() == [] and not list((tmp_path / "s" / "evicted").rglob("*.safetensors"))
