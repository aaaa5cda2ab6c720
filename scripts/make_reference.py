"""Generate golden vectors for the conformance tests from ngclearn 3.2.3.

ngclearn is the reference implementation of the synapses; the service promises the
same numbers wherever ngclearn runs and its shapes are right. This script drives
ngclearn over fixed, seeded samples of configurations, each through a sequence of
operations, and writes what it saw to ``tests/data/`` so the test suite runs without
ngclearn:

- ``--kind deconv`` (HebbianDeconvSynapse: forward / evolve / backtransmit / reset) →
  ``ngclearn_reference.{npz,json}``;
- ``--kind dense`` (HebbianSynapse: forward / evolve / calc_update / reset, sgd, adam and nag,
  the user sizes 784→512→512→10 at batch 250, 256→64/128/32 and 16×16 patches onto 100 units
  among random ones) and HebbianDeconvSynapse with nag → ``ngclearn_dense_reference.{npz,json}``.
  Arrays over 64 KiB are stored as SHA-256 digests of their float32 bytes plus a few values;
  the inputs are regenerated from their seeds (``numpy.random.RandomState``, a stable stream).

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
from ngclearn.components.synapses.hebbian.hebbianSynapse import HebbianSynapse  # noqa: E402
from ngclearn.utils.distribution_generator import DistributionGenerator  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "data"
N_CONFIGS = 240
N_DENSE = 220  # random dense configurations, the user sizes among them
N_DECONV_NAG = 40
DIGEST_BYTES = 64 << 10  # arrays larger than this are stored as digests


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



# --- the dense HebbianSynapse (and HebbianDeconvSynapse with nag) ---

USER_SIZES = [  # (n_in, n_out, batch): ngclearn's exhibits' sizes
    (784, 512, 250), (512, 512, 250), (512, 10, 250), (256, 64, 32), (256, 128, 32), (256, 32, 32), (256, 100, 16),
]
INITS = {
    "default": (None, None),
    "uniform": ({"dist": "uniform", "low": -1.0, "high": 1.0}, ("uniform", -1.0, 1.0)),
    "gaussian": ({"dist": "gaussian", "mean": 0.0, "std": 0.5}, ("gaussian", 0.0, 0.5)),
    "constant": ({"dist": "constant", "value": 0.3}, ("constant", 0.3)),
}
BIAS_INITS = {
    "uniform": ({"dist": "uniform", "low": -0.5, "high": 0.5}, ("uniform", -0.5, 0.5)),
    "gaussian": ({"dist": "gaussian", "mean": 0.1, "std": 0.2}, ("gaussian", 0.1, 0.2)),
    "constant": ({"dist": "constant", "value": 0.25}, ("constant", 0.25)),
}
PRIOR_CHOICES = [("constant", 0.0), ("l2", 0.01), ("ridge", 0.1), ("gaussian", 0.02), ("GAUSSIAN", 0.05),
                 ("l1", 0.01), ("lasso", 0.05), ("laplacian", 0.02), ("l1l2", (0.01, 0.3)), ("elastic_net", (0.1, 0.7))]


def sample_dense_config(rng: random.Random, index: int) -> dict:
    """One dense configuration: the service's config, and what ngclearn is given for the same synapse."""
    if index < len(USER_SIZES):
        n_in, n_out, batch = USER_SIZES[index]
    else:
        n_in, n_out, batch = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 6)
    weight_init = rng.choice(list(INITS))
    bias = rng.random() < 0.4
    bias_init = rng.choice(list(BIAS_INITS))
    prior = rng.choice(PRIOR_CHOICES)
    config = {
        "shape": [n_in, n_out], "batch_size": batch, "eta": rng.choice([0.0, 0.001, 0.01, 0.1]),
        "w_bound": rng.choice([0.0, 1.0, 1.0, 2.0]), "is_nonnegative": rng.random() < 0.3,
        "prior": [prior[0], list(prior[1]) if isinstance(prior[1], tuple) else prior[1]],
        "sign_value": rng.choice([1.0, -1.0]), "optim_type": rng.choice(["sgd", "adam", "nag"]),
        "pre_wght": rng.choice([1.0, 1.0, 0.5]), "post_wght": rng.choice([1.0, 1.0, 2.0]),
        "p_conn": rng.choice([1.0, 1.0, 1.0, 0.5, 0.2]), "g_conduct_factor": rng.choice([1.0, 1.0, 0.5, 2.0]),
        "bias": bias,
    }
    if INITS[weight_init][0] is not None:
        config["weight_init"] = INITS[weight_init][0]
    if bias:
        config["bias_init"] = BIAS_INITS[bias_init][0]
    return {"index": index, "seed": rng.randint(0, 2**31 - 1), "config": config,
            "weight_init": INITS[weight_init][1], "bias_init": BIAS_INITS[bias_init][1] if bias else None,
            "prior": prior}


def dense_signal(index: int, step: int, tag: int, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian values rounded to 1/16, from a stable stream the test regenerates."""
    rs = np.random.RandomState([index, step, tag])
    return (np.round(rs.normal(size=shape) * 16) / 16).astype(np.float32)


def _initializer(spec):
    if spec is None:
        return None
    name, *args = spec
    return {"uniform": DistributionGenerator.uniform, "gaussian": DistributionGenerator.gaussian,
            "constant": DistributionGenerator.constant}[name](*args)


def build_dense(record: dict, name: str):
    cfg = record["config"]
    shape = tuple(cfg["shape"])
    extra = {}
    if cfg["p_conn"] < 1.0:  # ngclearn forgets its p_conn mask; handed as mask= it keeps it, as the service does
        _, _, k_mask, _ = jax.random.split(jax.random.PRNGKey(record["seed"]), 4)
        extra["mask"] = jax.random.bernoulli(k_mask, p=cfg["p_conn"], shape=shape).astype(jnp.float32)
    with Context(name):
        syn = HebbianSynapse(
            "syn", shape, eta=cfg["eta"], weight_init=_initializer(record["weight_init"]),
            bias_init=_initializer(record["bias_init"]), w_bound=cfg["w_bound"], is_nonnegative=cfg["is_nonnegative"],
            prior=tuple(record["prior"]), sign_value=cfg["sign_value"], optim_type=cfg["optim_type"],
            pre_wght=cfg["pre_wght"], post_wght=cfg["post_wght"], p_conn=cfg["p_conn"],
            g_conduct_factor=cfg["g_conduct_factor"], batch_size=cfg["batch_size"],
            key=jax.random.PRNGKey(record["seed"]), **extra)
        procs = {
            "forward": MethodProcess(f"{name}_fwd") >> syn.advance_state,
            "evolve": MethodProcess(f"{name}_evo") >> syn.evolve,
            "calc_update": MethodProcess(f"{name}_cu") >> syn.calc_update,
            "reset": MethodProcess(f"{name}_rst") >> syn.reset,
        }
    return syn, procs


def keep(arrays: dict, digests: dict, key: str, value) -> None:
    """Store an array, or (over DIGEST_BYTES) its SHA-256 and 16 evenly spaced values."""
    import hashlib

    value = np.ascontiguousarray(np.asarray(value, np.float32))
    if value.nbytes <= DIGEST_BYTES:
        arrays[key] = value
        return
    flat = value.reshape(-1)
    digests[key] = {"sha256": hashlib.sha256(flat.tobytes()).hexdigest(), "shape": list(value.shape)}
    arrays[f"{key}#samples"] = flat[np.linspace(0, flat.size - 1, 16).astype(np.int64)]


def run_dense_config(record: dict, rng: np.random.Generator, arrays: dict, digests: dict) -> dict:
    """One op sequence through ngclearn's HebbianSynapse (forward batch = batch_size: ngclearn's only working one)."""
    index, cfg = record["index"], record["config"]
    prefix = f"d{index}"
    syn, procs = build_dense(record, f"dense{index}")
    n_in, n_out = cfg["shape"]
    batch = cfg["batch_size"]
    keep(arrays, digests, f"{prefix}/weights0", syn.weights.get())
    if cfg["bias"]:
        keep(arrays, digests, f"{prefix}/biases0", np.asarray(syn.biases.get()).reshape(-1))
    big = n_in * n_out > 100_000
    n_ops = 4 if big else int(rng.integers(6, 11))
    ops = []
    for step in range(n_ops):
        op = str(rng.choice(["forward", "evolve", "calc_update", "reset"], p=[0.3, 0.45, 0.15, 0.1]))
        if step == 0:
            op = "forward"
        if big and step in (1, 2):
            op = "evolve"
        key = f"{prefix}/{step}"
        if op == "forward":
            syn.inputs.set(jnp.asarray(dense_signal(index, step, 0, (batch, n_in))))
            procs["forward"].run(t=0.0, dt=1.0)
            keep(arrays, digests, f"{key}/outputs", syn.outputs.get())
        elif op in ("evolve", "calc_update"):
            syn.pre.set(jnp.asarray(dense_signal(index, step, 1, (batch, n_in))))
            syn.post.set(jnp.asarray(dense_signal(index, step, 2, (batch, n_out))))
            procs[op].run(t=0.0, dt=1.0)
            keep(arrays, digests, f"{key}/dWeights", syn.dWeights.get())
            if cfg["bias"]:
                keep(arrays, digests, f"{key}/dBiases", np.asarray(syn.dBiases.get()).reshape(-1))
            if op == "evolve":
                keep(arrays, digests, f"{key}/weights", syn.weights.get())
                if cfg["bias"]:
                    keep(arrays, digests, f"{key}/biases", np.asarray(syn.biases.get()).reshape(-1))
        else:
            procs["reset"].run(t=0.0, dt=1.0)
        ops.append({"op": op})
    opt = syn.opt_params.get()
    leaves = jax.tree_util.tree_leaves(opt)
    keep(arrays, digests, f"{prefix}/opt_count", leaves[-1] if cfg["optim_type"] != "sgd" else opt)
    return {"ops": ops}


SIGNALS = ("inputs", "pre", "post")  # generated inputs, stored as float16 (exact)
CHUNK = 30  # ngcsimlib slows down as contexts pile up in one process: run chunks in fresh ones


def run_chunk(kind: str, first: int, count: int, part: Path) -> None:
    """Worker: configurations [first, first + count) of one kind into one part file."""
    arrays: dict[str, np.ndarray] = {}
    digests: dict[str, dict] = {}
    records, skipped = [], {}
    if kind == "dense":
        rng = random.Random(20261129)
        for record in [sample_dense_config(rng, index) for index in range(first + count)][first:]:
            data_rng = np.random.default_rng([20261129, record["index"]])
            records.append({**record, **run_dense_config(record, data_rng, arrays, digests)})
    else:
        seed = 20261128 if kind == "deconv" else 20261130
        rng = random.Random(seed)
        configs = [sample_config(rng, index) for index in range(first + count)][first:]
        for cfg in configs:
            data_rng = np.random.default_rng([seed, cfg["index"]])
            if kind == "deconv-nag":  # without a bias: ngclearn's biased deconvolution drifts per pixel
                cfg = {**cfg, "optim_type": "nag", "bias": False}
            result = run_config(cfg, data_rng, arrays)
            if "skipped" in result:
                skipped[result["skipped"]] = skipped.get(result["skipped"], 0) + 1
                for name in [n for n in arrays if n.startswith(f"c{cfg['index']}/")]:
                    del arrays[name]
                continue
            records.append({**cfg, **result})
    np.savez(part.with_suffix(".npz"), **arrays)
    part.with_suffix(".json").write_text(json.dumps({"configs": records, "skipped": skipped, "digests": digests}))


def generate(kind: str, count: int) -> tuple[list, dict, dict, dict]:
    """Every configuration of ``kind``, in chunks run by fresh processes."""
    import subprocess
    import tempfile

    arrays: dict[str, np.ndarray] = {}
    records, skipped, digests = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for first in range(0, count, CHUNK):
            part = Path(tmp) / f"{kind}{first}"
            n = min(CHUNK, count - first)
            subprocess.run([sys.executable, __file__, "--chunk", kind, str(first), str(n), str(part)], check=True)
            with np.load(part.with_suffix(".npz"), allow_pickle=False) as data:
                arrays.update({k: data[k] for k in data.files})
            meta = json.loads(part.with_suffix(".json").read_text())
            records += meta["configs"]
            digests.update(meta["digests"])
            for reason, k in meta["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + k
            print(f"{kind}: configs {first}..{first + n - 1} done", file=sys.stderr)
    return records, skipped, digests, arrays


def cpu_description() -> str:
    """The CPU's model and the vector extensions XLA may use (what makes its small products differ)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))]
    return f"{model} ({' '.join(sorted(wanted))})"


def write_variant(out: Path, name: str, meta: dict, arrays: dict) -> None:
    """This machine's vectors where they differ from the base ones in ``out`` (same sample, same JAX):
    ``ngclearn_dense_reference.<name>.npz`` with those arrays and ``.json`` saying which and on what CPU."""
    base_meta = json.loads((out / "ngclearn_dense_reference.json").read_text())
    if base_meta["configs"] != meta["configs"] or base_meta["deconv_nag"] != meta["deconv_nag"]:
        raise SystemExit("the base vectors were made from another sample: make them again first (no --variant)")
    if base_meta["jax"] != meta["jax"]:
        raise SystemExit(f"the base vectors were made with JAX {base_meta['jax']}, this is {meta['jax']}")
    with np.load(out / "ngclearn_dense_reference.npz", allow_pickle=False) as base:
        if set(base.files) != set(arrays):
            raise SystemExit("the base vectors hold other arrays: make them again first (no --variant)")
        differing = {k: v for k, v in arrays.items() if not np.array_equal(base[k], v)}
    digests = {k: v for k, v in meta["digests"].items() if base_meta["digests"].get(k) != v}
    variant = {"generator": meta["generator"], "ngclearn": meta["ngclearn"], "jax": meta["jax"],
               "cpu": cpu_description(), "arrays": sorted(differing), "digests": digests}
    (out / f"ngclearn_dense_reference.{name}.json").write_text(json.dumps(variant, indent=1) + "\n")
    np.savez_compressed(out / f"ngclearn_dense_reference.{name}.npz", **differing)
    print(f"variant {name}: {len(differing)} arrays and {len(digests)} digests differ from the base", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("deconv", "dense", "all"), default="all")
    parser.add_argument("--configs", type=int, default=None, help="how many (default: the full sample)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--variant", metavar="NAME",
                        help="dense only: this CPU's numbers where they differ from the vectors already in --out "
                             "(XLA's CPU code for small products differs between CPUs), written as "
                             "ngclearn_dense_reference.NAME.{npz,json}; the tests pick the variant the machine "
                             "reproduces")
    parser.add_argument("--chunk", nargs=4, metavar=("KIND", "FIRST", "COUNT", "PART"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk:
        run_chunk(args.chunk[0], int(args.chunk[1]), int(args.chunk[2]), Path(args.chunk[3]))
        return 0

    from importlib.metadata import version

    args.out.mkdir(parents=True, exist_ok=True)
    header = {"generator": "scripts/make_reference.py", "ngclearn": version("ngclearn"), "jax": jax.__version__}
    if args.kind in ("deconv", "all"):
        records, skipped, _, arrays = generate("deconv", args.configs or N_CONFIGS)
        upstream_unit_test(arrays)
        meta = {**header, "configs": records, "skipped": skipped}
        (args.out / "ngclearn_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
        # the signals are multiples of 1/16 below 2^11: float16 holds them exactly, in half the bytes
        arrays = {k: v.astype(np.float16) if k.rsplit("/", 1)[-1] in SIGNALS else v for k, v in arrays.items()}
        np.savez_compressed(args.out / "ngclearn_reference.npz", **arrays)
        print(f"deconv: {len(records)} configurations kept, skipped: {skipped}", file=sys.stderr)
    if args.kind in ("dense", "all"):
        records, _, digests, arrays = generate("dense", args.configs or N_DENSE)
        nag, skipped, _, nag_arrays = generate("deconv-nag", args.configs or N_DECONV_NAG)
        arrays.update({k: v.astype(np.float16) if k.rsplit("/", 1)[-1] in SIGNALS else v
                       for k, v in nag_arrays.items()})
        meta = {**header, "configs": records, "digests": digests, "deconv_nag": nag, "deconv_nag_skipped": skipped}
        if args.variant:
            write_variant(args.out, args.variant, meta, arrays)
            return 0
        (args.out / "ngclearn_dense_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
        np.savez_compressed(args.out / "ngclearn_dense_reference.npz", **arrays)
        print(f"dense: {len(records)} configurations, {len(digests)} digests; deconv nag: {len(nag)} kept, "
              f"skipped: {skipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
