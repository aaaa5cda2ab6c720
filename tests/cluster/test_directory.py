"""The deployment's directory of names (cluster/shard.py's ``Directory``), without a cluster: a claim its front never
settled nor released expires."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from synapse_serve.cluster import shard as shard_module  # noqa: E402 - after the skip
from synapse_serve.cluster.shard import CLAIM_LEASE_S, Directory  # noqa: E402


def test_a_claim_never_settled_expires_and_the_name_can_be_created_again(monkeypatch):
    """A red-team run: a front that died between its claim and the settle (kill -9 mid-create, an OOM) left the
    name "being created" for good, counted against its owner's instance quota, until the directory restarted."""
    now = [1000.0]
    monkeypatch.setattr(shard_module.time, "monotonic", lambda: now[0])
    directory = Directory("test", 0)
    assert directory.claim("bob", "ghost", 2) is None  # the dead front's claim
    assert directory.claim("bob", "ghost", 2) == -1  # being created
    assert directory.claim("bob", "other", 2) is None
    assert directory.claim("bob", "third", 2) == "max_instances_per_owner"  # the claim counts meanwhile
    now[0] += CLAIM_LEASE_S - 1
    assert directory.claim("bob", "ghost", 2) == -1  # a slow create is not taken over
    now[0] += 2
    assert directory.claim("bob", "ghost", 2) is None  # past the lease: this front's claim now
    directory.settle("bob", "ghost", 1)
    now[0] += 10 * CLAIM_LEASE_S
    assert directory.claim("bob", "ghost", 2) == 1  # a settled name never expires
    directory.release("bob", "other")
    assert directory.claim("bob", "third", 2) is None and directory.claimed_at.keys() == {("bob", "third")}


def test_a_directory_that_does_not_answer_stalls_a_shard_once_not_at_every_growth(monkeypatch):
    """A reservation waits on the directory holding the shard's capacity lock (every create and growth there waits
    with it). It waited up to 30 s, and again at the next growth; now it waits ``CLAIM_TIMEOUT_S`` and then counts
    the shard's own bytes for ``CLAIM_BACKOFF_S`` before asking again."""
    import ray

    now = [1000.0]
    monkeypatch.setattr(shard_module.time, "monotonic", lambda: now[0])
    waited, answer = [], [None]

    def get(ref, timeout=None):
        waited.append(timeout)
        if answer[0] is None:
            raise TimeoutError("the directory is stuck")
        return answer[0]

    class Stuck:
        class claim_bytes:  # noqa: N801 - as a Ray actor handle's method
            @staticmethod
            def remote(*args):
                return object()

    monkeypatch.setattr(ray, "get", get)
    ledger = shard_module.ShardLedger(0, "test")
    monkeypatch.setattr(ledger, "_reach", lambda: Stuck)
    assert ledger.claim("bob", "state", 10, 5, 12) == (10, False)  # this shard's bytes alone
    assert ledger.claim("bob", "state", 10, 1, 12) == (10, True)
    assert waited == [shard_module.CLAIM_TIMEOUT_S] and shard_module.CLAIM_TIMEOUT_S <= 5  # one wait, bounded
    now[0] += shard_module.CLAIM_BACKOFF_S + 1
    answer[0] = (30, False)  # the directory back: across the shards bob holds more
    assert ledger.claim("bob", "state", 10, 1, 12) == (30, False)
    assert len(waited) == 2


def test_a_deletion_told_late_does_not_free_a_name_another_create_has_claimed():
    """Reading the directory: a delete on shard-0 whose release arrived after another front's create had claimed
    the name dropped that claim, so a third create could take the name on another shard while the second ran."""
    directory = Directory("test", 0)
    assert directory.claim("bob", "x") is None
    directory.settle("bob", "x", 0)
    assert directory.claim("bob", "x") == 0  # front B: held by shard-0 (which has deleted it meanwhile)
    directory.release("bob", "x", 0)  # B finds it on no shard and releases the stale holder...
    assert directory.claim("bob", "x") is None  # ...and claims it for its create
    directory.release("bob", "x", 0)  # front A's delete, told late
    assert directory.claim("bob", "x") == -1  # front C: still being created by B
    directory.settle("bob", "x", 1)
    directory.release("bob", "x", 0)  # a late word from shard-0 leaves shard-1's name
    assert directory.claim("bob", "x") == 1
    directory.release("bob", "x", 1)
    assert directory.claim("bob", "x") is None


def test_a_restarted_shard_clears_what_its_dead_incarnation_had_reserved():
    """Reading the ledger: a shard that reserved room for a growth and died before reporting it (kill -9, an OOM)
    left the reservation counted against the owner for as long as the directory lived, unless the restarted shard
    happened to hold something of that owner's."""
    directory = Directory("test", 0)
    assert directory.claim_bytes(0, "bob", "state", 0, 80, 100, (1, 0)) == (0, True)  # reserved, then the death
    assert directory.claim_bytes(1, "bob", "state", 0, 30, 100, (7, 0)) == (80, False)  # the phantom in the way
    directory.report(0, "carol", "state", 10, (2, 3))  # the new incarnation restoring carol's instance...
    directory.restarted(0, {"seq": (2, 5), "state": {"carol": 10}, "snapshot": {}})  # ...then ready
    assert directory.claim_bytes(1, "bob", "state", 0, 30, 100, (7, 1)) == (0, True)
    assert directory.claim_bytes(0, "carol", "state", 10, 0, 100, (2, 6)) == (10, True)
    directory.report(0, "dave", "state", 5, (2, 9))  # a report that overtook the word of the restart: kept
    directory.restarted(0, {"seq": (2, 8), "state": {"carol": 10}, "snapshot": {}})
    assert directory.claim_bytes(1, "dave", "state", 0, 0, 100, (7, 2)) == (5, True)
