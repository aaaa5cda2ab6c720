"""Sequences and packed calls with and without XLA's small-loop kernel, side by side (kinds/base.py).

XLA:CPU compiles a small ``while`` loop into one kernel of its own (its ``small-while-loop-hoisting``
pass); there a dense step's products and sums came out ulps apart from a separate call's, so the
programs that loop (scanned sequences, packed calls) are compiled without that pass
(``LOOP_COMPILER_OPTIONS``). This measures what that costs, on the engine in-process (synchronous
CPU dispatch, no HTTP): dense sequence calls both ways in interleaved rounds, with the first call of
each (its compile); and stacked packed calls on 256 instances, each way in a process of its own
(the packed programs are compiled with the options their module was imported with), run twice
each, alternating.

    .venv/bin/python bench/small_loops.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from synapse_serve.kinds import base  # noqa: E402

from harness import interleaved, machine, rand, table  # noqa: E402 - bench/ is on the path

DENSE_SEQUENCES = [([8, 4], 100, 2), ([64, 32], 100, 8), ([784, 512], 20, 32)]  # (shape, steps, batch)
PACKED = 256
WITHOUT, WITH = "without the pass (what runs)", "with XLA's small-loop kernel"


def sequences(shape: list[int], operation: str, steps: int, batch: int) -> dict:
    """The scanned sequence call, every step's outputs returned, each way: {label: (first call's seconds, call)}."""
    from synapse_serve.kinds import get_kind, sequence

    kind = get_kind("HebbianSynapse")
    cfg = kind.parse_config({"shape": shape, "eta": 0.01})
    op = kind.operations[operation]
    x, y = rand((steps, batch, shape[0]), 1), rand((steps, batch, shape[1]), 2)
    sent = {"inputs": x, "pre": x, "post": y}
    tensors = tuple(sent.get(arg.name) for arg in op.args)
    options = dict(base.LOOP_COMPILER_OPTIONS)
    out = {}
    for label, kept in ((WITHOUT, options), (WITH, {})):
        base.LOOP_COMPILER_OPTIONS.clear()
        base.LOOP_COMPILER_OPTIONS.update(kept)  # read when the program is built, below
        run = sequence._scanned(op.fn, ("outputs",), 1, False)
        state = [kind.init(cfg, 0, None, None)]

        def call(run=run, state=state):
            state[0], kept_values = run(cfg, state[0], *tensors)
            jax.block_until_ready(kept_values)

        started = time.perf_counter()
        call()
        out[label] = (time.perf_counter() - started, call)
    base.LOOP_COMPILER_OPTIONS.update(options)
    return out


def packed(rounds: int) -> None:
    """In this process: stacked packed calls on 256 instances of a small config of each kind, ms per call."""
    from synapse_serve.local.registry import Registry
    from synapse_serve.names import InstanceKey

    registry = Registry()
    result = []
    for kind, config, x_shape, y_shape in (
            ("HebbianDeconvSynapse", {"shape": [2, 2, 1, 2], "x_shape": [4, 4], "eta": 0.1}, (4, 4, 1), (4, 4, 2)),
            ("HebbianSynapse", {"shape": [16, 8], "eta": 0.1}, (16,), (8,))):
        keys = [InstanceKey.of("bench", f"{kind}-{i}") for i in range(PACKED)]
        for i, key in enumerate(keys):
            registry.create(key, kind=kind, config=config, seed=i)
        x, y = rand((PACKED, 2, *x_shape), 1), rand((PACKED, 2, *y_shape), 2)
        for operation, sent in (("forward", {"inputs": x}), ("evolve", {"pre": x, "post": y}),
                                ("step", {"inputs": x, "post": y})):
            for _ in range(3):  # the second packed call on a population runs on its stack
                registry.call_stacked(keys, operation, sent)
            times = []
            for _ in range(rounds * 5):
                started = time.perf_counter()
                registry.call_stacked(keys, operation, sent)
                times.append(time.perf_counter() - started)
            result.append(f"{np.median(times) * 1e3:.2f}")
    print(" ".join(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--packed", choices=["with", "without"], help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if args.packed:
        if args.packed == "with":
            base.LOOP_COMPILER_OPTIONS.clear()  # before the packed programs are built (at import)
        packed(args.rounds)
        return
    rows = []
    for shape, steps, batch in DENSE_SEQUENCES:
        for operation in ("forward", "evolve", "step"):
            ways = sequences(shape, operation, steps, batch)
            timings = interleaved({way: call for way, (_, call) in ways.items()}, args.rounds, 5)
            rows.append([f"dense {shape}, T={steps}, batch {batch}: {operation}", f"{timings[WITHOUT] * 1e6:.0f}",
                         f"{timings[WITH] * 1e6:.0f}", f"{timings[WITHOUT] / timings[WITH]:.2f}",
                         f"{ways[WITHOUT][0] * 1e3:.0f} / {ways[WITH][0] * 1e3:.0f}"])
    print(machine(f"; {args.rounds} interleaved rounds"))
    print(table(["sequence call", "without, µs", "with, µs", "ratio", "first call (compile), ms: without / with"],
                rows))
    runs: dict[str, list[list[float]]] = {"without": [], "with": []}
    for _ in range(2):
        for way in ("without", "with"):
            out = subprocess.run([sys.executable, __file__, "--packed", way, "--rounds", str(args.rounds)],
                                 check=True, capture_output=True, text=True).stdout.split()
            runs[way].append([float(v) for v in out])
    labels = [f"{kind}, {operation}" for kind in ("deconvolution 2x2x1x2", "dense [16, 8]")
              for operation in ("forward", "evolve", "step")]
    rows = [[label, " / ".join(f"{r[i]:.2f}" for r in runs["without"]), " / ".join(f"{r[i]:.2f}" for r in runs["with"]),
             f"{min(r[i] for r in runs['without']) / min(r[i] for r in runs['with']):.2f}"]
            for i, label in enumerate(labels)]
    print(f"\nstacked packed calls on {PACKED} instances, batch 2 (two processes each way)")
    print(table(["packed call", "without, ms", "with, ms", "ratio of the best"], rows))


if __name__ == "__main__":
    main()
