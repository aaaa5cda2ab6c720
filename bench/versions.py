"""Server variants side by side in one run: this checkout against an older one, and the lean operation route
against FastAPI's route alone. Same client, same machine, interleaved rounds; ratios to the first variant.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/versions.py --baseline /tmp/before

Measured per variant: a tiny synapse's forward round trip with a 1 KiB and a 1 MiB body (the transport
section of suite.py), and the tiny forward on a server hosting 1,000 instances (its scale section).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from synapse_client import SynapseClient
from synapse_serve.testing import ServerProcess

from harness import ROOT, interleaved, machine, ms, rand, table  # noqa: E402 - bench/ is on the path

KIND = "HebbianDeconvSynapse"


@contextlib.contextmanager
def variant_server(tmp: Path, name: str, checkout: Path, hosted: int, **settings):
    """A server process running ``checkout``'s code, hosting ``hosted`` tiny instances besides the measured ones."""
    process = ServerProcess(tmp / name, durability="off", max_body_bytes=1 << 30, max_instances_per_owner=5000,
                            **settings)
    process.env["PYTHONPATH"] = os.pathsep.join(str(checkout / d) for d in ("service", "client"))
    with process, SynapseClient(process.url) as client:
        for i in range(hosted):
            client.create(f"host-{i}", kind=KIND, config={"shape": [1, 1, 1, 1], "x_shape": [16, 16]})
        yield process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="an older checkout (e.g. a git worktree) to compare with")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    variants = {"this checkout": (ROOT, {}), "this checkout, FastAPI route only": (ROOT, {"operation_route": "false"})}
    if args.baseline:
        variants = {f"baseline ({args.baseline.name})": (args.baseline.resolve(), {}), **variants}
    cases = {"1 KiB": ((16, 16), 0, 30), "1 MiB": ((512, 512), 0, 8), "1 KiB, 1000 instances hosted": ((16, 16), 1000, 30)}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for case, (x_shape, hosted, calls) in cases.items():
            calls_of = {}
            for name, (checkout, settings) in variants.items():
                tag = f"{len(results)}-{list(variants).index(name)}"
                server = stack.enter_context(variant_server(Path(tmp), tag, checkout, hosted, **settings))
                client = stack.enter_context(SynapseClient(server.url))
                syn = client.create("measured", kind=KIND, config={"shape": [1, 1, 1, 1], "x_shape": list(x_shape)})
                x = rand((1, *x_shape, 1))
                calls_of[name] = lambda s=syn, v=x: s.forward(v)
            results[case] = interleaved(calls_of, args.rounds, calls)
            print(case, {k: ms(v) for k, v in results[case].items()}, flush=True)
            stack.close()
    first = next(iter(variants))
    rows = [[case, *(f"{ms(r[name])} ({r[name] / r[first]:.2f}x)" for name in variants)] for case, r in results.items()]
    print(machine())
    print(table(["forward round trip", *variants], rows))


if __name__ == "__main__":
    main()
