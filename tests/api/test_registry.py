"""The registry's locking: one instance's calls serialize, different instances never wait on each other."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from synapse_serve.errors import AlreadyExists, InvalidName, NotFound
from synapse_serve.registry import Registry

CONFIG = {"shape": [2, 2, 1, 2], "x_shape": [3, 3], "eta": 0.1}


@pytest.fixture
def registry():
    reg = Registry()
    reg.create("a", "HebbianDeconvSynapse", CONFIG)
    reg.create("b", "HebbianDeconvSynapse", CONFIG)
    return reg


def test_a_busy_instance_does_not_block_another(registry):
    x = np.ones((1, 3, 3, 1), np.float32)
    busy = registry._instances["local/a"].lock
    busy.acquire()  # as if a long call were running on "a"
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (registry.call("b", "forward", {"inputs": x}), done.set())).start()
        assert done.wait(30), "a call on b waited for a's lock"
        blocked = threading.Event()
        waiter = threading.Thread(target=lambda: (registry.call("a", "forward", {"inputs": x}), blocked.set()))
        waiter.start()
        assert not blocked.wait(0.5), "a call on a ran while a was busy"
    finally:
        busy.release()
    waiter.join(30)
    assert blocked.is_set()


def test_jax_never_runs_on_the_event_loop_thread(live_server, client, unique_name):
    threads = []
    registry = live_server.registry
    original = registry.call

    def recording_call(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    registry.call = recording_call
    try:
        syn = client.create(unique_name, kind="HebbianDeconvSynapse", config=CONFIG)
        syn.forward(np.ones((1, 3, 3, 1)))
    finally:
        del registry.call
    assert threads and all(t is not live_server.thread for t in threads)


def test_names_and_lookups(registry):
    with pytest.raises(AlreadyExists):
        registry.create("a", "HebbianDeconvSynapse", CONFIG)
    with pytest.raises(InvalidName):
        registry.create("../etc", "HebbianDeconvSynapse", CONFIG)
    registry.delete("a")
    with pytest.raises(NotFound):
        registry.describe("a")
    assert [d["name"] for d in registry.list()] == ["b"]


def test_failed_create_leaves_nothing_behind(registry):
    with pytest.raises(Exception, match="weights"):
        registry.create("c", "HebbianDeconvSynapse", CONFIG, init={"weights": np.ones((9, 9, 9, 9), np.float32)})
    with pytest.raises(NotFound):
        registry.describe("c")
    registry.create("c", "HebbianDeconvSynapse", CONFIG)  # the name is free again
