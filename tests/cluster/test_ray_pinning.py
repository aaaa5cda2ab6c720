"""CPU shards are devices of their own cores: each shard pinned to ``ray_shard_cpus`` cores no other shard on the
node holds, every thread of it, again after it is restarted (issue 17: "a configurable count on CPU nodes")."""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cluster.raycluster import ray, ray_server, stop_shards
from synapse_client import SynapseClient


def _pinned(live) -> list[list[int] | None]:
    return [info["cores"] for info in live.app.state.server.backend.shard_info()]


def _threads_on(pid: int) -> set[frozenset[int]]:
    masks = set()
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            masks.add(frozenset(os.sched_getaffinity(int(thread))))
        except OSError:  # a thread that ended meanwhile
            continue
    return masks


def test_cpu_shards_hold_cores_of_their_own_and_again_after_a_restart(cluster, tmp_path):
    live = ray_server(tmp_path, ray_pin_cpus=True, durability="sync")
    with live, SynapseClient(live.url, timeout=120) as client:
        backend = live.app.state.server.backend
        cores = _pinned(live)
        assert all(c is not None and len(c) == 1 for c in cores) and cores[0] != cores[1], cores
        infos = backend.shard_info()
        for info in infos:  # every thread of the shard's process: XLA's, and Ray's that run our calls
            assert _threads_on(info["pid"]) == {frozenset(info["cores"])}
        syn = client.create("pinned", kind="HebbianSynapse", config={"shape": [8, 4]}, device="shard-1")
        y = syn.forward(np.ones((2, 8), np.float32))
        os.kill(infos[1]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while True:  # Ray restarts it; the dead process's cores came free with it
            try:
                np.testing.assert_array_equal(syn.forward(np.ones((2, 8), np.float32)), y)
                break
            except Exception:  # noqa: BLE001 - 503 while it restarts (an unkeyed call is not retried for us)
                assert time.monotonic() < deadline
                time.sleep(0.5)
        again = backend.shard_info()[1]
        assert again["pid"] != infos[1]["pid"] and again["cores"] == cores[1]
        assert _threads_on(again["pid"]) == {frozenset(cores[1])}
    stop_shards(live)


def test_without_pinning_a_shard_keeps_every_core(cluster, tmp_path):
    live = ray_server(tmp_path, ray_shards=1)
    with live:
        info = live.app.state.server.backend.shard_info()[0]
        assert info["cores"] is None
        assert _threads_on(info["pid"]) == {frozenset(os.sched_getaffinity(0))}
    stop_shards(live)


def test_a_cluster_with_cpus_for_one_shard_gets_one_by_default(cluster, tmp_path):
    live = ray_server(tmp_path, ray_shards=None, ray_shard_cpus=3)  # the test cluster has 4 CPUs: room for one
    with live, SynapseClient(live.url) as client:
        assert len(live.app.state.server.backend.shards) == 1  # not two, the second of which Ray could never place
        syn = client.create("alone", kind="HebbianSynapse", config={"shape": [4, 2]})
        assert syn.forward(np.ones((1, 4), np.float32)).shape == (1, 2)
    stop_shards(live)


def test_a_shard_waits_a_moment_for_cores_a_dying_process_still_holds(cluster, tmp_path):
    """A shard restarted while its dead incarnation's process is still going away finds its cores held: it waits
    for them (a few seconds) rather than run unpinned. Here this test holds every core's lock, as such a
    process would, and lets one go after a second."""
    folder = Path(tempfile.gettempdir()) / "synapse-serve-cores" / ray.get_runtime_context().get_node_id()
    folder.mkdir(parents=True, exist_ok=True)
    held = []
    for core in sorted(os.sched_getaffinity(0)):
        handle = (folder / f"{core}.lock").open("a")
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append((core, handle))
    freed = held[-1][0]
    timer = threading.Timer(1.0, held[-1][1].close)
    timer.start()
    try:
        live = ray_server(tmp_path, ray_shards=1, ray_pin_cpus=True)
        with live:
            assert _pinned(live) == [[freed]]
        stop_shards(live)
    finally:
        timer.cancel()
        for _, handle in held:
            handle.close()
