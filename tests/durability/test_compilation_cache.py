"""The persistent compilation cache in the state directory: a restart loads executables, compiles nothing new."""

from __future__ import annotations

import numpy as np

from synapse_client import SynapseClient
from synapse_serve.testing import ServerProcess

CONFIG = {"shape": [3, 3, 2, 4], "x_shape": [6, 6], "stride": 2, "eta": 0.1}


def drive(url: str, create: bool) -> None:
    with SynapseClient(url) as client:
        syn = client.create("cached", kind="HebbianDeconvSynapse", config=CONFIG) if create else client.get("cached")
        x = np.ones((2, 6, 6, 2), np.float32)
        y = syn.forward(x)
        syn.evolve(x, y)
        syn.backtransmit(y)


def test_a_restart_reuses_the_compiled_programs(tmp_path):
    state = tmp_path / "state"
    cache = state / "jax-cache"
    server = ServerProcess(state)
    with server:
        drive(server.url, create=True)
        server.stop()
    assert len(list(cache.glob("*-cache"))) >= 3  # forward, evolve, backtransmit at least (plus init's programs)
    entries = None
    for _ in range(2):  # a restart restores from disk: its programs (shapes) differ from a fresh create's
        with ServerProcess(state) as again:
            drive(again.url, create=False)
            again.stop()
        # a compiled program is (re)written; one found in the cache is only read (its "-atime" file beside it is
        # rewritten on each read: the bounded cache's least-recently-used bookkeeping)
        written = {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.name.endswith("-cache")}
        if entries is not None:  # the same restart again found everything: nothing was compiled
            assert written == entries
        entries = written


def test_the_cache_can_be_turned_off(tmp_path):
    with ServerProcess(tmp_path / "state", compilation_cache="false") as server:
        drive(server.url, create=True)
        server.stop()
    assert not (tmp_path / "state" / "jax-cache").exists()


def test_the_cache_on_disk_is_bounded(tmp_path):
    """A red-team run (2026-11-30): every new batch size is a new program and a new file in the state directory's
    cache, 80 in 3 s, without bound and counted against nobody, on the disk sync writes need. Past
    ``compilation_cache_max_bytes`` the oldest files go, looked at every ``compilation_cache_prune_s`` (JAX's own
    bound read every entry of the directory at each compile: seconds a compile for a gigabyte of small programs)."""
    import time

    limit = 64 << 10
    cache = tmp_path / "state" / "jax-cache"

    def held() -> int:
        return sum(p.stat().st_size for p in cache.glob("*-cache"))

    with ServerProcess(tmp_path / "state", compilation_cache_max_bytes=limit, compilation_cache_prune_s=0.2) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("sizes", kind="HebbianSynapse", config={"shape": [3, 2]})
        for batch in range(1, 61):  # 60 programs, ~2.7 KB each on this machine: over twice the limit
            assert syn.forward(np.ones((batch, 3), np.float32)).shape == (batch, 2)
        deadline = time.monotonic() + 10
        while held() > limit and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 0 < held() <= limit, f"{len(list(cache.glob('*-cache')))} files, {held()} bytes"
        for batch in range(1, 61):  # and it goes on serving, pruned programs compiled again
            assert syn.forward(np.ones((batch, 3), np.float32)).shape == (batch, 2)
