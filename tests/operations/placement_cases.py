"""Placement across devices. Run by test_placement.py in a process that sees 4 CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4): JAX reads that flag once, at start."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

from conftest import LiveServer
from synapse_client import ConflictError, SynapseClient, UnprocessableEntityError
from synapse_serve.names import InstanceKey

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [3, 3, 1, 2], "x_shape": [5, 5], "eta": 0.1}


def test_four_devices_are_seen():
    assert len(jax.devices()) == 4


def test_instances_spread_over_devices_least_filled_first(tmp_path):
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        devices = [client.create(f"s{i}", kind=KIND, config=CONFIG).describe()["device"] for i in range(8)]
        assert sorted(devices[:4]) == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]  # one each, then around again
        assert sorted(devices[4:]) == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
        # the state really lives there, and calls run there
        for i, device in enumerate(devices):
            state = server.registry._get(InstanceKey("local", f"s{i}")).state
            assert {str(d.id) for leaf in jax.tree_util.tree_leaves(state) for d in leaf.devices()} == {device[4:]}
        x = np.ones((1, 5, 5, 1), np.float32)
        outputs = [client.get(f"s{i}").forward(x) for i in range(4)]
        for out in outputs[1:]:
            assert out.shape == outputs[0].shape
        state = server.registry._get(InstanceKey("local", "s3")).state
        assert {d.id for d in state.outputs.devices()} == {int(devices[3][4:])}


def test_an_explicit_device_and_a_wrong_one(tmp_path):
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        body = {"name": "there", "kind": KIND, "config": CONFIG, "device": "cpu:2"}
        client.request("POST", "/v1/synapses", body, retry=False)
        assert client.get("there").describe()["device"] == "cpu:2"
        client.request("POST", "/v1/synapses", {**body, "name": "by-index", "device": 3}, retry=False)
        assert client.get("by-index").describe()["device"] == "cpu:3"
        with pytest.raises(UnprocessableEntityError, match="not one of this server's devices: cpu:0, cpu:1"):
            client.request("POST", "/v1/synapses", {**body, "name": "nowhere", "device": "cuda:7"}, retry=False)


def test_a_device_budget_refuses_what_would_not_fit(tmp_path):
    from synapse_serve.kinds.hebbian_deconv import parse_config, state_nbytes

    nbytes = state_nbytes(parse_config(CONFIG))
    with LiveServer(state_dir=tmp_path, device_budget_bytes=2 * nbytes) as server, \
            SynapseClient(server.url) as client:
        for i in range(8):  # two per device
            client.create(f"b{i}", kind=KIND, config=CONFIG)
        with pytest.raises(ConflictError, match=r"device cpu:\d holds \d+ bytes of state; this needs"):
            client.create("one-too-many", kind=KIND, config=CONFIG)
        assert len(client.list()) == 8  # nothing half-made
        client.get("b0").delete()
        client.create("fits-again", kind=KIND, config=CONFIG)


def test_calls_on_instances_of_different_devices_run_at_the_same_time(tmp_path, monkeypatch):
    import synapse_serve.local.registry as registry_module

    inside = threading.Barrier(2, timeout=20)  # both calls must be inside the device work at once
    original = registry_module.device_call

    def meeting(fn, *args):
        result = original(fn, *args)
        inside.wait()  # inside each call (under its instance's lock): both get here only if neither waits
        return result

    with LiveServer(state_dir=tmp_path, inline_call_us=0) as server, SynapseClient(server.url) as client:
        a = client.create("on-0", kind=KIND, config=CONFIG)
        b = client.create("on-1", kind=KIND, config=CONFIG)
        assert {a.describe()["device"], b.describe()["device"]} == {"cpu:0", "cpu:1"}
        x = np.ones((1, 5, 5, 1), np.float32)
        a.forward(x), b.forward(x)  # compiled on both devices
        monkeypatch.setattr(registry_module, "device_call", meeting)
        errors = []

        def call(syn):
            try:
                syn.forward(x)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors  # a serialised registry would leave one waiting at the barrier: BrokenBarrier


def test_a_written_compartment_stays_on_its_instances_device(tmp_path):
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        body = {"name": "on-3", "kind": KIND, "config": CONFIG, "device": "cpu:3"}
        client.request("POST", "/v1/synapses", body, retry=False)
        syn = client.get("on-3")
        weights = syn.weights * 2.0
        syn.set("weights", weights)
        syn.set("inputs", np.ones((2, 5, 5, 1), np.float32))  # a batched compartment too
        state = server.registry._get(InstanceKey("local", "on-3")).state
        for leaf in (state.weights, state.inputs):  # committed there: calls never move it back and forth
            assert {d.id for d in leaf.devices()} == {3} and leaf.committed
        syn.forward(np.ones((1, 5, 5, 1), np.float32))
        assert {d.id for d in server.registry._get(InstanceKey("local", "on-3")).state.weights.devices()} == {3}
        assert np.array_equal(syn.weights, weights)
