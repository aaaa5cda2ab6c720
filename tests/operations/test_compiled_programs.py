"""The bound on compiled programs (SYNAPSE_MAX_COMPILED_PROGRAMS): a client that calls with a new batch size each
time compiles each time; the server keeps memory and memory maps bounded, answers the same numbers across
releases, and never compiles on its event loop after one."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from synapse_client import SynapseClient
from synapse_serve.testing import ServerProcess
from conftest import LiveServer, metric, metrics_of

CONFIG = {"shape": [8, 4], "eta": 0.01}


def memory_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum(1 for _ in maps)


def programs(url: str) -> tuple[float, float]:
    """(releases so far, programs since the last release) from /metrics."""
    samples = metrics_of(httpx.get(f"{url}/metrics").text)
    return (metric(samples, "synapse_compiled_program_releases_total"),
            metric(samples, "synapse_compiled_programs_since_release"))


def test_a_new_batch_size_per_call_cannot_grow_the_server_without_bound(tmp_path):
    """96 evolves, each of a new batch size, each a new program: unbounded they left ~8 memory maps each (783 in
    the measurement, ~0.5 MB apiece: 8,192 per JAX cache, past vm.max_map_count on a long run); bounded at 24, the
    process peaked at ~170 more maps than it had after the first call."""
    budget = 24
    with ServerProcess(tmp_path / "state", max_compiled_programs=budget) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("grows", kind="HebbianSynapse", config=CONFIG)
        x1, post1 = np.full((1, 8), 0.5, np.float32), np.full((1, 4), 0.25, np.float32)
        before = syn.forward(x1)
        weights = syn.get("weights")
        start = memory_maps(server.proc.pid)
        peak = 0
        for batch in range(2, 98):
            syn.evolve(pre=np.ones((batch, 8), np.float32), post=np.ones((batch, 4), np.float32))
            peak = max(peak, memory_maps(server.proc.pid) - start)
            assert programs(server.url)[1] <= budget
        releases, _ = programs(server.url)
        assert releases >= 3, releases
        assert peak < 400, peak  # unbounded: 783
        # the learned state is untouched by a release; the programs compile again and give the same numbers
        after = syn.get("weights")
        changed = syn.forward(x1)
        assert not np.array_equal(after, weights)  # the evolves did learn
        syn.set("weights", weights)
        assert np.array_equal(syn.forward(x1), before)
        syn.set("weights", after)
        assert np.array_equal(syn.forward(x1), changed)
        syn.evolve(pre=x1, post=post1)
        server.stop()


def test_memory_maps_over_their_limit_release_the_programs_however_few(tmp_path):
    """A program can hold far more maps than a small one (a large packed population's), so the count of programs
    alone would not keep a process under vm.max_map_count: past SYNAPSE_MAX_MEMORY_MAPS (counted after a compile,
    at most once a second) the programs are released too. Here the limit is 1: every count releases them."""
    with ServerProcess(tmp_path / "state", max_compiled_programs=1_000_000, max_memory_maps=1) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("maps", kind="HebbianSynapse", config=CONFIG)
        x1 = np.full((1, 8), 0.5, np.float32)
        before = syn.forward(x1)
        start = memory_maps(server.proc.pid)
        peak = 0
        for batch in range(2, 98):
            syn.evolve(pre=np.ones((batch, 8), np.float32), post=np.ones((batch, 4), np.float32))
            peak = max(peak, memory_maps(server.proc.pid) - start)
        samples = metrics_of(httpx.get(f"{server.url}/metrics").text)
        assert metric(samples, "synapse_compiled_program_releases_total") >= 1
        assert metric(samples, "synapse_memory_maps") > 0
        assert peak < 600, peak  # unbounded: 783 and growing
        np.testing.assert_allclose(syn.forward(x1), x1 @ syn.get("weights"), rtol=1e-5)  # compiled again, right
        assert before.shape == (1, 4)
        server.stop()
    assert "SYNAPSE_MAX_MEMORY_MAPS" in server.log.read_text()


@pytest.fixture(scope="module")
def small_budget(tmp_path_factory):
    # every known call inline (to see that a release sends them back to the workers); releases every 8 programs
    with LiveServer(state_dir=tmp_path_factory.mktemp("state"), max_compiled_programs=8,
                    inline_call_us=1e6) as server:
        yield server


def test_calls_side_by_side_across_releases_answer_the_same(small_budget):
    """Four clients on four instances, batch sizes cycling over more programs than the budget: releases happen while
    other calls run, and every answer equals the one the same call gave before."""
    server = small_budget
    with SynapseClient(server.url) as client:
        for n in range(4):
            client.create(f"side{n}", kind="HebbianSynapse", config=CONFIG, seed=n)
    batches = range(1, 13)
    inputs = {b: np.linspace(-1, 1, b * 8, dtype=np.float32).reshape(b, 8) for b in batches}
    expected: dict[tuple[int, int], np.ndarray] = {}
    with SynapseClient(server.url) as client:
        for n in range(4):
            for b in batches:
                expected[n, b] = client.get(f"side{n}").forward(inputs[b])
    released = server.app.state.server.backend.compiles.releases
    failures: list[str] = []

    def drive(n: int) -> None:
        with SynapseClient(server.url) as client:
            syn = client.get(f"side{n}")
            for round_ in range(3):
                for b in batches:
                    if not np.array_equal(syn.forward(inputs[b]), expected[n, b]):
                        failures.append(f"instance {n}, batch {b}, round {round_}")

    threads = [threading.Thread(target=drive, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures
    assert server.app.state.server.backend.compiles.releases > released


def test_after_a_release_a_call_compiles_on_a_worker_not_on_the_event_loop(small_budget, monkeypatch):
    """A call measured quick runs on the event loop; its program released, its next run compiles (tens of ms to
    seconds), which must not stall every other connection: it goes to a worker thread."""
    server = small_budget
    registry = server.registry
    threads: list[str] = []
    real_call = registry.call

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_call(*args, **kwargs)

    monkeypatch.setattr(registry, "call", recorded)
    compiles = server.app.state.server.backend.compiles
    x = np.ones((3, 8), np.float32)
    with SynapseClient(server.url) as client:
        syn = client.create("inline", kind="HebbianSynapse", config=CONFIG)
        other = client.create("compiles", kind="HebbianSynapse", config=CONFIG)
        for _ in range(5):  # the first changes the stored batch (a new signature): measured from the second, and
            syn.forward(x)  # anew after a release the earlier tests' programs may bring on meanwhile
            if not threads[-1].startswith("synapse-worker"):
                break
        assert not threads[-1].startswith("synapse-worker")  # measured quick: inline
        released = compiles.releases
        batch = 20
        while compiles.releases == released:  # another instance's new programs until the process releases them all
            other.forward(np.ones((batch, 8), np.float32))
            batch += 1
            assert batch < 100
        del threads[:]
        syn.forward(x)  # the same call on the same shapes: its cost is known, its program is not
        assert threads[0].startswith("synapse-worker"), threads
        syn.forward(x)
        assert not threads[-1].startswith("synapse-worker")  # measured again: inline again


def test_a_call_that_asks_for_other_compartments_compiles_on_a_worker(tmp_path, monkeypatch):
    """A sequence's program returns what it was asked for: the same call asking for another list of compartments
    compiles anew (~100 ms), and had run on the event loop (its cost was known under the same shapes), stalling
    every other connection. A list that differs only in order or repetition compiles nothing new."""
    with LiveServer(state_dir=tmp_path / "state", inline_call_us=100_000, inline_hop_factor=0) as server, \
            SynapseClient(server.url) as client:
        registry, threads = server.registry, []
        real_call = registry.call

        def recorded(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return real_call(*args, **kwargs)

        monkeypatch.setattr(registry, "call", recorded)
        syn = client.create("asks", kind="HebbianSynapse", config={**CONFIG, "optim_type": "adam", "batch_size": 2})
        xs = np.linspace(-1, 1, 3 * 2 * 8, dtype=np.float32).reshape(3, 2, 8)
        for _ in range(3):  # the first changes the stored batch (a new signature): measured from the second
            outputs = syn.call("forward", inputs=xs, returns=["outputs"])["outputs"]
        assert not threads[-1].startswith("synapse-worker"), threads  # measured quick: inline
        for returns in (["outputs", "inputs"], ["outputs", "inputs", "weights"]):
            answer = syn.call("forward", inputs=xs, returns=returns)
            assert threads[-1].startswith("synapse-worker"), (returns, threads)  # a new program: on a worker
            assert list(answer) == ["version", *returns] and np.array_equal(answer["outputs"], outputs)
            for _ in range(2):  # the compile was its first cost: measured again on a worker, then inline
                syn.call("forward", inputs=xs, returns=returns)
            assert not threads[-1].startswith("synapse-worker"), (returns, threads)
        compiled = programs(server.url)
        answer = syn.call("forward", inputs=xs, returns=["weights", "outputs", "weights", "inputs"])
        assert programs(server.url) == compiled  # the program of the same three in another order
        assert list(answer) == ["version", "weights", "outputs", "inputs"]  # as asked, each once
        assert np.array_equal(answer["outputs"], outputs) and answer["inputs"].shape == (3, 2, 8)
        assert np.array_equal(answer["inputs"][-1], xs[-1])


def test_the_in_process_mode_bounds_its_compiled_programs_too():
    """The caller's own process: the same bound, the same numbers after a release."""
    from synapse_serve.local.backend import compile_stats

    compiles = compile_stats()
    with SynapseClient("local", local_settings={"max_compiled_programs": 8}) as client:
        syn = client.create("local", kind="HebbianSynapse", config=CONFIG)
        x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
        before = syn.forward(x)
        released = compiles.releases
        for batch in range(3, 30):
            syn.forward(np.ones((batch, 8), np.float32))
            assert compiles.since_release <= 8
        assert compiles.releases > released
        assert np.array_equal(syn.forward(x), before)


def test_maps_the_programs_do_not_hold_do_not_release_them_on_every_compile(monkeypatch):
    """A server holding many large arrays may sit above the map limit with few programs: a release that freed
    nothing must not repeat at every compile; it repeats once the maps grew again (by an eighth of the limit)."""
    from synapse_serve.local import backend

    stats = backend.compile_stats()
    monkeypatch.setattr(backend, "MAPS_LOOK_INTERVAL_S", 0.0)
    monkeypatch.setattr(backend.jax, "clear_caches", lambda: None)  # the maps are the stub's: nothing to free
    maps = [5000]
    monkeypatch.setattr(backend, "memory_maps", lambda: maps[0])
    released = stats.releases

    def compiled_then_bounded() -> bool:
        stats.since_release += 1  # as a compile's event counts it
        return stats.release_if_over(1_000_000, 1000)

    assert compiled_then_bounded()  # over the limit: released
    assert stats.releases == released + 1
    for _ in range(3):
        assert not compiled_then_bounded()  # still 5000: what the release left, not the programs'
    maps[0] = 5100
    assert not compiled_then_bounded()  # grown, by less than an eighth of the limit
    maps[0] = 5200
    assert compiled_then_bounded()
    assert not compiled_then_bounded()
    assert stats.releases == released + 2


def anonymous_memory_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024


def test_a_release_hands_the_programs_memory_back_to_the_kernel(tmp_path):
    """glibc keeps what is freed in its pools: released but not trimmed, 300 small programs left a process 213 MB
    larger than trimmed (measured); the server's resident memory would then never come down after a release."""
    budget = 120
    with ServerProcess(tmp_path / "state", max_compiled_programs=budget) as server, \
            SynapseClient(server.url) as client:
        syn = client.create("grows", kind="HebbianSynapse", config=CONFIG)
        syn.forward(np.ones((1, 8), np.float32))
        start = anonymous_memory_mb(server.proc.pid)
        batch = 2
        while programs(server.url)[1] < budget - 2:  # programs held, none released yet
            syn.forward(np.ones((batch, 8), np.float32))
            batch += 1
        held = anonymous_memory_mb(server.proc.pid)
        assert held - start > 30, (start, held)  # the programs' memory (~0.7 MB each)
        released = programs(server.url)[0]
        while programs(server.url)[0] == released:  # the release: after the call that crossed the bound
            syn.forward(np.ones((batch, 8), np.float32))
            batch += 1
        after = anonymous_memory_mb(server.proc.pid)
        assert after - start < 0.5 * (held - start), (start, held, after)  # untrimmed: ~97% of it stayed
