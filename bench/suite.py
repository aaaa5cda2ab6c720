"""synapse-serve's benchmark suite: ratios measured side by side in one run.

Every comparison runs its candidates in interleaved rounds (so drift on a shared
machine hits them alike) and reports medians over the rounds. Sections:

- transport: service forward round trip of a tiny synapse vs a bare uvicorn echo of the
  same msgpack body (bench/echo_app.py), same client, at 1 KiB, 1 MiB and 64 MiB;
- ngclearn: forward, evolve, backtransmit per call at small, medium and large — ngclearn
  3.2.3 in-process (its own Python 3.12 environment, created when missing) vs the service
  round trip vs the engine in-process;
- dense: the dense HebbianSynapse's forward and evolve at 784x512 and 512x10, batch 250: engine
  in-process and service round trip vs ngclearn in-process;
- step: the fused step (one round trip) and references vs three separate calls;
- scale: per-call latency with 1, 100 and 1,000 instances, create time of an instance of an
  already-compiled config, server memory per instance vs its state bytes;
- concurrency: throughput of 1, 4 and 16 clients on separate instances and on one shared one;
- codec: encode and decode of 1 MiB and 64 MiB tensors vs a plain memory copy;
- restart: time to the first answers after a cold start, a restart with the persistent
  compilation cache, and a restart without it.

Not a test; run it by hand (``--quick`` for a smoke run)::

    .venv/bin/python bench/suite.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np

from synapse_client import Ref, SynapseClient
from synapse_client._codec import packb, packb_parts, unpackb
from synapse_serve.kinds import deconv, dense, hebbian
from synapse_serve.kinds import hebbian_deconv as hd
from synapse_serve.testing import ServerProcess, free_port

from harness import MiB, interleaved, machine, ms, ngclearn_python, rand  # noqa: E402 - bench/ is on the path

ROOT = Path(__file__).resolve().parents[1]
KIND = "HebbianDeconvSynapse"
# the issue's sizes: (batch, x_shape, filter shape)
SIZES = {
    "small": {"batch": 1, "x_shape": [8, 8], "shape": [3, 3, 1, 4]},
    "medium": {"batch": 32, "x_shape": [28, 28], "shape": [5, 5, 1, 32]},
    "large": {"batch": 128, "x_shape": [32, 32], "shape": [3, 3, 16, 64]},
}
LEARNING = {"eta": 0.01, "optim_type": "adam"}
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"


# --- measuring ---


def config_of(size: dict, **extra) -> dict:
    return {"shape": size["shape"], "x_shape": size["x_shape"], "batch_size": size["batch"], **LEARNING, **extra}


def signals(size: dict) -> tuple[np.ndarray, np.ndarray]:
    cfg = hd.parse_config(config_of(size))
    return rand((size["batch"], *cfg.in_trailing), 1), rand((size["batch"], *cfg.out_trailing), 2)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def server(tmp: Path, name: str, **settings):
    """A real server process on loopback (durability off unless said: compute and transport are measured)."""
    settings = {"durability": "off", "max_body_bytes": 1 << 30, **settings}
    process = ServerProcess(tmp / name, durability=settings.pop("durability"), **settings)
    with process:
        yield process


class Report:
    """Sections of markdown tables plus the targets, printed and optionally written to the docs."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.targets: list[tuple[str, str, str, bool | None]] = []

    def table(self, title: str, header: list[str], rows: list[list], note: str = "") -> None:
        lines = [f"### {title}", ""] + ([note, ""] if note else [])
        lines += ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        text = "\n".join(lines) + "\n"
        self.parts.append(text)
        print(text, flush=True)

    def target(self, what: str, goal: str, measured: str, met: bool | None) -> None:
        self.targets.append((what, goal, measured, met))

    def markdown(self, header: str) -> str:
        rows = [f"| {w} | {g} | {m} | {'met' if ok else 'not met' if ok is not None else 'not measured'} |"
                for w, g, m, ok in self.targets]
        targets = "\n".join(["### Targets", "", "| target | goal | measured | |", "| --- | --- | --- | --- |", *rows])
        return "\n".join([header, "", *self.parts, targets, ""])


# --- sections ---


def transport(tmp: Path, report: Report, quick: bool) -> None:
    payloads = {"1 KiB": (16, 16), "1 MiB": (512, 512), "64 MiB": (4096, 4096)}
    if quick:
        payloads = {"1 KiB": (16, 16), "1 MiB": (512, 512)}
    echo_port = free_port()
    echo = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "bench"), "echo_app:app", "--port", str(echo_port),
         "--log-level", "warning"], env={**os.environ, "PYTHONPATH": str(ROOT / "client")})
    try:
        with server(tmp, "transport") as srv, SynapseClient(srv.url) as client, \
                SynapseClient(f"http://127.0.0.1:{echo_port}") as echo_client:
            wait_for(f"http://127.0.0.1:{echo_port}/", echo)
            rows = []
            for label, x_shape in payloads.items():
                syn = client.create(f"tiny-{x_shape[0]}", kind=KIND,
                                    config={"shape": [1, 1, 1, 1], "x_shape": list(x_shape)})
                x = rand((1, *x_shape, 1))
                big = x.nbytes >= 16 * MiB
                rounds, calls = (3, 1) if quick else ((7, 2) if big else (15, 30 if x.nbytes < MiB else 8))
                result = interleaved({
                    "service": lambda s=syn, v=x: s.forward(v),
                    "echo": lambda v=x: echo_client.request("POST", "/echo", {"inputs": v}, retry=False),
                }, rounds, calls)
                ratio = result["service"] / result["echo"]
                rows.append([label, ms(result["echo"]), ms(result["service"]), f"{ratio:.2f}"])
                report.target(f"forward round trip, tiny synapse, {label}", "<= 1.25x bare echo",
                              f"{ratio:.2f}x", ratio <= 1.25)
            report.table("Transport floor: service forward vs bare uvicorn echo",
                         ["payload each way", "echo ms", "service forward ms", "service / echo"], rows,
                         "Same client, same codec, same uvicorn; the echo only decodes and re-encodes the body.")
    finally:
        echo.terminate()
        echo.wait(timeout=30)


def wait_for(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited")
        with contextlib.suppress(httpx.TransportError):
            httpx.get(url, timeout=1)
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url}: no answer")


class NgclearnWorker:
    """ngclearn 3.2.3 in its own process (bench/ngclearn_worker.py), timed on request; ``specs`` names sizes
    beyond the deconvolutional ones (the dense section's)."""

    def __init__(self, python: Path) -> None:
        self.proc = subprocess.Popen([str(python), str(ROOT / "bench" / "ngclearn_worker.py")], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
        self.hello = json.loads(self.proc.stdout.readline())

    def op(self, size: str, op: str, spec: dict | None = None):
        worker = self

        class Timed:
            def timed(self, calls: int) -> float:
                request_spec = spec or {**SIZES[size], **LEARNING}
                worker.proc.stdin.write(json.dumps({"size": size, "op": op, "calls": calls,
                                                    "spec": request_spec}) + "\n")
                worker.proc.stdin.flush()
                line = worker.proc.stdout.readline()
                if not line:
                    raise RuntimeError("the ngclearn worker died")
                return json.loads(line)["seconds_per_call"]

        return Timed()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Engine:
    """The engine in-process, as a researcher would call it: numpy in, numpy out."""

    def __init__(self, size: dict) -> None:
        self.cfg = hd.choose_filter_update(hd.parse_config(config_of(size)), jax.devices()[0].platform)
        self.state = hd.init(self.cfg, seed=0)

    def forward(self, x):
        self.state = deconv.forward(self.cfg, self.state, x)
        return np.asarray(self.state.outputs)

    def evolve(self, pre, post):
        self.state = jax.block_until_ready(hd.evolve(self.cfg, self.state, pre, post))

    def backtransmit(self, post):
        self.state = hd.backtransmit(self.cfg, self.state, post)
        return np.asarray(self.state.dInputs)


def against_ngclearn(tmp: Path, report: Report, quick: bool) -> None:
    try:
        worker = NgclearnWorker(ngclearn_python())
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError) as exc:
        print(f"ngclearn is not available ({exc}); skipping that comparison", flush=True)
        for size in ("medium", "large"):
            report.target(f"service evolve round trip, {size}", "<= 1.0x ngclearn in-process",
                          "ngclearn unavailable", None)
        return
    sizes = {"small": SIZES["small"]} if quick else SIZES
    rows = []
    try:
        with server(tmp, "ngclearn") as srv, SynapseClient(srv.url) as client:
            for size_name, size in sizes.items():
                syn = client.create(f"vs-{size_name}", kind=KIND, config=config_of(size))
                engine = Engine(size)
                x, post = signals(size)
                rounds, calls = (3, 2) if quick else {"small": (15, 40), "medium": (11, 8), "large": (7, 2)}[size_name]
                ops = {
                    "forward": (lambda: syn.forward(x), lambda: engine.forward(x)),
                    "evolve": (lambda: syn.evolve(x, post), lambda: engine.evolve(x, post)),
                    "backtransmit": (lambda: syn.backtransmit(post), lambda: engine.backtransmit(post)),
                }
                for op, (via_service, in_process) in ops.items():
                    result = interleaved({"ngclearn": worker.op(size_name, op), "service": via_service,
                                          "engine": in_process}, rounds, calls)
                    ratio = result["service"] / result["ngclearn"]
                    rows.append([size_name, op, ms(result["ngclearn"]), ms(result["service"]), ms(result["engine"]),
                                 f"{ratio:.2f}", f"{result['engine'] / result['ngclearn']:.2f}"])
                    if op == "evolve" and size_name in ("medium", "large"):
                        report.target(f"service evolve round trip, {size_name}", "<= 1.0x ngclearn in-process",
                                      f"{ratio:.2f}x", ratio <= 1.0)
    finally:
        worker.close()
    report.table("Against ngclearn 3.2.3 in-process (CPU)",
                 ["size", "op", "ngclearn ms", "service round trip ms", "engine in-process ms", "service / ngclearn",
                  "engine / ngclearn"], rows,
                 f"ngclearn {worker.hello.get('jax') and 'on JAX ' + worker.hello['jax']}: set the compartments from "
                 "numpy, run the op's MethodProcess, read the result as numpy. Service: the client sends every "
                 "tensor (evolve: pre and post) and receives the result. Sizes: small (batch 1, 8x8, k3, 1->4), "
                 "medium (batch 32, 28x28, k5, 1->32), large (batch 128, 32x32, k3, 16->64); adam.")


DENSE_SIZES = {"784x512": (784, 512, 250), "512x10": (512, 10, 250)}  # ngclearn's exhibits, batch 250


def against_ngclearn_dense(tmp: Path, report: Report, quick: bool) -> None:
    """The dense HebbianSynapse: engine in-process and service round trip vs ngclearn in-process."""
    try:
        worker = NgclearnWorker(ngclearn_python())
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError) as exc:
        print(f"ngclearn is not available ({exc}); skipping that comparison", flush=True)
        return
    rows = []
    try:
        with server(tmp, "dense") as srv, SynapseClient(srv.url) as client:
            for size_name, (n_in, n_out, batch) in DENSE_SIZES.items():
                if quick:
                    batch = 8
                config = {"shape": [n_in, n_out], "batch_size": batch, **LEARNING}
                spec = {"kind": "dense", "shape": [n_in, n_out], "batch": batch, **LEARNING}
                syn = client.create(f"dense-{size_name}", kind="HebbianSynapse", config=config)
                cfg = hebbian.parse_config(config)
                holder = {"state": hebbian.init(cfg, seed=0)}
                x, post = rand((batch, n_in), 1), rand((batch, n_out), 2)

                def engine_forward():
                    holder["state"] = dense.forward(cfg, holder["state"], x)
                    return np.asarray(holder["state"].outputs)

                def engine_evolve():
                    holder["state"] = jax.block_until_ready(hebbian.evolve(cfg, holder["state"], x, post))

                rounds, calls = (3, 2) if quick else (11, 10)
                for op, via_service, in_process in (("forward", lambda: syn.forward(x), engine_forward),
                                                    ("evolve", lambda: syn.evolve(x, post), engine_evolve)):
                    result = interleaved({"ngclearn": worker.op(f"dense-{size_name}", op, spec),
                                          "service": via_service, "engine": in_process}, rounds, calls)
                    engine_ratio = result["engine"] / result["ngclearn"]
                    rows.append([size_name, batch, op, ms(result["ngclearn"]), ms(result["service"]),
                                 ms(result["engine"]), f"{result['service'] / result['ngclearn']:.2f}",
                                 f"{engine_ratio:.2f}"])
                    report.target(f"dense engine {op}, {size_name}", "<= 0.8x ngclearn in-process",
                                  f"{engine_ratio:.2f}x", engine_ratio <= 0.8)
    finally:
        worker.close()
    report.table("Dense HebbianSynapse against ngclearn 3.2.3 in-process (CPU)",
                 ["size", "batch", "op", "ngclearn ms", "service round trip ms", "engine in-process ms",
                  "service / ngclearn", "engine / ngclearn"], rows,
                 "adam, eta 0.01, ngclearn's defaults otherwise (w_bound 1). ngclearn: set the compartments from "
                 "numpy, run the op's MethodProcess, read the result as numpy; engine: the same through the kind's "
                 "jitted functions; service: the client sends every tensor (evolve: pre and post) and reads the "
                 "answer.")


def fused_step(tmp: Path, report: Report, quick: bool) -> None:
    rows = []
    sizes = {"small": SIZES["small"]} if quick else {k: SIZES[k] for k in ("small", "medium")}
    with server(tmp, "step") as srv, SynapseClient(srv.url) as client:
        for size_name, size in sizes.items():
            a = client.create(f"three-{size_name}", kind=KIND, config=config_of(size))
            b = client.create(f"fused-{size_name}", kind=KIND, config=config_of(size))
            c = client.create(f"refs-{size_name}", kind=KIND, config=config_of(size))
            x, post = signals(size)

            def three_calls(s=a, x=x, post=post):
                s.forward(x)
                s.evolve(x, post)
                s.backtransmit(post)

            def with_refs(s=c, x=x, post=post):
                s.forward(x)
                s.evolve(Ref("inputs"), post)
                s.backtransmit(Ref("post"))

            rounds, calls = (3, 2) if quick else ((15, 20) if size_name == "small" else (9, 4))
            result = interleaved({"three": three_calls, "refs": with_refs,
                                  "step": lambda s=b, x=x, post=post: s.step(x, post)}, rounds, calls)
            rows.append([size_name, ms(result["three"]), ms(result["refs"]), ms(result["step"]),
                         f"{result['step'] / result['three']:.2f}"])
    report.table("Fused step and references", ["size", "forward + evolve + backtransmit ms",
                                               "same with pre, post as Ref ms", "step ms", "step / three calls"],
                 rows, "One learning step: the three calls with every tensor sent, the three with the repeated "
                       "tensors as references to the server's compartments, and one `step` call.")


def scale(tmp: Path, report: Report, quick: bool) -> None:
    """One server per instance count, all up at once, measured in interleaved rounds."""
    counts = (1, 10, 50) if quick else (1, 100, 1000)
    config = config_of(SIZES["small"])
    x = signals(SIZES["small"])[0]
    create_times = []
    with contextlib.ExitStack() as stack:
        servers, calls_on = {}, {}
        for count in counts:
            srv = stack.enter_context(server(tmp, f"scale-{count}", max_instances=5000, max_instances_per_owner=5000))
            client = stack.enter_context(SynapseClient(srv.url))
            first = client.create("n0", kind=KIND, config=config)
            first.forward(x)  # compiles: every later instance of this config shares the executable
            rss_one = rss_bytes(srv.proc.pid)
            for i in range(1, count):
                start = time.perf_counter()
                client.create(f"n{i}", kind=KIND, config=config)
                create_times.append(time.perf_counter() - start)
            servers[count] = (srv, rss_one, first.describe()["state_bytes"])
            # calls go round instances spread over the whole set, each called once before timing
            spread = [client.get(f"n{i}") for i in np.linspace(0, count - 1, min(count, 16)).astype(int)]
            for syn in spread:
                syn.forward(x)
            turn = iter(range(1 << 62))
            calls_on[count] = lambda spread=spread, turn=turn: spread[next(turn) % len(spread)].forward(x)
        rounds, calls = (3, 5) if quick else (21, 48)
        latency = interleaved({str(c): calls_on[c] for c in counts}, rounds, calls)
        top = counts[-1]
        srv, rss_one, state_bytes = servers[top]
        per_instance = (rss_bytes(srv.proc.pid) - rss_one) / (top - 1)
    rows = [[c, ms(latency[str(c)]), f"{latency[str(c)] / latency[str(counts[0])]:.2f}"] for c in counts]
    create_ms = statistics.median(create_times) * 1e3
    report.table("Scale in instances", ["instances hosted", "forward ms (small)", "vs 1 instance"], rows,
                 f"One server per count, all running, measured in interleaved rounds. Creating an instance of an "
                 f"already-compiled config (client round trip, median of {len(create_times)}): {create_ms:.2f} ms. "
                 f"Server memory per instance: {per_instance / 1024:.1f} KiB (RSS growth over {top - 1} creates) "
                 f"for {state_bytes} bytes of state.")
    ratio = latency[str(top)] / latency[str(counts[0])]
    report.target(f"per-call latency at {top} instances", "<= 1.1x at 1 instance", f"{ratio:.2f}x", ratio <= 1.1)
    report.target("create an instance of a compiled config", "<= 5 ms", f"{create_ms:.2f} ms", create_ms <= 5)


def concurrency(tmp: Path, report: Report, quick: bool) -> None:
    clients_counts = (1, 4) if quick else (1, 4, 16)
    seconds = 1.0 if quick else 4.0
    rows = []
    size = SIZES["small"]
    x = signals(size)[0]
    with server(tmp, "concurrency") as srv:
        with SynapseClient(srv.url) as setup:
            for i in range(max(clients_counts)):
                setup.create(f"c{i}", kind=KIND, config=config_of(size)).forward(x)
        throughput: dict[tuple[str, str, int], list[float]] = {}
        for _ in range(1 if quick else 3):  # rounds, interleaved; the median is kept
            for how in ("processes", "threads"):
                for shared in (False, True):
                    for n in clients_counts:
                        rate = drive_clients(srv.url, n, shared, x, seconds, processes=how == "processes")
                        throughput.setdefault((how, "shared" if shared else "separate", n), []).append(rate)
    medians = {key: statistics.median(values) for key, values in throughput.items()}
    for (how, mode, n), rate in sorted(medians.items()):
        rows.append([how, mode, n, f"{rate:.0f}", f"{rate / medians[(how, mode, 1)]:.2f}"])
    report.table("Concurrency: forward (small)", ["clients as", "instances", "clients", "calls/s", "vs 1 client"],
                 rows, f"Each client has its own connection and loops for {seconds:.0f} s; median of the rounds. "
                       "The clients run on the server's machine: as threads they share one Python process (at most "
                       "one core between them), as processes they compete with the server for both cores.")
    top = max(clients_counts)
    for how in ("threads", "processes"):
        ratio = medians[(how, "separate", top)] / medians[(how, "separate", 1)]
        report.target(f"{top} clients ({how}) on {top} instances", ">= 1.7x one client", f"{ratio:.2f}x",
                      ratio >= 1.7)


def _client_loop(url: str, name: str, x: np.ndarray, start_line, stop, counts, i: int) -> None:
    """One client: warm its connection, wait for the start, call forward until told to stop."""
    with SynapseClient(url) as client:
        syn = client.get(name)
        syn.forward(x)
        start_line.wait()
        n = 0
        while not stop.is_set():
            syn.forward(x)
            n += 1
        counts[i] = n


def drive_clients(url: str, n: int, shared: bool, x: np.ndarray, seconds: float, processes: bool) -> float:
    """Aggregate calls/s of ``n`` clients (threads or spawned processes) calling forward for ``seconds``."""
    if processes:
        context = multiprocessing.get_context("spawn")
        start_line, stop, counts = context.Barrier(n + 1), context.Event(), context.Array("q", n)
        workers = [context.Process(target=_client_loop, args=(url, "c0" if shared else f"c{i}", x, start_line, stop,
                                                              counts, i)) for i in range(n)]
    else:
        start_line, stop, counts = threading.Barrier(n + 1), threading.Event(), [0] * n
        workers = [threading.Thread(target=_client_loop, args=(url, "c0" if shared else f"c{i}", x, start_line, stop,
                                                               counts, i)) for i in range(n)]
    for w in workers:
        w.start()
    start_line.wait(timeout=120)
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - start  # each client may finish one call more: negligible over seconds
    for w in workers:
        w.join(60)
    return sum(counts) / elapsed


def codec(report: Report, quick: bool) -> None:
    rows = []
    for label, nbytes in (("1 MiB", MiB), ("64 MiB", 64 * MiB)):
        x = rand((nbytes // 4,))
        target = np.empty_like(x)
        body = packb({"x": x})
        rounds, calls = (3, 2) if quick else ((15, 20) if nbytes == MiB else (9, 3))
        result = interleaved({
            "memcpy": lambda: np.copyto(target, x),
            "encode": lambda: packb_parts({"x": x}),
            "decode": lambda: unpackb(body),
            "both": lambda: (packb_parts({"x": x}), unpackb(body)),
            "contiguous": lambda: packb({"x": x}),
        }, rounds, calls)
        gbps = {k: nbytes / v / 1e9 for k, v in result.items()}
        rows.append([label, f"{gbps['memcpy']:.1f}", f"{gbps['encode']:.0f}", f"{gbps['decode']:.0f}",
                     f"{gbps['both']:.0f}", f"{gbps['both'] / gbps['memcpy']:.1f}", f"{gbps['contiguous']:.1f}"])
        if label == "64 MiB":
            share = gbps["both"] / gbps["memcpy"]
            report.target("codec encode + decode, 64 MiB", ">= 0.5x memory copy", f"{share:.1f}x", share >= 0.5)
    report.table("Codec throughput (GB/s)", ["tensor", "memcpy (into an existing buffer)", "encode (parts)",
                                             "decode (in place)", "encode + decode", "encode + decode / memcpy",
                                             "one contiguous body (packb)"], rows,
                 "What the client and server do: encode yields a header and a view of the array's own memory, "
                 "written to the socket as is; decode views the received body's bytes. Neither copies the tensor "
                 "(the one copy on the way is the transport's). Building one contiguous body instead costs a copy "
                 "into freshly allocated memory, shown last.")


def restart(tmp: Path, report: Report, quick: bool) -> None:
    size = SIZES["small" if quick else "medium"]
    x, post = signals(size)
    rows = []

    def first_answers(state: Path, create: bool, **settings) -> tuple[float, float]:
        start = time.perf_counter()
        with ServerProcess(state, durability="sync", warmup=False, **settings) as srv, \
                SynapseClient(srv.url) as client:
            ready = time.perf_counter() - start
            t0 = time.perf_counter()
            syn = client.create("r", kind=KIND, config=config_of(size)) if create else client.get("r")
            syn.forward(x)
            syn.evolve(x, post)
            syn.backtransmit(post)
            first = time.perf_counter() - t0
            srv.stop()
        return ready, first

    for trial in range(1 if quick else 3):
        state = tmp / f"restart-{trial}"
        for label, create, settings in (("cold start (empty cache)", True, {}),
                                        ("restart, cache on", False, {}),
                                        ("restart, cache off", False, {"compilation_cache": "false"})):
            rows.append((label, *first_answers(state, create, **settings)))
    summary = {}
    for label, ready, first in rows:
        summary.setdefault(label, []).append((ready, first))
    table = [[label, ms(statistics.median(r for r, _ in values)), ms(statistics.median(f for _, f in values))]
             for label, values in summary.items()]
    report.table("Restart: persistent compilation cache", ["start", "process start to ready ms",
                                                           "first create/get + forward + evolve + backtransmit ms"],
                 table, f"Size {'small' if quick else 'medium'}; the instance is restored from disk on restarts; "
                        "median of the trials.")


SECTIONS = {"codec": codec, "transport": transport, "ngclearn": against_ngclearn, "dense": against_ngclearn_dense,
            "step": fused_step,
            "scale": scale, "concurrency": concurrency, "restart": restart}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run, not a measurement")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--write", type=Path, help="replace the suite's part of this markdown file")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")

    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            print(f"## {name}", flush=True)
            fn = SECTIONS[name]
            fn(report, args.quick) if name == "codec" else fn(Path(tmp), report, args.quick)
    header = machine(f", JAX {jax.__version__} on {jax.devices()[0].platform}{' (--quick)' if args.quick else ''}. "
                     f"Sections: {', '.join(wanted)}")
    text = report.markdown(header)
    print(text)
    if args.write:
        current = args.write.read_text() if args.write.exists() else f"{BEGIN}\n{END}\n"
        before, rest = current.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        args.write.write_text(f"{before}{BEGIN}\n{text}{END}{after}")


if __name__ == "__main__":
    main()
