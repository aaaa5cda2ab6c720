"""The Ray backend against the local one, side by side in one run (docs/scaling.md).

Five servers on this machine (loopback, durability off): the local backend, the Ray backend with
two shards and with one shard (each pinned to a core of its own, the default on CPU clusters),
with two shards whose step calls take Ray's actor call instead of the shards' direct channel
(``ray_direct=false``), and with one shard not pinned (XLA spreads it over every core); each Ray
server starts its own local Ray cluster.

0. the floor: a trivial call to a threaded Ray actor on a local cluster started here (before the servers);
1. a tiny dense forward round trip (REST, and the session stream): what a Ray actor call adds;
2. the user loop of bench/loop.py (43 calls per batch) over the session stream;
3. aggregate throughput of two clients, each evolving its own large dense synapse with the pre and
   post it already holds (``Ref``: compute-bound, no data moves), through two shards against one.

    .venv/bin/python bench/ray_backend.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from synapse_client import Ref, SynapseClient
from synapse_serve.testing import ServerProcess

from harness import interleaved, machine, table  # noqa: E402 - bench/ is on the path
from loop import CONFIG as LOOP_CONFIG, KIND as LOOP_KIND, user_loop  # noqa: E402

TINY = {"shape": [16, 8]}
HEAVY = {"shape": [1536, 1536], "eta": 0.001}
HEAVY_BATCH = 512
UNPINNED = "ray, 1 shard on every core"


@contextlib.contextmanager
def servers(root: Path):
    started = []
    try:
        for name, settings in (("local", {}), ("ray, 2 shards", {"backend": "ray", "ray_shards": 2}),
                               ("ray, 1 shard", {"backend": "ray", "ray_shards": 1}),
                               ("ray, 2 shards, Ray's call", {"backend": "ray", "ray_shards": 2, "ray_direct": False}),
                               (UNPINNED, {"backend": "ray", "ray_shards": 1, "ray_pin_cpus": False})):
            started.append((name, ServerProcess(root / "".join(c for c in name if c.isalnum()), durability="off",
                                                **settings).start(timeout=300)))
        yield dict(started)
    finally:
        for _, server in started:
            server.stop()


def actor_floor(calls: int = 500, rounds: int = 5) -> float:
    """Median seconds of a trivial call to a threaded actor (what Ray itself costs per call here)."""
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        @ray.remote(max_concurrency=32)
        class Trivial:
            def ping(self, *args):
                return args

        actor = Trivial.remote()
        x = np.ones((1, 16), np.float32)
        ray.get(actor.ping.remote(x))
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(calls):
                ray.get(actor.ping.remote(x))
            samples.append((time.perf_counter() - started) / calls)
        return float(np.median(samples))
    finally:
        ray.shutdown()


def tiny_forward(urls: dict[str, str], rounds: int) -> list[list[str]]:
    x = np.ones((1, 16), np.float32)
    clients = {name: SynapseClient(url) for name, url in urls.items()}
    candidates = {}
    with contextlib.ExitStack() as stack:
        for name, client in clients.items():
            stack.enter_context(client)
            syn = client.create("tiny", kind="HebbianSynapse", config=TINY)
            session = stack.enter_context(client.session())
            handle = session.get("tiny")
            candidates[f"{name}: REST"] = (lambda s=syn: s.forward(x))
            candidates[f"{name}: session"] = (lambda h=handle: h.forward(x))
        result = interleaved(candidates, rounds, 300)
    rows = []
    for name, seconds in result.items():
        transport = name.split(": ")[1]
        base = result[f"local: {transport}"]
        rows.append([name, f"{seconds * 1e6:.0f}", f"{seconds / base:.2f}"])
    return rows


def loop_over_session(urls: dict[str, str], rounds: int) -> list[list[str]]:
    candidates = {}
    with contextlib.ExitStack() as stack:
        for name, url in urls.items():
            client = stack.enter_context(SynapseClient(url))
            client.create("loop", kind=LOOP_KIND, config=LOOP_CONFIG)
            handle = stack.enter_context(client.session()).get("loop")
            candidates[name] = (lambda h=handle: user_loop(h, 1))
        result = interleaved(candidates, rounds, 1)
    base = result["local"]
    return [[name, f"{seconds * 1e3:.1f}", f"{seconds / base:.2f}"] for name, seconds in result.items()]


def evolve_many(handle, calls: int) -> None:
    """``calls`` evolves on the pre and post the instance holds, and a read that waits until they are computed
    (an answer comes when the work is queued: JAX dispatches asynchronously)."""
    for _ in range(calls):
        handle.evolve(Ref("pre"), Ref("post"))
    handle.get("biases")


def throughput(urls: dict[str, str], rounds: int, calls: int) -> list[list[str]]:
    rng = np.random.default_rng(0)
    pre = rng.random((HEAVY_BATCH, HEAVY["shape"][0]), np.float32)
    post = rng.random((HEAVY_BATCH, HEAVY["shape"][1]), np.float32)
    rows, results = [], {}
    for name in ("ray, 1 shard", "ray, 2 shards", UNPINNED):
        clients = [SynapseClient(urls[name], timeout=600) for _ in range(2)]
        handles = [c.create(f"heavy-{i}", kind="HebbianSynapse", config=HEAVY) for i, c in enumerate(clients)]
        shards = sorted(h.describe()["shard"] for h in handles)
        for h in handles:
            h.evolve(pre, post)  # compiled, and pre and post kept on the shard
        samples = []
        for _ in range(rounds):  # each evolve reuses its last pre and post: no data moves, the shards compute
            threads = [threading.Thread(target=evolve_many, args=(h, calls)) for h in handles]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            samples.append(2 * calls / (time.perf_counter() - started))
        for c in clients:
            c.close()
        results[name] = float(np.median(samples))
        rows.append([name, f"shards {shards}", f"{results[name]:.2f}"])
    rows.append(["2 shards / 1 shard", "", f"{results['ray, 2 shards'] / results['ray, 1 shard']:.2f}"])
    rows.append(["2 shards / 1 shard on every core", "", f"{results['ray, 2 shards'] / results[UNPINNED]:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--heavy-calls", type=int, default=8)
    parser.add_argument("--sections", default="tiny,loop,throughput", help="comma-separated: tiny, loop, throughput")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    floor = actor_floor()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as root, servers(Path(root)) as started:
        urls = {name: server.url for name, server in started.items() if name != UNPINNED}
        print(machine(" (JAX on CPU; medians of interleaved rounds)"))
        print(f"\nA trivial threaded-actor call on a local Ray cluster (the floor): {floor * 1e6:.0f} µs")
        if "tiny" in sections:
            print("\nTiny dense forward round trip (HebbianSynapse 16x8, batch 1)\n")
            print(table(["candidate", "µs per call", "vs local (same transport)"], tiny_forward(urls, args.rounds)))
        if "loop" in sections:
            print("\nThe user loop of bench/loop.py over the session stream, one batch (43 calls)\n")
            print(table(["backend", "ms per batch", "vs local"], loop_over_session(urls, args.rounds)))
        if "throughput" not in sections:
            return
        print(f"\nTwo clients, each evolving its own HebbianSynapse {HEAVY['shape']} at batch {HEAVY_BATCH} "
              "(pre and post kept on the shard)\n")
        every = {name: server.url for name, server in started.items()}
        print(table(["backend", "placed on", "evolves per second"], throughput(every, args.rounds, args.heavy_calls)))


if __name__ == "__main__":
    main()
