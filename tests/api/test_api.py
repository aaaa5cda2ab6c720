"""The REST API through the real client against a real uvicorn server on loopback."""

from __future__ import annotations

import json
import threading

import httpx
import jax
import msgpack
import numpy as np
import pytest

from synapse_client import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    SynapseClient,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
)
from synapse_serve.kinds import deconv as dc
from synapse_serve.kinds import hebbian_deconv as hd

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [3, 3, 2, 4], "x_shape": [6, 6], "eta": 0.05, "stride": 1, "optim_type": "adam", "bias": True}


def rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- health, kinds, OpenAPI ---


def test_health_and_readiness(live_server):
    assert httpx.get(f"{live_server.url}/healthz").json() == {"status": "ok", "storage": "ok"}
    assert httpx.get(f"{live_server.url}/readyz").json() == {"status": "ready"}


def test_not_ready_until_warm(monkeypatch, tmp_path):
    import threading as _threading

    from conftest import LiveServer

    import synapse_serve.local.backend as backend_module

    release = _threading.Event()
    real_warm_up = backend_module.warm_up
    monkeypatch.setattr(backend_module, "warm_up", lambda: (release.wait(30), real_warm_up()))
    server = LiveServer(state_dir=tmp_path, warmup=True).start()
    try:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        r = httpx.get(f"{server.url}/readyz")
        assert r.status_code == 503 and r.json()["title"] == "Not ready" and "warming up" in r.json()["detail"]
        release.set()
        assert server.ready.wait(30)
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        release.set()
        server.__exit__()


def test_kinds_and_help(client):
    names = {k["name"] for k in client.kinds()}
    assert names == {"DeconvSynapse", "HebbianDeconvSynapse", "DenseSynapse", "HebbianSynapse"}
    help_ = client.kind_help(KIND)
    assert help_["hyperparameters"]["eta"]["default"] == 0.0
    assert "dWeights" in help_["compartments"]
    with pytest.raises(NotFoundError) as info:
        client.kind_help("Nope")
    assert "known kinds" in info.value.detail and info.value.request_id


def test_openapi_documents_every_route_with_msgpack(live_server):
    spec = httpx.get(f"{live_server.url}/openapi.json").json()
    paths = spec["paths"]
    for path in ("/healthz", "/readyz", "/v1/kinds", "/v1/kinds/{kind}", "/v1/synapses", "/v1/synapses/{name}",
                 "/v1/synapses/{name}/help", "/v1/synapses/{name}/{operation}",
                 "/v1/synapses/{name}/compartments/{compartment}"):
        assert path in paths, path
    create = paths["/v1/synapses"]["post"]
    assert set(create["requestBody"]["content"]) == {"application/msgpack", "application/json"}
    assert "application/problem+json" in create["responses"]["409"]["content"]


# --- lifecycle ---


def test_create_describe_list_delete(client, unique_name):
    syn = client.create(unique_name, kind=KIND, config=CONFIG, seed=7)
    description = syn.describe()
    assert description["kind"] == KIND and description["seed"] == 7
    assert description["config"]["filter_update"] == "vjp"  # the choice is visible (CPU)
    assert description["compartments"]["weights"] == {"shape": [3, 3, 2, 4], "dtype": "float32"}
    assert description["version"] == 1 and description["counters"] == {}
    assert description["device"]
    assert unique_name in {d["name"] for d in client.list()}
    assert client.get(unique_name).name == unique_name
    syn.delete()
    with pytest.raises(NotFoundError):
        syn.describe()
    with pytest.raises(NotFoundError):
        client.get(unique_name)


def test_create_with_explicit_init_tensors(client, unique_name):
    w = rand((3, 3, 2, 4))
    syn = client.create(unique_name, kind=KIND, config=CONFIG, init={"weights": w, "biases": np.arange(4.0)})
    np.testing.assert_array_equal(syn.weights, w)
    np.testing.assert_array_equal(syn.get("biases"), np.arange(4.0))


def test_duplicate_name_is_409(client, unique_name):
    client.create(unique_name, kind=KIND, config=CONFIG)
    with pytest.raises(ConflictError) as info:
        client.create(unique_name, kind=KIND, config=CONFIG)
    assert info.value.status_code == 409 and unique_name in info.value.detail


@pytest.mark.parametrize("name", ["", "a/b", "../etc", "x" * 129, "-lead", "sp ace", "semi;colon", 7])
def test_invalid_names_are_422(client, name):
    with pytest.raises(UnprocessableEntityError) as info:  # the server refuses them
        client.request("POST", "/v1/synapses", {"name": name, "kind": KIND, "config": CONFIG}, retry=False)
    assert "letters, digits" in info.value.detail
    with pytest.raises(ValueError, match="letters, digits"):  # and the client, before sending anything
        client.create(name, kind=KIND, config=CONFIG)


def test_invalid_config_is_422_naming_the_field(client, unique_name):
    with pytest.raises(UnprocessableEntityError) as info:
        client.create(unique_name, kind=KIND, config={**CONFIG, "stride": -1})
    assert "stride: -1 is not allowed" in info.value.detail
    with pytest.raises(NotFoundError, match="unknown kind"):
        client.create(unique_name, kind="../../os", config=CONFIG)
    with pytest.raises(NotFoundError):  # nothing was left behind
        client.get(unique_name)


# --- operations ---


def test_operations_round_trip(client, unique_name):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    x = rand((2, 6, 6, 2))
    y = syn.forward(x)
    assert y.shape == (2, 6, 6, 4) and y.dtype == np.float32
    np.testing.assert_array_equal(syn.forward(jax.numpy.asarray(x)), y)  # jax arrays are accepted
    result = syn.evolve(x, y, returns=("dWeights", "dBiases"))
    assert result["dWeights"].shape == (3, 3, 2, 4) and result["dBiases"].shape == (4,)
    assert syn.evolve(x, y) == {"version": result["version"] + 1}
    assert syn.backtransmit(y).shape == (2, 6, 6, 2)
    np.testing.assert_array_equal(syn.backtransmit(), syn.get("dInputs"))  # post defaults to the stored one
    syn.reset()
    assert not syn.get("inputs").any()
    assert syn.help()["hyperparameters"]["optim_type"]["value"] == "adam"
    assert syn.describe()["counters"] == {"forward": 2, "evolve": 2, "backtransmit": 2, "reset": 1}
    assert syn.get("opt_state/0/count") == 2


def test_non_learning_kind_has_no_evolve(client, unique_name):
    syn = client.create(unique_name, kind="DeconvSynapse", config={"shape": [2, 2, 1, 1], "x_shape": [3, 3]})
    assert syn.forward(np.ones((1, 3, 3, 1))).shape == (1, 3, 3, 1)
    with pytest.raises(UnprocessableEntityError, match="no operation 'evolve'"):
        syn.evolve(np.ones((1, 3, 3, 1)), np.ones((1, 3, 3, 1)))


def test_compartment_read_and_write(client, unique_name):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    version = syn.set("weights", np.full((3, 3, 2, 4), 0.5))
    assert version == syn.describe()["version"]
    np.testing.assert_array_equal(syn.weights, 0.5)
    with pytest.raises(UnprocessableEntityError, match=r"expected shape \(3, 3, 2, 4\), received \(3, 3, 2\)"):
        syn.set("weights", np.ones((3, 3, 2)))
    with pytest.raises(UnprocessableEntityError, match="unknown compartment 'filters'"):
        syn.get("filters")


def test_json_for_curl(live_server, unique_name):
    url = f"{live_server.url}/v1/synapses"
    r = httpx.post(url, json={"name": unique_name, "kind": KIND, "config": CONFIG})
    assert r.status_code == 201 and r.headers["content-type"] == "application/json"
    assert r.headers["location"] == f"/v1/synapses/{unique_name}"
    r = httpx.post(f"{url}/{unique_name}/forward", json={"inputs": np.ones((1, 6, 6, 2)).tolist()})
    assert r.status_code == 200
    outputs = r.json()["outputs"]
    assert outputs["dtype"] == "float32" and outputs["shape"] == [1, 6, 6, 4]
    assert np.asarray(outputs["values"]).shape == (1, 6, 6, 4)
    tensor = {"dtype": "float32", "shape": [1, 6, 6, 2], "values": [0.5] * 72}
    r = httpx.post(f"{url}/{unique_name}/forward", json={"inputs": tensor}, headers={"Accept": "application/msgpack"})
    assert r.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(r.content)["outputs"]["shape"] == [1, 6, 6, 4]  # a plain msgpack library reads it
    r = httpx.get(f"{url}/{unique_name}", headers={"Accept": "text/html"})
    assert r.status_code == 406 and r.headers["content-type"] == "application/problem+json"


def test_packed_calls_in_json_both_forms(live_server, unique_name):
    names = [f"{unique_name}-{i}" for i in range(2)]
    for name in names:
        assert httpx.post(f"{live_server.url}/v1/synapses", json={"name": name, "kind": KIND,
                                                                  "config": CONFIG}).status_code == 201
    x = np.arange(2 * 72, dtype=np.float32).reshape(2, 1, 6, 6, 2) / 144
    r = httpx.post(f"{live_server.url}/v1/packed/forward", json={"names": names, "tensors": {"inputs": x.tolist()}})
    assert r.status_code == 200, r.text
    stacked = r.json()
    assert stacked["names"] == names and stacked["versions"] == [2, 2]
    assert stacked["outputs"]["shape"] == [2, 1, 6, 6, 4]
    r = httpx.post(f"{live_server.url}/v1/packed/forward",
                   json={"calls": [{"name": n, "tensors": {"inputs": x[i].tolist()}} for i, n in enumerate(names)]})
    assert r.status_code == 200, r.text
    for i, result in enumerate(r.json()["results"]):  # the same inputs again: the same outputs, a new version
        assert result["version"] == 3
        assert np.array_equal(np.asarray(result["outputs"]["values"], np.float32),
                              np.asarray(stacked["outputs"]["values"], np.float32)[i])
    for body, fragment in (({"names": names}, "give calls"),
                           ({"calls": [], "names": names, "tensors": {}}, "give calls"),
                           ({"names": names, "tensors": {"inputs": x[:1].tolist()}}, "leading axis of 2")):
        r = httpx.post(f"{live_server.url}/v1/packed/forward", json=body)
        assert r.status_code in (400, 422) and fragment in r.json()["detail"], r.text
    assert [httpx.get(f"{live_server.url}/v1/synapses/{n}").json()["version"] for n in names] == [3, 3]


def test_plain_msgpack_library_reads_every_response(live_server, unique_name):
    headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    body = {"name": unique_name, "kind": KIND, "config": CONFIG}
    r = httpx.post(f"{live_server.url}/v1/synapses", content=msgpack.packb(body), headers=headers)
    assert msgpack.unpackb(r.content)["name"] == unique_name
    x = {"dtype": "float32", "shape": [1, 6, 6, 2], "data": np.ones(72, "<f4").tobytes()}
    r = httpx.post(f"{live_server.url}/v1/synapses/{unique_name}/forward", content=msgpack.packb({"inputs": x}),
                   headers=headers)
    out = msgpack.unpackb(r.content)["outputs"]
    assert len(out["data"]) == 4 * np.prod(out["shape"])
    r = httpx.get(f"{live_server.url}/v1/synapses/{unique_name}/compartments/weights", headers=headers)
    value = msgpack.unpackb(r.content)["value"]
    np.testing.assert_array_equal(np.frombuffer(value["data"], "<f4").reshape(value["shape"]).shape, (3, 3, 2, 4))


# --- errors and bad input leave state untouched ---


def _raw(live_server, path, content, content_type="application/msgpack"):
    return httpx.post(f"{live_server.url}{path}", content=content, headers={"Content-Type": content_type})


def test_every_error_status(client, live_server, unique_name):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    path = f"/v1/synapses/{unique_name}/forward"
    cases = {
        400: _raw(live_server, path, b"\xc1garbage"),
        415: _raw(live_server, path, b"x", "text/plain"),
        413: _raw(live_server, path, b"\x00" * (5 << 20)),
        404: httpx.get(f"{live_server.url}/v1/synapses/nope"),
        422: _raw(live_server, path, msgpack.packb({"inputs": {"dtype": "float32", "shape": [1, 2],
                                                              "data": b"\x00" * 8}})),
    }
    for status, response in cases.items():
        assert response.status_code == status, (status, response.text)
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert problem["status"] == status and problem["title"] and problem["detail"] and problem["type"]
        assert "Traceback" not in response.text
    with pytest.raises(BadRequestError):
        client.request("POST", path, {"inputs": 3}, retry=False)
    assert syn.describe()["version"] == 1


BAD_BODIES = [
    ("truncated msgpack", b"\x82\xa6inputs\x83\xa5dtype"),
    ("shape/bytes mismatch", msgpack.packb({"inputs": {"dtype": "float32", "shape": [1, 6, 6, 2], "data": b"\0" * 8}})),
    ("2^40 elements", msgpack.packb({"inputs": {"dtype": "float32", "shape": [1 << 20, 1 << 20], "data": b""}})),
    ("unknown dtype", msgpack.packb({"inputs": {"dtype": "object", "shape": [1], "data": b"\0"}})),
    ("negative dim", msgpack.packb({"inputs": {"dtype": "float32", "shape": [-1, 6, 6, 2], "data": b""}})),
    ("wrong shape", msgpack.packb({"inputs": {"dtype": "float32", "shape": [1, 6, 5, 2], "data": b"\0" * 240}})),
    ("int dtype", msgpack.packb({"inputs": {"dtype": "int32", "shape": [1, 6, 6, 2], "data": b"\0" * 288}})),
    ("unknown field", msgpack.packb({"inputs": [1.0], "bogus": 1})),
    ("not a map", msgpack.packb([1, 2, 3])),
    ("deep nesting", b"\x91" * 5000 + b"\xc0"),
    ("pickle payload", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94."),
]


@pytest.mark.parametrize(("what", "body"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_4xx_and_leaves_state_untouched(client, live_server, unique_name, what, body):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    syn.forward(rand((1, 6, 6, 2)))
    before_w, before_v = syn.weights, syn.describe()["version"]
    for op in ("forward", "evolve", "backtransmit"):
        response = _raw(live_server, f"/v1/synapses/{unique_name}/{op}", body)
        assert 400 <= response.status_code < 500, (what, op, response.status_code, response.text)
        assert response.json()["detail"]
    np.testing.assert_array_equal(syn.weights, before_w)
    assert syn.describe()["version"] == before_v
    assert httpx.get(f"{live_server.url}/healthz").status_code == 200


def test_wrong_evolve_shapes_leave_state_untouched(client, unique_name):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    before_w, before_v = syn.weights, syn.describe()["version"]
    with pytest.raises(UnprocessableEntityError, match=r"post: expected batch 2 \(as the arguments before it\), received 3"):
        syn.evolve(rand((2, 6, 6, 2)), rand((3, 6, 6, 4)))
    with pytest.raises(UnprocessableEntityError, match="needs the tensor 'post'"):
        syn.call("evolve", pre=rand((2, 6, 6, 2)))
    with pytest.raises(UnprocessableEntityError, match="cannot return 'nothing'"):
        syn.call("evolve", pre=rand((2, 6, 6, 2)), post=rand((2, 6, 6, 4)), returns=["nothing"])
    np.testing.assert_array_equal(syn.weights, before_w)
    assert syn.describe()["version"] == before_v
    assert syn.describe()["counters"] == {}


def test_unsupported_media_type_maps_to_its_client_error(live_server):
    with SynapseClient(live_server.url) as c:
        response = c._http.post("/v1/synapses", content=b"name=x", headers={"Content-Type": "text/csv"})
        assert response.status_code == 415
        with pytest.raises(UnsupportedMediaTypeError, match="text/csv"):
            c._decode(response)


def test_body_limit_is_checked_before_reading(client, unique_name):
    syn = client.create(unique_name, kind=KIND, config={**CONFIG, "x_shape": [256, 256]})
    with pytest.raises(PayloadTooLargeError, match="over the limit"):
        syn.forward(np.zeros((10, 256, 256, 2), np.float32))  # 5.2 MB > 4 MiB (Content-Length)


def test_body_limit_holds_for_chunked_bodies(live_server):
    def chunks():  # no Content-Length: the server counts while streaming and stops early
        for _ in range(80):
            yield b"\x00" * (64 << 10)

    r = httpx.post(f"{live_server.url}/v1/synapses", content=chunks(),
                   headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]


# --- experiment loop and concurrency ---


def _in_process(config: dict, seed: int, steps: list[tuple[np.ndarray, np.ndarray]]):
    cfg = hd.choose_filter_update(hd.parse_config(config), "cpu")
    state = hd.init(cfg, seed=seed)
    for x, post in steps:
        state = dc.forward(cfg, state, x)
        state = hd.evolve(cfg, state, x, post)
        state = hd.backtransmit(cfg, state, post)
    return np.asarray(state.weights), np.asarray(state.dInputs)


def test_experiment_loop_matches_the_engine_bit_for_bit(client, unique_name):
    config = {**CONFIG, "stride": 2, "optim_type": "sgd", "sign_value": -1.0}
    syn = client.create(unique_name, kind=KIND, config=config, seed=3)
    steps = [(rand((2, 6, 6, 2), i), rand((2, 12, 12, 4), 1000 + i)) for i in range(50)]
    for x, post in steps:
        syn.forward(x)
        syn.evolve(x, post)
        d_inputs = syn.backtransmit(post)
    weights, expected_d_inputs = _in_process(config, 3, steps)
    np.testing.assert_array_equal(syn.weights, weights)
    np.testing.assert_array_equal(d_inputs, expected_d_inputs)
    assert syn.describe()["counters"] == {"forward": 50, "evolve": 50, "backtransmit": 50}


def test_concurrent_evolves_on_one_instance_are_serialized(client, live_server, unique_name):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    x, post = rand((1, 6, 6, 2)), rand((1, 6, 6, 4))
    errors = []

    def worker():
        try:
            with SynapseClient(live_server.url) as c:
                handle = c.get(unique_name)
                for _ in range(50):
                    handle.evolve(x, post)
        except Exception as exc:  # collected: a failed thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    description = syn.describe()
    assert description["counters"] == {"evolve": 400} and description["version"] == 401


def test_parallel_instances_each_match_their_serial_run(live_server, unique_name):
    config = {**CONFIG, "optim_type": "sgd"}
    results, errors = {}, []

    def worker(i):
        try:
            steps = [(rand((1, 6, 6, 2), 10 * i + s), rand((1, 6, 6, 4), 500 + 10 * i + s)) for s in range(10)]
            with SynapseClient(live_server.url) as c:
                syn = c.create(f"{unique_name}-{i}", kind=KIND, config=config, seed=i)
                for x, post in steps:
                    syn.forward(x)
                    syn.evolve(x, post)
                    syn.backtransmit(post)
                results[i] = (syn.weights, steps)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, (weights, steps) in results.items():
        np.testing.assert_array_equal(weights, _in_process(config, i, steps)[0])


def test_problem_bodies_carry_request_id(live_server):
    r = httpx.get(f"{live_server.url}/v1/synapses/nope", headers={"X-Request-ID": "abc123"})
    assert r.headers["x-request-id"] == "abc123" and r.json()["request_id"] == "abc123"
    r = httpx.get(f"{live_server.url}/no/such/route")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert json.loads(r.text)["status"] == 404


def test_no_answer_may_be_sniffed_as_html(live_server):
    """Problem details echo what was sent (``unknown kind '<img src=x onerror=…>'``): every answer says nosniff,
    once (the page's own answers set it themselves)."""
    for method, path in (("GET", "/v1/kinds/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E"), ("GET", "/v1/kinds"),
                         ("GET", "/docs"), ("GET", "/ui"), ("POST", "/v1/synapses/nope/forward")):
        r = httpx.request(method, f"{live_server.url}{path}")
        assert r.headers.get_list("x-content-type-options") == ["nosniff"], (method, path, r.status_code)


BAD_CREATES = [
    ("negative stride", {"config": {**CONFIG, "stride": -1}}, 422, "stride: -1"),
    ("kernel larger than allowed", {"config": {**CONFIG, "shape": [65, 3, 2, 4]}}, 422, "between 1 and 64"),
    ("name with path characters", {"name": "../../etc/passwd"}, 422, "letters, digits"),
    ("name with a slash", {"name": "a/b"}, 422, "letters, digits"),
    ("unknown kind", {"kind": "__import__('os')"}, 404, "unknown kind"),
    ("unknown top-level field", {"exec": "rm -rf /"}, 422, "unknown exec"),
    ("config not a map", {"config": [1, 2]}, 422, "expected an object"),
    ("seed not an int", {"seed": "zero"}, 422, "seed: expected an integer"),
    ("huge x_shape", {"config": {**CONFIG, "x_shape": [1 << 20, 1 << 20]}}, 422, "x_shape[0]"),
]


@pytest.mark.parametrize(("what", "change", "status", "fragment"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES])
def test_bad_creates_are_4xx(live_server, unique_name, what, change, status, fragment):
    body = {"name": unique_name, "kind": KIND, "config": CONFIG, **change}
    for content, media in ((json.dumps(body).encode(), "application/json"), (msgpack.packb(body), "application/msgpack")):
        r = httpx.post(f"{live_server.url}/v1/synapses", content=content, headers={"Content-Type": media})
        assert r.status_code == status and fragment in r.json()["detail"], (what, media, r.text)
    assert httpx.get(f"{live_server.url}/healthz").status_code == 200


def test_json_sent_as_msgpack_is_400(live_server):
    r = httpx.post(f"{live_server.url}/v1/synapses", content=b'{"name": "x"}',
                   headers={"Content-Type": "application/msgpack"})
    assert r.status_code == 400


@pytest.mark.parametrize("operation", ["forward", "evolve", "step", "sequence"])
def test_nan_and_inf_inputs_are_a_422_naming_the_tensor_and_touch_nothing(client, unique_name, operation):
    """Refused (docs/security.md): an evolve on a NaN would make every weight NaN, the learned state lost. ngclearn
    propagates them; finite inputs give its numbers as before."""
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    x = np.ones((1, 6, 6, 2), np.float32)
    y = syn.forward(x)
    before = syn.describe()["version"], syn.get("weights")
    bad = x.copy()
    bad[0, 0, 0, 0], bad[0, 1, 1, 1] = np.nan, np.inf
    with pytest.raises(UnprocessableEntityError, match=r"values must be finite \(no NaN or Inf\); 2 of (72|144) are not"):
        if operation == "forward":
            syn.forward(bad)
        elif operation == "evolve":
            syn.evolve(bad, y)
        elif operation == "step":
            syn.step(bad, y)
        else:
            syn.forward(np.stack([x, bad]))
    assert (syn.describe()["version"], syn.describe()["counters"]) == (before[0], {"forward": 1})
    np.testing.assert_array_equal(syn.get("weights"), before[1])
    with pytest.raises(UnprocessableEntityError, match="post: values must be finite"):  # learned from twice: as sent
        syn.evolve(x, np.full_like(y, np.inf))
    assert syn.evolve(x, y)["version"] == before[0] + 1  # the instance goes on
