"""The registry's locking: one instance's calls serialize, different instances never wait on each other."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from synapse_client import SynapseClient
from synapse_serve.errors import AlreadyExists, InvalidName, NotFound
from synapse_serve.local.registry import Registry
from synapse_serve.names import InstanceKey

CONFIG = {"shape": [2, 2, 1, 2], "x_shape": [3, 3], "eta": 0.1}


A, B, C = InstanceKey("local", "a"), InstanceKey("local", "b"), InstanceKey("local", "c")


@pytest.fixture
def registry():
    reg = Registry()
    reg.create(A, kind="HebbianDeconvSynapse", config=CONFIG)
    reg.create(B, kind="HebbianDeconvSynapse", config=CONFIG)
    return reg


def test_a_busy_instance_does_not_block_another(registry):
    x = np.ones((1, 3, 3, 1), np.float32)
    busy = registry._instances[A].lock
    busy.acquire()  # as if a long call were running on "a"
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (registry.call(B, "forward", {"inputs": x}), done.set())).start()
        assert done.wait(30), "a call on b waited for a's lock"
        blocked = threading.Event()
        waiter = threading.Thread(target=lambda: (registry.call(A, "forward", {"inputs": x}), blocked.set()))
        waiter.start()
        assert not blocked.wait(0.5), "a call on a ran while a was busy"
    finally:
        busy.release()
    waiter.join(30)
    assert blocked.is_set()


def record_device_threads(monkeypatch):
    """The thread of every JAX computation the registry runs."""
    import synapse_serve.local.registry as registry_module

    threads, original = [], registry_module.device_call

    def recording(fn, *args):
        threads.append(threading.current_thread())
        return original(fn, *args)

    monkeypatch.setattr(registry_module, "device_call", recording)
    return threads


def test_slow_work_never_runs_on_the_event_loop_thread(live_server, client, unique_name, monkeypatch):
    threads = record_device_threads(monkeypatch)
    big = client.create(unique_name, kind="HebbianDeconvSynapse",
                        config={"shape": [5, 5, 8, 64], "x_shape": [48, 48], "eta": 0.1})
    x = np.ones((8, 48, 48, 8), np.float32)
    for _ in range(3):  # the first compiles; the others take milliseconds: over the inline budget
        big.forward(x)
    assert len(threads) >= 3 and all(t is not live_server.thread for t in threads)


def test_quick_calls_on_a_free_instance_skip_the_thread_hop(live_server, client, unique_name, monkeypatch):
    threads = record_device_threads(monkeypatch)
    tiny = client.create(unique_name, kind="HebbianDeconvSynapse", config={"shape": [1, 1, 1, 1], "x_shape": [2, 2]})
    x = np.ones((1, 2, 2, 1), np.float32)
    for _ in range(20):
        tiny.forward(x)
    assert threads[0] is not live_server.thread  # the first call (the compile) never runs inline
    assert live_server.thread in threads  # once measured quick, calls run on the loop


def test_with_inline_calls_off_every_call_runs_on_a_worker(tmp_path, monkeypatch):
    from conftest import LiveServer

    threads = record_device_threads(monkeypatch)
    with LiveServer(state_dir=tmp_path, inline_call_us=0) as server, SynapseClient(server.url) as client:
        tiny = client.create("t", kind="HebbianDeconvSynapse", config={"shape": [1, 1, 1, 1], "x_shape": [2, 2]})
        for _ in range(20):
            tiny.forward(np.ones((1, 2, 2, 1), np.float32))
        assert len(threads) >= 20 and server.thread not in threads  # (warm-up calls too)


def test_where_a_thread_hop_is_dear_against_a_call_the_call_runs_inline(tmp_path, monkeypatch):
    """The inline bound rises to a multiple of the hop the server measures: with a bound of 1 µs set, a tiny
    forward (tens of µs) runs on the loop once hops were measured, and never with the factor at 0 (fixed)."""
    from conftest import LiveServer

    x = np.ones((1, 2, 2, 1), np.float32)
    for factor, inline in ((100, True), (0, False)):
        threads = record_device_threads(monkeypatch)
        with LiveServer(state_dir=tmp_path / str(factor), inline_call_us=1, inline_hop_factor=factor) as server, \
                SynapseClient(server.url) as client:
            tiny = client.create("t", kind="HebbianDeconvSynapse", config={"shape": [1, 1, 1, 1], "x_shape": [2, 2]})
            for _ in range(20):
                tiny.forward(x)
            assert (server.thread in threads[-5:]) is inline, (factor, threads[-5:])


def test_the_inline_bound_follows_the_median_hop_within_its_floor_and_ceiling(tmp_path):
    from synapse_serve.local.backend import INLINE_CEILING_S, LocalBackend
    from synapse_serve.settings import Settings

    def bound_after(hops, **settings):
        backend = LocalBackend(Settings(state_dir=tmp_path, **settings))
        try:
            for hop in hops:
                backend._note_hop(hop)
            return backend.inline_max_s
        finally:
            backend.executor.shutdown()

    assert bound_after([]) == pytest.approx(250e-6)  # nothing measured: inline_call_us
    assert bound_after([200e-6, 190e-6, 5e-3]) == pytest.approx(4 * 200e-6)  # the median: one slow hop is noise
    assert bound_after([30e-6] * 5) == pytest.approx(250e-6)  # cheap hops: the setting stays the bound
    assert bound_after([1e-3] * 5) == pytest.approx(INLINE_CEILING_S)  # never past the ceiling
    assert bound_after([1e-3] * 5, inline_call_us=5000) == pytest.approx(5e-3)  # an operator's own bound stands
    assert bound_after([200e-6] * 5, inline_call_us=0) == 0  # inline calls off stays off
    assert bound_after([200e-6] * 5, inline_hop_factor=0) == pytest.approx(250e-6)  # fixed


def test_a_hand_off_that_waited_behind_another_call_is_not_counted_as_a_hop(tmp_path):
    """What sets the bound is the hop alone: a call queued for the only worker measures the queue, not the hop."""
    import asyncio
    import time

    from synapse_serve.local.backend import LocalBackend
    from synapse_serve.settings import Settings

    backend = LocalBackend(Settings(state_dir=tmp_path, worker_threads=1))
    release = threading.Event()

    async def scenario():
        first = asyncio.ensure_future(backend._off(release.wait, 10))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(backend._off(time.sleep, 0))  # waits for the worker the first holds
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.gather(first, second)
        queued = list(backend._hops)
        await backend._off(time.sleep, 0)  # alone: a hop
        return queued, list(backend._hops)

    try:
        queued, after = asyncio.run(scenario())
    finally:
        backend.executor.shutdown()
    assert queued == []
    assert len(after) == 1 and after[0] < 0.15


def test_a_cost_measured_on_an_instance_never_lets_another_of_its_name_run_inline(tmp_path, monkeypatch):
    """Deleted and created again with another eta (a sweep), the same name and shapes: its first evolve compiles. Run
    on the loop with the old instance's cost, that compile stalled every connection (~200-340 ms)."""
    from conftest import LiveServer

    threads = record_device_threads(monkeypatch)
    x, post = np.ones((1, 2, 2, 1), np.float32), np.ones((1, 2, 2, 1), np.float32)
    config = {"shape": [1, 1, 1, 1], "x_shape": [2, 2]}
    with LiveServer(state_dir=tmp_path, inline_call_us=1e6) as server, SynapseClient(server.url) as client:
        for eta in (0.1, 0.2, 0.3):
            syn = client.create("sweep", kind="HebbianDeconvSynapse", config={**config, "eta": eta})
            del threads[:]
            for _ in range(3):
                syn.evolve(x, post)
            assert threads[0] is not server.thread, eta  # its first: a compile, on a worker
            assert server.thread in threads[1:], eta  # then measured quick: inline
            syn.delete()


def test_a_member_of_a_stack_is_taken_out_on_a_worker(tmp_path, monkeypatch):
    """A single call on a stacked member first takes it out of the stack (device work, a compile the first time):
    never on the event loop, whatever the member's last call cost."""
    from conftest import LiveServer

    threads = record_device_threads(monkeypatch)
    config = {"shape": [1, 1, 1, 1], "x_shape": [2, 2]}
    with LiveServer(state_dir=tmp_path, inline_call_us=1e6) as server, SynapseClient(server.url) as client:
        names = [f"m{i}" for i in range(4)]
        for name in names:
            syn = client.create(name, kind="HebbianDeconvSynapse", config=config)
            for _ in range(3):
                syn.forward(np.ones((1, 2, 2, 1), np.float32))  # measured quick: inline from now on
        assert server.thread in threads
        for _ in range(2):  # packed twice: stacked
            client.call_stacked("forward", names, {"inputs": np.ones((4, 1, 2, 2, 1), np.float32)})
        del threads[:]
        client.get("m0").forward(np.ones((1, 2, 2, 1), np.float32))
        assert threads and server.thread not in threads


def test_names_and_lookups(registry):
    with pytest.raises(AlreadyExists):
        registry.create(A, kind="HebbianDeconvSynapse", config=CONFIG)
    with pytest.raises(InvalidName):
        InstanceKey.of("local", "../etc")
    registry.delete(A)
    with pytest.raises(NotFound):
        registry.describe(A)
    assert [d["name"] for d in registry.list()] == ["b"]


def test_failed_create_leaves_nothing_behind(registry):
    with pytest.raises(Exception, match="weights"):
        registry.create(C, kind="HebbianDeconvSynapse", config=CONFIG,
                        init={"weights": np.ones((9, 9, 9, 9), np.float32)})
    with pytest.raises(NotFound):
        registry.describe(C)
    assert registry.capacity.owner_usage("local") == {"instances": 2, "state_bytes": 2 * registry._instances[A]
                                                     .held_bytes, "snapshot_bytes": 0}  # nothing counted
    registry.create(C, kind="HebbianDeconvSynapse", config=CONFIG)  # the name is free again


def test_request_fingerprints_hash_tensors_in_place():
    """Item 37: every keyed call copied each tensor twice to hash it (0.19 s for a 40 MiB evolve)."""
    import tracemalloc

    from synapse_serve.local.instance import fingerprint
    from synapse_serve.names import CompartmentRef

    big = np.ones((10, 1024, 1024), np.float32)  # 40 MiB
    tracemalloc.start()
    try:
        first = fingerprint("evolve", [big, CompartmentRef("inputs")], ["dWeights"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    changed = big.copy()
    changed[-1, -1, -1] = 2.0
    assert fingerprint("evolve", [changed, CompartmentRef("inputs")], ["dWeights"]) != first
    assert fingerprint("evolve", [big.reshape(20, 512, 1024), CompartmentRef("inputs")], ["dWeights"]) != first
    assert fingerprint("evolve", [big[:, ::2], None], []) != fingerprint("evolve", [big[:, ::2].copy(), None], [""])
