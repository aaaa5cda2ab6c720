"""The learning-curve history in the registry: bounded, one sample per learning call, settled to the host."""

from __future__ import annotations

import numpy as np
import pytest

from synapse_serve.local.history import SETTLE_EVERY
from synapse_serve.local.registry import Registry
from synapse_serve.names import InstanceKey

KEY = InstanceKey("local", "curve")


def _registry(length: int, **options) -> Registry:
    registry = Registry(history_length=length, history_when_off=True, **options)
    registry.create(KEY, kind="HebbianSynapse", config={"shape": [6, 3], "eta": 0.2})
    return registry


def test_samples_settle_on_the_host_and_keep_their_values():
    length, calls = SETTLE_EVERY + 8, 2 * SETTLE_EVERY + 6
    registry = _registry(length)
    rng = np.random.default_rng(0)
    returned = []
    for _ in range(calls):
        answer = registry.call(KEY, "evolve", {"pre": rng.random((2, 6), np.float32),
                                               "post": rng.random((2, 3), np.float32)}, returns=["weights"])
        returned.append(answer)
    history = registry._instances[KEY].history
    assert len(history._on_device) < SETTLE_EVERY  # the finished ones went to the host
    assert sum(isinstance(entry[3], np.ndarray) for entry in history._samples) >= length - SETTLE_EVERY
    entries = registry.history(KEY)["entries"]
    assert len(entries) == length
    for entry, answer in zip(entries, returned[-length:]):
        assert entry["version"] == answer["version"]
        assert entry["norm"] == pytest.approx(np.linalg.norm(answer["weights"].astype(np.float64)), rel=1e-5)


def test_only_learning_calls_are_sampled_and_a_zero_length_keeps_none():
    registry = _registry(8)
    x, post = np.ones((1, 6), np.float32), np.ones((1, 3), np.float32)
    registry.call(KEY, "forward", {"inputs": x})
    registry.call(KEY, "calc_update", {"pre": x, "post": post})
    registry.call(KEY, "reset", {})
    registry.write(KEY, "weights", np.zeros((6, 3), np.float32))
    assert registry.history(KEY)["entries"] == []
    registry.call(KEY, "step", {"inputs": x, "post": post})
    registry.call_many([KEY], "evolve", [{"pre": x, "post": post}])
    assert [e["steps"] for e in registry.history(KEY)["entries"]] == [1, 2]
    none = _registry(0)
    none.call(KEY, "evolve", {"pre": x, "post": post})
    assert none.history(KEY) == {"name": "curve", "owner": "local", "version": 2, "length": 0, "entries": []}


def test_memory_only_instances_keep_none_unless_asked():
    registry = Registry(history_length=8)  # no state directory: durability off
    registry.create(KEY, kind="HebbianSynapse", config={"shape": [6, 3]})
    registry.call(KEY, "evolve", {"pre": np.ones((1, 6), np.float32), "post": np.ones((1, 3), np.float32)})
    assert registry.describe(KEY)["history_length"] == 0 and registry.history(KEY)["entries"] == []
