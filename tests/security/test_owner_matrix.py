"""Owner isolation on every instance route, through the entry points a client uses (issue 18, item 1).

Every operation, compartment and snapshot route (and describe, help, stats, history, the filters
picture, export, delete, packed calls), with and without ``?owner=``, for a non-admin and for an admin: a non-admin never reaches
another owner's instance — whether by naming the owner or by using the name in their own
namespace — and an admin always does. Over REST the operations go through the lean operation
route, the rest through FastAPI's; over the session stream every request is a frame.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import pytest

from conftest import LiveServer
from synapse_client import NotFoundError, Ref, Synapse, SynapseClient

ALICE, BOB, ROOT = "alice-" + "a" * 24, "bob-" + "b" * 24, "root-" + "r" * 24
KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [2, 2, 1, 2], "x_shape": [3, 3], "eta": 0.1}
X, POST = np.ones((1, 3, 3, 1), np.float32), np.ones((1, 3, 3, 2), np.float32)

ATTEMPTS: dict[str, Callable[[Synapse], object]] = {
    "forward": lambda s: s.forward(X),
    "evolve": lambda s: s.evolve(X, POST),
    "backtransmit": lambda s: s.backtransmit(POST),
    "backtransmit(stored)": lambda s: s.backtransmit(),
    "step": lambda s: s.step(X, POST),
    "step(ref)": lambda s: s.step(Ref("inputs"), Ref("post")),
    "reset": lambda s: s.reset(),
    "call(return)": lambda s: s.call("forward", inputs=X, returns=["weights"]),
    "get": lambda s: s.get("weights"),
    "get(path)": lambda s: s.get("dWeights"),
    "set": lambda s: s.set("weights", np.zeros((2, 2, 1, 2), np.float32)),
    "describe": lambda s: s.describe(),
    "help": lambda s: s.help(),
    "stats": lambda s: s.stats(),
    "history": lambda s: s.history(),
    "plot_filters": lambda s: s.plot_filters(),
    "plot_filters(dWeights)": lambda s: s.plot_filters(compartment="dWeights"),
    "export": lambda s: s.client.request("GET", s._url("/export"), retry=False),
    "snapshot": lambda s: s.snapshot("intruder"),
    "snapshots": lambda s: s.snapshots(),
    "restore": lambda s: s.restore("base"),
    "delete_snapshot": lambda s: s.delete_snapshot("base"),
    "call_many": lambda s: s.client.call_many("forward", {s.name: {"inputs": X}}, owner=s.owner),
    "call_stacked": lambda s: s.client.call_stacked("forward", [s.name], {"inputs": X[None]}, owner=s.owner),
    "delete": lambda s: s.delete(),
}
ENTRIES = ("rest", "session")


@contextlib.contextmanager
def caller(server, token: str, entry: str, **options):
    """A client (REST) or one of its sessions (frames over a WebSocket) for ``token``."""
    with SynapseClient(server.url, token=token, **options) as client:
        if entry == "rest":
            yield client
        else:
            with client.session() as session:
                yield session


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(state_dir=tmp_path_factory.mktemp("matrix"),
                    tokens=f"alice:{ALICE},bob:{BOB},root:{ROOT}:admin") as live:
        yield live


def _alices(server, name: str) -> Synapse:
    with SynapseClient(server.url, token=ALICE) as alice:
        syn = alice.create(name, kind=KIND, config=CONFIG)
        syn.forward(X)
        syn.snapshot("base")
    return syn


def _untouched(server, name: str) -> None:
    with SynapseClient(server.url, token=ALICE) as alice:
        syn = alice.get(name)
        description = syn.describe()
        assert description["version"] == 2 and description["counters"] == {"forward": 1}, description
        assert [s["snapshot"] for s in syn.snapshots()] == ["base"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("what", list(ATTEMPTS))
def test_a_non_admin_never_reaches_another_owners_instance(server, what, entry):
    name = f"private-{entry}-{what.replace('(', '-').replace(')', '')}"
    _alices(server, name)
    with caller(server, BOB, entry, max_retries=0) as bob:
        for owner in ("alice", None, "root"):  # naming her; in his own namespace; naming someone else
            handle = Synapse(bob, name, owner=owner)
            with pytest.raises(NotFoundError) as info:
                ATTEMPTS[what](handle)
            assert "alice" not in info.value.detail, info.value.detail
    _untouched(server, name)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("what", list(ATTEMPTS))
def test_an_admin_reaches_every_owners_instance_and_an_owner_their_own(server, what, entry):
    name = f"shared-{entry}-{what.replace('(', '-').replace(')', '')}"
    _alices(server, name)
    with caller(server, ROOT, entry) as root, caller(server, ALICE, entry) as alice:
        ATTEMPTS[what](Synapse(root, name, owner="alice"))  # succeeds, on alice's instance
        if what not in ("delete", "snapshot", "delete_snapshot"):  # (those succeed once)
            ATTEMPTS[what](Synapse(alice, name, owner="alice"))  # naming oneself is the same as not
            ATTEMPTS[what](Synapse(alice, name))
    if what == "delete":
        with SynapseClient(server.url, token=ALICE) as alice, pytest.raises(NotFoundError):
            alice.get(name)
    elif what in ("forward", "evolve", "step", "reset", "set", "restore", "call(return)", "backtransmit",
                  "backtransmit(stored)", "step(ref)", "call_many", "call_stacked"):
        with SynapseClient(server.url, token=ALICE) as alice:
            assert alice.get(name).describe()["version"] > 2  # the admin's call landed on alice's instance


@pytest.mark.parametrize("entry", ENTRIES)
def test_references_never_reach_another_owner(server, entry):
    _alices(server, f"source-{entry}")
    with caller(server, BOB, entry) as bob:
        (bob.client if entry == "session" else bob).create(f"reader-{entry}", kind=KIND, config=CONFIG)
        mine = Synapse(bob, f"reader-{entry}")
        with pytest.raises(NotFoundError):
            mine.forward(Ref("inputs", instance=f"source-{entry}"))  # looked up among bob's instances
        with pytest.raises(NotFoundError):
            Synapse(bob, mine.name, owner="alice").forward(Ref("inputs", instance=f"source-{entry}"))
    _untouched(server, f"source-{entry}")
