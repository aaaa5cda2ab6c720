"""The client as a new user meets it: tokens, names, arrays, configs, errors and the calls it lacked
(issue 11, items 20, 21, 26, 29, 30, 35)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from conftest import LiveServer
from synapse_client import APIConnectionError, AsyncSynapseClient, NotFoundError, SynapseClient
from synapse_serve.testing import free_port

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [2, 2, 1, 2], "x_shape": [4, 4], "eta": 0.1}
ALICE, ROOT = "alice-" + "a" * 24, "root-" + "r" * 24


def test_a_token_is_never_shown_and_stray_whitespace_is_dropped(tmp_path):
    """Item 20: a token with a trailing newline ended up, whole, in an exception."""
    with LiveServer(state_dir=tmp_path, tokens=f"alice:{ALICE}") as server:
        with SynapseClient(server.url, token=ALICE + "\n") as client:  # as read from a file
            assert client.list() == []
        for bad in (ALICE[:10] + " " + ALICE[10:], ALICE + "\x00", ALICE + "é"):
            with pytest.raises(ValueError, match="characters an HTTP header cannot carry") as info:
                SynapseClient(server.url, token=bad)
            assert ALICE[:10] not in str(info.value)


@pytest.mark.parametrize("name", ["../kinds", "x?owner=bob", "a/b", "x#frag", "", "%2e%2e"])
def test_names_are_checked_before_anything_is_sent(client, name):
    """Item 21: ``client.get("../kinds")`` called /v1/kinds; ``"x?owner=bob"`` injected a query."""
    for attempt in (lambda: client.get(name), lambda: client.create(name, kind=KIND, config=CONFIG),
                    lambda: client.get_or_create(name, kind=KIND, config=CONFIG),
                    lambda: client.import_("/dev/null", name=name)):
        with pytest.raises(ValueError, match="invalid instance name"):
            attempt()


def test_compartment_and_snapshot_names_are_escaped(client, unique_name):
    syn = client.create(unique_name, kind=KIND, config={**CONFIG, "optim_type": "adam"})
    assert syn.get("opt_state/0/count") == 0  # a path compartment still works
    for bad in ("../../kinds", "weights?owner=bob", "a//b"):
        with pytest.raises(ValueError, match="invalid compartment name"):
            syn.get(bad)
    with pytest.raises(ValueError, match="invalid snapshot"):
        syn.restore("../x")


def test_returned_arrays_are_writable_copies(client, unique_name):
    """Item 29: syn.weights and forward outputs were read-only; a user's first in-place edit failed."""
    syn = client.create(unique_name, kind=KIND, config={**CONFIG, "x_shape": [64, 64]})
    small = syn.weights
    small += 1.0  # in place
    big = syn.forward(np.ones((8, 64, 64, 1), np.float32))  # over 64 KiB: decoded in place
    assert big.nbytes > 64 << 10 and big.flags.writeable
    big[0] = 0.0
    assert not np.array_equal(syn.weights, small)  # the server's copy is not ours


def test_numpy_scalars_in_a_config_are_numbers(client, unique_name):
    """Item 30: np.float32(0.01), an np.int64 seed and np.bool_ were refused as "array(...)"."""
    syn = client.create(unique_name, kind=KIND, seed=np.int64(3),
                        config={**CONFIG, "eta": np.float32(0.25), "bias": np.bool_(True),
                                "stride": np.int32(2), "shape": np.array([2, 2, 1, 2])})
    config = syn.describe()["config"]
    assert config["eta"] == 0.25 and config["bias"] is True and config["stride"] == 2
    assert syn.describe()["seed"] == 3


def test_a_refused_connection_names_the_url_and_how_to_start_a_server():
    """Item 26: "connection refused" named neither the URL nor how to start the server."""
    url = f"http://127.0.0.1:{free_port()}"
    with SynapseClient(url, max_retries=0) as client, pytest.raises(APIConnectionError) as info:
        client.list()
    assert url in str(info.value) and "serve.sh" in str(info.value) and "after 1 attempt" in str(info.value)


def test_device_get_or_create_and_an_admins_owner(tmp_path):
    """Item 35: the client had no device=, no get_or_create, and no way for an admin to name an owner."""
    tokens = f"alice:{ALICE},root:{ROOT}:admin"
    with LiveServer(state_dir=tmp_path, tokens=tokens) as server, SynapseClient(server.url, token=ALICE) as alice, \
            SynapseClient(server.url, token=ROOT) as root:
        syn = alice.create("placed", kind=KIND, config=CONFIG, device="cpu:0")
        assert syn.describe()["device"] == "cpu:0"
        again = alice.get_or_create("placed", kind=KIND, config=CONFIG)
        assert again.describe()["version"] == 1 and again.name == "placed"
        with pytest.raises(ValueError, match="exists with eta=0.1"):
            alice.get_or_create("placed", kind=KIND, config={**CONFIG, "eta": 0.5})
        with pytest.raises(ValueError, match="kind 'HebbianDeconvSynapse'"):
            alice.get_or_create("placed", kind="DeconvSynapse", config={"shape": [2, 2, 1, 2], "x_shape": [4, 4]})
        fresh = alice.get_or_create("fresh", kind=KIND, config=CONFIG, seed=4)
        assert fresh.describe()["seed"] == 4
        theirs = root.get("placed", owner="alice")  # an admin acts on alice's instance
        theirs.forward(np.ones((1, 4, 4, 1), np.float32))
        assert syn.describe()["counters"] == {"forward": 1}
        assert {d["name"] for d in root.list(owner="alice")} == {"placed", "fresh"}
        root.create("made-for-alice", kind=KIND, config=CONFIG, owner="alice")
        assert "made-for-alice" in {d["name"] for d in alice.list()}
        with pytest.raises(NotFoundError):
            alice.get("placed", owner="root")  # a non-admin cannot name another owner

        async def twin():
            async with AsyncSynapseClient(server.url, token=ALICE) as client:
                handle = await client.get_or_create("placed", kind=KIND, config=CONFIG)
                return (await handle.describe())["counters"]

        assert asyncio.run(twin()) == {"forward": 1}
