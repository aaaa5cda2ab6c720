"""Every limit holds on every route: REST (msgpack and JSON), the session stream and the in-process mode.

Each case was a way around a limit that another route enforced: a sequence whose answer grows
with its steps while its request does not, a config whose batch_size is over max_batch, an
in-process tensor over max_tensor_elements, a reference inside a packed call answered
differently by JSON bodies and in-process. Each is refused with the same 4xx everywhere, and
nothing changes.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from synapse_client import BadRequestError, Ref, SynapseClient, UnprocessableEntityError
from synapse_client._codec import WireError, packb, unpackb

from conftest import LiveServer

SMALL = {"max_answer_bytes": 64 << 10, "max_batch": 64, "max_tensor_elements": 4096}


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    with LiveServer(state_dir=tmp_path_factory.mktemp("state"), **SMALL) as server:
        yield server


def clients(server: LiveServer, tmp_path) -> dict[str, SynapseClient]:
    return {"rest": SynapseClient(server.url), "local": SynapseClient(f"local:{tmp_path / 'local'}", local_settings=SMALL)}


@pytest.mark.parametrize("transport", ["rest", "stream", "local"])
def test_a_sequence_whose_answer_would_be_over_max_answer_bytes_is_refused_before_it_runs(limited, tmp_path,
                                                                                        transport, unique_name):
    by_transport = clients(limited, tmp_path)
    client = by_transport["local" if transport == "local" else "rest"]
    try:
        client.create(unique_name, kind="HebbianSynapse", config={"shape": [64, 64]})  # 16 KiB of weights
        x = np.ones((32, 1, 64), np.float32)  # 32 steps of batch 1: 8 KiB sent, within max_batch
        with client.session() if transport == "stream" else _same(client) as target:
            syn = target.get(unique_name)
            with pytest.raises(UnprocessableEntityError, match="over the server's max_answer_bytes") as caught:
                syn.call("forward", inputs=x, returns=["weights"])  # the weights after each step: 32 x 16 KiB
            assert caught.value.problem["answer_bytes"] == 32 * 64 * 64 * 4
            assert syn.describe()["version"] == 1  # nothing ran
            kept = syn.call("forward", inputs=x, returns=["weights"], sequence={"last": True})  # once: within it
            assert kept["weights"].shape == (64, 64)
            every = syn.call("forward", inputs=x, returns=["outputs"])  # 32 x 256 bytes
            assert every["outputs"].shape == (32, 1, 64)
    finally:
        for c in by_transport.values():
            c.close()


class _same:
    def __init__(self, client: SynapseClient) -> None:
        self.client = client

    def __enter__(self) -> SynapseClient:
        return self.client

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_sequence_answer_counts_against_the_owner_quota(tmp_path):
    with SynapseClient(f"local:{tmp_path}", local_settings={"max_state_bytes_per_owner": 200_000,
                                                            "max_batch": 4096}) as client:
        syn = client.create("w", kind="HebbianSynapse", config={"shape": [64, 64]})
        with pytest.raises(UnprocessableEntityError, match="max_state_bytes_per_owner of 200000"):
            syn.call("forward", inputs=np.ones((64, 1, 64), np.float32), returns=["weights"])
        assert syn.describe()["version"] == 1


@pytest.mark.parametrize("transport", ["rest", "local"])
def test_a_batch_size_over_max_batch_is_refused_at_create(limited, tmp_path, transport, unique_name):
    by_transport = clients(limited, tmp_path)
    try:
        with pytest.raises(UnprocessableEntityError, match="batch_size 1000 is over the server's max_batch of 64"):
            by_transport[transport].create(unique_name, kind="HebbianSynapse",
                                           config={"shape": [3, 2], "batch_size": 1000})
        assert unique_name not in [s["name"] for s in by_transport[transport].list()]
        syn = by_transport[transport].create(unique_name, kind="HebbianSynapse",
                                             config={"shape": [3, 2], "batch_size": 64})
        assert syn.describe()["compartments"]["inputs"]["shape"] == [64, 3]
    finally:
        for c in by_transport.values():
            c.close()


def test_an_import_with_a_batch_size_over_max_batch_is_refused(limited, tmp_path, unique_name):
    with SynapseClient(f"local:{tmp_path / 'big'}") as roomy, \
            SynapseClient(limited.url) as client:
        roomy.create("wide", kind="HebbianSynapse", config={"shape": [3, 2], "batch_size": 1000})
        path = roomy.get("wide").export(tmp_path / "wide.synapse")
        with pytest.raises(UnprocessableEntityError, match="over the server's max_batch of 64"):
            client.import_(path, name=unique_name)
        assert unique_name not in [s["name"] for s in client.list()]


@pytest.mark.parametrize("transport", ["rest", "stream", "local"])
def test_a_tensor_over_max_tensor_elements_is_a_400_on_every_route(limited, tmp_path, transport, unique_name):
    by_transport = clients(limited, tmp_path)
    client = by_transport["local" if transport == "local" else "rest"]
    try:
        client.create(unique_name, kind="HebbianSynapse", config={"shape": [64, 2]})
        x = np.ones((65, 64), np.float32)  # 4160 elements, over 4096; a batch of 65 is over max_batch too
        with client.session() if transport == "stream" else _same(client) as target:
            syn = target.get(unique_name)
            with pytest.raises(BadRequestError, match="declares 4160 elements; the limit is 4096"):
                syn.forward(x)
            with pytest.raises(BadRequestError, match="declares 4160 elements"):
                target.call_many("forward", {unique_name: {"inputs": x}})
            assert syn.describe()["version"] == 1
            assert syn.forward(x[:2]).shape == (2, 2)  # the stream goes on
    finally:
        for c in by_transport.values():
            c.close()


@pytest.mark.parametrize("transport", ["json", "msgpack", "local"])
def test_a_reference_in_a_packed_call_is_the_same_422_on_every_route(limited, tmp_path, transport, unique_name):
    with SynapseClient(f"local:{tmp_path}") as local, \
            SynapseClient(limited.url) as client:
        target = local if transport == "local" else client
        target.create(unique_name, kind="HebbianSynapse", config={"shape": [3, 2]})
        expected = f"calls[0] ('{unique_name}'): a packed call takes tensors, not references"
        if transport == "json":
            answer = httpx.post(f"{limited.url}/v1/packed/forward",
                                json={"calls": [{"name": unique_name, "tensors": {"inputs": {"ref": "inputs"}}}]})
            assert answer.status_code == 422 and expected in answer.json()["detail"]
        else:
            with pytest.raises(UnprocessableEntityError, match=expected.replace("(", r"\(").replace(")", r"\)")
                               .replace("[", r"\[")):
                target.call_many("forward", {unique_name: {"inputs": Ref("inputs")}})
        assert target.get(unique_name).describe()["version"] == 1


def test_references_in_a_packed_call_are_refused_before_their_instances_are_waited_for(limited, monkeypatch,
                                                                                     unique_name):
    """A red-team run: each reference of a packed call's calls named an instance the call then waited its turn for,
    one by one on the event loop, before the registry refused references at all (1,000 calls of 16 each held
    another owner ~0.2 s). They are refused as the calls are read."""
    backend = limited.app.state.server.backend
    reached = []
    monkeypatch.setattr(backend, "call_many", lambda *args, **kwargs: reached.append(args))
    with SynapseClient(limited.url) as client:
        client.create(unique_name, kind="HebbianSynapse", config={"shape": [3, 2]})
        with pytest.raises(UnprocessableEntityError, match="a packed call takes tensors, not references"):
            client.call_many("forward", {unique_name: {"inputs": Ref("outputs", instance="elsewhere")}})
    assert reached == []


@pytest.mark.parametrize("transport", ["rest", "stream"])
def test_if_match_on_a_packed_call_is_the_same_422_on_every_route(limited, transport, unique_name):
    with SynapseClient(limited.url) as client:
        client.create(unique_name, kind="HebbianSynapse", config={"shape": [3, 2]})
        body = {"calls": [{"name": unique_name, "tensors": {"inputs": np.ones((1, 3), np.float32)}}]}
        if transport == "rest":
            with pytest.raises(UnprocessableEntityError, match="If-Match"):
                client.request("POST", "/v1/packed/forward", body, retry=False, headers={"If-Match": '"1"'})
        else:
            with client.session() as session, pytest.raises(UnprocessableEntityError, match="if_match"):
                session.request("POST", "/v1/packed/forward", body, retry=False, headers={"If-Match": '"1"'})
        assert client.get(unique_name).describe()["version"] == 1


@pytest.mark.parametrize("transport", ["rest", "stream", "local"])
def test_the_stacked_form_takes_operations_without_tensors(limited, tmp_path, transport):
    by_transport = clients(limited, tmp_path)
    client = by_transport["local" if transport == "local" else "rest"]
    names = [f"nothing-sent-{transport}-{i}" for i in range(3)]
    try:
        for name in names:
            client.create(name, kind="HebbianSynapse", config={"shape": [3, 2]})
        with client.session() if transport == "stream" else _same(client) as target:
            target.call_stacked("forward", names, {"inputs": np.ones((3, 2, 3), np.float32)})
            back = target.call_stacked("backtransmit", names, {})  # reads each one's post compartment
            assert back["dInputs"].shape == (3, 1, 3)  # post as created: batch_size 1
            reset = target.call_stacked("reset", names, {}, returns=["inputs"])
            assert reset["versions"] == [4, 4, 4] and not reset["inputs"].any()
    finally:
        for c in by_transport.values():
            c.close()


@pytest.mark.parametrize("owner", ["no spaces allowed", "x" * 200, "x" * 65, 5])
def test_listing_a_malformed_owner_is_a_422_as_a_call_on_one_is(limited, owner):
    # the client refuses such names itself: raw requests, as the admin (auth off on loopback)
    if isinstance(owner, str):  # a query is text: 5 is the owner "5" there
        rest = httpx.get(f"{limited.url}/v1/synapses", params={"owner": owner})
        assert rest.status_code == 422 and "invalid owner" in rest.json()["detail"]
    with connect(limited.url.replace("http://", "ws://") + "/v1/session") as ws:
        for frame in ({"id": 1, "op": "list", "owner": owner}, {"id": 2, "op": "describe", "name": "x", "owner": owner}):
            ws.send(packb(frame))
            answer = unpackb(ws.recv(timeout=30))
            assert answer["status"] == 422 and "invalid owner" in answer["problem"]["detail"], answer


def test_an_owner_is_held_to_the_rule_its_files_and_tokens_follow(limited):
    """An admin naming an owner of 65-128 characters (an instance name's rule, not an owner's) got a 201, then lost
    the instance at restart: its file's owner could not be read back. Now it is refused before anything is made."""
    for owner, status in (("o" * 65, 422), ("o" * 64, 201)):
        body = {"name": "long-owner", "kind": "HebbianSynapse", "config": {"shape": [2, 2]}}
        made = httpx.post(f"{limited.url}/v1/synapses", params={"owner": owner}, json=body)
        assert made.status_code == status, made.text
        if status == 422:
            assert "invalid owner" in made.json()["detail"] and "64 characters" in made.json()["detail"]
            assert httpx.get(f"{limited.url}/v1/synapses", params={"owner": "o" * 64}).json()["synapses"] == []
    assert httpx.delete(f"{limited.url}/v1/synapses/long-owner", params={"owner": "o" * 64}).status_code == 204


def test_a_body_of_many_small_values_is_a_413_on_every_route_before_any_is_built(tmp_path):
    """A red-team run (2026-11-30): a 4 MiB msgpack body of empty lists cost the server 297 MB and held its event
    loop 2 s (each value a Python object of 30-70 bytes from one byte sent); a JSON body of them 135 MB; a session
    frame the same, arriving deflated as 4 KB. Every route counts the values first and refuses past
    ``max_body_values``, naming it; a body within it is served."""
    from synapse_client import PayloadTooLargeError

    limit = 2048
    many = [[] for _ in range(100_000)]  # 100,001 values in ~100 KB of msgpack
    config = {"shape": [3, 2], "eta": 0.1}
    with LiveServer(state_dir=tmp_path / "state", max_body_values=limit, max_json_body_bytes=1 << 20) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("target", kind="HebbianSynapse", config=config)
        msgpack_headers = {"Content-Type": "application/msgpack", "Accept": "application/json"}
        for path, body in (("/v1/synapses/target/forward", {"inputs": many}),
                           ("/v1/packed/forward", {"calls": [{"name": "target", "tensors": {}}] * 5000}),
                           ("/v1/synapses", {"name": "other", "kind": "HebbianSynapse", "config": {**config, "x": many}})):
            answer = httpx.post(server.url + path, content=packb(body), headers=msgpack_headers)
            assert answer.status_code == 413 and answer.json()["limit"] == "max_body_values", (path, answer.text)
            answer = httpx.post(server.url + path, json=body)  # JSON: its arrays and objects
            assert answer.status_code == 413 and "max_body_values" in answer.json()["detail"], (path, answer.text)
        with connect(server.url.replace("http://", "ws://") + "/v1/session", compression="deflate") as ws:
            assert "Sec-WebSocket-Extensions" not in ws.response.headers  # no deflated frames: sizes are as sent
            ws.send(packb({"id": 7, "op": "call", "name": "target", "operation": "forward", "tensors": {"inputs": many}}))
            answer = unpackb(ws.recv(timeout=30))
            assert answer["id"] == 7 and answer["status"] == 413, answer
            assert answer["problem"]["limit"] == "max_body_values"
            ws.send(packb({"id": 8, "op": "describe", "name": "target"}))
            assert unpackb(ws.recv(timeout=30))["status"] == 200  # the stream goes on
        with pytest.raises(PayloadTooLargeError, match="max_body_values"):
            client.create("other", kind="HebbianSynapse", config={**config, "x": many})
        flat = httpx.post(server.url + "/v1/synapses/target/forward",  # within the limit: a tensor sent flat
                          json={"inputs": {"dtype": "float32", "shape": [4000, 3], "values": [0.5] * 12000}})
        assert flat.status_code == 200, flat.text
        # JSON's reading holds the interpreter throughout: its bodies have a byte limit of their own
        wide = httpx.post(server.url + "/v1/synapses/target/forward",
                          json={"inputs": {"dtype": "float32", "shape": [60_000, 3], "values": [0.123456] * 180_000}})
        assert wide.status_code == 413 and wide.json()["limit"] == "max_json_body_bytes", wide.text[:300]
        assert syn.forward(np.full((60_000, 3), 0.5, np.float32)).shape == (60_000, 2)  # in msgpack: served
        assert syn.describe()["version"] == 3 and [s["name"] for s in client.list()] == ["target"]
    with SynapseClient(f"local:{tmp_path / 'local'}", local_settings={"max_body_values": limit}) as local:
        with pytest.raises(PayloadTooLargeError, match="max_body_values"):
            local.create("other", kind="HebbianSynapse", config={**config, "x": many})
        assert local.list() == []


def test_counting_values_builds_none_and_counts_exactly():
    """The count is exact (each map, array, key and scalar one value; bins, strings and extensions stepped over),
    and refusing a body of four million empty lists costs no memory to speak of."""
    import random
    import tracemalloc

    import msgpack

    from synapse_client._codec import TooManyValues, check_values

    def values_in(obj) -> int:
        if isinstance(obj, dict):
            return 1 + sum(1 + values_in(v) for v in obj.values())
        if isinstance(obj, list):
            return 1 + sum(values_in(v) for v in obj)
        return 1

    rng = random.Random(0)

    def body(depth: int = 0):
        pick = rng.random()
        if depth < 3 and pick < 0.2:
            return {f"k{i}" * rng.randint(0, 40): body(depth + 1) for i in range(rng.randint(0, 20))}
        if depth < 3 and pick < 0.4:
            return [body(depth + 1) for _ in range(rng.randint(0, 30))]
        if pick < 0.45:
            return msgpack.ExtType(1, b"abcd" * rng.choice([0, 1, 2, 4, 8, 40]))
        return rng.choice([1, -3, 300, 70000, 2**40, -2**40, 1.5, None, True, "x" * rng.randint(0, 300),
                           b"y" * rng.randint(0, 70000), 2.5])

    for _ in range(200):
        obj = body()
        data, count = msgpack.packb(obj, use_bin_type=True), values_in(obj)
        check_values(data, count)
        if len(data) > count - 1 >= 0:
            with pytest.raises(TooManyValues):
                check_values(data, count - 1)
    flood = msgpack.packb({"inputs": [[]] * 4_000_000})
    tracemalloc.start()
    try:
        with pytest.raises(TooManyValues):
            unpackb(flood, max_values=1 << 19)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak / 1e6:.1f} MB to refuse a 4 MB body"


def test_a_body_of_many_different_keys_is_refused_before_the_decoder_interns_them(tmp_path):
    """A red-team run (2026-11-30): msgpack's C reader interns every map key, and on CPython 3.12 an interned string
    is never freed: each body of distinct keys kept ~90 bytes a key for good, refused or not (20 bodies of 100,000
    keys: +177 MB). A body names its fields and tensors: more than 512 different keys is a 413 before decoding."""
    import msgpack

    from synapse_client._codec import MAX_DISTINCT_KEYS, TooManyValues, pack_held, unpack_held

    def body(keys: int, salt: str) -> bytes:
        return msgpack.packb({"inputs": {f"{salt}-{i:06d}": 0 for i in range(keys)}})

    with pytest.raises(TooManyValues, match="different keys"):
        unpackb(body(MAX_DISTINCT_KEYS + 1, "a"), max_values=1 << 16)
    packed, held = pack_held({"config": {f"b-{i:06d}": 0 for i in range(MAX_DISTINCT_KEYS + 1)}})
    with pytest.raises(TooManyValues, match="different keys"):
        unpack_held(packed, held, max_values=1 << 16)  # the in-process mode's frames
    assert len(unpackb(body(MAX_DISTINCT_KEYS - 2, "c"), max_values=1 << 16)["inputs"]) == MAX_DISTINCT_KEYS - 2
    with LiveServer(state_dir=tmp_path) as server, SynapseClient(server.url) as client:
        syn = client.create("target", kind="HebbianSynapse", config={"shape": [3, 2]})
        for salt in ("d", "e", "f"):
            answer = httpx.post(server.url + "/v1/synapses/target/forward", content=body(5000, salt),
                                headers={"Content-Type": "application/msgpack", "Accept": "application/json"})
            assert answer.status_code == 413 and "different keys" in answer.json()["detail"], answer.text
        assert syn.describe()["version"] == 1


def test_bodies_of_new_keys_one_after_another_do_not_grow_the_process_for_good(monkeypatch):
    """A red-team run (2026-12-01): each frame held at most 512 different keys, but 2,000 frames of new ones took
    the server from 340 to 491 MB for good (msgpack's C reader interns every key, and interned strings live as
    long as the process on CPython 3.12). The C reader now interns only a bounded vocabulary; a body with keys
    past it is read by the reader written here, which interns nothing, and decodes to the same values."""
    import msgpack

    from synapse_client import _codec

    monkeypatch.setattr(_codec, "_INTERNABLE", set(_codec._INTERNABLE))
    monkeypatch.setattr(_codec, "MAX_INTERNED_KEYS", len(_codec._INTERNABLE) + 10)

    def twice(keys: list[str]) -> tuple[dict, dict]:
        body = msgpack.packb({"inputs": {key: [1.5, {"inner": key}] for key in keys}, "id": 7})
        return unpackb(body, max_values=1 << 16), unpackb(body, max_values=1 << 16)

    first, again = twice([f"known-{i}" for i in range(5)])  # within the vocabulary's room: interned, once
    assert first == again and all(a is b for a, b in zip(first["inputs"], again["inputs"], strict=True))
    for salt in range(3):
        keys = [f"new-{salt}-{i}" for i in range(20)]
        first, again = twice(keys)
        assert first == again == {"inputs": {key: [1.5, {"inner": key}] for key in keys}, "id": 7}
        assert not any(a is b for a, b in zip(first["inputs"], again["inputs"], strict=True))  # never interned
    assert len(_codec._INTERNABLE) <= _codec.MAX_INTERNED_KEYS
    with pytest.raises(WireError, match="a map key is a int"):
        unpackb(msgpack.packb({1: 2, "fresh-key": 3}, strict_types=False), max_values=1 << 16)
    read = []  # a key that is no string is refused before either reader reads the body (a red-team run: one integer
    monkeypatch.setattr(_codec._InPlaceReader, "read_all", lambda self: read.append(1))  # key forced the slow one)
    with pytest.raises(WireError, match="a map key is a int"):
        unpackb(msgpack.packb({"values": [0] * 60_000, 5: 1}), max_values=1 << 16)
    assert read == []


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("transport", ["json", "rest", "stream", "local"])
def test_a_packed_call_naming_more_than_an_owner_holds_is_refused_before_any_name_is_read(tmp_path, transport,
                                                                                        stacked):
    """A red-team frame of 65,000 names held the event loop 0.8 s (each name checked, then waiting its turn on the
    loop) before the registry refused more than the server holds. A pack names only the caller's instances: more
    than one owner may hold is refused at once, the same 422 on every route."""
    quota = {"max_instances_per_owner": 3}
    names = ["p0", "p1", "p2", "p3"]
    x = np.ones((1, 3), np.float32)
    body = {"names": names, "tensors": {"inputs": np.ones((4, 1, 3), np.float32)}} if stacked else \
        {"calls": [{"name": name, "tensors": {"inputs": x}} for name in names]}
    field = "names" if stacked else "calls"
    expected = f"{field}: 4 instances, more than the 3 one owner can hold"
    with LiveServer(state_dir=tmp_path / "state", **quota) as server, \
            SynapseClient(server.url) as remote, SynapseClient(f"local:{tmp_path / 'local'}",
                                                                 local_settings=quota) as local:
        client = local if transport == "local" else remote
        for name in names[:3]:
            client.create(name, kind="HebbianSynapse", config={"shape": [3, 2]})
        if transport == "json":
            answer = httpx.post(f"{server.url}/v1/packed/forward", json={
                **body, **({"tensors": {"inputs": body["tensors"]["inputs"].tolist()}} if stacked else {
                    "calls": [{"name": n, "tensors": {"inputs": x.tolist()}} for n in names]})})
            assert answer.status_code == 422 and expected in answer.json()["detail"], answer.text
        elif transport == "stream":
            with remote.session() as session, pytest.raises(UnprocessableEntityError, match=expected):
                session.request("POST", "/v1/packed/forward", body, retry=False)
        else:
            with pytest.raises(UnprocessableEntityError, match=expected):
                client.request("POST", "/v1/packed/forward", body, retry=False)
        assert [client.get(name).describe()["version"] for name in names[:3]] == [1, 1, 1]


@pytest.mark.parametrize("route", ["json", "msgpack", "stream", "local", "packed", "stacked"])
def test_a_map_of_more_tensors_than_an_operation_takes_is_refused_before_any_is_read(limited, tmp_path, route,
                                                                                 unique_name):
    """A red-team JSON body of 349,525 ``null`` tensors went through several loops over them on the event loop
    (~1 s; the planner then echoed every unknown name). An operation takes a few tensors: a map of more than 16 is
    refused at once, the same 422 on every route, and an unknown name is echoed at most eight at a time."""
    nulls = {f"t{i:03d}": None for i in range(40)}  # what the red team sent, in JSON
    extra = {f"t{i:03d}": np.zeros(1, np.float32) for i in range(40)}  # a client sends no None tensor
    expected = "tensors; an operation takes at most 16"
    with SynapseClient(f"local:{tmp_path}", local_settings=SMALL) as local, SynapseClient(limited.url) as client:
        target = local if route == "local" else client
        target.create(unique_name, kind="HebbianSynapse", config={"shape": [3, 2]})
        x = np.ones((1, 3), np.float32)
        if route == "json":
            answer = httpx.post(f"{limited.url}/v1/synapses/{unique_name}/forward",
                                json={"inputs": x.tolist(), **nulls})
            assert answer.status_code == 422 and f"body: 41 {expected}" in answer.json()["detail"], answer.text
        elif route in ("msgpack", "local"):
            with pytest.raises(UnprocessableEntityError, match=f"(body|tensors): 41 {expected}"):  # local: a frame
                target.request("POST", f"/v1/synapses/{unique_name}/forward", {"inputs": x, **extra}, retry=False)
        elif route == "stream":
            with client.session() as session, pytest.raises(UnprocessableEntityError, match=f"tensors: 41 {expected}"):
                session.get(unique_name).call("forward", inputs=x, **extra)
        else:
            body = {"names": [unique_name], "tensors": {"inputs": x[None], **extra}} if route == "stacked" else \
                {"calls": [{"name": unique_name, "tensors": {"inputs": x, **extra}}]}
            with pytest.raises(UnprocessableEntityError, match=f"tensors: 41 {expected}"):
                client.request("POST", "/v1/packed/forward", body, retry=False)
        few = {f"u{i}": x for i in range(12)}  # within the bound: the planner names at most eight of them
        with pytest.raises(UnprocessableEntityError, match=r"unknown: u0, u1, .*, …") as caught:
            target.get(unique_name).call("forward", inputs=x, **few)
        assert caught.value.problem["detail"].count(", u") <= 8
        assert target.get(unique_name).describe()["version"] == 1


@pytest.mark.parametrize("route", ["json", "stream", "packed-json"])
def test_a_return_list_longer_than_any_instance_has_compartments_is_refused_before_it_is_read(limited, route,
                                                                                            unique_name):
    """A JSON list of strings is one container at any length, so the values bound does not bound it: a body's
    ``return`` (and a JSON packed call's list of calls) is refused on its length before any item is looked at."""
    with SynapseClient(limited.url) as client:
        client.create(unique_name, kind="HebbianSynapse", config={"shape": [3, 2]})
        x = np.ones((1, 3), np.float32)
        asked = ["outputs"] * 65
        if route == "json":
            answer = httpx.post(f"{limited.url}/v1/synapses/{unique_name}/forward",
                                json={"inputs": x.tolist(), "return": asked})
            assert answer.status_code == 422 and "return: 65 names" in answer.json()["detail"], answer.text
        elif route == "stream":
            with client.session() as session, pytest.raises(UnprocessableEntityError, match="return: 65 names"):
                session.get(unique_name).call("forward", inputs=x, returns=asked)
        else:
            calls = [{"name": f"{unique_name}-{i}", "tensors": {"inputs": x.tolist()}} for i in range(1000)]
            calls.append({"name": "last", "tensors": {"inputs": "no tensor"}})  # a 400 if the calls were read first
            answer = httpx.post(f"{limited.url}/v1/packed/forward", json={"calls": calls})
            assert answer.status_code == 422 and "calls: 1001 instances" in answer.json()["detail"], answer.text
        assert client.get(unique_name).describe()["version"] == 1
        assert client.get(unique_name).call("forward", inputs=x, returns=["outputs"] * 3)["outputs"].shape == (1, 2)


def test_a_json_body_of_many_unknown_fields_names_a_few_of_them(limited):
    """JSON counts no object keys towards the values bound: a create body of 100,000 unknown fields had them all
    sorted and joined into its problem on the event loop. A few are named, whatever the count."""
    body = {"name": "many-fields", "kind": "HebbianSynapse", "config": {"shape": [3, 2]},
            **{f"field{i:06d}": 0 for i in range(100_000)}}
    answer = httpx.post(f"{limited.url}/v1/synapses", json=body, timeout=60)
    detail = answer.json()["detail"]
    assert answer.status_code == 422 and "unknown field000000, field000001" in detail and ", …" in detail, detail
    assert len(detail) < 1000
    assert httpx.get(f"{limited.url}/v1/synapses/many-fields").status_code == 404
