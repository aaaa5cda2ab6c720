"""The client's contract tests (tests/client/test_transports.py), run against the Ray backend.

The same test functions, the same assertions — the engine's own numbers, the error classes and
messages, keyed calls, snapshots, files and listings, references — over REST and over the session
stream, with a front whose two shards hold the instances. Only the packed-call half of
``test_sequences_and_packed_calls`` is not run here: a packed call is all or nothing on one shard,
and that test's instances spread over both (the refusal is tested in test_ray_backend.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cluster.raycluster import ray_server, stop_shards
from synapse_client import SynapseClient

_spec = importlib.util.spec_from_file_location(
    "transports_contract", Path(__file__).resolve().parents[1] / "client" / "test_transports.py")
contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(contract)

# the contract's scenarios, collected here as this module's tests
test_the_operations_give_the_engines_numbers = contract.test_the_operations_give_the_engines_numbers
test_answers_are_the_callers_own_arrays = contract.test_answers_are_the_callers_own_arrays
test_references_and_compartments = contract.test_references_and_compartments
test_errors_are_the_same_classes_and_messages = contract.test_errors_are_the_same_classes_and_messages
test_a_keyed_call_applies_once = contract.test_a_keyed_call_applies_once
test_snapshots_files_and_listing = contract.test_snapshots_files_and_listing


@pytest.fixture(scope="module")
def ray_front(cluster, tmp_path_factory):
    live = ray_server(tmp_path_factory.mktemp("ray-contract"), max_body_bytes=4 << 20)
    with live:
        yield live
    stop_shards(live)


@pytest.fixture(params=("rest", "session"))
def via(request, ray_front):
    with SynapseClient(ray_front.url) as client:
        if request.param == "rest":
            yield contract.Via(client)
        else:
            with client.session() as session:
                yield contract.Via(client, session)


def test_sequences_through_the_ray_backend(via, unique_name):
    """The sequence half of the contract's test_sequences_and_packed_calls."""
    syn = via.create(unique_name, kind="HebbianSynapse", config=contract.DENSE)
    xs, posts = contract.rand((6, 3, 5), 3), contract.rand((6, 3, 4), 4)
    truth = contract.engine_answers("HebbianSynapse", contract.DENSE,
                                    [("step", {"inputs": xs[t], "post": posts[t]}, None) for t in range(6)])
    every2 = syn.run_sequence("step", inputs=xs, post=posts, every=2)
    assert (every2["outputs"] == [truth[t]["outputs"] for t in (1, 3, 5)]).all()
    assert syn.describe()["counters"] == {"step": 6} and every2["version"] == 2
    assert syn.forward(xs).shape == (6, 3, 4)
