"""Generate golden vectors for the conformance tests from ngclearn 3.2.3.

ngclearn is the reference implementation of HebbianDeconvSynapse; the service
promises the same numbers wherever ngclearn runs and its shapes are right.
This script drives ngclearn over a fixed, seeded sample of configurations, each
through a sequence of forward / evolve / backtransmit / reset operations, and
writes what it saw to ``tests/data/ngclearn_reference.npz`` (arrays) and
``tests/data/ngclearn_reference.json`` (configs and op sequences), so the test
suite runs without ngclearn.

ngclearn 3.2.3 needs Python >= 3.12 (its numpy and jax pins)::

    python3.12 -m venv /tmp/ngc && /tmp/ngc/bin/pip install ngclearn==3.2.3
    /tmp/ngc/bin/python scripts/make_reference.py

Configurations that ngclearn rejects or answers with wrong shapes are skipped
and counted (they are the defects the service fixes, tested separately).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import jax
import numpy as np
from jax import numpy as jnp

jax.config.update("jax_platforms", "cpu")

from ngclearn import Context, MethodProcess  # noqa: E402
from ngclearn.components.synapses.convolution.hebbianDeconvSynapse import (  # noqa: E402
    HebbianDeconvSynapse,
)
from ngclearn.utils.distribution_generator import DistributionGenerator  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"
N_CONFIGS = 240


def sample_config(rng: random.Random, index: int) -> dict:
    """One random, ngclearn-valid configuration (square maps and kernels)."""
    k = rng.randint(1, 5)
    with_bias = rng.random() < 0.2
    c_out = k if with_bias else rng.randint(1, 4)  # ngclearn's bias is (1, kernel width)
    w_bound = rng.choice([0.0, 0.0, 0.5, 2.0])
    return {
        "index": index,
        "seed": rng.randint(0, 2**31 - 1),
        "shape": [k, k, rng.randint(1, 4), c_out],
        "x_shape": [min(rng.randint(1, 16), rng.randint(1, 16))] * 2,  # 1..16, mostly small: small files
        "padding": rng.choice(["SAME", "VALID"]),
        "stride": rng.randint(1, 3),
        "batch_size": rng.randint(1, 3),
        "eta": rng.choice([0.0, 0.01, 0.05, 0.1]),
        "optim_type": rng.choice(["sgd", "adam"]),
        "sign_value": rng.choice([1.0, -1.0]),
        "w_bound": w_bound,
        "is_nonnegative": rng.random() < 0.5,
        "w_decay": rng.choice([0.0, 0.0, 0.01, 0.1]),
        "g_conduct_factor": rng.choice([1.0, 1.0, 0.5, 2.0]),
        "bias": with_bias,
    }


def build(cfg: dict, name: str):
    with Context(name):
        syn = HebbianDeconvSynapse(
            "syn",
            tuple(cfg["shape"]),
            tuple(cfg["x_shape"]),
            eta=cfg["eta"],
            bias_init=DistributionGenerator.uniform(-0.5, 0.5) if cfg["bias"] else None,
            stride=cfg["stride"],
            padding=cfg["padding"],
            g_conduct_factor=cfg["g_conduct_factor"],
            w_bound=cfg["w_bound"],
            is_nonnegative=cfg["is_nonnegative"],
            w_decay=cfg["w_decay"],
            sign_value=cfg["sign_value"],
            optim_type=cfg["optim_type"],
            batch_size=cfg["batch_size"],
            key=jax.random.PRNGKey(cfg["seed"]),
        )
        procs = {
            "forward": MethodProcess(f"{name}_fwd") >> syn.advance_state,
            "evolve": MethodProcess(f"{name}_evo") >> syn.evolve,
            "backtransmit": MethodProcess(f"{name}_bt") >> syn.backtransmit,
            "reset": MethodProcess(f"{name}_rst") >> syn.reset,
        }
    return syn, procs


def signal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian values rounded to 1/16: exact in float32 and they compress well."""
    return (np.round(rng.normal(size=shape) * 16) / 16).astype(np.float32)


def run_config(cfg: dict, rng: np.random.Generator, arrays: dict) -> dict | None:
    """Run one op sequence through ngclearn; returns its record or None if ngclearn fails."""
    prefix = f"c{cfg['index']}"
    try:
        syn, procs = build(cfg, f"ref{cfg['index']}")
    except Exception as exc:  # ngclearn rejects the config: a defect tested elsewhere
        return {"skipped": f"construct: {type(exc).__name__}"}
    in_shape = tuple(syn.in_shape)
    out_shape = tuple(syn.out_shape)
    arrays[f"{prefix}/weights0"] = np.asarray(syn.weights.get())
    if cfg["bias"]:
        arrays[f"{prefix}/biases0"] = np.asarray(syn.biases.get()).reshape(-1)

    n_ops = rng.integers(8, 13)
    kinds = ["forward", "evolve", "backtransmit"]
    ops = []
    try:
        for step in range(n_ops):
            op = str(rng.choice(kinds + ["reset"], p=[0.3, 0.35, 0.25, 0.1]))
            if step == 0:
                op = "forward"
            key = f"{prefix}/{step}"
            record = {"op": op}
            if op == "forward":
                x = signal(rng, in_shape)
                arrays[f"{key}/inputs"] = x
                syn.inputs.set(jnp.asarray(x))
                procs["forward"].run(t=0.0, dt=1.0)
                arrays[f"{key}/outputs"] = np.asarray(syn.outputs.get())
            elif op == "evolve":
                pre = signal(rng, in_shape)
                post = signal(rng, out_shape)
                arrays[f"{key}/pre"] = pre
                arrays[f"{key}/post"] = post
                syn.pre.set(jnp.asarray(pre))
                syn.post.set(jnp.asarray(post))
                procs["evolve"].run(t=0.0, dt=1.0)
                if not cfg["bias"]:
                    # ngclearn's evolve writes None into a bias-free synapse's biases and the next
                    # forward crashes (a defect the service fixes); restore its neutral 0.0
                    syn.biases.set(0.0)
                dw = np.asarray(syn.dWeights.get())
                if dw.shape != tuple(cfg["shape"]):
                    return {"skipped": f"dWeights shape {dw.shape}"}
                arrays[f"{key}/dWeights"] = dw
                arrays[f"{key}/weights"] = np.asarray(syn.weights.get())
            elif op == "backtransmit":
                # half the time with a fresh post, else the post already stored
                record["with_post"] = bool(rng.random() < 0.5)
                if record["with_post"]:
                    post = signal(rng, out_shape)
                    arrays[f"{key}/post"] = post
                    syn.post.set(jnp.asarray(post))
                procs["backtransmit"].run(t=0.0, dt=1.0)
                dx = np.asarray(syn.dInputs.get())
                if dx.shape != in_shape:
                    return {"skipped": f"dInputs shape {dx.shape}"}
                arrays[f"{key}/dInputs"] = dx
            else:
                procs["reset"].run(t=0.0, dt=1.0)
            ops.append(record)
    except Exception as exc:
        return {"skipped": f"run: {type(exc).__name__}: {str(exc)[:80]}"}
    return {"ops": ops, "in_shape": list(in_shape), "out_shape": list(out_shape)}


def upstream_unit_test(arrays: dict) -> None:
    """ngclearn's own hand-computed case: all-ones 2x2 input and 2x2 filter, SAME, stride 1."""
    with Context("upstream"):
        syn = HebbianDeconvSynapse(
            "a", (2, 2, 1, 1), (2, 2), eta=0.0, filter_init=DistributionGenerator.constant(1.0),
            stride=1, padding="SAME", batch_size=1, key=jax.random.PRNGKey(1234),
        )
        fwd = MethodProcess("up_fwd") >> syn.advance_state
        evo = MethodProcess("up_evo") >> syn.evolve
        bt = MethodProcess("up_bt") >> syn.backtransmit
    x = jnp.ones((1, 2, 2, 1))
    syn.inputs.set(x)
    fwd.run(t=0.0, dt=1.0)
    y = syn.outputs.get()
    syn.pre.set(x)
    syn.post.set(y)
    evo.run(t=0.0, dt=1.0)
    bt.run(t=0.0, dt=1.0)
    arrays["upstream/y"] = np.asarray(y)
    arrays["upstream/dK"] = np.asarray(syn.dWeights.get())
    arrays["upstream/dX"] = np.asarray(syn.dInputs.get())


SIGNALS = ("inputs", "pre", "post")  # generated inputs, stored as float16 (exact)
CHUNK = 30  # ngcsimlib slows down as contexts pile up in one process: run chunks in fresh ones


def run_chunk(first: int, count: int, part: Path) -> None:
    """Worker: configurations [first, first + count) into one part file."""
    rng = random.Random(20261128)
    configs = [sample_config(rng, index) for index in range(first + count)][first:]
    arrays: dict[str, np.ndarray] = {}
    records, skipped = [], {}
    for cfg in configs:
        data_rng = np.random.default_rng([20261128, cfg["index"]])
        result = run_config(cfg, data_rng, arrays)
        if "skipped" in result:
            skipped[result["skipped"]] = skipped.get(result["skipped"], 0) + 1
            for name in [n for n in arrays if n.startswith(f"c{cfg['index']}/")]:
                del arrays[name]
            continue
        records.append({**cfg, **result})
    np.savez(part.with_suffix(".npz"), **arrays)
    part.with_suffix(".json").write_text(json.dumps({"configs": records, "skipped": skipped}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=N_CONFIGS)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--chunk", nargs=3, metavar=("FIRST", "COUNT", "PART"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk:
        run_chunk(int(args.chunk[0]), int(args.chunk[1]), Path(args.chunk[2]))
        return 0

    import subprocess
    import tempfile
    from importlib.metadata import version

    arrays: dict[str, np.ndarray] = {}
    records, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for first in range(0, args.configs, CHUNK):
            part = Path(tmp) / f"part{first}"
            count = min(CHUNK, args.configs - first)
            subprocess.run([sys.executable, __file__, "--chunk", str(first), str(count), str(part)], check=True)
            with np.load(part.with_suffix(".npz"), allow_pickle=False) as data:
                arrays.update({k: data[k] for k in data.files})
            meta = json.loads(part.with_suffix(".json").read_text())
            records += meta["configs"]
            for reason, n in meta["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
            print(f"configs {first}..{first + count - 1} done", file=sys.stderr)
    upstream_unit_test(arrays)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "generator": "scripts/make_reference.py",
        "ngclearn": version("ngclearn"),
        "jax": jax.__version__,
        "configs": records,
        "skipped": skipped,
    }
    (args.out / "ngclearn_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    # the signals are multiples of 1/16 below 2^11: float16 holds them exactly, in half the bytes
    arrays = {k: v.astype(np.float16) if k.rsplit("/", 1)[-1] in SIGNALS else v for k, v in arrays.items()}
    np.savez_compressed(args.out / "ngclearn_reference.npz", **arrays)
    print(f"{len(records)} configurations kept, skipped: {skipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
