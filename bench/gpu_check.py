"""The engine on an accelerator: correctness against the CPU, and speed against the device's peak.

For each size — the dense HebbianSynapse at 784x512 (batch 250) and 4096x4096 (batch 1024), and
the deconvolutional synapse at the suite's small, medium and large sizes plus a large strided
one — each precision (fp32 ``highest``, the device ``default``, ``bfloat16``) and, for the
deconvolution, each filter-update formulation (``vjp``, ``adjoint``), it

- checks forward, the filter update H and backtransmit against the CPU at
  fp32-highest (relative error: max |gpu - cpu| / max |cpu|, on a batch of at
  most 16 to keep the CPU side short);
- times forward, evolve and backtransmit on the device (state and signals on
  the device, as the server keeps them; median of repeated timed loops);
- relates the achieved FLOP rate to the device's peak measured in the same run
  (a large matrix product in the same precision).

It needs only jax, optax and numpy (no server), prints a short table last and
writes everything as JSON. Run it on the GPU machine::

    PYTHONPATH=service python3 bench/gpu_check.py --json "$OUT/gpu_check.json"

``--quick`` shrinks every size so the script can be tried on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from datetime import date

import jax
import numpy as np
from jax import numpy as jnp

from synapse_serve.kinds import deconv, dense, hebbian
from synapse_serve.kinds import hebbian_deconv as hd

from harness import timed  # noqa: E402 - bench/ is on the path when run as a script

# (batch, (h, w), kernel, c_in, c_out, stride)
SIZES = {
    "small": (1, (8, 8), 3, 1, 4, 1),
    "medium": (32, (28, 28), 5, 1, 32, 1),
    "large": (128, (32, 32), 3, 16, 64, 1),
    "large-s2": (256, (64, 64), 3, 64, 128, 2),
}
QUICK_SIZES = {
    "small": (1, (8, 8), 3, 1, 4, 1),
    "medium": (4, (12, 12), 5, 1, 8, 1),
    "large-s2": (4, (16, 16), 3, 8, 16, 2),
}
# dense: (batch, n_in, n_out)
DENSE_SIZES = {"dense-784x512": (250, 784, 512), "dense-4096": (1024, 4096, 4096)}
QUICK_DENSE_SIZES = {"dense-784x512": (8, 64, 32)}
PRECISIONS = ("highest", "default", "bfloat16")
FORMS = ("vjp", "adjoint")
CHECK_BATCH = 16


def make_config(size: tuple, precision: str, form: str) -> hd.HebbianDeconvConfig:
    batch, x_shape, k, c_in, c_out, stride = size
    return hd.parse_config({
        "shape": [k, k, c_in, c_out], "x_shape": list(x_shape), "stride": stride, "eta": 1e-3,
        "batch_size": batch, "precision": precision, "filter_update": form,
    })


def flops(size: tuple) -> float:
    """Multiply-adds x 2 of one transposed convolution (forward, H and dInputs each cost this)."""
    batch, (h, w), k, c_in, c_out, _ = size
    return 2.0 * batch * h * w * k * k * c_in * c_out


def measure_peak(device: jax.Device, n: int) -> dict[str, float]:
    """TFLOP/s of an n x n x n matrix product per precision, and copy bandwidth in GB/s."""
    key = jax.random.PRNGKey(0)
    out = {}
    with jax.default_device(device):
        a = jax.random.normal(key, (n, n), jnp.float32)
        b = jax.random.normal(jax.random.split(key)[0], (n, n), jnp.float32)
        for name, precision in (("highest", jax.lax.Precision.HIGHEST), ("default", jax.lax.Precision.DEFAULT)):
            mm = jax.jit(lambda x, y, p=precision: jnp.dot(x, y, precision=p))
            seconds = timed(lambda: mm(a, b).block_until_ready(), 0.3)
            out[name] = 2 * n**3 / seconds / 1e12
        a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        mm16 = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        out["bfloat16"] = 2 * n**3 / timed(lambda: mm16(a16, b16).block_until_ready(), 0.3) / 1e12
        big = jnp.ones((n * n * 4,), jnp.float32)
        scale = jax.jit(lambda x: x * 1.0001)
        seconds = timed(lambda: scale(big).block_until_ready(), 0.3)
        out["copy_GBps"] = 2 * big.nbytes / seconds / 1e9
    return out


def signals(size: tuple, batch: int) -> tuple[np.ndarray, np.ndarray]:
    _, (h, w), k, c_in, c_out, stride = size
    cfg = make_config(size, "highest", "vjp")
    rng = np.random.default_rng(1)
    pre = rng.standard_normal((batch, h, w, c_in), np.float32)
    post = rng.standard_normal((batch, *cfg.out_map, c_out), np.float32)
    return pre, post


def run_ops(cfg: hd.HebbianDeconvConfig, pre: np.ndarray, post: np.ndarray, device: jax.Device) -> dict:
    """Host copies of outputs, H (dWeights with sign +1 and no decay) and dInputs on ``device``."""
    with jax.default_device(device):
        state = hd.init(dataclasses.replace(cfg, batch_size=pre.shape[0]), seed=0)
        state = deconv.forward(cfg, state, jnp.asarray(pre))
        outputs = np.asarray(state.outputs)
        state = hd.backtransmit(cfg, state, jnp.asarray(post))
        d_inputs = np.asarray(state.dInputs)
        state = hd.evolve(cfg, state, jnp.asarray(pre), jnp.asarray(post))
        return {"forward": outputs, "H": np.asarray(state.dWeights), "dInputs": d_inputs}


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want)) / max(np.max(np.abs(want)), 1e-30))


def time_ops(cfg: hd.HebbianDeconvConfig, pre: np.ndarray, post: np.ndarray, device: jax.Device,
             min_seconds: float) -> dict[str, float]:
    """Median seconds of forward, evolve and backtransmit on ``device``, the state donated each call."""
    with jax.default_device(device):
        holder = {"state": hd.init(cfg, seed=0)}
        pre_d, post_d = jax.device_put(pre, device), jax.device_put(post, device)

        def step(op, *args):
            def call():
                holder["state"] = jax.block_until_ready(op(cfg, holder["state"], *args))
            return call

        return {
            "forward": timed(step(deconv.forward, pre_d), min_seconds),
            "evolve": timed(step(hd.evolve, pre_d, post_d), min_seconds),
            "backtransmit": timed(step(hd.backtransmit, post_d), min_seconds),
        }


def dense_config(size: tuple, precision: str) -> hebbian.HebbianConfig:
    batch, n_in, n_out = size
    return hebbian.parse_config({"shape": [n_in, n_out], "eta": 1e-3, "batch_size": batch, "precision": precision,
                                 "w_bound": 0.0})


def dense_run_ops(cfg: hebbian.HebbianConfig, pre: np.ndarray, post: np.ndarray, device: jax.Device) -> dict:
    """Host copies of outputs, H (dWeights with sign +1, no bound, no prior) and dInputs on ``device``."""
    with jax.default_device(device):
        state = hebbian.init(dataclasses.replace(cfg, batch_size=pre.shape[0]), seed=0)
        state = dense.forward(cfg, state, jnp.asarray(pre))
        outputs = np.asarray(state.outputs)
        state = hebbian.backtransmit(cfg, state, jnp.asarray(post))
        d_inputs = np.asarray(state.dInputs)
        state = hebbian.evolve(cfg, state, jnp.asarray(pre), jnp.asarray(post))
        return {"forward": outputs, "H": np.asarray(state.dWeights), "dInputs": d_inputs}


def dense_time_ops(cfg: hebbian.HebbianConfig, pre: np.ndarray, post: np.ndarray, device: jax.Device,
                   min_seconds: float) -> dict[str, float]:
    with jax.default_device(device):
        holder = {"state": hebbian.init(cfg, seed=0)}
        pre_d, post_d = jax.device_put(pre, device), jax.device_put(post, device)

        def step(op, *args):
            def call():
                holder["state"] = jax.block_until_ready(op(cfg, holder["state"], *args))
            return call

        return {
            "forward": timed(step(dense.forward, pre_d), min_seconds),
            "evolve": timed(step(hebbian.evolve, pre_d, post_d), min_seconds),
            "backtransmit": timed(step(hebbian.backtransmit, post_d), min_seconds),
        }


def dense_rows(sizes: dict, device: jax.Device, cpu: jax.Device, peak: dict, min_seconds: float) -> list[dict]:
    rows = []
    for size_name, size in sizes.items():
        batch, n_in, n_out = size
        rng = np.random.default_rng(1)
        pre = rng.standard_normal((batch, n_in), np.float32)
        post = rng.standard_normal((batch, n_out), np.float32)
        check = min(batch, CHECK_BATCH)
        reference = dense_run_ops(dense_config(size, "highest"), pre[:check], post[:check], cpu)
        work = 2.0 * batch * n_in * n_out  # one matrix product: forward, H and dInputs each cost this
        for precision in PRECISIONS:
            cfg = dense_config(size, precision)
            got = dense_run_ops(cfg, pre[:check], post[:check], device)
            errors = {op: rel_error(got[op], reference[op]) for op in reference}
            seconds = dense_time_ops(cfg, pre, post, device, min_seconds)
            rate = work / seconds["evolve"] / 1e12
            row = {"size": size_name, "precision": precision, "form": "dense", "auto": "-", "timed_choice": "-",
                   **{f"{op}_ms": v * 1e3 for op, v in seconds.items()},
                   "evolve_over_forward": seconds["evolve"] / seconds["forward"],
                   "evolve_tflops": rate, "evolve_pct_peak": 100 * rate / peak[precision],
                   "forward_tflops": work / seconds["forward"] / 1e12, **{f"err_{op}": e for op, e in errors.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run on any machine")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="time per timed loop")
    parser.add_argument("--only", nargs="*", help="run only these sizes")
    args = parser.parse_args()

    sizes = QUICK_SIZES if args.quick else SIZES
    sizes = {name: size for name, size in sizes.items() if not args.only or name in args.only}
    dense_sizes = QUICK_DENSE_SIZES if args.quick else DENSE_SIZES
    dense_sizes = {name: size for name, size in dense_sizes.items() if not args.only or name in args.only}
    device = jax.devices()[0]
    cpu = jax.devices("cpu")[0]
    kind = getattr(device, "device_kind", device.platform)
    print(f"# gpu_check {date.today()} device={kind} ({device.platform}) jax={jax.__version__} "
          f"host={platform.machine()}", flush=True)
    peak = measure_peak(device, 1024 if args.quick else 8192)
    print("peak:", {k: round(v, 1) for k, v in peak.items()}, flush=True)

    rows = dense_rows(dense_sizes, device, cpu, peak, args.min_seconds)
    for size_name, size in sizes.items():
        batch = size[0]
        check_batch = min(batch, CHECK_BATCH)
        pre_full, post_full = signals(size, batch)
        pre_chk, post_chk = pre_full[:check_batch], post_full[:check_batch]
        reference = run_ops(make_config(size, "highest", "vjp"), pre_chk, post_chk, cpu)
        auto = hd.choose_filter_update(make_config(size, "highest", "auto"), device.platform, device).filter_update
        chosen = hd.choose_filter_update(make_config(size, "highest", "timed"), device.platform, device)
        print(f"{size_name}: auto -> {auto}, timed -> {chosen.filter_update}", flush=True)
        for precision in PRECISIONS:
            for form in FORMS:
                cfg = make_config(size, precision, form)
                if form == "adjoint" and not hd.adjoint_applicable(cfg):
                    continue
                got = run_ops(cfg, pre_chk, post_chk, device)
                errors = {op: rel_error(got[op], reference[op]) for op in reference}
                seconds = time_ops(cfg, pre_full, post_full, device, args.min_seconds)
                rate = flops(size) / seconds["evolve"] / 1e12
                row = {"size": size_name, "precision": precision, "form": form, "auto": auto,
                       "timed_choice": chosen.filter_update,
                       **{f"{op}_ms": s * 1e3 for op, s in seconds.items()},
                       "evolve_over_forward": seconds["evolve"] / seconds["forward"],
                       "evolve_tflops": rate, "evolve_pct_peak": 100 * rate / peak[precision],
                       "forward_tflops": flops(size) / seconds["forward"] / 1e12,
                       **{f"err_{op}": e for op, e in errors.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": str(date.today()), "device": kind, "jax": jax.__version__, "peak": peak,
                       "rows": rows}, fh, indent=1)
    print(f"\npeak (same run): fp32-highest {peak['highest']:.1f}, default {peak['default']:.1f}, "
          f"bf16 {peak['bfloat16']:.1f} TFLOP/s; copy {peak['copy_GBps']:.0f} GB/s")
    print("| size | precision | form | fwd ms | evolve ms | bt ms | evolve/fwd | evolve TFLOP/s | % peak "
          "| rel err fwd | rel err H | rel err dIn |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']} | {r['precision']} | {r['form']} | {r['forward_ms']:.3f} | {r['evolve_ms']:.3f} | "
              f"{r['backtransmit_ms']:.3f} | {r['evolve_over_forward']:.2f} | {r['evolve_tflops']:.2f} | "
              f"{r['evolve_pct_peak']:.1f} | {r['err_forward']:.1e} | {r['err_H']:.1e} | {r['err_dInputs']:.1e} |")


if __name__ == "__main__":
    main()
