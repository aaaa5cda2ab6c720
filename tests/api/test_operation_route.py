"""The lean operation route and FastAPI's documented route are one handler: the same requests through
both give the same status, headers and bodies (issue 12, item 6)."""

from __future__ import annotations

import json

import httpx
import msgpack
import numpy as np
import pytest

from conftest import LiveServer

ALICE, ROOT = "alice-" + "a" * 24, "root-" + "r" * 24
KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [2, 2, 1, 2], "x_shape": [3, 3], "eta": 0.1, "optim_type": "adam"}


def tensor(shape, value=1.0):
    return {"dtype": "float32", "shape": list(shape), "data": np.full(shape, value, "<f4").tobytes()}


X, POST = tensor((2, 3, 3, 1)), tensor((2, 3, 3, 2), 0.5)
MP = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
REQUESTS = [  # (token, path suffix, body, extra headers)
    (ALICE, "/syn/forward", msgpack.packb({"inputs": X}), {}),
    (ALICE, "/syn/evolve", msgpack.packb({"pre": X, "post": POST, "return": ["dWeights"]}), {"Idempotency-Key": "k1"}),
    (ALICE, "/syn/evolve", msgpack.packb({"pre": X, "post": POST, "return": ["dWeights"]}), {"Idempotency-Key": "k1"}),
    (ALICE, "/syn/evolve", msgpack.packb({"pre": X, "post": X}), {"Idempotency-Key": "k2"}),  # wrong shape
    (ALICE, "/syn/backtransmit", b"", {}),
    (ALICE, "/syn/step", msgpack.packb({"inputs": {"ref": "inputs"}, "post": POST}), {"If-Match": '"4"'}),
    (ALICE, "/syn/step", msgpack.packb({"inputs": X, "post": POST}), {"If-Match": '"99"'}),  # 412
    (ALICE, "/syn/reset", b"", {"Accept": "application/json"}),
    (ALICE, "/syn/reset", b"", {"Accept": "text/html"}),  # 406
    (ALICE, "/syn/forward", b"\xc1", {}),  # 400
    (ALICE, "/syn/forward", json.dumps({"inputs": [[[[1.0]] * 3] * 3]}).encode(),
     {"Content-Type": "application/json"}),
    (ALICE, "/nope/forward", msgpack.packb({"inputs": X}), {}),  # 404
    (ALICE, "/syn/forward?owner=root", msgpack.packb({"inputs": X}), {}),  # 404: not an admin
    (ROOT, "/syn/forward?owner=alice", msgpack.packb({"inputs": X}), {}),  # an admin acts for alice
    ("wrong-token-wrong-token", "/syn/forward", msgpack.packb({"inputs": X}), {}),  # 401
    (None, "/syn/forward", msgpack.packb({"inputs": X}), {}),  # 401
    (ALICE, "/bad..name!/forward", msgpack.packb({"inputs": X}), {}),  # 422 name
    (ALICE, "/syn/forward", msgpack.packb({"inputs": X, "bogus": X}), {}),  # 422 argument
]


def run_all(url: str, names: tuple[str, ...] = ("syn",), prefix: str = "/v1/synapses",
            requests: list = REQUESTS) -> list[tuple[int, dict, object]]:
    """Create alice's ``names`` (as the admin), then send ``requests`` under ``prefix``: (status, headers, body)."""
    out = []
    with httpx.Client(base_url=url) as http:
        auth = {"Authorization": f"Bearer {ROOT}"}
        for name in names:
            http.post("/v1/synapses?owner=alice", json={"name": name, "kind": KIND, "config": CONFIG, "seed": 3},
                      headers=auth).raise_for_status()
        for token, suffix, body, extra in requests:
            headers = {**MP, **({"Authorization": f"Bearer {token}"} if token else {}), **extra,
                       "X-Request-ID": "same-id"}
            r = http.post(f"{prefix}{suffix}", content=body, headers=headers)
            kept = {k: v for k, v in r.headers.items() if k not in ("date",)}
            media = r.headers.get("content-type", "")
            parsed = msgpack.unpackb(r.content) if "msgpack" in media else json.loads(r.content or b"null")
            out.append((r.status_code, kept, parsed))
    return out


PACKED = [  # (token, path suffix, body, extra headers): packed calls on syn-0 and syn-1
    (ALICE, "/forward", msgpack.packb({"names": ["syn-0", "syn-1"], "tensors": {"inputs": tensor((2, 2, 3, 3, 1))}}),
     {}),
    (ALICE, "/forward", msgpack.packb({"calls": [{"name": "syn-0", "tensors": {"inputs": X}},
                                                 {"name": "syn-1", "tensors": {"inputs": X}}]}), {}),
    (ALICE, "/evolve", msgpack.packb({"names": ["syn-0", "syn-1"], "tensors": {"pre": tensor((2, 2, 3, 3, 1)),
                                                                                "post": tensor((2, 2, 3, 3, 2))},
                                      "return": ["dWeights"]}), {"Idempotency-Key": "p1"}),
    (ALICE, "/evolve", msgpack.packb({"names": ["syn-0", "syn-1"], "tensors": {"pre": tensor((2, 2, 3, 3, 1)),
                                                                                "post": tensor((2, 2, 3, 3, 2))},
                                      "return": ["dWeights"]}), {"Idempotency-Key": "p1"}),  # replayed
    (ALICE, "/reset", msgpack.packb({"names": ["syn-0", "syn-1"], "tensors": {}}), {}),
    (ALICE, "/forward", msgpack.packb({"names": ["syn-0", "nope"], "tensors": {"inputs": tensor((2, 2, 3, 3, 1))}}),
     {}),  # 404
    (ALICE, "/forward", msgpack.packb({"names": ["syn-0"], "tensors": {"inputs": X}}), {"If-Match": '"2"'}),  # 422
    (ALICE, "/forward", b"\xc1", {}),  # 400
    (ALICE, "/forward?owner=root", msgpack.packb({"names": ["syn-0"], "tensors": {"inputs": tensor((1, 2, 3, 3, 1))}}),
     {}),  # 404: not an admin
    (ROOT, "/forward?owner=alice", msgpack.packb({"names": ["syn-0"], "tensors": {"inputs": tensor((1, 2, 3, 3, 1))}}),
     {}),
    (None, "/forward", msgpack.packb({"names": ["syn-0"], "tensors": {"inputs": tensor((1, 2, 3, 3, 1))}}), {}),  # 401
    (ALICE, "/forwrd", msgpack.packb({"names": ["syn-0"], "tensors": {"inputs": tensor((1, 2, 3, 3, 1))}}), {}),  # 422
]


@pytest.mark.parametrize(("names", "prefix", "requests", "statuses"), [
    (("syn",), "/v1/synapses", REQUESTS, [200, 200, 200, 422, 200, 200, 412, 200, 406, 400, 200, 404, 404, 200, 401,
                                          401, 422, 422]),
    (("syn-0", "syn-1"), "/v1/packed", PACKED, [200, 200, 200, 200, 200, 404, 422, 400, 404, 200, 401, 422]),
], ids=["operations", "packed"])
def test_both_entry_points_answer_alike(tmp_path, names, prefix, requests, statuses):
    tokens = f"alice:{ALICE},root:{ROOT}:admin"
    with LiveServer(state_dir=tmp_path / "lean", tokens=tokens) as lean:
        through_lean = run_all(lean.url, names, prefix, requests)
    with LiveServer(state_dir=tmp_path / "fastapi", tokens=tokens, operation_route=False) as documented:
        through_fastapi = run_all(documented.url, names, prefix, requests)
    assert [status for status, _, _ in through_lean] == statuses
    for i, (a, b) in enumerate(zip(through_lean, through_fastapi)):
        assert a == b, (i, requests[i][1], a, b)


def test_an_unknown_operation_goes_to_the_documented_route(live_server, client, unique_name):
    client.create(unique_name, kind=KIND, config=CONFIG)
    r = httpx.post(f"{live_server.url}/v1/synapses/{unique_name}/forwrd", json={})
    assert r.status_code == 422 and r.json()["title"] == "Unknown operation"
    r = httpx.post(f"{live_server.url}/v1/synapses/{unique_name}/snapshots", json={"snapshot": "s"})
    assert r.status_code == 201  # a POST route of the same shape is not mistaken for an operation


@pytest.mark.parametrize("operation_route", [True, False])
def test_operations_are_counted_and_labelled_alike(tmp_path, operation_route):
    from conftest import metric, metrics_of

    with LiveServer(state_dir=tmp_path, operation_route=operation_route) as server:
        httpx.post(f"{server.url}/v1/synapses", json={"name": "m", "kind": KIND, "config": CONFIG})
        for _ in range(3):
            httpx.post(f"{server.url}/v1/synapses/m/forward", content=msgpack.packb({"inputs": X}), headers=MP)
        for _ in range(2):
            httpx.post(f"{server.url}/v1/packed/forward", headers=MP,
                       content=msgpack.packb({"names": ["m"], "tensors": {"inputs": tensor((1, 2, 3, 3, 1))}}))
        samples = metrics_of(httpx.get(f"{server.url}/metrics").text)
    route = {"method": "POST", "route": "/v1/synapses/{name}/{operation}", "status": "200"}
    assert metric(samples, "synapse_requests_total", **route) == 3
    packed = {"method": "POST", "route": "/v1/packed/{operation}", "status": "200"}
    assert metric(samples, "synapse_requests_total", **packed) == 2
    assert metric(samples, "synapse_operations_total", operation="forward", status="200") == 5


def test_the_api_layer_never_imports_jax():
    """api/, app.py, metrics.py and backend.py reach instances only through the backend interface: a cluster
    front can serve the same API without JAX (the local backend is imported when it is made)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import synapse_serve.app, synapse_serve.api.operations, synapse_serve.api.synapses\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'optax')], 'jax imported'\n"
            "assert 'synapse_serve.local.registry' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
