"""What the learning-curve history costs a learning call, side by side in one run (in process, no HTTP).

Two registries in this process, one keeping no history and one keeping 256 samples (what a
``durability=off`` instance gets with ``SYNAPSE_HISTORY_WHEN_DURABILITY_OFF=true``), each evolving
the same tiny dense synapse and a small deconvolutional one, in interleaved rounds. The ratio is
why memory-only instances keep no history by default (docs/api.md#what-learned-pictures-statistics-history).

    .venv/bin/python bench/history_cost.py [--rounds 15]
"""

from __future__ import annotations

import argparse

import numpy as np

from synapse_serve.local.registry import Registry
from synapse_serve.names import InstanceKey

from harness import interleaved, machine, table  # noqa: E402 - bench/ is on the path

CASES = {
    "HebbianSynapse 16x8, batch 4": ("HebbianSynapse", {"shape": [16, 8]}, (4, 16), (4, 8)),
    "HebbianDeconvSynapse 3x3x1x4 on 8x8, batch 2": ("HebbianDeconvSynapse",
                                                     {"shape": [3, 3, 1, 4], "x_shape": [8, 8]},
                                                     (2, 8, 8, 1), (2, 8, 8, 4)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    rows = []
    for label, (kind, config, pre_shape, post_shape) in CASES.items():
        pre, post = np.ones(pre_shape, np.float32), np.ones(post_shape, np.float32)
        candidates = {}
        for length in (0, 256):
            registry, key = Registry(history_length=length, history_when_off=True), InstanceKey("local", "bench")
            registry.create(key, kind=kind, config=config)
            candidates[str(length)] = (lambda r=registry, k=key: r.call(k, "evolve", {"pre": pre, "post": post}))
        times = interleaved(candidates, args.rounds, args.calls)
        rows.append([label, f"{times['0'] * 1e6:.1f}", f"{times['256'] * 1e6:.1f}",
                     f"{(times['256'] - times['0']) * 1e6:.1f}", f"{times['256'] / times['0']:.2f}"])
    print(machine(" (JAX on CPU; medians of interleaved rounds)"))
    print(table(["evolve of", "no history µs", "history µs", "added µs", "ratio"], rows))


if __name__ == "__main__":
    main()
