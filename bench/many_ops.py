"""Many operations per round trip, side by side in one run: the session stream, sequences, packed calls.

Four comparisons, each measured in interleaved rounds (bench/harness.py) against a server
started here (durability off, loopback):

1. a tiny forward on the session stream against a bare WebSocket echo of the same frame
   (bench/echo_app.py: same uvicorn, same codec, no engine): what the stream adds; and on a
   second server with busy polling off (``SYNAPSE_BUSY_POLL_US=0``): what polling gives;
2. T = 20 forward steps as one sequence call against 20 REST calls, and against 20 stream frames;
   REST calls also through httpx (a client with a custom transport: the path before the lean one);
3. one packed forward on 256 small instances of one config against 256 separate calls
   (REST, session stream, in-process client), as a list of calls and in the stacked form
   (one (256, batch, …) tensor in, one out);
4. throughput of 16 session clients (threads), each on its own instance, against one;
5. the spread of stacked packed calls' latencies over the stream on two more servers, one with
   ``SYNAPSE_GC_FREEZE`` (the default) and one without: Python's full garbage collections, and
   what keeping start-up's objects out of them does to the slowest calls (the mean, the median,
   the 99th percentile and the worst of all calls, not medians of rounds: pauses are the point).

    .venv/bin/python bench/many_ops.py [--rounds 7] [--sections tiny,sequence,packed,throughput,pauses]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from synapse_client import SynapseClient
from synapse_client._session import Session
from synapse_serve.testing import ServerProcess, free_port

from harness import ROOT, interleaved, machine, rand, table  # noqa: E402 - bench/ is on the path

KIND = "HebbianDeconvSynapse"
TINY = {"shape": [2, 2, 1, 2], "x_shape": [4, 4], "eta": 0.1}
SEQ = {"shape": [3, 3, 4, 4], "x_shape": [8, 8], "eta": 0.01}
PACKED = 256


@contextlib.contextmanager
def echo_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "echo_app:app", "--port", str(port), "--log-level",
                             "warning", "--ws", "websockets-sansio"], cwd=ROOT / "bench")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with SynapseClient(url) as probe:
                    probe.request("POST", "/", {"inputs": np.zeros(1, np.float32)}, retry=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def stream_vs_echo(client: SynapseClient, echo_url: str, unpolled_url: str, rounds: int) -> list[list[str]]:
    syn = client.create("tiny", kind=KIND, config=TINY)
    x = rand((1, 4, 4, 1))
    with client.session() as session, SynapseClient(echo_url) as echo_client, \
            SynapseClient(unpolled_url) as unpolled_client:
        handle = session.get("tiny")
        unpolled_client.create("tiny", kind=KIND, config=TINY)
        unpolled = unpolled_client.session()
        unpolled_handle = unpolled.get("tiny")
        echo = Session(echo_client)
        echo_handle = type(handle)(echo, "tiny")
        result = interleaved({"session forward": lambda: handle.forward(x),
                              "session forward, busy polling off": lambda: unpolled_handle.forward(x),
                              "bare WebSocket echo": lambda: echo_handle.call("forward", inputs=x)},
                             rounds, 500)
        echo.close()
        unpolled.close()
    syn.delete()
    base = result["bare WebSocket echo"]
    return [[name, f"{seconds * 1e6:.0f}", f"{seconds / base:.2f}"] for name, seconds in result.items()]


def sequence_vs_calls(client: SynapseClient, rounds: int) -> list[list[str]]:
    syn = client.create("seq", kind=KIND, config=SEQ)
    xs = rand((20, 8, 8, 8, 4))
    with client.session() as session, SynapseClient(client.base_url, transport=httpx.HTTPTransport()) as slow:
        handle = session.get("seq")
        through_httpx = slow.get("seq")
        result = interleaved({
            "20 REST calls": lambda: [syn.forward(x) for x in xs],
            "20 REST calls through httpx": lambda: [through_httpx.forward(x) for x in xs],
            "20 stream frames": lambda: [handle.forward(x) for x in xs],
            "1 sequence call (REST)": lambda: syn.forward(xs),
            "1 sequence call (stream)": lambda: handle.forward(xs),
        }, rounds, 3)
    syn.delete()
    base = result["20 REST calls"]
    return [[name, f"{seconds * 1e3:.2f}", f"{seconds / base:.3f}"] for name, seconds in result.items()]


def packed_vs_separate(client: SynapseClient, rounds: int) -> list[list[str]]:
    # the separate calls and the packed ones on populations of their own (the same seeds): separate calls on a
    # packed population would take its members out of the stack the server keeps it in (docs/api.md)
    names, packed = [f"col-{i}" for i in range(PACKED)], [f"pk-{i}" for i in range(PACKED)]
    xs = rand((PACKED, 2, 4, 4, 1))
    local = SynapseClient("local")
    for target in (client, local):
        for population in (names, packed):
            for i, name in enumerate(population):
                target.create(name, kind=KIND, config=TINY, seed=i)
    rest = [client.get(n) for n in names]
    local_handles = [local.get(n) for n in names]
    calls = {n: {"inputs": x} for n, x in zip(packed, xs)}
    with client.session() as session, SynapseClient(client.base_url, transport=httpx.HTTPTransport()) as slow:
        stream = [session.get(n) for n in names]
        through_httpx = [slow.get(n) for n in names]
        result = interleaved({
            f"{PACKED} REST calls": lambda: [h.forward(x) for h, x in zip(rest, xs)],
            f"{PACKED} REST calls through httpx": lambda: [h.forward(x) for h, x in zip(through_httpx, xs)],
            f"{PACKED} stream frames": lambda: [h.forward(x) for h, x in zip(stream, xs)],
            f"{PACKED} in-process calls": lambda: [h.forward(x) for h, x in zip(local_handles, xs)],
            "1 packed call (REST)": lambda: client.call_many("forward", calls),
            "1 packed call (stream)": lambda: session.call_many("forward", calls),
            "1 packed call (in-process)": lambda: local.call_many("forward", calls),
            "1 stacked packed call (REST)": lambda: client.call_stacked("forward", packed, {"inputs": xs}),
            "1 stacked packed call (stream)": lambda: session.call_stacked("forward", packed, {"inputs": xs}),
            "1 stacked packed call (in-process)": lambda: local.call_stacked("forward", packed, {"inputs": xs}),
        }, rounds, 1)
    local.close()
    base = result[f"{PACKED} REST calls"]
    return [[name, f"{seconds * 1e3:.2f}", f"{seconds / base:.3f}"] for name, seconds in result.items()]


def gc_pauses(tmp: Path, rounds: int) -> list[list[str]]:
    servers = {label: ServerProcess(tmp / label.replace(" ", "-"), durability="off", warmup=True, gc_freeze=freeze)
               for label, freeze in (("gc_freeze on", True), ("gc_freeze off", False))}
    names = [f"pause-{i}" for i in range(PACKED)]
    xs = rand((PACKED, 2, 4, 4, 1))
    latencies: dict[str, list[float]] = {label: [] for label in servers}
    with contextlib.ExitStack() as stack:
        sessions = {}
        for label, server in servers.items():
            client = stack.enter_context(SynapseClient(stack.enter_context(server).url))
            for i, name in enumerate(names):
                client.create(name, kind=KIND, config=TINY, seed=i)
            sessions[label] = stack.enter_context(client.session())
            for _ in range(5):
                sessions[label].call_stacked("forward", names, {"inputs": xs})
        for _ in range(rounds * 4):  # blocks of 25 calls, interleaved
            for label, session in sessions.items():
                for _ in range(25):
                    started = time.perf_counter()
                    session.call_stacked("forward", names, {"inputs": xs})
                    latencies[label].append(time.perf_counter() - started)
    rows = []
    for label, values in latencies.items():
        values.sort()
        rows.append([label, str(len(values)), f"{np.mean(values) * 1e3:.2f}", f"{values[len(values) // 2] * 1e3:.2f}",
                     f"{values[int(len(values) * 0.99)] * 1e3:.2f}", f"{values[-1] * 1e3:.2f}"])
    return rows


def session_throughput(url: str, rounds: int) -> list[list[str]]:
    clients = [SynapseClient(url) for _ in range(16)]
    for i, c in enumerate(clients):
        c.create(f"own-{i}", kind=KIND, config=TINY)
    sessions = [c.session() for c in clients]
    handles = [s.get(f"own-{i}") for i, s in enumerate(sessions)]
    x = rand((1, 4, 4, 1))
    rows = []
    for count in (1, 16):
        per_client = 300 // count

        def work(handle, n=per_client) -> None:
            for _ in range(n):
                handle.forward(x)

        samples = []
        for _ in range(rounds):
            threads = [threading.Thread(target=work, args=(h,)) for h in handles[:count]]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            samples.append(per_client * count / (time.perf_counter() - start))
        rows.append([f"{count} session client{'s' if count > 1 else ''}", f"{sorted(samples)[len(samples) // 2]:.0f}"])
    for s, c in zip(sessions, clients):
        s.close()
        c.close()
    rows[1].append(f"{float(rows[1][1]) / float(rows[0][1]):.2f}")
    rows[0].append("1.00")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sections", default="tiny,sequence,packed,throughput,pauses",
                        help="comma-separated: tiny, sequence, packed, throughput, pauses")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        server = stack.enter_context(ServerProcess(Path(tmp) / "state", durability="off"))
        client = stack.enter_context(SynapseClient(server.url))
        echo_url = stack.enter_context(echo_server())
        print(machine(f"; {args.rounds} interleaved rounds"))
        if "tiny" in sections:
            unpolled = stack.enter_context(ServerProcess(Path(tmp) / "unpolled", durability="off", busy_poll_us=0))
            print("\n1. A tiny forward ((1, 4, 4, 1) in, (1, 4, 4, 2) out) on the session stream vs a bare "
                  "WebSocket echo")
            print(table(["candidate", "µs per call", "/ echo"],
                        stream_vs_echo(client, echo_url, unpolled.url, args.rounds)))
        if "sequence" in sections:
            print("\n2. T = 20 forward steps (batch 8, 8x8x4 -> 8x8x4)")
            print(table(["candidate", "ms per 20 steps", "/ 20 REST calls"], sequence_vs_calls(client, args.rounds)))
        if "packed" in sections:
            print(f"\n3. forward on {PACKED} small instances of one config (batch 2, 4x4x1 -> 4x4x2)")
            print(table(["candidate", "ms", f"/ {PACKED} REST calls"], packed_vs_separate(client, args.rounds)))
        if "throughput" in sections:
            print("\n4. throughput: session clients (threads), each on its own instance, tiny forward")
            print(table(["clients", "calls per second", "/ one client"], session_throughput(server.url, args.rounds)))
        if "pauses" in sections:
            print(f"\n5. stacked packed forward on {PACKED} instances over the stream: every call's latency, two servers")
            print(table(["server", "calls", "mean ms", "median ms", "p99 ms", "worst ms"], gc_pauses(Path(tmp), args.rounds)))


if __name__ == "__main__":
    main()
