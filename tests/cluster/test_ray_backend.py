"""The Ray backend: the same API and client over two shard actors of a local Ray cluster (issue 17).

The test session starts a Ray cluster (``cluster/raycluster.py``: loopback, token authentication,
no dashboard, a small object store, ``JAX_PLATFORMS=cpu`` in the shards); each server below is a
real uvicorn front whose backend is ``RayBackend`` with two shards in a namespace of its own. The answers are checked
against the in-process engine (the local backend) bit for bit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import httpx
import numpy as np
import pytest

from cluster.raycluster import ray, ray_server, serving
from synapse_client import (
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    Ref,
    ServiceUnavailableError,
    SynapseClient,
    UnprocessableEntityError,
)

ALICE, BOB, ROOT = "alice-" + "a" * 24, "bob-" + "b" * 24, "root-" + "r" * 24
DENSE = {"shape": [12, 5], "eta": 0.1, "optim_type": "adam", "sign_value": -1.0}
DECONV = {"shape": [3, 3, 1, 4], "x_shape": [8, 8], "eta": 0.05}


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    live = ray_server(tmp_path_factory.mktemp("ray-state"), durability="sync",
                      tokens=f"alice:{ALICE},bob:{BOB},root:{ROOT}:admin")
    with serving(live):
        yield live


@pytest.fixture
def alice(server):
    with SynapseClient(server.url, token=ALICE) as client:
        yield client


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_answers_equal_the_local_engines_bit_for_bit(alice):
    rng = np.random.default_rng(0)
    x, post = rng.random((4, 12), np.float32), rng.random((4, 5), np.float32)
    with SynapseClient("local", local_settings={"history_when_durability_off": True}) as local:
        name = _name("same")
        remote = alice.create(name, kind="HebbianSynapse", config=DENSE, seed=3)
        here = local.create(name, kind="HebbianSynapse", config=DENSE, seed=3)
        for syn in (remote, here):
            for _ in range(3):
                syn.evolve(x, post)
        np.testing.assert_array_equal(remote.forward(x), here.forward(x))
        np.testing.assert_array_equal(remote.get("weights"), here.get("weights"))
        np.testing.assert_array_equal(remote.get("opt_state/mu/0"), here.get("opt_state/mu/0"))
        seq = rng.random((6, 4, 12), np.float32)
        np.testing.assert_array_equal(remote.run_sequence("forward", inputs=seq)["outputs"],
                                      here.run_sequence("forward", inputs=seq)["outputs"])
        assert remote.describe()["counters"] == here.describe()["counters"] == {"evolve": 3, "forward": 7}
        assert remote.stats()["weights"] == here.stats()["weights"]
        assert [e["norm"] for e in remote.history()] == pytest.approx([e["norm"] for e in here.history()])
        assert remote.plot_filters()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_whole_api_works_over_rest_and_the_session(alice, tmp_path):
    name = _name("api")
    syn = alice.create(name, kind="HebbianDeconvSynapse", config=DECONV)
    described = syn.describe()
    assert described["device"].startswith(f"shard-{described['shard']}/")
    x = np.ones((2, 8, 8, 1), np.float32)
    with alice.session() as session:
        handle = session.get(name)
        y = handle.forward(x)
        handle.evolve(x, y)
        assert handle.describe()["counters"] == {"forward": 1, "evolve": 1}
    version = syn.set("weights", np.zeros((3, 3, 1, 4), np.float32))
    assert syn.describe()["version"] == version
    syn.snapshot("zero")
    syn.set("weights", np.ones((3, 3, 1, 4), np.float32))
    syn.restore("zero")
    assert not syn.get("weights").any()
    path = syn.export(tmp_path / "api.safetensors")
    copy = alice.import_(path, name=_name("copy"))
    np.testing.assert_array_equal(copy.get("weights"), syn.get("weights"))
    assert {d["name"] for d in alice.list()} >= {name, copy.name}
    syn.delete()
    with pytest.raises(NotFoundError):
        syn.describe()


def test_instances_spread_over_the_shards_and_references_cross_them(alice):
    # each new instance goes to the shard holding the fewest state bytes: two large ones land on both
    names = [_name("spread") for _ in range(2)]
    shards = {alice.create(n, kind="HebbianSynapse", config={"shape": [128, 128]}).describe()["shard"]
              for n in names}
    assert shards == {0, 1}
    a = alice.create(_name("ref-a"), kind="HebbianSynapse", config={"shape": [5, 5]}, device="shard-0")
    b = alice.create(_name("ref-b"), kind="HebbianSynapse", config={"shape": [5, 3]}, device="shard-1/cpu:0")
    assert (a.describe()["shard"], b.describe()["shard"]) == (0, 1)
    outputs = a.forward(np.random.default_rng(1).random((2, 5), np.float32))
    np.testing.assert_array_equal(b.forward(Ref("outputs", instance=a.name)), b.forward(outputs))
    with pytest.raises(UnprocessableEntityError, match="one shard"):
        alice.call_many("forward", {a.name: {"inputs": np.ones((1, 5))}, b.name: {"inputs": np.ones((1, 5))}})
    same = alice.create(_name("ref-c"), kind="HebbianSynapse", config={"shape": [5, 5]}, device="shard-0")
    packed = alice.call_many("forward", {a.name: {"inputs": np.ones((1, 5))}, same.name: {"inputs": np.ones((1, 5))}})
    assert set(packed) == {a.name, same.name}
    stacked = alice.call_stacked("forward", [a.name, same.name], {"inputs": np.ones((2, 1, 5))})
    np.testing.assert_array_equal(stacked["outputs"], np.stack([packed[n]["outputs"] for n in (a.name, same.name)]))
    with pytest.raises(UnprocessableEntityError, match="one shard"):
        alice.call_stacked("forward", [a.name, b.name], {"inputs": np.ones((2, 1, 5))})


def test_owners_stay_apart_across_shards(server, alice):
    mine = [alice.create(_name("mine"), kind="HebbianSynapse", config=DENSE, device=f"shard-{i}") for i in (0, 1)]
    with SynapseClient(server.url, token=BOB) as bob, SynapseClient(server.url, token=ROOT) as root:
        for syn in mine:
            with pytest.raises(NotFoundError):
                bob.get(syn.name).describe()
            with pytest.raises(NotFoundError):
                bob.get(syn.name, owner="alice").describe()
            assert root.get(syn.name, owner="alice").describe()["owner"] == "alice"
        assert not any(d["owner"] == "alice" for d in bob.list())
        everyone = {(d["owner"], d["name"]) for d in root.list()}
        assert {("alice", s.name) for s in mine} <= everyone


def test_a_shards_budget_refuses_a_create_before_any_work(cluster, tmp_path):
    with SynapseClient("local") as local:  # what one such instance holds
        nbytes = local.create("probe", kind="HebbianSynapse", config={"shape": [16, 16]}).describe()["state_bytes"]
    live = ray_server(tmp_path, device_budget_bytes=nbytes * 3 // 2)  # room for one per shard
    with serving(live), SynapseClient(live.url) as client:
        first = client.create("first", kind="HebbianSynapse", config={"shape": [16, 16]})
        second = client.create("second", kind="HebbianSynapse", config={"shape": [16, 16]})
        assert {first.describe()["shard"], second.describe()["shard"]} == {0, 1}  # the full one passed it on
        with pytest.raises(ConflictError, match=r"device shard-\d/cpu:0 holds \d+ bytes") as full:
            client.create("third", kind="HebbianSynapse", config={"shape": [16, 16]})
        assert full.value.problem["device"] in ("shard-0/cpu:0", "shard-1/cpu:0")  # as GET /v1/devices names it
        assert {d["name"] for d in client.list()} == {"first", "second"}
        ready = httpx.get(f"{live.url}/readyz").json()
        assert ready == {"status": "ready", "shards": "2/2 up"}
        metrics = httpx.get(f"{live.url}/metrics").text
        assert 'synapse_shard_up{shard="shard-0"} 1.0' in metrics and 'synapse_shard_up{shard="shard-1"} 1.0' in metrics
        assert 'synapse_state_bytes{device="shard-1/cpu:0"}' in metrics
        assert "synapse_compiled_programs_since_release" in metrics  # the shards' counts, summed
        assert {d["device"] for d in client.request("GET", "/v1/devices", retry=True)["devices"]} == {
            "shard-0/cpu:0", "shard-1/cpu:0"}
        assert len(client.request("GET", "/v1/admin/storage", retry=True)["shards"]) == 2


@pytest.mark.parametrize("how", ["ray.kill", "kill -9"])
def test_a_shard_killed_mid_stream_loses_no_acknowledged_evolve(cluster, tmp_path, how):
    live = ray_server(tmp_path, durability="sync")
    with serving(live), SynapseClient(live.url, timeout=120) as client:
        syn = client.create("learner", kind="HebbianSynapse", config={"shape": [8, 4], "eta": 0.05})
        backend = live.app.state.server.backend
        shard = syn.describe()["shard"]
        rng = np.random.default_rng(2)
        acknowledged, errors = [], []
        started = threading.Event()

        def stream() -> None:
            try:
                for _ in range(60):
                    acknowledged.append(syn.evolve(rng.random((2, 8), np.float32), rng.random((2, 4), np.float32)))
                    started.set()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                started.set()

        before = backend.shard_info()[shard]["pid"]
        worker = threading.Thread(target=stream)
        worker.start()
        started.wait(60)
        if how == "ray.kill":
            ray.kill(backend.shards[shard], no_restart=False)
        else:
            os.kill(before, signal.SIGKILL)
        at_kill = len(acknowledged)
        worker.join(180)
        assert not worker.is_alive() and errors == [], errors
        assert len(acknowledged) == 60
        described = syn.describe()  # the restarted shard restored it from its files
        assert described["counters"] == {"evolve": 60}  # every acknowledged evolve, each exactly once
        assert described["version"] == acknowledged[-1]["version"] == 61
        syn.forward(np.ones((1, 8), np.float32))  # and it answers
        assert backend.shard_info()[shard]["pid"] != before  # it was a new process
        assert 0 < at_kill < 60, "the shard was not killed in the middle of the stream"


def test_two_fronts_never_both_create_one_name(cluster, tmp_path):
    """Fronts of one deployment share its shards and its directory: racing creates of a name, one wins."""
    first = ray_server(tmp_path)
    with serving(first), ray_server(tmp_path, ray_namespace=first.settings.ray_namespace) as second, \
            SynapseClient(first.url) as a, SynapseClient(second.url) as b:
        outcomes: dict[str, list[str]] = {}

        def create(client, name) -> None:
            try:
                client.create(name, kind="HebbianSynapse", config={"shape": [4, 2]})
                outcomes.setdefault(name, []).append("created")
            except ConflictError:
                outcomes.setdefault(name, []).append("conflict")

        for i in range(8):
            racers = [threading.Thread(target=create, args=(client, f"race-{i}")) for client in (a, b)]
            for racer in racers:
                racer.start()
            for racer in racers:
                racer.join(60)
        assert all(sorted(o) == ["conflict", "created"] for o in outcomes.values()), outcomes
        assert len(outcomes) == 8
        assert {d["name"] for d in b.list()} == {f"race-{i}" for i in range(8)}  # each on one shard, seen by both
        b.get("race-0").delete()
        a.create("race-0", kind="HebbianSynapse", config={"shape": [4, 2]})  # a deleted name is free again
        assert a.get("race-0").describe()["version"] == 1


def test_a_restarted_directory_relearns_the_names_from_the_shards(server, alice):
    """The directory is rebuilt from the shards' own lists: a held name stays taken, a free one can be created."""
    held = alice.create(_name("held"), kind="HebbianSynapse", config={"shape": [4, 2]})
    backend = server.app.state.server.backend
    ray.kill(backend.directory, no_restart=False)
    with pytest.raises(ConflictError, match="already exists"):
        alice.create(held.name, kind="HebbianSynapse", config={"shape": [4, 2]})
    fresh = alice.create(_name("fresh"), kind="HebbianSynapse", config={"shape": [4, 2]})
    assert fresh.describe()["version"] == 1 and held.describe()["version"] == 1


def test_the_front_counts_a_shard_call_in_flight_as_busy(server, alice):
    """The front's busy polling (api/polling.py) stops while a shard computes: ``RayBackend.busy`` says when."""
    backend = server.app.state.server.backend
    syn = alice.create(_name("busy"), kind="HebbianDeconvSynapse", config=DECONV)
    xs = np.random.default_rng(0).random((400, 8, 8, 8, 1), np.float32)  # a long sequence: tens of ms on a shard
    seen = []
    call = threading.Thread(target=lambda: seen.append(syn.forward(xs).shape))
    assert not backend.busy()
    call.start()
    busy_seen = False
    while call.is_alive():
        busy_seen = busy_seen or backend.busy()
    call.join()
    assert busy_seen and seen == [(400, 8, 8, 8, 4)]
    assert not backend.busy()


def test_quotas_idle_eviction_keyed_references_and_a_stuck_shard_are_as_on_one_host(cluster, tmp_path):
    """A red-team found the Ray backend apart from one host: instance quotas counted per shard (an owner got
    twice each), names its shards' idle evictor freed still taken (no restore, no create), a keyed retry whose
    reference lived on another shard refused once those values changed, an unknown kind asked of shard-0 with a
    blocking call, and a shard that does not answer made a create a 500 that left its name taken for good."""
    with SynapseClient(f"local:{tmp_path / 'probe'}") as local:  # what one instance holds, at batch 1 and 3
        probe = local.create("probe", kind="HebbianSynapse", config={"shape": [4, 2]})
        small = probe.describe()["state_bytes"]
        probe.snapshot("s")  # and what a snapshot of it keeps on disk
        probe.forward(np.ones((3, 4), np.float32))
        grown = probe.describe()["state_bytes"]
    snapshot = next((tmp_path / "probe").glob("snapshots/*/probe/s.*")).stat().st_size
    live = ray_server(tmp_path, durability="sync", max_instances_per_owner=2, max_instances=4, evict_idle_after_s=8,
                      max_state_bytes_per_owner=small + grown - 1, max_snapshot_bytes_per_owner=snapshot * 5 // 2,
                      tokens=f"alice:{ALICE},bob:{BOB}")
    with serving(live), SynapseClient(live.url, token=ALICE) as alice, SynapseClient(live.url, token=BOB) as bob:
        a = [alice.create(f"a{i}", kind="HebbianSynapse", config={"shape": [4, 2]}, device=f"shard-{i}")
             for i in (0, 1)]
        with pytest.raises(PermissionDeniedError, match="max_instances_per_owner"):
            alice.create("a2", kind="HebbianSynapse", config={"shape": [4, 2]})
        # the byte quotas count both shards: a1 alone would fit batch 3 on its shard, not with a0 on the other
        with pytest.raises(PermissionDeniedError, match="max_state_bytes_per_owner: 'alice' holds"):
            a[1].forward(np.ones((3, 4), np.float32))
        a[0].snapshot("first")
        a[1].snapshot("second")
        with pytest.raises(PermissionDeniedError, match="max_snapshot_bytes_per_owner"):  # shard-1 alone: room
            a[1].snapshot("third")
        a[0].delete_snapshot("first")
        a[1].snapshot("third")
        for snapshot in ("second", "third"):  # evicted copies count against the same quota: room for a0's and a1's
            a[1].delete_snapshot(snapshot)
        b0 = bob.create("b0", kind="HebbianSynapse", config={"shape": [4, 2], "eta": 0.1}, device="shard-0")
        b1 = bob.create("b1", kind="HebbianSynapse", config={"shape": [2, 3], "eta": 0.1}, device="shard-1")
        with pytest.raises(PermissionDeniedError, match="max_instances: the server"):
            bob.get_or_create("b2", kind="HebbianSynapse", config={"shape": [4, 2]})
        # a keyed call whose reference is read from the other shard, retried after those values changed
        b0.forward(np.ones((1, 4), np.float32))
        post = np.ones((1, 3), np.float32)
        first = b1.call("evolve", pre=Ref("outputs", instance="b0"), post=post, idempotency_key="once")
        b0.forward(np.full((1, 4), 2.0, np.float32))
        again = b1.call("evolve", pre=Ref("outputs", instance="b0"), post=post, idempotency_key="once")
        assert again["version"] == first["version"] and b1.describe()["counters"] == {"evolve": 1}
        with pytest.raises(NotFoundError, match="unknown kind 'Nope'"):
            alice.kind_help("Nope")
        with pytest.raises(NotFoundError, match=r"names\[1\] \('zz'\): no instance named 'zz'") as missing:
            bob.call_stacked("forward", ["b0", "zz"], {"inputs": np.ones((2, 1, 4), np.float32)})
        assert missing.value.problem["call"] == 1  # named as one host names it
        # the shards' own idle evictor: the names are free again, and restoring one works
        deadline = time.monotonic() + 60
        while {e["name"] for e in alice.evicted()} != {"a0", "a1"}:
            assert time.monotonic() < deadline, alice.evicted()
            time.sleep(0.5)
        restored = alice.restore_evicted("a0")
        assert restored.describe()["shard"] == 0
        taken_anew = alice.create("a1", kind="HebbianSynapse", config={"shape": [4, 2]})  # the evicted a1's name
        with pytest.raises(NotFoundError, match="no evicted instance named 'a1'"):
            bob.discard_evicted("a1")  # not bob's
        alice.discard_evicted("a1")  # its copy goes from whichever shard holds it; the live a1 stays
        assert alice.evicted() == [] and taken_anew.describe()["version"] == 1
        with pytest.raises(NotFoundError, match="no evicted instance named 'a1'"):
            alice.restore_evicted("a1")
        with pytest.raises(PermissionDeniedError, match="quota max_instances"):  # alice's 2 (or 4 in all) again
            alice.create("a3", kind="HebbianSynapse", config={"shape": [4, 2]})
        a[0].describe()
        taken_anew.delete()
        # a shard that does not answer: a 503 naming it, never a 500, and the name is not left taken
        backend = live.app.state.server.backend
        stuck = backend.shard_info()[1]["pid"]
        with SynapseClient(live.url, token=BOB, max_retries=0) as hasty:
            os.kill(stuck, signal.SIGSTOP)
            try:
                with pytest.raises(ServiceUnavailableError, match="shard-1 does not answer"):
                    hasty.get("never-made").describe()
                with pytest.raises(ServiceUnavailableError, match="shard-1 does not answer"):
                    hasty.create("late", kind="HebbianSynapse", config={"shape": [4, 2]}, device="shard-0")
                # a red-team run: what asks every shard (a listing, a create placed where there is room) waited for
                # the stuck one with no bound
                backend.each_timeout_s = 2.0
                for asked in (hasty.list, lambda: hasty.create("late", kind="HebbianSynapse", config={"shape": [4, 2]})):
                    started = time.monotonic()
                    with pytest.raises(ServiceUnavailableError, match="shard-1 did not answer within 2 s"):
                        asked()
                    assert time.monotonic() - started < 10
            finally:
                os.kill(stuck, signal.SIGCONT)
            assert hasty.create("late", kind="HebbianSynapse", config={"shape": [4, 2]}).describe()["version"] == 1


def test_what_the_channel_cannot_carry_goes_through_ray_and_evicted_copies_come_back_newest(cluster, tmp_path):
    """A red-team run: a request the shard's channel decoder refused (a ``sequence`` nested past its depth, a
    reference's values over ``max_tensor_elements``) was taken for a shard that died — 503, or, keyed, retried for
    good; an integer the channel's codec cannot carry was a 500; and a name evicted on two shards came back as its
    older copy. Each now answers as one host does."""
    live = ray_server(tmp_path, durability="sync", max_tensor_elements=64, tokens=f"alice:{ALICE},root:{ROOT}:admin")
    with serving(live), SynapseClient(live.url, token=ALICE) as alice:
        src = alice.create("src", kind="HebbianSynapse", config={"shape": [1, 80]}, device="shard-1")
        dst = alice.create("dst", kind="HebbianSynapse", config={"shape": [80, 2], "eta": 0.1}, device="shard-0")
        src.forward(np.ones((1, 1), np.float32))  # 80 outputs: over the element bound, read on shard-1
        started = time.monotonic()
        answer = dst.call("evolve", pre=Ref("outputs", instance="src"), post=np.ones((1, 2), np.float32),
                          idempotency_key="over-the-bound")
        assert answer["version"] == 2 and time.monotonic() - started < 30
        with SynapseClient("local") as one_host:  # a reference to what is no floating compartment: the same words
            one_host.create("src", kind="HebbianSynapse", config={"shape": [1, 80]})
            here = one_host.create("dst", kind="HebbianSynapse", config={"shape": [80, 2], "eta": 0.1})
            for compartment in ("nope", "key"):
                refusals = []
                for syn in (dst, here):
                    with pytest.raises(UnprocessableEntityError) as refused:
                        syn.call("evolve", pre=Ref(compartment, instance="src"), post=np.ones((1, 2), np.float32))
                    refusals.append(refused.value.problem["detail"])
                assert refusals[0] == refusals[1] and "no such floating compartment in 'src'" in refusals[0]
        e = alice.create("e", kind="HebbianSynapse", config={"shape": [4, 4]})
        deep: object = 1
        for _ in range(62):  # within what the front reads; past what the channel's frame may nest
            deep = [deep]
        for sequence, said in (({"zz": deep}, "sequence: unknown option 'zz'"),
                               ({"every": 10 ** 23}, "sequence.every: "), ({"last": 2 ** 64}, "sequence.last: ")):
            over_ray = httpx.post(f"{live.url}/v1/synapses/e/forward", json={"inputs": [[[1, 2, 3, 4]]],
                                  "sequence": sequence}, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
            assert over_ray.status_code == 422 and over_ray.json()["detail"].startswith(said), over_ray.text
        assert e.describe()["version"] == 1  # refused, never run
        evict = {"url": f"{live.url}/v1/admin/evict", "json": {"idle_s": 0},
                 "headers": {"Authorization": f"Bearer {ROOT}"}, "timeout": 60}
        ev = alice.create("ev", kind="HebbianSynapse", config={"shape": [4, 2], "eta": 0.1}, device="shard-0")
        ev.evolve(np.ones((1, 4), np.float32), np.ones((1, 2), np.float32))
        swept = httpx.post(**evict).json()
        assert {e["name"] for e in swept["evicted"]} == {"src", "dst", "e", "ev"} and swept["stayed"] == []
        again = alice.create("ev", kind="HebbianSynapse", config={"shape": [4, 2], "eta": 0.1}, device="shard-1")
        for _ in range(4):
            again.evolve(np.ones((1, 4), np.float32), np.ones((1, 2), np.float32))
        newest = again.describe()["version"]
        httpx.post(**evict).raise_for_status()
        shards = live.app.state.server.backend.shards
        held = [ray.get(shard.run.remote("evicted", (), {"owner": "alice"}), timeout=60)[1] for shard in shards]
        assert [[c["name"] for c in copies if c["name"] == "ev"] for copies in held] == [[], ["ev"]]  # not counted
        assert [c["name"] for c in alice.evicted() if c["name"] == "ev"] == ["ev"]  # one copy a name, the latest
        assert {"src", "dst", "e"} <= {c["name"] for c in alice.evicted()}  # names this sweep did not write stay
        back = alice.restore_evicted("ev")
        assert back.describe()["version"] == newest and back.describe()["shard"] == 1
        assert "ev" not in {c["name"] for c in alice.evicted()}  # the older copy went too
