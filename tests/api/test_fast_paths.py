"""The fused step operation and compartment references, through the real client and server."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from synapse_client import NotFoundError, Ref, SynapseClient, UnprocessableEntityError

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [3, 3, 2, 4], "x_shape": [6, 6], "stride": 2, "eta": 0.05, "optim_type": "adam", "bias": True,
          "w_decay": 0.01, "w_bound": 2.0}


def rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def state_of(syn):
    return {name: syn.get(name) for name in syn.describe()["compartments"]}


def assert_same_state(a, b):
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


def test_step_equals_forward_evolve_backtransmit(client, unique_name):
    fused = client.create(unique_name + "-f", kind=KIND, config=CONFIG, seed=3)
    split = client.create(unique_name + "-s", kind=KIND, config=CONFIG, seed=3)
    for i in range(4):
        x, post = rand((2, 6, 6, 2), i), rand((2, 12, 12, 4), 100 + i)
        answer = fused.step(x, post)
        outputs = split.forward(x)
        split.evolve(x, post)
        d_inputs = split.backtransmit(post)
        np.testing.assert_array_equal(answer["outputs"], outputs)
        np.testing.assert_array_equal(answer["dInputs"], d_inputs)
    assert_same_state(fused, split)
    assert fused.describe()["counters"] == {"step": 4}
    assert set(fused.step(x, post, returns=["dWeights"])) == {"version", "dWeights"}


def test_references_replace_sending_the_same_tensors(client, unique_name):
    by_ref = client.create(unique_name + "-r", kind=KIND, config=CONFIG, seed=1)
    by_value = client.create(unique_name + "-v", kind=KIND, config=CONFIG, seed=1)
    x, target = rand((3, 6, 6, 2), 7), rand((3, 12, 12, 4), 8)
    for syn in (by_ref, by_value):
        syn.forward(x)
    by_ref.evolve(Ref("inputs"), target)
    by_value.evolve(x, target)
    # post = the stored outputs of the last forward (taken when the call starts)
    np.testing.assert_array_equal(by_ref.backtransmit(Ref("outputs")), by_value.backtransmit(by_value.get("outputs")))
    by_ref.step(Ref("inputs"), Ref("post"))
    by_value.step(x, by_value.get("post"))
    assert_same_state(by_ref, by_value)


def test_reference_to_another_instance_chains_synapses_on_the_server(client, unique_name):
    first = client.create(unique_name + "-a", kind=KIND, config={**CONFIG, "shape": [3, 3, 2, 2]}, seed=1)
    # the second's inputs are shaped like the first's outputs: (12, 12, 2)
    second = client.create(unique_name + "-b", kind=KIND, config={**CONFIG, "x_shape": [12, 12]}, seed=2)
    x = rand((2, 6, 6, 2), 3)
    hidden = first.forward(x)
    chained = second.forward(Ref("outputs", instance=first.name))
    np.testing.assert_array_equal(chained, second.forward(hidden))
    # the copy is the second's own: the first's next call (which donates its buffers) changes nothing there
    first.forward(rand((2, 6, 6, 2), 4))
    np.testing.assert_array_equal(second.get("inputs"), hidden)
    # a reference to itself by name is the same as a plain reference
    np.testing.assert_array_equal(second.forward(Ref("inputs", instance=second.name)), chained)


def test_step_and_references_in_json(live_server, client, unique_name):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    x = rand((1, 6, 6, 2))
    syn.forward(x)
    url = f"{live_server.url}/v1/synapses/{unique_name}/step"
    r = httpx.post(url, json={"inputs": {"ref": "inputs"}, "post": {"ref": "outputs"}, "return": ["outputs"]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"]["shape"] == [1, 12, 12, 4]


@pytest.mark.parametrize(("arguments", "error", "needle"), [
    ({"pre": Ref("nope"), "post": None}, UnprocessableEntityError, "cannot refer to 'nope'"),
    ({"pre": Ref("outputs"), "post": None}, UnprocessableEntityError, "pre: expected shape (batch, 6, 6, 2)"),
    ({"pre": Ref("key"), "post": None}, UnprocessableEntityError, "no such floating compartment"),
    ({"pre": Ref("inputs", instance="no-such-instance"), "post": None}, NotFoundError, "no-such-instance"),
    ({"pre": Ref("inputs", instance="../x"), "post": None}, UnprocessableEntityError, "invalid instance name"),
])
def test_bad_references_are_4xx_and_touch_nothing(client, unique_name, arguments, error, needle):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    syn.forward(rand((2, 6, 6, 2)))
    arguments = {**arguments, "post": rand((2, 12, 12, 4))}
    before, version = state_of(syn), syn.describe()["version"]
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        syn.evolve(**arguments)
    after = state_of(syn)
    assert syn.describe()["version"] == version
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_batch_of_a_reference_must_match_the_sent_tensors(client, unique_name):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    syn.forward(rand((2, 6, 6, 2)))
    with pytest.raises(UnprocessableEntityError, match="expected batch 2"):
        syn.evolve(Ref("inputs"), rand((3, 12, 12, 4)))


@pytest.mark.parametrize("value", [{"ref": 3}, {"ref": "inputs", "extra": 1}, {"ref": ""}, {"ref": "x" * 200},
                                   {"ref": "inputs", "instance": 5}])
def test_malformed_reference_maps_are_400(live_server, client, unique_name, value):
    client.create(unique_name, kind=KIND, config=CONFIG)
    r = httpx.post(f"{live_server.url}/v1/synapses/{unique_name}/forward", json={"inputs": value})
    assert r.status_code == 400, r.text
    assert "reference" in r.json()["detail"]


def test_another_owners_instance_cannot_be_referenced(tmp_path):
    from conftest import LiveServer

    alice, bob = "alice-" + "a" * 24, "bob-" + "b" * 24
    with LiveServer(state_dir=tmp_path, auth="on", tokens=f"alice:{alice},bob:{bob}") as server, \
            SynapseClient(server.url, token=alice) as a, SynapseClient(server.url, token=bob) as b:
        secret = a.create("secret", kind=KIND, config=CONFIG)
        secret.forward(rand((1, 6, 6, 2)))
        mine = b.create("mine", kind=KIND, config=CONFIG)
        with pytest.raises(NotFoundError, match="secret"):
            mine.forward(Ref("inputs", instance="secret"))


def test_a_retried_step_with_its_key_applies_once(client, unique_name):
    syn = client.create(unique_name, kind=KIND, config=CONFIG)
    x, post = rand((1, 6, 6, 2)), rand((1, 12, 12, 4))
    first = syn.call("step", inputs=Ref("inputs"), post=post, idempotency_key="k1")
    again = syn.call("step", inputs=Ref("inputs"), post=post, idempotency_key="k1")
    assert first["version"] == again["version"]
    np.testing.assert_array_equal(first["dInputs"], again["dInputs"])
    with pytest.raises(UnprocessableEntityError, match="different request"):
        syn.call("step", inputs=x, post=post, idempotency_key="k1")
    assert syn.describe()["counters"] == {"step": 1}
