"""Runs in ngclearn 3.2.3's own Python (tests/interop/test_ngclearn.py starts it): jobs in, results out.

``python ngclearn_driver.py jobs.json``; each job is one of

- ``continue``: load an export with its own ``load_in_ngclearn.py`` (component or model layout), run
  the given evolve/forward steps, save what ngclearn computed after each;
- ``native``: build a component in ngclearn, evolve it, save it with ngclearn's own ``syn.save`` (and
  ``ctx.save_to_json``), then run one more step and save the result (the files' next step);

and writes ``{"ok": true}`` or the error to stdout as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import numpy as jnp  # noqa: E402
from ngclearn import Context, MethodProcess  # noqa: E402
from ngclearn.components.synapses.convolution.hebbianDeconvSynapse import HebbianDeconvSynapse  # noqa: E402
from ngclearn.components.synapses.hebbian.hebbianSynapse import HebbianSynapse  # noqa: E402
from ngclearn.utils.distribution_generator import DistributionGenerator  # noqa: E402


def loader(folder: str):
    spec = importlib.util.spec_from_file_location(f"loader_{abs(hash(folder))}", os.path.join(folder,
                                                                                               "load_in_ngclearn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_steps(syn, ctx, tag: str, steps: np.lib.npyio.NpzFile, out: str) -> None:
    with ctx:
        evolve = MethodProcess(f"{tag}_evolve") >> syn.evolve
        forward = MethodProcess(f"{tag}_forward") >> syn.advance_state
    results = {}
    for t in range(int(steps["count"])):
        syn.pre.set(jnp.asarray(steps[f"pre{t}"]))
        syn.post.set(jnp.asarray(steps[f"post{t}"]))
        evolve.run(t=0.0, dt=1.0)
        if syn.biases.get() is None:  # ngclearn's no-bias deconvolution leaves None (its defect, see the notes)
            syn.biases.set(0.0)
        syn.inputs.set(jnp.asarray(steps[f"x{t}"]))
        forward.run(t=0.0, dt=1.0)
        results[f"weights{t}"] = np.asarray(syn.weights.get())
        results[f"biases{t}"] = np.asarray(syn.biases.get())
        results[f"dWeights{t}"] = np.asarray(syn.dWeights.get())
        results[f"outputs{t}"] = np.asarray(syn.outputs.get())
        leaves = jax.tree_util.tree_leaves(syn.opt_params.get())
        results[f"t{t}"] = np.asarray(leaves[-1], np.float32)
    np.savez(out, **results)


def continue_export(job: dict) -> None:
    steps = np.load(job["steps"])
    if job["layout"] == "component":
        ctx, syn = loader(job["folder"]).load_component(job["folder"], context_name=job["tag"])
    else:
        ctx = loader(job["folder"]).load_model(job["directory"], job["model"])
        syn = ctx.get_components(job["model"])
    run_steps(syn, ctx, job["tag"], steps, job["out"])


def native(job: dict) -> None:
    """A component made and saved by ngclearn itself, and the step after the save."""
    rng = np.random.RandomState(job["seed"])
    with Context(job["tag"]) as ctx:
        if job["kind"] == "HebbianSynapse":
            syn = HebbianSynapse("syn", tuple(job["shape"]), eta=0.05, weight_init=DistributionGenerator.uniform(
                -1.0, 1.0), bias_init=DistributionGenerator.constant(0.1) if job["bias"] else None,
                optim_type=job["optim_type"], batch_size=2, key=jax.random.PRNGKey(job["seed"]))
        else:
            syn = HebbianDeconvSynapse("syn", tuple(job["shape"]), tuple(job["x_shape"]), eta=0.05,
                                       filter_init=DistributionGenerator.uniform(-1.0, 1.0), padding="SAME",
                                       optim_type=job["optim_type"], batch_size=1, key=jax.random.PRNGKey(job["seed"]))
        evolve = MethodProcess(f"{job['tag']}_evolve") >> syn.evolve
    in_shape = (2, job["shape"][0]) if job["kind"] == "HebbianSynapse" else tuple(syn.in_shape)
    out_shape = (2, job["shape"][1]) if job["kind"] == "HebbianSynapse" else tuple(syn.out_shape)
    for _ in range(2):
        syn.pre.set(jnp.asarray(rng.randn(*in_shape).astype(np.float32)))
        syn.post.set(jnp.asarray(rng.randn(*out_shape).astype(np.float32)))
        evolve.run(t=0.0, dt=1.0)
        if syn.biases.get() is None:
            syn.biases.set(0.0)
    os.makedirs(job["component_dir"], exist_ok=True)
    syn.save(job["component_dir"])
    ctx.save_to_json(job["model_dir"], "model")
    pre, post = rng.randn(*in_shape).astype(np.float32), rng.randn(*out_shape).astype(np.float32)
    syn.pre.set(jnp.asarray(pre))
    syn.post.set(jnp.asarray(post))
    evolve.run(t=0.0, dt=1.0)
    np.savez(job["out"], pre=pre, post=post, weights=np.asarray(syn.weights.get()),
             biases=np.asarray(syn.biases.get() if syn.biases.get() is not None else 0.0))


def main() -> None:
    jobs = json.load(open(sys.argv[1]))
    done = []
    for job in jobs:
        try:
            (continue_export if job["do"] == "continue" else native)(job)
            done.append({"tag": job["tag"], "ok": True})
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            done.append({"tag": job["tag"], "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    print(json.dumps(done))


if __name__ == "__main__":
    main()
