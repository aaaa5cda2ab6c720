"""Quotas and limits, enforced exactly at their boundaries."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from conftest import LiveServer
from synapse_client import ConflictError, PermissionDeniedError, SynapseClient, UnprocessableEntityError

ALICE, BOB = "alice-" + "a" * 24, "bob-" + "b" * 24
CONFIG = {"shape": [2, 2, 1, 1], "x_shape": [3, 3], "eta": 0.1}


def state_bytes(tmp_path) -> int:
    with LiveServer(state_dir=tmp_path / "probe", durability="off") as server, SynapseClient(server.url) as c:
        return c.create("probe", kind="HebbianDeconvSynapse", config=CONFIG).describe()["state_bytes"]


def test_instance_and_byte_quotas_per_owner(tmp_path):
    one = state_bytes(tmp_path)
    settings = dict(state_dir=tmp_path / "state", auth="on", tokens=f"alice:{ALICE},bob:{BOB}",
                    max_instances_per_owner=3, max_state_bytes_per_owner=2 * one)
    with LiveServer(**settings) as server, SynapseClient(server.url, token=ALICE) as alice, \
            SynapseClient(server.url, token=BOB) as bob:
        alice.create("a1", kind="HebbianDeconvSynapse", config=CONFIG)
        alice.create("a2", kind="HebbianDeconvSynapse", config=CONFIG)  # exactly at the byte quota
        with pytest.raises(PermissionDeniedError, match="max_state_bytes_per_owner") as info:
            alice.create("a3", kind="HebbianDeconvSynapse", config=CONFIG)
        assert info.value.status_code == 403 and info.value.problem["quota"] == "max_state_bytes_per_owner"
        assert [d["name"] for d in alice.list()] == ["a1", "a2"]  # the refused one left nothing behind
        for i in range(2):  # bob's quota is his own
            bob.create(f"b{i}", kind="HebbianDeconvSynapse", config=CONFIG)
    settings["max_state_bytes_per_owner"] = 100 * one
    with LiveServer(**settings) as server, SynapseClient(server.url, token=ALICE) as alice:
        alice.create("a3", kind="HebbianDeconvSynapse", config=CONFIG)  # the third of three: allowed
        with pytest.raises(PermissionDeniedError, match="max_instances_per_owner: 'alice' already holds 3 of 3"):
            alice.create("a4", kind="HebbianDeconvSynapse", config=CONFIG)
        alice.get("a1").delete()
        alice.create("a4", kind="HebbianDeconvSynapse", config=CONFIG)  # room again


def test_max_batch_boundary(tmp_path):
    with LiveServer(state_dir=tmp_path, max_batch=4) as server, SynapseClient(server.url) as client:
        syn = client.create("batch", kind="HebbianDeconvSynapse", config=CONFIG)
        assert syn.forward(np.ones((4, 3, 3, 1))).shape[0] == 4
        with pytest.raises(UnprocessableEntityError, match="batch 5 is over the server's max_batch of 4"):
            syn.forward(np.ones((5, 3, 3, 1)))
        assert syn.describe()["counters"] == {"forward": 1}


def test_body_limit_boundary(tmp_path):
    limit = 4096
    with LiveServer(state_dir=tmp_path, max_body_bytes=limit) as server:
        url = f"{server.url}/v1/synapses"
        headers = {"Content-Type": "application/json"}
        at_limit = b'{"name": "x", "pad": "' + b"p" * (limit - 24) + b'"}'
        assert len(at_limit) == limit
        r = httpx.post(url, content=at_limit, headers=headers)
        assert r.status_code == 422 and "unknown pad" in r.json()["detail"]  # read and judged: not a 413
        r = httpx.post(url, content=at_limit + b" ", headers=headers)
        assert r.status_code == 413


def test_max_tensor_elements_boundary(tmp_path):
    with LiveServer(state_dir=tmp_path, max_tensor_elements=27) as server, SynapseClient(server.url) as client:
        syn = client.create("elements", kind="HebbianDeconvSynapse", config=CONFIG)
        assert syn.forward(np.ones((3, 3, 3, 1))).shape[0] == 3  # 27 elements
        r = httpx.post(f"{server.url}/v1/synapses/elements/forward", json={"inputs": np.ones((4, 3, 3, 1)).tolist()})
        assert r.status_code == 400 and "limit is 27" in r.json()["detail"]


def test_lowered_quotas_never_drop_stored_instances(tmp_path):
    settings = dict(state_dir=tmp_path / "state", durability="sync")
    with LiveServer(**settings) as server, SynapseClient(server.url) as client:
        for i in range(3):
            client.create(f"kept{i}", kind="HebbianDeconvSynapse", config=CONFIG)
    with LiveServer(**settings, max_instances_per_owner=1, max_state_bytes_per_owner=1) as server, \
            SynapseClient(server.url) as client:
        assert [d["name"] for d in client.list()] == ["kept0", "kept1", "kept2"]
        with pytest.raises(PermissionDeniedError):
            client.create("new", kind="HebbianDeconvSynapse", config=CONFIG)


def test_the_server_wide_instance_limit(tmp_path):
    """SYNAPSE_MAX_INSTANCES counts every owner's instances together."""
    tokens = f"alice:{ALICE},bob:{BOB}"
    with LiveServer(state_dir=tmp_path, tokens=tokens, max_instances=3) as server, \
            SynapseClient(server.url, token=ALICE) as alice, SynapseClient(server.url, token=BOB) as bob:
        alice.create("a1", kind="HebbianDeconvSynapse", config=CONFIG)
        alice.create("a2", kind="HebbianDeconvSynapse", config=CONFIG)
        bob.create("b1", kind="HebbianDeconvSynapse", config=CONFIG)  # the third of three, another owner
        with pytest.raises(PermissionDeniedError, match="max_instances: the server holds its maximum of 3") as info:
            bob.create("b2", kind="HebbianDeconvSynapse", config=CONFIG)
        assert info.value.problem["quota"] == "max_instances"
        alice.get("a1").delete()
        bob.create("b2", kind="HebbianDeconvSynapse", config=CONFIG)


def test_import_obeys_every_quota_and_the_device_budget(tmp_path):
    """The docs promise quotas and the budget are checked at import too (an import is a create)."""
    one = state_bytes(tmp_path)
    with LiveServer(state_dir=tmp_path / "src", durability="off") as server, SynapseClient(server.url) as client:
        path = client.create("x", kind="HebbianDeconvSynapse", config=CONFIG).export(tmp_path / "x.safetensors")
    limits = [({"max_instances_per_owner": 1}, PermissionDeniedError, "max_instances_per_owner"),
              ({"max_instances": 1}, PermissionDeniedError, "max_instances"),
              ({"max_state_bytes_per_owner": one + one // 2}, PermissionDeniedError, "max_state_bytes_per_owner"),
              ({"device_budget_bytes": one + one // 2}, ConflictError, "device budget")]
    for i, (setting, error, needle) in enumerate(limits):
        with LiveServer(state_dir=tmp_path / f"dst{i}", **setting) as server, SynapseClient(server.url) as client:
            client.import_(path, name="first")  # one fits
            with pytest.raises(error, match=needle):
                client.import_(path, name="second")
            assert [d["name"] for d in client.list()] == ["first"], setting


def test_a_rollback_over_the_quota_is_refused_before_the_device_holds_it_and_a_failed_write_counts_nothing(
        tmp_path, monkeypatch):
    """Red-team readings (2026-11-30): a rollback built the snapshot's state on the device before its size was checked
    against the owner's quota (a snapshot may be larger than the quota lets the instance be now); and a write
    counted the new size before the device took it, so a device error left capacity counting a state it never held."""
    import dataclasses

    from synapse_serve.errors import DeviceError
    from synapse_serve.local import registry as registry_module

    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        syn = client.create("net", kind="HebbianSynapse", config={"shape": [4, 3], "batch_size": 64})
        syn.forward(np.ones((64, 4), np.float32))  # signals of batch 64
        syn.snapshot("wide")
        syn.forward(np.ones((1, 4), np.float32))  # signals of batch 1: smaller
        small = server.registry.capacity.owner_usage("local")["state_bytes"]
        capacity = server.registry.capacity
        capacity.limits = dataclasses.replace(capacity.limits, max_state_bytes_per_owner=small)  # what it holds now
        built = []
        real_build = registry_module.state_from_compartments
        monkeypatch.setattr(registry_module, "state_from_compartments",
                            lambda *args: built.append(1) or real_build(*args))
        with pytest.raises(PermissionDeniedError, match="max_state_bytes_per_owner"):
            syn.restore("wide")
        assert built == [] and server.registry.capacity.owner_usage("local")["state_bytes"] == small
        capacity.limits = dataclasses.replace(capacity.limits, max_state_bytes_per_owner=None)
        assert syn.restore("wide") > 0 and built == [1]  # within the quota: restored
        wide = server.registry.capacity.owner_usage("local")["state_bytes"]

        def failing(*args):
            raise DeviceError("the device failed: out of memory")

        monkeypatch.setattr(registry_module, "with_compartment", failing)
        version = syn.describe()["version"]
        with pytest.raises(Exception, match="device failed"):
            syn.set("inputs", np.ones((128, 4), np.float32))  # would grow the state
        assert server.registry.capacity.owner_usage("local")["state_bytes"] == wide
        assert syn.describe()["version"] == version and syn.describe()["state_bytes"] == wide
