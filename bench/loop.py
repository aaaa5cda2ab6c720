"""A real user loop, side by side: convolutional sparse coding on 8x8 images, as a researcher writes it.

Per batch of 32 images: twenty inference steps — forward the latent code through the dictionary
(a HebbianDeconvSynapse, 3x3 filters, 16 latent channels onto 1 image channel), take the
reconstruction error in numpy, back-transmit it and update the code (numpy) — then one evolve
and a renormalisation of the filters (read, normalise in numpy, write back): 43 calls per batch.

Candidates, measured in interleaved rounds in one run (bench/harness.py):

- ngclearn 3.2.3 in-process (its own Python 3.12 environment, bench/ngclearn_worker.py), with JAX's
  defaults (the yardstick), and again with JAX's CPU dispatch synchronous (the engine's default,
  ``SYNAPSE_CPU_ASYNC_DISPATCH``): what that flag alone gives ngclearn;
- bare jitted JAX ops (conv_transpose and its two gradients, no service at all): the floor, in this
  process, whose CPU dispatch is synchronous as the in-process mode's (``--cpu-async-dispatch``: not);
- the service's engine in-process through the client (``SynapseClient("local")``);
- the client over the session stream (one WebSocket frame per call), and again on a server with
  busy polling off (``SYNAPSE_BUSY_POLL_US=0``: its loop sleeps as soon as it has answered);
- the same, the instance renormalising its filters itself after each evolve (``w_norm``: 41 calls);
- the client over REST (one HTTP request per call), and again through httpx (a client given a
  custom transport, as https or a proxy would be: the path before the client's lean HTTP path).

    .venv/bin/python bench/loop.py [--batches 5] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import httpx
import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from synapse_client import SynapseClient
from synapse_serve.testing import ServerProcess

from harness import ROOT, interleaved, machine, ms, ngclearn_python, table  # noqa: E402 - bench/ is on the path

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [3, 3, 16, 1], "x_shape": [8, 8], "stride": 1, "eta": 0.01, "sign_value": -1.0,
          "filter_init": {"dist": "uniform", "low": -0.1, "high": 0.1}}
BATCH, STEPS, RATE, SPARSITY = 32, 20, 0.01, 0.001
NORMED = {**CONFIG, "w_norm": 1.0, "w_norm_per": "in"}  # the same renormalisation, done by the instance


def images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((BATCH, 8, 8, 1), dtype=np.float32)


def user_loop(syn, batches: int, renormalise: bool = True) -> None:
    """The loop as a researcher writes it against a handle (REST, session or in-process: the same code).
    ``renormalise`` False: the instance does it itself after each evolve (``w_norm``: 41 calls per batch)."""
    for b in range(batches):
        x = images(b)
        z = np.zeros((BATCH, 8, 8, 16), np.float32)
        for _ in range(STEPS):
            error = x - syn.forward(z)
            dz = syn.backtransmit(error)
            z = z - RATE * dz - SPARSITY * np.sign(z)
        syn.evolve(z, error)
        if renormalise:
            w = syn.weights
            w /= np.sqrt((w ** 2).sum(axis=(0, 1, 3), keepdims=True)) + 1e-8
            syn.set("weights", w)


class BareJax:
    """The floor: conv_transpose and its gradients as plain jitted functions, numpy between them."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.w = jnp.asarray(rng.uniform(-0.1, 0.1, (3, 3, 16, 1)).astype(np.float32))
        dims = ("NHWC", "HWIO", "NHWC")

        def fwd(z, w):
            return lax.conv_transpose(z, w, (1, 1), "SAME", dimension_numbers=dims, precision=lax.Precision.HIGHEST)

        self.forward = jax.jit(fwd)
        self.backtransmit = jax.jit(lambda e, w: -jax.vjp(lambda z: fwd(z, w), jnp.zeros((BATCH, 8, 8, 16)))[1](e)[0])
        self.evolve = jax.jit(lambda z, e, w: w - 0.01 * jax.vjp(lambda k: fwd(z, k), w)[1](e)[0])

    def loop(self, batches: int) -> None:
        for b in range(batches):
            x = images(b)
            z = np.zeros((BATCH, 8, 8, 16), np.float32)
            for _ in range(STEPS):
                error = x - np.asarray(self.forward(z, self.w))
                dz = np.asarray(self.backtransmit(error, self.w))
                z = z - RATE * dz - SPARSITY * np.sign(z)
            w = np.array(self.evolve(z, error, self.w))
            w /= np.sqrt((w ** 2).sum(axis=(0, 1, 3), keepdims=True)) + 1e-8
            self.w = jnp.asarray(w)


class NgclearnLoop:
    """The same loop in ngclearn's process (bench/ngclearn_worker.py), timed there."""

    def __init__(self, batches: int, *options: str) -> None:
        self.batches = batches
        self.proc = subprocess.Popen([str(ngclearn_python()), str(ROOT / "bench" / "ngclearn_worker.py"), *options],
                                     text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
        self.hello = json.loads(self.proc.stdout.readline())

    def timed(self, calls: int) -> float:
        request = {"loop": {**CONFIG, "batch": BATCH, "steps": STEPS, "rate": RATE, "sparsity": SPARSITY},
                   "batches": self.batches, "calls": calls}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds_per_call"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="batches per timed loop")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip", nargs="*", default=[], help="candidates to leave out")
    parser.add_argument("--cpu-async-dispatch", action="store_true",
                        help="keep JAX's asynchronous CPU dispatch in this process (the bare floor and the "
                             "in-process mode); the servers keep their own default")
    args = parser.parse_args()
    jax.config.update("jax_cpu_enable_async_dispatch", args.cpu_async_dispatch)  # before JAX starts its CPU backend
    candidates = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if "ngclearn" not in args.skip:
            worker = NgclearnLoop(args.batches)
            stack.callback(worker.close)
            candidates["ngclearn in-process"] = worker
            synchronous = NgclearnLoop(args.batches, "--cpu-sync-dispatch")
            stack.callback(synchronous.close)
            candidates["ngclearn in-process, CPU dispatch synchronous"] = synchronous
        bare = BareJax()
        candidates["bare jitted JAX"] = lambda: bare.loop(args.batches)
        if "local" not in args.skip:
            local = stack.enter_context(SynapseClient("local"))
            local_syn = local.create("csc", kind=KIND, config=CONFIG)
            candidates["in-process client"] = lambda: user_loop(local_syn, args.batches)
        server = stack.enter_context(ServerProcess(Path(tmp) / "state", durability="off"))
        client = stack.enter_context(SynapseClient(server.url))
        rest_syn = client.create("csc", kind=KIND, config=CONFIG)
        session = stack.enter_context(client.session())
        stream_syn = session.get("csc")
        candidates["session stream"] = lambda: user_loop(stream_syn, args.batches)
        unpolled = stack.enter_context(ServerProcess(Path(tmp) / "unpolled", durability="off", busy_poll_us=0))
        unpolled_client = stack.enter_context(SynapseClient(unpolled.url))
        unpolled_client.create("csc", kind=KIND, config=CONFIG)
        unpolled_syn = stack.enter_context(unpolled_client.session()).get("csc")
        candidates["session stream, busy polling off"] = lambda: user_loop(unpolled_syn, args.batches)
        client.create("csc-normed", kind=KIND, config=NORMED)
        normed_syn = session.get("csc-normed")
        candidates["session stream, w_norm (41 calls)"] = lambda: user_loop(normed_syn, args.batches, False)
        candidates["REST"] = lambda: user_loop(rest_syn, args.batches)
        httpx_client = stack.enter_context(SynapseClient(server.url, transport=httpx.HTTPTransport()))
        httpx_syn = httpx_client.get("csc")
        candidates["REST through httpx"] = lambda: user_loop(httpx_syn, args.batches)
        result = interleaved(candidates, args.rounds, 1)
    base = result.get("ngclearn in-process")
    rows = [[name, ms(seconds / args.batches),
             f"{seconds / (args.batches * (2 * STEPS + (1 if 'w_norm' in name else 3))) * 1e3:.3f}",
             f"{seconds / base:.2f}" if base else "-"] for name, seconds in result.items()]
    print(machine(f", JAX {jax.__version__} on {jax.devices()[0].platform}; {args.rounds} rounds of {args.batches} "
                  f"batches"))
    print(table(["candidate", "ms per batch", "ms per call", "/ ngclearn"], rows))


if __name__ == "__main__":
    main()
