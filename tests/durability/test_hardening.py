"""Nothing acknowledged is ever lost: restore races, full disks at start-up, 507 retries, two servers, crashes.

Each test here failed on the code before the fix it names (issue 11, items 1-5, 8, 12).
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import LiveServer
from durability.files import with_index, with_record
from synapse_client import (
    ConflictError,
    InsufficientStorageError,
    NotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
    SynapseClient,
    UnprocessableEntityError,
)
from synapse_serve.auth import TokenTable
from synapse_serve.errors import AlreadyExists, AnswerNotKept, InvalidConfig
from synapse_serve.local.instance import Instance
from synapse_serve.local.persistence import Persistence
from synapse_serve.local.registry import Registry
from synapse_serve.names import InstanceKey
from synapse_serve.store import Store, decode, encode
from synapse_serve.testing import ServerProcess

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [2, 2, 1, 2], "x_shape": [4, 4], "eta": 0.1, "optim_type": "adam"}
X = np.ones((1, 4, 4, 1), np.float32)
POST = np.ones((1, 4, 4, 2), np.float32)


def _learned(state_dir, names, mode="sync") -> dict[str, np.ndarray]:
    """Instances that learned a little, stored; returns their weights."""
    weights = {}
    with LiveServer(state_dir=state_dir, durability=mode) as server, SynapseClient(server.url) as client:
        for i, name in enumerate(names):
            syn = client.create(name, kind=KIND, config=CONFIG, seed=i)
            for _ in range(i + 1):
                syn.evolve(X, POST)
            weights[name] = syn.weights
    return weights


def test_no_call_acts_on_a_name_whose_file_is_not_restored_yet(tmp_path, monkeypatch):
    """Item 1: while restore runs, a create of a stored name used to win and overwrite its file."""
    weights = _learned(tmp_path, ["x", "y"])
    stored = Store(tmp_path).path("local/x").read_bytes()
    release = threading.Event()
    real_load = Registry.load_stored
    monkeypatch.setattr(Registry, "load_stored", lambda self: (release.wait(30), real_load(self))[1])
    server = LiveServer(state_dir=tmp_path, durability="sync").start()
    try:
        with SynapseClient(server.url, max_retries=0) as client:
            for attempt in (lambda: client.get("x"), lambda: client.get("x").forward(X), client.list,
                            lambda: client.create("x", kind=KIND, config=CONFIG)):
                with pytest.raises(ServiceUnavailableError, match="being restored|restored") as info:
                    attempt()
                assert info.value.problem["status"] == 503
            r = httpx.post(f"{server.url}/v1/synapses", json={"name": "x", "kind": KIND, "config": CONFIG})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert Store(tmp_path).path("local/x").read_bytes() == stored  # untouched
            client.create("new", kind=KIND, config=CONFIG)  # a name with no file is free meanwhile
            release.set()
            assert server.ready.wait(30)
            for name, w in weights.items():
                np.testing.assert_array_equal(client.get(name).weights, w)  # the acknowledged history
            with pytest.raises(ConflictError):
                client.create("x", kind=KIND, config=CONFIG)
    finally:
        release.set()
        server.__exit__()


def test_a_create_never_overwrites_a_stored_file(tmp_path):
    """Item 1, second half: a file whose instance is not loaded keeps its name taken."""
    _learned(tmp_path, ["kept"])
    registry = Registry(persistence=Persistence(Store(tmp_path), "sync"))  # never loaded: the file is there
    with pytest.raises(AlreadyExists, match="stored file for 'kept' exists but is not loaded"):
        registry.create(InstanceKey("local", "kept"), kind=KIND, config=CONFIG)
    assert decode(Store(tmp_path).path("local/kept").read_bytes()).counters == {"evolve": 1}


def _refuse_writes(monkeypatch, error: int):
    """Every instance file write fails like a full or read-only disk; returns the writes attempted."""
    attempts = []

    def refused(*args, **kwargs):
        attempts.append(args)
        raise OSError(error, "No space left on device" if error == errno.ENOSPC else "Read-only file system")

    monkeypatch.setattr("synapse_serve.store.write_atomic", refused)
    return attempts


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_a_sync_restart_on_a_full_or_read_only_disk_loses_nothing(tmp_path, monkeypatch, error):
    """Item 2: restore rewrote every file; a failed write then quarantined every instance."""
    weights = _learned(tmp_path, ["a", "b", "c"])
    attempts = _refuse_writes(monkeypatch, error)
    with LiveServer(state_dir=tmp_path, durability="sync") as server, SynapseClient(server.url) as client:
        assert attempts == []  # restoring reads, never writes
        assert sorted(d["name"] for d in client.list()) == ["a", "b", "c"]
        for name, w in weights.items():
            np.testing.assert_array_equal(client.get(name).weights, w)
        assert server.registry.storage_status()["restore_errors"] == {}
        with pytest.raises(InsufficientStorageError):  # the disk is still full: a mutation says so
            client.get("a").evolve(X, POST)
    assert not (tmp_path / "quarantine").exists() or not any((tmp_path / "quarantine").rglob("*"))


def test_a_keyed_call_after_a_507_applies_exactly_once(tmp_path, monkeypatch):
    """Item 3: the state moved but the answer was not kept, so each retry applied the call again."""
    with LiveServer(state_dir=tmp_path, durability="sync") as server, SynapseClient(server.url) as client:
        syn = client.create("k", kind=KIND, config=CONFIG)
        _refuse_writes(monkeypatch, errno.ENOSPC)
        for _ in range(3):
            with pytest.raises(InsufficientStorageError, match="same Idempotency-Key"):
                syn.call("evolve", pre=X, post=POST, idempotency_key="key-1")
        assert syn.describe()["counters"] == {"evolve": 1}  # applied once, in memory
        monkeypatch.undo()  # space again
        answer = syn.call("evolve", pre=X, post=POST, idempotency_key="key-1")
        assert answer["version"] == 2 and syn.describe()["counters"] == {"evolve": 1}
        assert decode(Store(tmp_path).path("local/k").read_bytes()).counters == {"evolve": 1}  # now durable

        _refuse_writes(monkeypatch, errno.ENOSPC)  # a create refused so is undone, and its 507 says so
        with pytest.raises(InsufficientStorageError, match="'late' was not created") as info:
            client.create("late", kind=KIND, config=CONFIG)
        assert "applied in memory" not in info.value.problem["detail"] and "nothing was kept" in str(info.value)
        assert [d["name"] for d in client.list()] == ["k"]
        monkeypatch.undo()
        assert _evict_all(server) == ["k"]
        _refuse_writes(monkeypatch, errno.ENOSPC)  # a red-team run: this said "nothing was kept", and the copy was
        with pytest.raises(InsufficientStorageError, match="its evicted copy is kept, restore it again once"):
            client.restore_evicted("k")
        monkeypatch.undo()
        assert client.restore_evicted("k").describe()["counters"] == {"evolve": 1}


def test_a_second_server_on_the_same_state_directory_refuses_to_start(tmp_path):
    """Item 4: a rolling redeploy that started the new process first lost the old one's acknowledged versions."""
    with ServerProcess(tmp_path / "state", durability="sync") as first, SynapseClient(first.url) as client:
        client.create("mine", kind=KIND, config=CONFIG)
        second = ServerProcess(tmp_path / "state", durability="sync")
        proc = subprocess.run([second.exe, "--port", str(second.port), "--state-dir", str(second.state_dir)],
                              env=second.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert f"in use by another synapse-serve process (pid {first.proc.pid})" in proc.stderr
        assert client.get("mine").describe()["version"] == 1  # the first one serves on, untouched
    with LiveServer(state_dir=tmp_path / "other"):  # in-process too: the lifespan takes the lock before serving
        second = LiveServer(state_dir=tmp_path / "other")
        try:
            with pytest.raises(RuntimeError, match="did not start"):
                second.start(wait_ready=True)
        finally:
            second.sock.close()


def test_a_crash_during_a_snapshot_never_makes_delete_fail(tmp_path):
    """Item 5: a snapshot's temporary file made DELETE answer 500."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        syn = client.create("s", kind=KIND, config=CONFIG)
        syn.snapshot("one")
        (tmp_path / "snapshots" / "local" / "s" / ".two.safetensors.0123abcd.tmp").write_bytes(b"half a file")
        syn.delete()
        assert not (tmp_path / "snapshots" / "local" / "s").exists()
        syn = client.create("t", kind=KIND, config=CONFIG)
        syn.snapshot("one")
    (tmp_path / "snapshots" / "local" / "t" / ".two.safetensors.4567.tmp").write_bytes(b"half")
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        assert not list(tmp_path.rglob("*.tmp"))  # start-up cleans every temporary, snapshots' too
        client.get("t").delete()


def _export(tmp_path) -> bytes:
    with LiveServer(state_dir=tmp_path / "src", durability="off") as server, SynapseClient(server.url) as client:
        syn = client.create("src", kind=KIND, config={**CONFIG, "bias": True})
        syn.evolve(X, POST)
        return syn.export(tmp_path / "src.safetensors").read_bytes()


def test_imported_files_are_validated_like_a_create(tmp_path):
    """Item 8: a valid checksum let in version 2^64+5 (describe then answered 500), NaN weights, and more."""
    good = _export(tmp_path)
    record = decode(good)

    def with_array(name: str, value: float) -> bytes:
        changed = decode(good)
        changed.arrays = {**record.arrays, name: np.full_like(record.arrays[name], value)}
        return encode(changed)

    crafted = {
        "huge version": with_record(good, version=2**64 + 5),
        "bogus durability": with_record(good, durability="bogus"),
        "NaN created_at": with_record(good, created_at=float("nan")),
        "negative counter": with_record(good, counters={"evolve": -1}),
        "unknown counter": with_record(good, counters={"rm -rf": 1}),
        "NaN weights": with_array("weights", np.nan),
        # what a write of the same compartment refuses (an evolve on references to them: every weight NaN)
        "NaN signal": with_array("pre", np.nan),
        "infinite signal": with_array("outputs", -np.inf),
        "negative step count": with_array("opt_state/0/count", -1.0),
        "negative second moments": with_array("opt_state/0/nu/0", -0.25),
    }
    with LiveServer(state_dir=tmp_path / "dst") as server, SynapseClient(server.url) as client:
        for what, blob in crafted.items():
            path = tmp_path / "crafted.safetensors"
            path.write_bytes(blob)
            with pytest.raises(UnprocessableEntityError) as info:
                client.import_(path, name="crafted")
            assert info.value.problem["type"].endswith("invalid-instance-file"), (what, info.value.problem)
            assert info.value.problem["status"] == 422
        assert client.list() == []  # nothing half-made
        (tmp_path / "ok.safetensors").write_bytes(good)
        assert client.import_(tmp_path / "ok.safetensors", name="ok").describe()["version"] == 2


def test_import_checks_quota_and_budget_against_what_the_config_will_allocate(tmp_path):
    """Item 12: an export with batch_size raised imported under a quota that refuses the same create."""
    with LiveServer(state_dir=tmp_path / "a", durability="off") as server, SynapseClient(server.url) as client:
        big = client.create("big", kind=KIND, config={**CONFIG, "batch_size": 4096})
        blob = big.export(tmp_path / "big.safetensors")
        create_bytes = big.describe()["state_bytes"]
    small = decode((tmp_path / "big.safetensors").read_bytes())
    small.arrays = {k: (v[:1] if k in ("inputs", "outputs", "pre", "post", "dInputs") else v)
                    for k, v in small.arrays.items()}  # the signals at batch 1: a small file
    (tmp_path / "small.safetensors").write_bytes(encode(small))
    quota = create_bytes // 2
    with LiveServer(state_dir=tmp_path / "b", max_state_bytes_per_owner=quota) as server, \
            SynapseClient(server.url) as client:
        with pytest.raises(PermissionDeniedError, match="max_state_bytes_per_owner"):
            client.create("big", kind=KIND, config={**CONFIG, "batch_size": 4096})
        with pytest.raises(PermissionDeniedError, match="max_state_bytes_per_owner"):
            client.import_(tmp_path / "small.safetensors", name="big")
        assert client.list() == []
    assert blob.exists()


def test_restore_waits_are_bounded_by_a_retry_after(tmp_path, monkeypatch):
    """A restore that is slow does not make callers hang: 503 at once, with Retry-After."""
    _learned(tmp_path, ["slow"])
    release = threading.Event()
    real_load = Registry.load_stored
    monkeypatch.setattr(Registry, "load_stored", lambda self: (release.wait(30), real_load(self))[1])
    server = LiveServer(state_dir=tmp_path, durability="sync").start()
    try:
        started = time.monotonic()
        r = httpx.get(f"{server.url}/v1/synapses/slow")
        assert r.status_code == 503 and time.monotonic() - started < 5 and "retry-after" in r.headers
    finally:
        release.set()
        server.__exit__()


def test_a_keyed_call_retried_after_a_restart_applies_exactly_once(tmp_path):
    """A sync-mode evolve acknowledged (or applied and stored, the answer lost) before the server (or a shard)
    restarted is not applied again when its retry arrives: the file remembers its Idempotency-Key."""
    x, post = X, POST
    headers = {"Idempotency-Key": "evolve-before-the-crash"}
    with LiveServer(state_dir=tmp_path, durability="sync") as server, SynapseClient(server.url) as client:
        syn = client.create("once", kind=KIND, config=CONFIG)
        first = client.request("POST", "/v1/synapses/once/evolve", {"pre": x, "post": post}, retry=False,
                               headers=headers)
        returned = client.request("POST", "/v1/synapses/once/evolve", {"pre": x, "post": post},
                                  retry=False, headers={"Idempotency-Key": "with-weights"})
        kept = syn.call("evolve", pre=x, post=post, returns=["weights"], idempotency_key="with-tensors")
        weights = syn.get("weights")
    with LiveServer(state_dir=tmp_path, durability="sync") as server, SynapseClient(server.url) as client:
        again = client.request("POST", "/v1/synapses/once/evolve", {"pre": x, "post": post}, retry=False,
                               headers=headers)
        assert again == first  # answered from the file: {"version": …}
        assert client.request("POST", "/v1/synapses/once/evolve", {"pre": x, "post": post}, retry=False,
                              headers={"Idempotency-Key": "with-weights"}) == returned
        with pytest.raises(ConflictError, match="no longer kept"):  # applied once; its tensors were not stored
            client.get("once").call("evolve", pre=x, post=post, returns=["weights"], idempotency_key="with-tensors")
        with pytest.raises(UnprocessableEntityError, match="different request"):
            client.request("POST", "/v1/synapses/once/evolve", {"pre": x * 2, "post": post}, retry=False,
                           headers=headers)
        described = client.get("once").describe()
        assert described["counters"]["evolve"] == 3 and described["version"] == kept["version"]
        np.testing.assert_array_equal(client.get("once").get("weights"), weights)


@pytest.mark.parametrize("away", ["evicted", "exported"])
def test_a_keyed_call_retried_after_its_instance_came_back_applies_exactly_once(tmp_path, away):
    """An instance that left memory and came back — evicted and restored, or exported, deleted and imported under
    its name — keeps the keys its file remembers, as a restarted server does: a retry is not applied twice."""
    x, post = X, POST
    root = "root-" + "r" * 24
    with LiveServer(state_dir=tmp_path / "state", durability="sync", auth="on", tokens=f"root:{root}:admin") as server, \
            SynapseClient(server.url, token=root) as client:
        syn = client.create("back", kind=KIND, config=CONFIG)
        first = syn.call("evolve", pre=x, post=post, idempotency_key="before-it-left")
        stacked = client.call_stacked("evolve", ["back"], {"pre": x[None], "post": post[None]},
                                      idempotency_key="packed-before-it-left")
        if away == "evicted":
            assert client.request("POST", "/v1/admin/evict", {"idle_s": 0}, retry=False)["evicted"]
            client.restore_evicted("back")
        else:
            path = syn.export(tmp_path / "back.safetensors")
            syn.delete()
            client.import_(path, name="back")
        again = client.get("back")
        assert again.call("evolve", pre=x, post=post, idempotency_key="before-it-left") == first
        assert client.call_stacked("evolve", ["back"], {"pre": x[None], "post": post[None]},
                                   idempotency_key="packed-before-it-left")["versions"] == stacked["versions"]
        described = again.describe()
        assert described["counters"]["evolve"] == 2 and described["version"] == first["version"] + 1
        with pytest.raises(UnprocessableEntityError, match="different request"):
            again.call("evolve", pre=x * 2, post=post, idempotency_key="before-it-left")


class _Crash(BaseException):
    """The process dies here (nothing after it runs, nothing catches it)."""


@pytest.mark.parametrize("form", ["calls", "stacked"])
@pytest.mark.parametrize("crash", ["before-its-commit", "after-its-commit"])
def test_a_packed_call_cut_short_while_stored_is_stored_all_or_none(tmp_path, monkeypatch, form, crash):
    """Sync mode stored a packed call's members one by one: a crash between two writes left some members on the
    new version and the others not (a red-team run found it unkeyed too: 'all or none' broken by kill -9), and a
    retry ran the members not stored. The members are now stored together (their files renamed in after an intent
    that lists them): a crash before that intent leaves every member as it was, and the retry applies the call
    once to each; one after it is finished at the next start, every member applied once, and the retry applies
    nothing again."""
    from synapse_serve import store as store_module

    config = {"shape": [6, 4], "eta": 0.05, "optim_type": "adam", "bias": True}
    names = [f"m{i}" for i in range(6)]
    rng = np.random.default_rng(3)
    pre, post = rng.normal(size=(6, 2, 6)).astype(np.float32), rng.normal(size=(6, 2, 4)).astype(np.float32)

    def call(registry: Registry) -> list[dict]:
        keys = [InstanceKey("local", n) for n in names]
        if form == "stacked":
            answer = registry.call_stacked(keys, "evolve", {"pre": pre, "post": post}, ["weights"],
                                           idempotency_key="K")
            return [{"version": v, "weights": answer["weights"][i]} for i, v in enumerate(answer["versions"])]
        return registry.call_many(keys, "evolve", [{"pre": pre[i], "post": post[i]} for i in range(6)],
                                  ["weights"], idempotency_key="K")

    first = Registry(persistence=Persistence(Store(tmp_path), "sync"))
    for i, name in enumerate(names):
        first.create(InstanceKey("local", name), kind="HebbianSynapse", config=config, seed=i)
    calls = []
    if crash == "before-its-commit":  # the fourth member's file half written
        real, target = store_module.write_record, "write_record"
    else:  # the intent written (the first rename), two members renamed in
        real, target = store_module.os.replace, "replace"

    def crashing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 4:
            raise _Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module if target == "write_record" else store_module.os, target, crashing)
    with pytest.raises(_Crash):
        call(first)
    monkeypatch.undo()
    on_disk = {n: decode(Store(tmp_path).path(f"local/{n}").read_bytes()).counters for n in names}
    if crash == "before-its-commit":
        assert on_disk == {n: {} for n in names}
    else:
        assert on_disk == {**{n: {"evolve": 1} for n in names[:2]}, **{n: {} for n in names[2:]}}  # split, until...

    again = Registry(persistence=Persistence(Store(tmp_path), "sync"))
    again.open()  # ...the start finishes what the intent lists
    try:
        again.load_stored()
        assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".pack-*"))
        assert {n: decode(Store(tmp_path).path(f"local/{n}").read_bytes()).counters for n in names} == {
            n: ({} if crash == "before-its-commit" else {"evolve": 1}) for n in names}
        if crash == "before-its-commit":
            call(again)  # never stored: applied now, once
        else:  # stored: the answers are not kept across a restart (the keys are), and nothing runs again
            with pytest.raises(AnswerNotKept, match=r"\[0\] \('m0'\): this Idempotency-Key's call was applied once"):
                call(again)
        twins = Registry()
        for i, name in enumerate(names):
            key = InstanceKey("local", name)
            twins.create(key, kind="HebbianSynapse", config=config, seed=i)
            twins.call(key, "evolve", {"pre": pre[i], "post": post[i]})
            assert again.describe(key)["counters"] == {"evolve": 1} and again.describe(key)["version"] == 2
            assert again.read(key, "weights")[0].tobytes() == twins.read(key, "weights")[0].tobytes()
            assert decode(Store(tmp_path).path(f"local/{name}").read_bytes()).counters == {"evolve": 1}
        if crash == "before-its-commit":  # and again: still applied once (answered as first)
            assert [a["version"] for a in call(again)] == [2] * len(names)
        else:
            with pytest.raises(AnswerNotKept):
                call(again)
        assert all(again.describe(InstanceKey("local", n))["counters"] == {"evolve": 1} for n in names)
    finally:
        again.close()


def test_a_packed_calls_files_left_by_a_failed_rename_never_overwrite_newer_ones(tmp_path):
    """The start renames in only a file of the same instance at a later version: an intent a failing disk left
    behind (its files stale once the instance was stored again) changes nothing."""
    from synapse_serve.store import PACK_INTENT

    registry = Registry(persistence=Persistence(Store(tmp_path), "sync"))
    key = InstanceKey("local", "n")
    registry.create(key, kind="HebbianSynapse", config={"shape": [3, 2]})
    stale = tmp_path / "instances" / "local" / f".n.safetensors.{'a' * 32}.tmp"
    stale.write_bytes(Store(tmp_path).path("local/n").read_bytes())  # version 1
    registry.call(key, "evolve", {"pre": np.ones((1, 3), np.float32), "post": np.ones((1, 2), np.float32)})
    (tmp_path / "instances" / "local" / f".pack-{'b' * 32}{PACK_INTENT}").write_text(f'["{stale.name}"]')
    registry.close()
    again = Registry(persistence=Persistence(Store(tmp_path), "sync"))
    again.open()
    again.load_stored()
    assert again.describe(key)["version"] == 2 and not stale.exists()
    again.close()


def test_an_optimizer_state_written_out_of_its_range_is_refused_before_it_can_poison_the_weights(tmp_path):
    """A step count of -1 (finite, the right shape and dtype) was accepted, and the next Adam evolve divided by zero:
    every weight NaN, the instance's export refused on import. A count is a whole number >= 0, a second moment too."""
    with LiveServer(state_dir=tmp_path, durability="off") as server, SynapseClient(server.url) as client:
        syn = client.create("adam", kind="HebbianSynapse", config={"shape": [3, 2], "optim_type": "adam", "eta": 0.1})
        version = syn.describe()["version"]
        for compartment, value in (("opt_state/count", np.float32(-1)), ("opt_state/count", np.float32(0.5)),
                                   ("opt_state/nu/0", -np.ones((3, 2), np.float32))):
            with pytest.raises(UnprocessableEntityError, match=compartment):
                syn.set(compartment, value)
        assert syn.describe()["version"] == version
        syn.set("opt_state/count", np.float32(3))  # a whole number of steps: as a restored run would write
        syn.evolve(np.ones((1, 3), np.float32), np.ones((1, 2), np.float32))
        assert np.isfinite(syn.weights).all()


def test_an_instance_whose_learning_overflowed_comes_back_from_eviction_as_it_was(tmp_path):
    """Finite inputs and a finite eta can overflow the weights; the evicted copy of such an instance was refused on
    the way back (as an import of non-finite parameters is), and the owner could never get it again."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        syn = client.create("wild", kind=KIND, config={**CONFIG, "optim_type": "sgd", "eta": 1e38})
        syn.evolve(X, POST)
        weights, version = syn.weights, syn.describe()["version"]
        assert not np.isfinite(weights).all()
        evicted = httpx.post(f"{server.url}/v1/admin/evict", json={"idle_s": 0}, timeout=60)
        assert [e["name"] for e in evicted.json()["evicted"]] == ["wild"]
        back = client.restore_evicted("wild")
        assert np.array_equal(back.weights, weights, equal_nan=True)
        assert back.describe()["version"] == version
        export = back.export(tmp_path / "wild.safetensors")
        with pytest.raises(UnprocessableEntityError, match="finite"):  # an import is still checked like a create
            client.import_(export, name="copy")


def test_an_imported_file_must_leave_its_instance_room_to_count(tmp_path):
    """Version 2^63 - 1 imported; the next call stored 2^63, which no file may hold: after a restart the instance
    was quarantined, its acknowledged call lost. An import leaves room: 2^53 at most (exact in JSON readers too)."""
    good = _export(tmp_path)
    with LiveServer(state_dir=tmp_path / "dst") as server, SynapseClient(server.url) as client:
        far_retry = [{"key": "k", "fingerprint": "0" * 64, "version": 2**62, "whole": True}]  # a retry's answer
        for field, value in (("version", 2**63 - 1), ("version", 2**53 + 1), ("counters", {"evolve": 2**62}),
                             ("applied", far_retry)):
            (tmp_path / "far.safetensors").write_bytes(with_record(good, **{field: value}))
            with pytest.raises(UnprocessableEntityError, match="room left to count"):
                client.import_(tmp_path / "far.safetensors", name="far")
        (tmp_path / "near.safetensors").write_bytes(with_record(good, version=2**53))
        near = client.import_(tmp_path / "near.safetensors", name="near")
        near.forward(X)
        assert near.describe()["version"] == 2**53 + 1


def test_an_index_entry_declaring_an_array_numpy_cannot_shape_is_an_invalid_file(tmp_path):
    """An empty tensor with a dimension of 2^62, or one of 65 dimensions, passed the offset checks and numpy's
    reshape raised: a 500 where a damaged file is a 422."""
    good = _export(tmp_path)
    crafted = {
        "empty, 2^62 wide": with_index(good, inputs={"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}),
        "65 dimensions": with_index(good, extra={"dtype": "U8", "shape": [1] * 65, "data_offsets": [0, 1]}),
    }
    with LiveServer(state_dir=tmp_path / "dst") as server, SynapseClient(server.url) as client:
        for what, blob in crafted.items():
            (tmp_path / "odd.safetensors").write_bytes(blob)
            with pytest.raises(UnprocessableEntityError) as info:
                client.import_(tmp_path / "odd.safetensors", name="odd")
            assert info.value.problem["type"].endswith("invalid-instance-file"), (what, info.value.problem)
            assert info.value.problem["status"] == 422
        assert client.list() == []


def test_an_evicted_instance_brought_back_in_interval_mode_is_stored_before_its_evicted_copy_goes(tmp_path):
    """Interval mode stored a restored instance only at the next flush, and the evicted file was deleted at once: a
    crash in between lost the instance (a red-team probe: kill -9 right after the 201). Its file is written first."""
    with LiveServer(state_dir=tmp_path, durability="interval", flush_interval_s=3600) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("a", kind=KIND, config=CONFIG)
        syn.evolve(X, POST)
        weights = syn.weights
        evicted = httpx.post(f"{server.url}/v1/admin/evict", json={"idle_s": 0}, timeout=60)
        assert [e["name"] for e in evicted.json()["evicted"]] == ["a"]
        assert not list((tmp_path / "instances").rglob("*.safetensors"))
        client.restore_evicted("a")
        # what a crash now would leave: the instance's own file, at the version it came back with
        files = list((tmp_path / "instances").rglob("*.safetensors"))
        assert len(files) == 1 and not list((tmp_path / "evicted").rglob("*.safetensors"))
        record = decode(files[0].read_bytes())
        assert record.version == client.get("a").describe()["version"]
        assert np.array_equal(record.arrays["weights"], weights)


@pytest.mark.parametrize("over", ["rest", "session", "asyncio session"])
def test_a_keyed_call_answered_503_while_its_instance_is_restored_is_sent_again_after_retry_after(tmp_path,
                                                                                               monkeypatch, over):
    """A client that resent an evolve after a restart got 503 (the instance still being restored) and raised it;
    the caller, retrying as the message says, applied the evolve twice. A call safe to repeat waits and is resent."""
    import asyncio

    from synapse_client import AsyncSynapseClient
    from synapse_client._client import AsyncSynapse, Synapse

    _learned(tmp_path, ["x"])  # one evolve, stored
    release = threading.Event()
    real_load = Registry.load_stored
    monkeypatch.setattr(Registry, "load_stored", lambda self: (release.wait(30), real_load(self))[1])
    server = LiveServer(state_dir=tmp_path, durability="sync").start()
    try:
        if over == "asyncio session":
            async def run():
                async with AsyncSynapseClient(server.url) as client, client.session() as session:
                    syn = AsyncSynapse(session, "x")  # no describe first: the evolve is what meets the restore
                    began = asyncio.get_running_loop().time()
                    with pytest.raises(ServiceUnavailableError):  # not safe to repeat: raised at once
                        await syn.forward(X)
                    assert asyncio.get_running_loop().time() - began < 0.9  # (a restore's Retry-After is 1 s)
                    threading.Timer(0.3, release.set).start()
                    return (await syn.evolve(X, POST))["version"], (await syn.describe())["counters"]["evolve"]
            version, evolves = asyncio.run(run())
        else:
            with SynapseClient(server.url) as client, contextlib.ExitStack() as stack:
                host = stack.enter_context(client.session()) if over == "session" else client
                syn = Synapse(host, "x")
                began = time.monotonic()
                with pytest.raises(ServiceUnavailableError):
                    syn.forward(X)
                assert time.monotonic() - began < 0.9
                threading.Timer(0.3, release.set).start()
                version, evolves = syn.evolve(X, POST)["version"], syn.describe()["counters"]["evolve"]
        assert (version, evolves) == (3, 2)  # created, one evolve, this one: applied once
    finally:
        release.set()
        server.__exit__()


def test_pipelined_keyed_frames_meeting_a_restore_are_applied_in_the_order_they_were_sent(tmp_path, monkeypatch):
    """A red-team probe pipelined keyed evolves across a restart: those that met the restore were answered 503 and
    sent again only when their answers were awaited, after the frames behind them had run (applied once each, in
    another order: other weights). A frame safe to repeat now waits in place on the stream until the server is
    ready; one that is not safe to repeat is still answered 503 at once."""
    from synapse_client._codec import packb, unpackb
    from websockets.sync.client import connect

    _learned(tmp_path, ["x"])  # one evolve, stored
    release = threading.Event()
    real_load = Registry.load_stored
    monkeypatch.setattr(Registry, "load_stored", lambda self: (release.wait(30), real_load(self))[1])
    server = LiveServer(state_dir=tmp_path, durability="sync").start()
    rng = np.random.default_rng(3)
    posts = [rng.normal(size=POST.shape).astype(np.float32) for _ in range(5)]
    try:
        with connect(server.url.replace("http://", "ws://") + "/v1/session", max_size=None) as ws:
            ws.send(packb({"id": 0, "op": "call", "name": "x", "operation": "forward", "tensors": {"inputs": X}}))
            assert unpackb(ws.recv(timeout=30))["status"] == 503  # not safe to repeat: answered at once
            for i, post in enumerate(posts, start=1):
                ws.send(packb({"id": i, "op": "call", "name": "x", "operation": "evolve", "idempotency_key": f"k{i}",
                               "tensors": {"pre": X, "post": post}, "return": ["weights"]}))
            threading.Timer(0.3, release.set).start()
            answers = [unpackb(ws.recv(timeout=60)) for _ in posts]
        assert [(a["id"], a["status"]) for a in answers] == [(i, 200) for i in range(1, 6)]
        assert [a["result"]["version"] for a in answers] == [3, 4, 5, 6, 7]  # applied in the order sent, once each
        with SynapseClient(server.url) as client:
            np.testing.assert_array_equal(client.get("x").weights, answers[-1]["result"]["weights"])
    finally:
        release.set()
        server.__exit__()


@pytest.mark.parametrize("crash_at", ["before the decision", "after the decision"])
def test_a_delete_cut_short_by_a_crash_is_whole_or_never_happened(tmp_path, monkeypatch, crash_at):
    """A red-team probe killed the server mid-delete: the instance came back without 6 of its 40 snapshots (they were
    deleted one by one before its file). A deletion is decided by one synced marker: before it, nothing is deleted;
    after it, a start-up finishes what the crash cut short."""
    key = InstanceKey("local", "doomed")
    first = Registry(persistence=Persistence(Store(tmp_path), "sync"))
    first.create(key, kind=KIND, config=CONFIG)
    for i in range(4):
        first.snapshot(key, f"s{i}")
    mark, remove = Store.mark_deleted, Store.remove

    def crash(*args):
        raise _Crash

    if crash_at == "before the decision":
        monkeypatch.setattr(Store, "mark_deleted", crash)
    else:
        monkeypatch.setattr(Store, "remove", crash)  # the snapshots went, the instance file had not yet
    with pytest.raises(_Crash):
        first.delete(key)
    monkeypatch.setattr(Store, "mark_deleted", mark)
    monkeypatch.setattr(Store, "remove", remove)
    again = Registry(persistence=Persistence(Store(tmp_path), "sync"))
    again.open()
    again.load_stored()
    snapshots = tmp_path / "snapshots" / "local" / "doomed"
    if crash_at == "before the decision":
        assert again.describe(key)["version"] == 1 and [s["snapshot"] for s in again.snapshots(key)] == [
            "s0", "s1", "s2", "s3"]
    else:
        assert again.list() == [] and not snapshots.exists() and not list(tmp_path.rglob("*.deleting"))
        again.create(key, kind=KIND, config=CONFIG)  # the name is free, and starts with no snapshots of the old
        assert again.snapshots(key) == []
    again.close()


def test_an_import_is_at_least_as_durable_as_the_server_it_lands_on(tmp_path):
    """A red-team probe imported, on a sync server, a file exported from an instance that was ``off`` (or
    ``interval``) elsewhere: the next evolve was acknowledged from memory only, and a kill -9 lost the instance. A file
    keeps its mode only where it is stronger than the server's."""
    blobs = {}
    with LiveServer(state_dir=tmp_path / "src", durability="interval") as server, \
            SynapseClient(server.url) as client:
        for mode in ("off", "interval", "sync"):
            syn = client.create(f"from-{mode}", kind=KIND, config=CONFIG, durability=mode)
            blobs[mode] = syn.export(tmp_path / f"{mode}.safetensors")
    for server_mode, expected in (("sync", {"off": "sync", "interval": "sync", "sync": "sync"}),
                                  ("interval", {"off": "interval", "interval": "interval", "sync": "sync"})):
        state = tmp_path / server_mode
        with LiveServer(state_dir=state, durability=server_mode) as server, SynapseClient(server.url) as client:
            for mode, path in blobs.items():
                syn = client.import_(path, name=f"in-{mode}")
                assert syn.describe()["durability"] == expected[mode], (server_mode, mode)
                if expected[mode] == "sync":  # acknowledged: on disk at once
                    syn.evolve(X, POST)
                    assert decode((state / "instances" / "local" / f"in-{mode}.safetensors").read_bytes()).version == 2


def test_a_description_read_while_a_call_is_stored_shows_the_version_before_it(tmp_path, monkeypatch):
    """A red-team probe read GET /v1/synapses/{name} while a sync evolve was storing its file: it answered the new
    version (as its ETag too), and a kill at that moment brought the instance back one version lower — a client
    using If-Match, or the page, saw versions go backwards. Until a call ends, descriptions say what was before it."""
    key = InstanceKey("local", "slow")
    registry = Registry(persistence=Persistence(Store(tmp_path), "sync"))
    registry.create(key, kind=KIND, config=CONFIG)
    storing, release, save = threading.Event(), threading.Event(), Store.save

    def slow_save(store, name, record):
        if record.version == 2:
            storing.set()
            assert release.wait(30)
        return save(store, name, record)

    monkeypatch.setattr(Store, "save", slow_save)
    evolve = threading.Thread(target=registry.call, args=(key, "evolve", {"pre": X, "post": POST}))
    evolve.start()
    try:
        assert storing.wait(30)  # the new state is in memory, its file not written yet
        described, listed = registry.describe(key), registry.list()[0]
        assert described["running"]["operation"] == "evolve"
        assert (described["version"], described["counters"]) == (1, {})
        assert (listed["version"], listed["counters"]) == (1, {})
    finally:
        release.set()
        evolve.join(timeout=30)
    assert registry.describe(key)["version"] == 2 and registry.describe(key)["counters"] == {"evolve": 1}
    registry.close()


@pytest.mark.parametrize(("holder", "operation"), [("flush", "store"), ("read", "read"), ("stats", "stats")])
def test_a_description_answers_at_once_while_background_work_or_a_read_holds_the_instance(tmp_path, monkeypatch,
                                                                                           holder, operation):
    """A red-team reading: describe and list waited on the instance's lock (a worker of the owner's share each)
    whenever its holder was no call — the background flush writing a large instance, a read, its statistics —
    because only calls said what they run. Every holder says it now, and descriptions answer meanwhile."""
    key = InstanceKey("local", "held")
    registry = Registry(persistence=Persistence(Store(tmp_path), "interval"))
    registry.create(key, kind=KIND, config=CONFIG)
    registry.call(key, "evolve", {"pre": X, "post": POST})  # version 2, not stored yet: the flush has work
    holding, release = threading.Event(), threading.Event()

    def block() -> None:
        holding.set()
        assert release.wait(10)

    if holder == "flush":
        save = Store.save
        monkeypatch.setattr(Store, "save", lambda store, name, record: (block(), save(store, name, record))[1])
        work = registry.flush
    else:
        host_state = Instance.host_state
        monkeypatch.setattr(Instance, "host_state", lambda instance: (block(), host_state(instance))[1])
        work = (lambda: registry.read(key, "weights")) if holder == "read" else (lambda: registry.learning_stats(key))
    thread = threading.Thread(target=work)
    thread.start()
    try:
        assert holding.wait(30)
        started = time.monotonic()
        described, listed = registry.describe(key), registry.list()[0]
        assert time.monotonic() - started < 5, "a description waited for the holder to finish"
        assert described["running"]["operation"] == operation and listed["running"]["operation"] == operation
        assert (described["version"], described["counters"]) == (2, {"evolve": 1})
    finally:
        release.set()
        thread.join(timeout=30)
    assert registry.describe(key)["running"] is None
    registry.close()


def test_names_differing_only_in_case_are_refused_where_the_state_directory_ignores_case(tmp_path):
    """A red-team reading: on a file system that ignores case (macOS, Docker Desktop bind mounts: a laptop's
    ``SynapseClient("local:state")``), ``enc`` and ``Enc`` are one file, and owners ``alice`` and ``Alice`` one
    folder — one instance overwriting the other's acknowledged state, or, at the next start, one owner's instances
    restored as another's. Where the directory ignores case the second name is refused; elsewhere both are fine."""
    assert Store(tmp_path / "here").folds_case() is False  # this file system tells case apart
    registry = Registry(persistence=Persistence(Store(tmp_path / "folding"), "sync"))
    registry.persistence.folds_case = True  # as the probe says on macOS
    registry.create(InstanceKey("alice", "enc"), kind=KIND, config=CONFIG)
    with pytest.raises(AlreadyExists, match="'Enc' differs only in case from the instance 'enc'"):
        registry.create(InstanceKey("alice", "Enc"), kind=KIND, config=CONFIG)
    with pytest.raises(AlreadyExists, match="the owner name 'Alice' differs only in case from another owner's"):
        registry.create(InstanceKey("Alice", "other"), kind=KIND, config=CONFIG)
    registry.create(InstanceKey("alice", "enc2"), kind=KIND, config=CONFIG)  # other names are free
    assert [d["name"] for d in registry.list()] == ["enc", "enc2"]
    registry.close()
    telling = Registry(persistence=Persistence(Store(tmp_path / "telling"), "sync"))
    for key in (InstanceKey("alice", "enc"), InstanceKey("alice", "Enc"), InstanceKey("Alice", "enc")):
        telling.create(key, kind=KIND, config=CONFIG)
    telling.close()
    # a red-team run: an owner whose only instance was evicted held none the check saw, and its twin could then list
    # and bring back its evicted copies (one folder)
    lone = Registry(persistence=Persistence(Store(tmp_path / "evicted-only"), "sync"))
    lone.persistence.folds_case = True
    lone.create(InstanceKey("alice", "x"), kind=KIND, config=CONFIG)
    assert [e["name"] for e in lone.evict_idle(0.0, now=time.time() + 60)] == ["x"]
    with pytest.raises(AlreadyExists, match="'Alice' differs only in case from another owner's, whose files"):
        lone.create(InstanceKey("Alice", "y"), kind=KIND, config=CONFIG)
    lone.unevict(InstanceKey("alice", "x"))  # the owner itself is not its own twin
    listings = []
    store, lone_twin = lone.persistence.store, lone.persistence.store.owner_twin
    store.owner_twin = lambda owner: listings.append(owner) or lone_twin(owner)
    lone.create(InstanceKey("alice", "z"), kind=KIND, config=CONFIG)  # an owner holding instances: no listing
    with pytest.raises(AlreadyExists, match="'Alice' differs only in case from another owner's"):
        lone.create(InstanceKey("Alice", "y"), kind=KIND, config=CONFIG)
    assert listings == []
    lone.create(InstanceKey("bob", "z"), kind=KIND, config=CONFIG)  # a new owner's folders are looked at once
    lone.create(InstanceKey("bob", "w"), kind=KIND, config=CONFIG)
    assert listings == ["bob"]
    lone.close()


def test_owners_differing_only_in_case_are_refused_in_the_token_list():
    """Their folders would be one where the state directory's file system ignores case (a red-team run)."""
    with pytest.raises(InvalidConfig, match="'alice' and 'Alice' differ only in case"):
        TokenTable.load("alice:aliceTOKEN0123456789abcd,Alice:AliceTOKEN0123456789abcd")


def test_a_name_taken_anew_after_a_deletion_the_disk_cut_short_survives_a_restart(tmp_path):
    """A deletion decided (its marker written) whose files the disk then refused stays decided; a new instance of the
    name must not be deleted with it at the next start."""
    key = InstanceKey("local", "again")
    store = Store(tmp_path)
    first = Registry(persistence=Persistence(store, "sync"))
    first.create(key, kind=KIND, config=CONFIG)
    first.delete(key)
    store.mark_deleted(str(key))  # as if its files had been left behind by a failing disk
    first.create(key, kind=KIND, config=CONFIG, seed=5)
    first.call(key, "evolve", {"pre": X, "post": POST})
    first.close()
    again = Registry(persistence=Persistence(Store(tmp_path), "sync"))
    again.open()
    again.load_stored()
    assert again.describe(key)["version"] == 2 and again.describe(key)["seed"] == 5
    again.close()


def _evict_all(server) -> list[str]:
    answer = httpx.post(f"{server.url}/v1/admin/evict", json={"idle_s": 0}, timeout=60)
    return [e["name"] for e in answer.json()["evicted"]]


def test_an_evicted_instances_snapshots_go_and_come_back_with_it(tmp_path):
    """A red-team run (2026-11-30): an instance's snapshots stayed under its bare name when it was evicted; a new
    instance taken under the name listed them, rolled back into another instance's state, and deleting it deleted
    them, so the evicted one came back without them. They now travel with the evicted copy (and go with it when it
    is discarded, their bytes released)."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        first = client.create("enc", kind=KIND, config=CONFIG, seed=1)
        first.evolve(X, POST)
        first.snapshot("before-run")
        weights = first.weights
        assert _evict_all(server) == ["enc"]
        second = client.create("enc", kind=KIND, config=CONFIG, seed=2)  # the name taken anew
        assert second.snapshots() == []
        with pytest.raises(NotFoundError):
            second.restore("before-run")
        second.delete()
        back = client.restore_evicted("enc")
        assert [s["snapshot"] for s in back.snapshots()] == ["before-run"]
        back.evolve(X, POST)
        back.restore("before-run")
        np.testing.assert_array_equal(back.weights, weights)
        assert _evict_all(server) == ["enc"]
        client.discard_evicted("enc")  # the copy and its snapshots
        assert not [p for p in (tmp_path / "evicted").rglob("*") if p.is_file()]
        assert not list((tmp_path / "snapshots").rglob("*.safetensors"))
        client.create("enc", kind=KIND, config=CONFIG).snapshot("fresh")  # nothing left over counts: room again
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        assert [s["snapshot"] for s in client.get("enc").snapshots()] == ["fresh"]


def test_an_eviction_or_restore_cut_short_by_a_crash_leaves_the_instance_not_a_second_copy(tmp_path):
    """A red-team run (2026-11-30) killed the server between a restore's storing the instance and its deleting the
    evicted copy: after the restart the instance was live and its copy still listed (counted against the quota;
    once the instance was deleted, restoring the stale copy brought back an old version). A restore now leaves a
    marker beside the copy until the copy is gone, and the next start finishes it; an eviction leaves one until the
    instance's file is gone, and the next start finishes the eviction. A copy of another instance stays: a name
    taken anew, or an import of an export (which keeps its creation time: later red-team runs found the settling
    took it for a leftover, and gave it the copy's snapshots)."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        a = client.create("a", kind=KIND, config=CONFIG)
        a.snapshot("kept")
        exported = a.export(tmp_path / "a0.safetensors")
        client.create("b", kind=KIND, config=CONFIG)
        c = client.create("c", kind=KIND, config=CONFIG)
        c.evolve(X, POST)
        c.snapshot("trained")
        assert sorted(_evict_all(server)) == ["a", "b", "c"]
        evicted = tmp_path / "evicted" / "local"
        copies = {p.name.split(".")[0]: (p, p.read_bytes()) for p in evicted.glob("*.safetensors")}
        stash = copies["a"][0].with_name(copies["a"][0].name[: -len(".safetensors")] + ".snapshots")
        stashed = {p.name: p.read_bytes() for p in stash.iterdir()}
        back = client.restore_evicted("a")
        back.evolve(X, POST)  # it learns after the restore, before the crash
        version = back.describe()["version"]
        client.create("b", kind=KIND, config=CONFIG, seed=3)  # b taken anew: its evicted copy is another instance
        imported = client.import_(exported, name="c")  # c's export from before it learned, under its name
        imported.evolve(X, 2 * POST)
        imported.evolve(X, 2 * POST)
        assert imported.describe()["version"] >= 2
    path, blob = copies["a"]  # what a crash before the restore deleted the copy would have left
    path.write_bytes(blob)
    stash.mkdir()
    for name, data in stashed.items():
        (stash / name).write_bytes(data)
    path.with_name(path.name[: -len(".safetensors")] + ".restoring").touch()
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        assert sorted(e["name"] for e in client.evicted()) == ["b", "c"]
        a = client.get("a")
        assert a.describe()["version"] == version and [s["snapshot"] for s in a.snapshots()] == ["kept"]
        assert not path.exists() and not stash.exists() and not list(evicted.glob("*.restoring"))
        assert client.get("c").snapshots() == []  # the import is not given the evicted c's snapshots
        client.get("b").delete()
        assert client.restore_evicted("b").describe()["version"] == 1
        client.get("c").delete()
        assert [s["snapshot"] for s in client.restore_evicted("c").snapshots()] == ["trained"]
        assert sorted(_evict_all(server)) == ["a", "b", "c"]
    # an eviction cut short: its marker and copy written, the instance's file not yet deleted, and older than the
    # copy (interval mode: a red-team run lost the snapshots that had gone beside the copy)
    copy = next(evicted.glob("a.*.safetensors"))
    copied_version = decode(copy.read_bytes()).version
    (tmp_path / "instances" / "local" / "a.safetensors").write_bytes(exported.read_bytes())
    copy.with_name(copy.name[: -len(".safetensors")] + ".evicting").touch()
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        assert sorted(e["name"] for e in client.evicted()) == ["a", "b", "c"] and client.list() == []
        back = client.restore_evicted("a")  # the eviction was finished: the copy, the newer state, comes back
        assert back.describe()["version"] == copied_version
        assert [s["snapshot"] for s in back.snapshots()] == ["kept"]
        assert not list(evicted.glob("*.evicting"))


@pytest.mark.parametrize("stored", [True, False], ids=["file-left", "never-stored"])
def test_an_eviction_finished_at_start_up_deletes_the_older_copies_of_its_name(tmp_path, stored):
    """A red-team run (2026-11-30): an eviction a crash cut short after its copy was written was finished at the next
    start without what a live eviction does next — the name's older copy stayed, the name was listed twice, and
    its bytes counted against the quota though no restore could reach it. The older copies now go there too."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        client.create("a", kind=KIND, config=CONFIG)
        assert _evict_all(server) == ["a"]
        evicted = tmp_path / "evicted" / "local"
        (older,) = evicted.glob("a.*.safetensors")
        older_blob = older.read_bytes()
        back = client.restore_evicted("a")
        back.evolve(X, POST)
        version = back.describe()["version"]
        assert _evict_all(server) == ["a"]
        (latest,) = evicted.glob("a.*.safetensors")
    time.sleep(0.01)  # the older copy's file is written after the latest one's: its time must not decide
    older.write_bytes(older_blob)  # the state a crash after the copy, before the older copy's deletion, leaves
    if stored:
        (tmp_path / "instances" / "local" / "a.safetensors").write_bytes(latest.read_bytes())
    latest.with_name(latest.name[: -len(".safetensors")] + ".evicting").touch()
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        assert [e["name"] for e in client.evicted()] == ["a"] and client.list() == []
        assert not older.exists() and latest.exists()
        assert server.registry.capacity._snapshot_bytes["local"] == latest.stat().st_size
        assert client.restore_evicted("a").describe()["version"] == version


def _hold_unstash_open(monkeypatch) -> None:
    """Moving a restored instance's snapshots back takes 0.6 s: the window a racing call would meet, held open."""
    real = Store.unstash_snapshots

    def slow(self, *args, **kwargs):
        time.sleep(0.6)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "unstash_snapshots", slow)


def _recorder(outcomes: dict[str, object]):
    """``run(what, call)``: the call's result, or the exception it raised, kept as ``outcomes[what]``."""
    def run(what, call):
        try:
            outcomes[what] = call()
        except Exception as exc:  # noqa: BLE001 - recorded, asserted by the test
            outcomes[what] = exc
    return run


def test_a_restore_is_never_evicted_over_nor_discarded_under(tmp_path, monkeypatch):
    """A red-team run (2026-11-30): a restore stored the instance, then moved its snapshots back from beside the
    copy; an eviction in between deleted the old copy with them (its newer copy had none), and a discard in between
    deleted copy and snapshots while the restore answered 201. While a name is being restored its copies are left
    alone: the evictor passes it by, a discard waits for the restore (and finds nothing), another restore too."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        syn = client.create("x", kind=KIND, config=CONFIG)
        syn.snapshot("s1")
        assert _evict_all(server) == ["x"]
        _hold_unstash_open(monkeypatch)
        outcomes: dict[str, object] = {}
        run = _recorder(outcomes)

        restoring = threading.Thread(target=run, args=("restore", lambda: client.restore_evicted("x").name))
        restoring.start()
        time.sleep(0.2)
        run("evict", lambda: _evict_all(server))
        discarding = threading.Thread(target=run, args=("discard", lambda: client.discard_evicted("x")))
        discarding.start()
        restoring.join()
        discarding.join()
        monkeypatch.undo()
        assert outcomes["restore"] == "x" and outcomes["evict"] == []
        assert isinstance(outcomes["discard"], NotFoundError)  # after the restore, which took the copy
        assert [s["snapshot"] for s in client.get("x").snapshots()] == ["s1"]
        assert client.evicted() == []


def test_a_restored_instance_is_reached_only_with_its_snapshots_back_and_its_copy_gone(tmp_path, monkeypatch):
    """A red-team run (2026-11-30): the restored instance could be used before its snapshots were back. A delete in
    that window left them behind for the next instance of the name, and a snapshot of the same name replaced the
    evicted one (its bytes never released). Calls on the instance now wait until the restore is whole."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        client.create("x", kind=KIND, config=CONFIG).snapshot("s1")
        outcomes: dict[str, object] = {}
        run = _recorder(outcomes)

        for racing in ("snapshot", "delete"):
            assert _evict_all(server) == ["x"]
            _hold_unstash_open(monkeypatch)
            restoring = threading.Thread(target=run, args=("restore", lambda: client.restore_evicted("x").name))
            restoring.start()
            time.sleep(0.3)
            if racing == "snapshot":
                run(racing, lambda: client.get("x").snapshot("s1"))
            else:
                run(racing, lambda: client.get("x").delete())
            restoring.join()
            monkeypatch.undo()
            assert outcomes["restore"] == "x", outcomes
            if racing == "snapshot":
                assert isinstance(outcomes["snapshot"], ConflictError), outcomes  # the evicted s1 is back: 409
                assert [s["snapshot"] for s in client.get("x").snapshots()] == ["s1"]
        assert outcomes["delete"] is None and client.evicted() == []
        assert not (tmp_path / "snapshots" / "local" / "x").exists()
        assert client.create("x", kind=KIND, config=CONFIG).snapshots() == []  # nothing left for a new x
        client.get("x").snapshot("s1")  # and the quota counts what is on disk: one snapshot, no more
        used = server.registry.capacity._snapshot_bytes["local"]
        assert used == sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors")
                           if "snapshots" in p.parts or "evicted" in p.parts)


def test_snapshots_outlive_an_instance_lost_with_its_state_only_in_quarantine(tmp_path):
    """A red-team run (2026-11-30): an instance with durability off (or interval mode before its first write) is gone
    after a restart, its snapshots are not; a new instance of the name listed them and could roll back into them.
    They are moved to quarantine/<owner>/ (each file imports as an instance), out of any new instance's reach. And
    an evicted copy beside an import of the same export at the same version is a copy of another instance: it stays
    (the settling had deleted it, and given its snapshots to the import)."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        gone = client.create("gone", kind=KIND, config=CONFIG, durability="off")
        gone.evolve(X, POST)
        gone.snapshot("s1")
        twin = client.create("twin", kind=KIND, config=CONFIG)
        twin.snapshot("t1")
        exported = twin.export(tmp_path / "twin.safetensors")
        assert sorted(_evict_all(server)) == ["gone", "twin"]
        client.discard_evicted("gone")  # (evicted and discarded: nothing of it but its snapshot is left)
        client.import_(exported, name="twin")  # beside twin's evicted copy: the same state, another instance
        client.create("gone", kind=KIND, config=CONFIG, durability="off").snapshot("s2")
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        assert [d["name"] for d in client.list()] == ["twin"]
        assert [e["name"] for e in client.evicted()] == ["twin"] and client.get("twin").snapshots() == []
        assert client.create("gone", kind=KIND, config=CONFIG).snapshots() == []
        (moved,) = (tmp_path / "quarantine" / "local").glob("gone.snapshots.*")
        back = client.import_(moved / "s2.safetensors", name="back")  # the lost instance's snapshot, as a file
        assert back.describe()["kind"] == KIND
        client.get("twin").delete()
        assert [s["snapshot"] for s in client.restore_evicted("twin").snapshots()] == ["t1"]


def test_a_crash_mid_eviction_of_an_instance_never_stored_and_a_damaged_file_keep_their_snapshots_reachable(tmp_path):
    """A red-team run (2026-11-30): an instance with no file (durability off, interval before its first write) killed
    after its evicted copy was written came back from the copy without its snapshots (quarantined as an instance's
    that was gone); and an instance file found damaged at start-up was quarantined while its snapshots stayed for
    a new instance of the name, which rolled back into one. The snapshots now go beside the copy, or to quarantine
    with the damaged file."""
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        unstored = client.create("unstored", kind=KIND, config=CONFIG, durability="off")
        unstored.snapshot("u1")
        record = unstored.export(tmp_path / "unstored.safetensors").read_bytes()
        client.create("damaged", kind=KIND, config=CONFIG).snapshot("d1")
    evicted = tmp_path / "evicted" / "local"  # what a crash after the copy was written left of unstored's eviction
    evicted.mkdir(parents=True)
    copy = evicted / "unstored.20261130T000000Z.0000abcd.safetensors"
    copy.write_bytes(record)
    copy.with_name(copy.name[: -len(".safetensors")] + ".evicting").touch()
    damaged = tmp_path / "instances" / "local" / "damaged.safetensors"
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        assert [s["snapshot"] for s in client.restore_evicted("unstored").snapshots()] == ["u1"]
        assert client.create("damaged", kind=KIND, config=CONFIG).snapshots() == []
        assert [p.name for p in (tmp_path / "quarantine" / "local").glob("damaged.snapshots.*/*")] == ["d1.safetensors"]
        used = server.registry.capacity._snapshot_bytes["local"]
        assert used == sum(p.stat().st_size for p in (tmp_path / "snapshots").rglob("*.safetensors"))


def test_an_instance_stored_with_an_init_a_create_now_refuses_still_loads_and_imports(tmp_path):
    """A red-team run (2026-11-30): the float32 range checks on init distributions ran on every config read, so an
    instance the release before had accepted (its infinite draw repaired with written weights, then evolved) was
    quarantined at the first start after the upgrade, and its file would not import. Its init is history: only a
    create checks it."""
    record = decode(_export(tmp_path))
    wide = {**record.config, "filter_init": {"dist": "uniform", "low": -2e38, "high": 2e38}}
    blob = with_record(_export(tmp_path), config=wide)
    state = tmp_path / "dst"
    with LiveServer(state_dir=state, durability="sync") as server, SynapseClient(server.url) as client:
        with pytest.raises(UnprocessableEntityError, match="float32"):
            client.create("new", kind=KIND, config=wide)  # a new one is refused
        (tmp_path / "old.safetensors").write_bytes(blob)
        imported = client.import_(tmp_path / "old.safetensors", name="old")
        imported.evolve(X, POST)
        version, weights = imported.describe()["version"], imported.weights
    with LiveServer(state_dir=state, durability="sync") as server, SynapseClient(server.url) as client:
        back = client.get("old")  # loaded at start-up, not quarantined
        assert back.describe()["version"] == version and np.array_equal(back.weights, weights)
        assert httpx.get(f"{server.url}/v1/admin/storage").json()["restore_errors"] == {}


@contextlib.contextmanager
def _read_only_later(state_dir):
    """A state directory a server can write now and cannot once ``make_read_only`` is called: a tmpfs remounted
    read-only where this process may mount (root), else the tree's write permissions taken away."""
    import os
    import stat

    mounted = False
    if os.geteuid() == 0:
        state_dir.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(state_dir)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("root, and no tmpfs to remount read-only: permissions would not stop this process")

    def make_read_only():
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(state_dir)], check=True)
            return
        for path in [state_dir, *state_dir.rglob("*")]:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    try:
        yield make_read_only
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(state_dir)], check=False)
        else:
            for path in [state_dir, *state_dir.rglob("*")]:
                path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.mark.parametrize("cache", [True, False])
def test_a_read_only_state_directory_is_served_and_every_write_says_it_cannot(tmp_path, cache):
    """A red-team run: a state directory remounted read-only stopped start-up (the lock file could not be opened for
    writing), where docs/durability.md promises a read-only disk costs nothing at start-up."""
    state = tmp_path / "state"
    with _read_only_later(state) as make_read_only:
        server = ServerProcess(state, durability="sync", compilation_cache=str(cache).lower()).start()
        try:
            with SynapseClient(server.url) as client:
                syn = client.create("enc", kind=KIND, config=CONFIG)
                acknowledged = syn.evolve(X, POST)["version"]
                weights = syn.weights
        finally:
            server.stop()
        make_read_only()
        server = ServerProcess(state, durability="sync", compilation_cache=str(cache).lower()).start()
        try:
            with SynapseClient(server.url) as client:
                syn = client.get("enc")
                assert syn.describe()["version"] == acknowledged
                np.testing.assert_array_equal(syn.weights, weights)
                with pytest.raises(InsufficientStorageError, match="applied in memory but could not be stored"):
                    syn.evolve(X, POST)
                assert httpx.get(f"{server.url}/healthz").json()["storage"].startswith("failing")
        finally:
            server.stop()


def test_a_damaged_snapshot_or_evicted_copy_is_listed_refused_409_and_deletable(tmp_path):
    """A red-team run: a truncated snapshot was left out of the listing, yet taking one of its name was a 409 naming
    it; restoring it, or a truncated evicted copy, was a 507 "storage error" on a disk with nothing wrong."""
    with LiveServer(state_dir=tmp_path, durability="sync") as server, SynapseClient(server.url) as client:
        syn = client.create("enc", kind=KIND, config=CONFIG)
        syn.snapshot("s0")
        path = next(tmp_path.glob("snapshots/*/enc/s0.safetensors"))
        path.write_bytes(path.read_bytes()[:100])
        listed = syn.snapshots()
        assert [(s["snapshot"], s["version"]) for s in listed] == [("s0", None)] and "damaged" in listed[0]
        with pytest.raises(ConflictError, match="snapshot 's0' is damaged .* delete it") as refused:
            syn.restore("s0")
        assert refused.value.problem["type"].endswith("/damaged-file")
        with pytest.raises(ConflictError, match="already has a snapshot 's0'"):
            syn.snapshot("s0")
        syn.delete_snapshot("s0")
        assert syn.snapshot("s0")["snapshot"] == "s0" and "damaged" not in syn.snapshots()[0]
        assert _evict_all(server) == ["enc"]
        copy = next(tmp_path.glob("evicted/*/enc.*.safetensors"))
        copy.write_bytes(copy.read_bytes()[:100])
        with pytest.raises(ConflictError, match="the evicted copy of 'enc' is damaged .* discard it"):
            client.restore_evicted("enc")
        client.discard_evicted("enc")
        assert client.evicted() == [] and client.list() == []
