"""The dense kinds through the real server and client: the engine's numbers over HTTP, every operation."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from synapse_client import Ref, UnprocessableEntityError
from synapse_serve.kinds import dense, hebbian

CONFIG = {"shape": [784, 512], "eta": 0.01, "optim_type": "adam", "sign_value": -1.0, "bias": True, "p_conn": 0.8,
          "prior": ["elastic_net", [0.001, 0.5]]}


def rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_a_784_to_512_layer_learns_exactly_as_the_engine(client, unique_name):
    syn = client.create(unique_name, kind="HebbianSynapse", config=CONFIG, seed=5)
    cfg = hebbian.parse_config(CONFIG)
    state = hebbian.init(cfg, seed=5)
    for i in range(3):
        x, post = rand((250, 784), i), rand((250, 512), 100 + i)
        y = syn.forward(x)
        syn.evolve(x, post)
        d_inputs = syn.backtransmit(post)
        state = dense.forward(cfg, state, x)
        np.testing.assert_array_equal(y, state.outputs)
        state = hebbian.backtransmit(cfg, hebbian.evolve(cfg, state, x, post), post)
        np.testing.assert_array_equal(d_inputs, state.dInputs)
    np.testing.assert_array_equal(syn.weights, state.weights)
    np.testing.assert_array_equal(syn.get("opt_state/mu/0"), state.opt_state.mu[0])
    description = syn.describe()
    assert description["compartments"]["mask"] == {"shape": [784, 512], "dtype": "float32"}
    assert description["config"]["prior"] == ["l1l2", [0.001, 0.5]] and description["config"]["w_bound"] == 1.0
    assert description["counters"] == {"forward": 3, "evolve": 3, "backtransmit": 3}
    mask = syn.get("mask")
    assert not syn.weights[mask == 0].any()  # sparse, and it stays sparse


def test_every_dense_operation_and_reference(client, unique_name):
    config = {"shape": [6, 4], "eta": 0.1, "optim_type": "nag", "batch_size": 2}
    syn = client.create(unique_name, kind="HebbianSynapse", config=config)
    x, post = rand((3, 6)), rand((3, 4), 1)
    answer = syn.call("calc_update", pre=x, post=post)
    assert set(answer) == {"version", "dWeights"} and answer["dWeights"].shape == (6, 4)
    assert syn.describe()["counters"] == {"calc_update": 1}
    syn.forward(x)
    step = syn.step(Ref("inputs"), post)
    assert step["outputs"].shape == (3, 4) and step["dInputs"].shape == (3, 6)
    syn.reset()
    assert syn.get("inputs").shape == (2, 6) and not syn.get("dWeights").any()
    assert syn.get("opt_state/count") == 1.0
    plain = client.create(unique_name + "-plain", kind="DenseSynapse", config={"shape": [4, 3], "bias": True})
    assert plain.forward(Ref("outputs", instance=unique_name)).shape == (2, 3)  # two layers chained on the server
    with pytest.raises(UnprocessableEntityError, match="no operation 'evolve'"):
        plain.evolve(rand((1, 4)), rand((1, 3)))


@pytest.mark.parametrize(("config", "message"), [
    ({"prior": ["L2", 0.1]}, "did you mean 'l2'"),
    ({"prior": ["elastic_net", 0.1]}, "elastic_net needs lambda"),
    ({"optim_type": "rmsprop"}, "choose one of sgd, adam, nag"),
    ({"p_release_mean": 0.5}, "stochastic release is not supported"),
    ({"max_delay_steps": 3}, "axonal delays are not supported"),
    ({"shape": [784]}, "expected [n_in, n_out]"),
])
def test_bad_dense_configs_are_422(live_server, unique_name, config, message):
    body = {"name": unique_name, "kind": "HebbianSynapse", "config": {"shape": [4, 2], **config}}
    r = httpx.post(f"{live_server.url}/v1/synapses", json=body)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_dense_from_curl_json(live_server, unique_name):
    body = {"name": unique_name, "kind": "HebbianSynapse", "config": {"shape": [3, 2], "w_decay": 0.1}}
    r = httpx.post(f"{live_server.url}/v1/synapses", json=body)
    assert r.status_code == 201 and r.json()["config"]["prior"] == ["l2", 0.1]
    r = httpx.post(f"{live_server.url}/v1/synapses/{unique_name}/forward", json={"inputs": [[1, 2, 3]]})
    assert r.status_code == 200 and r.json()["outputs"]["shape"] == [1, 2]
