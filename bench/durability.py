"""Evolve throughput of each durability mode, side by side in one run.

Starts one real server process per mode (sync, interval, off) on loopback,
creates the same synapse on each, and drives them in interleaved rounds so
drift on a shared machine hits every mode alike. Prints medians and ratios
to ``off``. Not a test: run it by hand::

    .venv/bin/python bench/durability.py [--rounds 20] [--calls 25]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from synapse_client import SynapseClient
from synapse_serve.testing import ServerProcess

from harness import interleaved, machine  # noqa: E402 - bench/ is on the path when run as a script

SIZES = {
    "small": {"shape": [3, 3, 1, 4], "x_shape": [8, 8], "batch": 1},
    "medium": {"shape": [5, 5, 1, 32], "x_shape": [28, 28], "batch": 32},
}
MODES = ("off", "interval", "sync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=25, help="evolves per mode per round")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        servers = {m: ServerProcess(Path(tmp) / m, durability=m, flush_interval_s=2.0).start() for m in MODES}
        try:
            rows = []
            for size, spec in SIZES.items():
                config = {"shape": spec["shape"], "x_shape": spec["x_shape"], "eta": 0.01, "optim_type": "adam"}
                rng = np.random.default_rng(0)
                clients = {m: SynapseClient(s.url) for m, s in servers.items()}
                syns = {m: c.create(f"bench-{size}", kind="HebbianDeconvSynapse", config=config)
                        for m, c in clients.items()}
                pre = rng.normal(size=(spec["batch"], *spec["x_shape"], spec["shape"][2])).astype(np.float32)
                post = syns["off"].forward(pre)
                for syn in syns.values():  # compile and warm the connections
                    syn.evolve(pre, post)
                medians = interleaved({m: (lambda s=syns[m]: s.evolve(pre, post)) for m in MODES}, args.rounds,
                                      args.calls)
                state_bytes = syns["off"].describe()["state_bytes"]
                for mode in MODES:
                    median = medians[mode]
                    rows.append((size, state_bytes, mode, median * 1e3, 1 / median, median / medians["off"]))
                for c in clients.values():
                    c.close()
        finally:
            for server in servers.values():
                server.stop()
    print(f"# evolve throughput by durability mode — {machine()} rounds={args.rounds}, calls/round={args.calls}")
    print("| size | state bytes | mode | ms/evolve (median) | evolves/s | × off |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size, nbytes, mode, ms, rate, ratio in rows:
        print(f"| {size} | {nbytes} | {mode} | {ms:.2f} | {rate:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
