"""Sequences around a convolution, written out or scanned, side by side in one run (kinds/convolutions.py).

On the CPU, XLA runs a convolution with Eigen's kernel only in a program's entry computation; inside
``lax.scan`` it runs its own loop nest. Sequences of an operation that convolves are therefore
written out (at most 32 steps per program). This measures, on the engine in-process (synchronous
CPU dispatch, no HTTP, no registry), each sequence call both ways in interleaved rounds — written
out (what runs) and scanned (what ran before) — and the first call of each (its compile).

    .venv/bin/python bench/written_out.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from synapse_serve.kinds import get_kind, sequence  # noqa: E402

from harness import interleaved, machine, rand, table  # noqa: E402 - bench/ is on the path

KIND = get_kind("HebbianDeconvSynapse")
LOOP = {"shape": [3, 3, 16, 1], "x_shape": [8, 8], "eta": 0.01, "sign_value": -1.0}  # bench/loop.py's dictionary
SEQ = {"shape": [3, 3, 4, 4], "x_shape": [8, 8], "eta": 0.01}  # bench/many_ops.py's sequence


def sent(cfg, operation: str, lead: tuple[int, ...], batch: int) -> tuple:
    x, y = rand((*lead, batch, *cfg.trailing("in")), 1), rand((*lead, batch, *cfg.trailing("out")), 2)
    return {"forward": (x,), "evolve": (x, y)}[operation]


def sequences(config: dict, operation: str, steps: int, batch: int) -> dict:
    """The sequence call, every step's outputs returned, each way: {label: (first call's seconds, call)}."""
    cfg = KIND.parse_config(config)
    fn = KIND.operations[operation].fn
    tensors = sent(cfg, operation, (steps,), batch)
    run = sequence.sequence_fn(fn, ("outputs",), 1, False)
    out = {}
    for label, written in (("written out", True), ("scanned", False)):
        state = [KIND.init(cfg, 0, None, None)]

        def call(written=written, state=state):
            sequence._CONVOLUTION_OF[(fn, cfg)] = written  # the one switch between the two ways
            state[0], kept = run(cfg, state[0], *tensors)
            jax.block_until_ready(kept)

        started = time.perf_counter()
        call()
        out[label] = (time.perf_counter() - started, call)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    cases = [
        ("sequence, T=20 forward, 3x3x4x4 (bench/many_ops.py's)", sequences(SEQ, "forward", 20, 8)),
        ("sequence, T=20 evolve, 3x3x4x4", sequences(SEQ, "evolve", 20, 8)),
        ("sequence, T=20 evolve, loop dictionary 3x3x16x1, batch 32", sequences(LOOP, "evolve", 20, 32)),
        ("sequence, T=70 evolve, loop dictionary (3 programs written out)", sequences(LOOP, "evolve", 70, 32)),
    ]
    rows = []
    for label, ways in cases:
        timings = interleaved({way: call for way, (_, call) in ways.items()}, args.rounds, 5)
        (written, looped) = ways
        rows.append([label, f"{timings[written] * 1e3:.3f}", f"{timings[looped] * 1e3:.3f}",
                     f"{timings[written] / timings[looped]:.2f}",
                     f"{ways[written][0]:.2f} / {ways[looped][0]:.2f}"])
    print(machine(f"; {args.rounds} interleaved rounds"))
    print(table(["call", "written out, ms", "scanned, ms", "ratio", "first call (compile), s: written / scanned"],
                rows))


if __name__ == "__main__":
    main()
