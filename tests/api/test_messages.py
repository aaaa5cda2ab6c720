"""Bad input gets a clear 4xx, never a 500 (issue 11, items 24-26)."""

from __future__ import annotations

import json

import httpx
import msgpack
import numpy as np
import pytest

from synapse_client import Ref, SynapseClient, UnprocessableEntityError

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [3, 3, 2, 4], "x_shape": [6, 6], "eta": 0.05}


def test_a_wrong_shaped_reference_to_another_instance_is_a_422_on_a_live_connection(live_server, unique_name):
    """Item 24: it answered 500, without a request id, and dropped the keep-alive connection."""
    with SynapseClient(live_server.url, max_retries=0) as client:
        other = client.create(unique_name + "-l2", kind=KIND, config={**CONFIG, "shape": [3, 3, 2, 3]})
        other.forward(np.ones((2, 6, 6, 2), np.float32))  # outputs (2, 6, 6, 3): not this one's inputs
        syn = client.create(unique_name, kind=KIND, config=CONFIG)
        before = syn.describe()
        for operation, arguments, argument in (
                ("forward", {"inputs": Ref("outputs", instance=unique_name + "-l2")}, "inputs"),
                ("evolve", {"pre": np.ones((2, 6, 6, 2), np.float32),
                            "post": Ref("outputs", instance=unique_name + "-l2")}, "post")):
            with pytest.raises(UnprocessableEntityError, match=rf"{argument}: expected shape \(batch, 6, 6, ") as info:
                syn.call(operation, **arguments)
            assert info.value.request_id and info.value.problem["request_id"] == info.value.request_id
        assert syn.describe()["version"] == before["version"]  # the same connection serves on
        assert syn.forward(np.ones((1, 6, 6, 2), np.float32)).shape == (1, 6, 6, 4)


def _post(live_server, path: str, content: bytes, media: str = "application/msgpack") -> httpx.Response:
    return httpx.post(f"{live_server.url}{path}", content=content, headers={"Content-Type": media})


def test_bytes_map_keys_and_huge_json_numbers_are_4xx(live_server, client, unique_name):
    """Item 25: msgpack bodies with bytes map keys, and JSON integers beyond a float, answered 500."""
    client.create(unique_name, kind=KIND, config=CONFIG)
    tensor = {"dtype": "float32", "shape": [1, 6, 6, 2], "data": np.ones(72, "<f4").tobytes()}
    small = msgpack.packb({b"inputs": tensor}, use_bin_type=True)
    big = msgpack.packb({b"inputs": {**tensor, "shape": [40, 6, 6, 2], "data": np.ones(40 * 72, "<f4").tobytes()}},
                        use_bin_type=True)  # over 64 KiB: the in-place reader
    nested = msgpack.packb({"name": unique_name + "-n", "kind": KIND, "config": {b"eta": 1.0, **CONFIG}},
                           use_bin_type=True)
    int_keys = msgpack.packb({1: 2}, use_bin_type=True, strict_types=False)
    for path, body in ((f"/v1/synapses/{unique_name}/forward", small), (f"/v1/synapses/{unique_name}/forward", big),
                       ("/v1/synapses", nested), (f"/v1/synapses/{unique_name}/forward", int_keys)):
        r = _post(live_server, path, body)
        assert r.status_code == 400 and "map key" in r.json()["detail"], (path, r.text)
    huge = "1" + "0" * 400
    for field in ("eta", "g_conduct_factor", "stride", "w_bound"):
        config = {k: v for k, v in CONFIG.items() if k != field}
        body = json.dumps({"name": unique_name + "-h", "kind": KIND, "config": config})
        body = body.replace('"config": {', f'"config": {{"{field}": {huge}, ', 1)
        r = _post(live_server, "/v1/synapses", body.encode(), "application/json")
        assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)
    r = _post(live_server, "/v1/synapses", json.dumps({"name": unique_name + "-s", "kind": KIND, "config": CONFIG})
              .replace('"config"', f'"seed": {huge}, "config"').encode(), "application/json")
    assert r.status_code == 422 and "seed" in r.json()["detail"]
    assert httpx.get(f"{live_server.url}/healthz").status_code == 200


def test_messages_say_what_was_wrong(client, live_server, unique_name):
    """Item 26: a phantom batch in init shapes, Python internals for a missing field, a missing tensor titled
    "Unknown operation or compartment", no "did you mean"."""
    with pytest.raises(UnprocessableEntityError) as info:
        client.create(unique_name, kind=KIND, config=CONFIG, init={"weights": np.ones((9, 9), np.float32)})
    assert info.value.detail.startswith("weights: expected shape (3, 3, 2, 4), received (9, 9)")
    with pytest.raises(UnprocessableEntityError) as info:
        client.create(unique_name, kind=KIND, config={"shape": [3, 3, 2, 4]})
    assert "config: missing required field x_shape (input map" in info.value.detail
    assert "__init__" not in info.value.detail and "positional" not in info.value.detail
    with pytest.raises(UnprocessableEntityError, match="did you mean 'eta'"):
        client.create(unique_name, kind=KIND, config={**CONFIG, "etaa": 0.1})
    with pytest.raises(UnprocessableEntityError, match="did you mean 'adam'"):
        client.create(unique_name, kind=KIND, config={**CONFIG, "optim_type": "adm"})
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    with pytest.raises(UnprocessableEntityError) as info:
        syn.call("evolve", pre=np.ones((1, 6, 6, 2), np.float32))
    assert info.value.title == "Missing argument" and "needs the tensor 'post'" in info.value.detail
    assert "(batch, 6, 6, 4)" in info.value.detail
    with pytest.raises(UnprocessableEntityError, match="did you mean 'forward'") as info:
        syn.call("forwrd", inputs=np.ones((1, 6, 6, 2), np.float32))
    assert info.value.title == "Unknown operation"
    with pytest.raises(UnprocessableEntityError, match="did you mean 'weights'") as info:
        syn.get("weight")
    assert info.value.title == "Unknown compartment"
    r = httpx.post(f"{live_server.url}/v1/synapses", json={"name": unique_name + "-x", "kind": KIND})
    assert r.status_code == 422 and r.json()["title"] == "Invalid body fields" and "missing config" in r.json()["detail"]


def test_the_documented_error_trees_are_the_real_classes():
    """Both trees (server and client) list exactly the classes that exist, with their statuses."""
    import re

    import synapse_client._exceptions as client_errors
    import synapse_serve.errors as server_errors

    for module, base in ((server_errors, server_errors.SynapseServeError), (client_errors, client_errors.SynapseError)):
        documented = set(re.findall(r"[├└]── (\w+)", module.__doc__))
        real = {name for name, value in vars(module).items()
                if isinstance(value, type) and issubclass(value, base) and value is not base}
        assert documented == real, (module.__name__, documented ^ real)
    for line in re.findall(r"[├└]── (\w+)\s+\((\d{3})\)", server_errors.__doc__):
        assert getattr(server_errors, line[0]).status == int(line[1]), line


def test_routing_errors_and_unknown_tensors_carry_the_documented_titles(live_server, unique_name):
    """A docs audit found framework spellings ("Not Found", "Method Not Allowed") and a title the error table did
    not list ("Invalid request" for an unknown tensor of an operation)."""
    missing = httpx.get(f"{live_server.url}/v1/nowhere")
    assert missing.status_code == 404 and missing.json()["title"] == "Not found"
    wrong_method = httpx.put(f"{live_server.url}/v1/synapses")
    assert wrong_method.status_code == 405 and wrong_method.json()["title"] == "Method not allowed"
    assert "POST" in wrong_method.headers["allow"]  # the framework's Allow header is kept
    with SynapseClient(live_server.url) as client:
        syn = client.create(unique_name, kind="HebbianSynapse", config={"shape": [2, 2]})
        with pytest.raises(UnprocessableEntityError, match="forward takes inputs; unknown: bogus") as info:
            syn.call("forward", inputs=np.ones((1, 2), np.float32), bogus=np.ones((1, 2), np.float32))
        assert info.value.problem["title"] == "Invalid body fields"
