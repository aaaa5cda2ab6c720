"""ngclearn 3.2.3 in-process, timed on request: the reference the service is measured against.

Runs inside ngclearn's own environment (Python >= 3.12; ``bench/suite.py`` creates
it). It reads one JSON request per line on stdin and answers one JSON line on
stdout, so the suite can interleave its rounds with the service's:

    {"size": "medium", "op": "evolve", "calls": 20, "spec": {...}}  ->  {"seconds_per_call": 0.0123}

A spec with ``"kind": "dense"`` builds a HebbianSynapse (``shape`` = [n_in, n_out]), else a
HebbianDeconvSynapse.

A call is what a researcher's loop does in-process: set the argument compartments
from numpy, run the op's ``MethodProcess``, and read the result back as numpy.

JAX's defaults, as ngclearn's users run it; ``--cpu-sync-dispatch`` turns JAX's asynchronous CPU
dispatch off first (what the service's engine does), to show what that flag alone is worth here.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
from jax import numpy as jnp
from ngclearn import Context, MethodProcess
from ngclearn.components.synapses.convolution.hebbianDeconvSynapse import HebbianDeconvSynapse
from ngclearn.components.synapses.hebbian.hebbianSynapse import HebbianSynapse
from ngclearn.utils.distribution_generator import DistributionGenerator

if "--cpu-sync-dispatch" in sys.argv:  # before anything starts JAX's CPU backend
    jax.config.update("jax_cpu_enable_async_dispatch", False)

_built: dict[str, tuple] = {}


def build(size: str, spec: dict) -> tuple:
    if size not in _built:
        dense = spec.get("kind") == "dense"
        with Context(f"bench_{size}"):
            if dense:
                syn = HebbianSynapse("syn", tuple(spec["shape"]), eta=spec["eta"], optim_type=spec["optim_type"],
                                     batch_size=spec["batch"], key=jax.random.PRNGKey(0))
            else:
                syn = HebbianDeconvSynapse(
                    "syn", tuple(spec["shape"]), tuple(spec["x_shape"]), eta=spec["eta"], stride=1, padding="SAME",
                    optim_type=spec["optim_type"], batch_size=spec["batch"], key=jax.random.PRNGKey(0),
                )
            procs = {
                "forward": MethodProcess(f"{size}_fwd") >> syn.advance_state,
                "evolve": MethodProcess(f"{size}_evo") >> syn.evolve,
            }
            if not dense:
                procs["backtransmit"] = MethodProcess(f"{size}_bt") >> syn.backtransmit
        rng = np.random.default_rng(0)
        in_shape = (spec["shape"][0],) if dense else tuple(syn.in_shape[1:])
        out_shape = (spec["shape"][1],) if dense else tuple(syn.out_shape[1:])
        x = rng.standard_normal((spec["batch"], *in_shape)).astype(np.float32)
        post = rng.standard_normal((spec["batch"], *out_shape)).astype(np.float32)
        _built[size] = (syn, procs, x, post)
    return _built[size]


def one_call(op: str, syn, procs, x: np.ndarray, post: np.ndarray) -> None:
    if op == "forward":
        syn.inputs.set(jnp.asarray(x))
        procs["forward"].run(t=0.0, dt=1.0)
        np.asarray(syn.outputs.get())
    elif op == "evolve":
        syn.pre.set(jnp.asarray(x))
        syn.post.set(jnp.asarray(post))
        procs["evolve"].run(t=0.0, dt=1.0)
        jax.block_until_ready(syn.weights.get())
    else:
        syn.post.set(jnp.asarray(post))
        procs["backtransmit"].run(t=0.0, dt=1.0)
        np.asarray(syn.dInputs.get())


def loop(spec: dict, batches: int) -> None:
    """bench/loop.py's convolutional sparse-coding loop, written against ngclearn."""
    if "loop" not in _built:
        with Context("bench_loop"):
            init = spec["filter_init"]
            syn = HebbianDeconvSynapse("syn", tuple(spec["shape"]), tuple(spec["x_shape"]), eta=spec["eta"],
                                       stride=spec["stride"], padding="SAME", sign_value=spec["sign_value"],
                                       filter_init=DistributionGenerator.uniform(init["low"], init["high"]),
                                       batch_size=spec["batch"], key=jax.random.PRNGKey(0))
            procs = {name: MethodProcess(f"loop_{name}") >> getattr(syn, method) for name, method in
                     (("forward", "advance_state"), ("evolve", "evolve"), ("backtransmit", "backtransmit"))}
        _built["loop"] = (syn, procs)
    syn, procs = _built["loop"]
    batch, c_in = spec["batch"], spec["shape"][2]
    for b in range(batches):
        x = np.random.default_rng(b).random((batch, 8, 8, 1), dtype=np.float32)
        z = np.zeros((batch, 8, 8, c_in), np.float32)
        for _ in range(spec["steps"]):
            syn.inputs.set(jnp.asarray(z))
            procs["forward"].run(t=0.0, dt=1.0)
            error = x - np.asarray(syn.outputs.get())
            syn.post.set(jnp.asarray(error))
            procs["backtransmit"].run(t=0.0, dt=1.0)
            z = z - spec["rate"] * np.asarray(syn.dInputs.get()) - spec["sparsity"] * np.sign(z)
        syn.pre.set(jnp.asarray(z))
        syn.post.set(jnp.asarray(error))
        procs["evolve"].run(t=0.0, dt=1.0)
        syn.biases.set(0.0)  # ngclearn's bias-free evolve writes None here (docs/conformance.md)
        w = np.array(syn.weights.get())
        w /= np.sqrt((w ** 2).sum(axis=(0, 1, 3), keepdims=True)) + 1e-8
        syn.weights.set(jnp.asarray(w))


def main() -> None:
    print(json.dumps({"ready": True, "jax": jax.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "loop" in request:
            loop(request["loop"], request["batches"])  # compiled on first use; not timed
            start = time.perf_counter()
            for _ in range(request["calls"]):
                loop(request["loop"], request["batches"])
            print(json.dumps({"seconds_per_call": (time.perf_counter() - start) / request["calls"]}), flush=True)
            continue
        syn, procs, x, post = build(request["size"], request["spec"])
        one_call(request["op"], syn, procs, x, post)  # compiled on first use; not timed
        start = time.perf_counter()
        for _ in range(request["calls"]):
            one_call(request["op"], syn, procs, x, post)
        seconds = (time.perf_counter() - start) / request["calls"]
        if request["op"] == "evolve" and request["spec"].get("kind") != "dense":
            # ngclearn's bias-free deconvolutional evolve writes None into the biases and the next forward
            # would crash (docs/conformance.md): put back its neutral 0.0, outside the timed loop
            syn.biases.set(0.0)
        print(json.dumps({"seconds_per_call": seconds}), flush=True)


if __name__ == "__main__":
    main()
