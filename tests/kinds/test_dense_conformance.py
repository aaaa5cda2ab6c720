"""The dense HebbianSynapse (and HebbianDeconvSynapse with nag) give ngclearn 3.2.3's numbers.

Golden vectors from ``scripts/make_reference.py --kind dense`` (ngclearn in its own Python 3.12
venv), replayed here without ngclearn: every forward output, update (dWeights, dBiases), weight
and bias after each evolve, and the optimizer's step count. With the JAX the vectors were made
with, every comparison is bit for bit — sgd, adam and nag alike (the optimizers follow ngclearn's
arithmetic, kinds/optim.py); with another JAX, within 1e-5 of the largest magnitude. Large arrays
are stored as SHA-256 digests of their bytes plus 16 sampled values. Inputs are regenerated from
their seeds (``numpy.random.RandomState``: a stable stream).

XLA's CPU code for some small products differs between CPUs, so ngclearn's own numbers do: on a
CPU with AVX-512 and AMX, 47 of the 4,460 arrays (forward outputs of 16 configs) came out an ulp
apart from the base vectors' — and the service's came out equal to ngclearn's run there.
``make_reference.py --variant NAME`` stores such a CPU's differing arrays beside the base
(``ngclearn_dense_reference.NAME.*``); the tests first find which vectors this machine
reproduces — every config's first forward that can be computed as ngclearn computes it (plain JAX
on the stored weights, not the service's code) — and compare bit for bit against those. On a CPU
none reproduces, they compare within 1e-5, as with another JAX (and say so).

Where ngclearn runs incorrectly the vectors avoid it: forwards use ``batch_size`` (ngclearn's only
working batch), and a ``p_conn < 1`` synapse is given its mask as ngclearn's ``mask=`` (ngclearn
forgets its own p_conn mask after the first evolve; the service keeps it — tested separately).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import numpy as jnp

from synapse_serve.kinds import dense, hebbian
from synapse_serve.kinds import hebbian_deconv as hd

DATA = Path(os.environ.get("SYNAPSE_REFERENCE_DIR", Path(__file__).resolve().parent.parent / "data"))
META = json.loads((DATA / "ngclearn_dense_reference.json").read_text())
with np.load(DATA / "ngclearn_dense_reference.npz", allow_pickle=False) as _npz:
    ARRAYS = {k: _npz[k].astype(np.float32) for k in _npz.files}
SAME_JAX = jax.__version__ == META["jax"]
VARIANTS = {}  # CPU name -> (its record, the arrays that differ from the base)
for _path in sorted(DATA.glob("ngclearn_dense_reference.*.json")):
    with np.load(_path.with_suffix(".npz"), allow_pickle=False) as _npz:
        VARIANTS[_path.name.split(".")[1]] = (json.loads(_path.read_text()),
                                              {k: _npz[k].astype(np.float32) for k in _npz.files})


def dense_signal(index: int, step: int, tag: int, shape: tuple[int, ...]) -> np.ndarray:
    """The generator's inputs (scripts/make_reference.py): gaussian values rounded to 1/16."""
    rs = np.random.RandomState([index, step, tag])
    return (np.round(rs.normal(size=shape) * 16) / 16).astype(np.float32)


@jax.jit
def _ngclearn_forward(inputs, weights, g_conduct_factor, biases):
    return jnp.matmul(inputs, weights) * jnp.ones((), jnp.float32) * g_conduct_factor + biases  # its gate: ones


def probed(index: int) -> bool:
    """Whether config ``index``'s first forward can be recomputed from the vectors alone (no mask, weights kept)."""
    record = META["configs"][index]
    return (record["index"] == index and record["ops"][0]["op"] == "forward" and record["config"]["p_conn"] == 1.0
            and f"d{index}/weights0" in ARRAYS and (not record["config"]["bias"] or f"d{index}/biases0" in ARRAYS))


def first_outputs(index: int) -> np.ndarray:
    """Config ``index``'s first forward, computed as ngclearn computes it (plain JAX on the stored initial weights,
    not the service's code): what this CPU makes of it, whatever the service does."""
    config = META["configs"][index]["config"]
    n_in, n_out = config["shape"]
    biases = ARRAYS[f"d{index}/biases0"] if config["bias"] else np.zeros((n_out,), np.float32)
    return np.asarray(_ngclearn_forward(dense_signal(index, 0, 0, (config["batch_size"], n_in)),
                                        ARRAYS[f"d{index}/weights0"], np.float32(config["g_conduct_factor"]), biases))


@functools.cache
def reproduced() -> str | None:
    """The vectors this CPU reproduces — "" the base ones, a variant's name, or None (none) — told by the first
    forward of every config where one can be computed without the service (130 of them)."""
    probes = [f"d{record['index']}/0/outputs" for record in META["configs"] if probed(record["index"])]
    computed = {key: first_outputs(int(key.split("/")[0][1:])) for key in probes}
    for name in ["", *VARIANTS]:
        arrays = VARIANTS[name][1] if name else {}
        if all(np.array_equal(value, arrays.get(key, ARRAYS[key])) for key, value in computed.items()):
            return name
    return None


def check(key: str, actual) -> None:
    """``actual`` equals what ngclearn gave for ``key``: bit for bit with the same JAX on a CPU whose numbers the
    vectors hold (the base ones or a variant's), else within 1e-5 of the largest magnitude."""
    actual = np.ascontiguousarray(np.asarray(actual, np.float32))
    variant = reproduced() if SAME_JAX else None
    exact = variant is not None
    own = VARIANTS[variant] if variant else ({"digests": {}}, {})
    digest = own[0]["digests"].get(key, META["digests"].get(key))
    if digest is not None:
        assert list(actual.shape) == digest["shape"], (key, actual.shape)
        if exact:
            assert hashlib.sha256(actual.reshape(-1).tobytes()).hexdigest() == digest["sha256"], key
            return
        flat = actual.reshape(-1)
        expected = ARRAYS[f"{key}#samples"]
        actual = flat[np.linspace(0, flat.size - 1, 16).astype(np.int64)]
    else:
        expected = own[1].get(key, ARRAYS[key])
        assert actual.shape == expected.shape, (key, actual.shape, expected.shape)
    if exact:
        np.testing.assert_array_equal(actual, expected, err_msg=key)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * (np.abs(expected).max() if expected.size
                                                                               else 0), err_msg=key)


def test_enough_dense_configurations_covering_every_option():
    configs = [r["config"] for r in META["configs"]]
    assert len(configs) >= 200
    assert {c["optim_type"] for c in configs} == {"sgd", "adam", "nag"}
    assert {tuple(c["shape"]) for c in configs} >= {(784, 512), (512, 10), (256, 64), (256, 128), (256, 32),
                                                     (256, 100)}
    assert {r["prior"][0] for r in META["configs"]} >= {"constant", "l2", "ridge", "gaussian", "GAUSSIAN", "l1",
                                                        "lasso", "laplacian", "l1l2", "elastic_net"}
    for option in ("bias", "is_nonnegative"):
        assert {c[option] for c in configs} == {True, False}
    assert {c["w_bound"] for c in configs} >= {0.0, 1.0, 2.0} and {c["p_conn"] for c in configs} >= {1.0, 0.5}
    assert {c["sign_value"] for c in configs} == {1.0, -1.0}
    assert {c["pre_wght"] for c in configs} >= {1.0, 0.5} and {c["post_wght"] for c in configs} >= {1.0, 2.0}
    ops = {op["op"] for r in META["configs"] for op in r["ops"]}
    assert ops == {"forward", "evolve", "calc_update", "reset"}
    assert len(META["deconv_nag"]) >= 30


@pytest.mark.parametrize("record", META["configs"], ids=lambda r: f"d{r['index']}")
def test_dense_sequence_matches_ngclearn(record):
    cfg = hebbian.parse_config(record["config"])
    index, prefix = record["index"], f"d{record['index']}"
    state = hebbian.init(cfg, seed=record["seed"])  # the same seed: the same draws (ngclearn's key schedule)
    check(f"{prefix}/weights0", state.weights)
    if cfg.bias:
        check(f"{prefix}/biases0", state.biases)
    n_in, n_out = cfg.shape
    batch = cfg.batch_size
    for step, op in enumerate(record["ops"]):
        key = f"{prefix}/{step}"
        if op["op"] == "forward":
            state = dense.forward(cfg, state, dense_signal(index, step, 0, (batch, n_in)))
            check(f"{key}/outputs", state.outputs)
        elif op["op"] in ("evolve", "calc_update"):
            pre, post = dense_signal(index, step, 1, (batch, n_in)), dense_signal(index, step, 2, (batch, n_out))
            state = (hebbian.evolve if op["op"] == "evolve" else hebbian.calc_update)(cfg, state, pre, post)
            check(f"{key}/dWeights", state.dWeights)
            if cfg.bias:
                check(f"{key}/dBiases", state.dBiases)
            if op["op"] == "evolve":
                check(f"{key}/weights", state.weights)
                if cfg.bias:
                    check(f"{key}/biases", state.biases)
        else:
            state = hebbian.reset(cfg, state)
    check(f"{prefix}/opt_count", state.opt_state.count)


def _deconv_config(record: dict) -> hd.HebbianDeconvConfig:
    keys = ("shape", "x_shape", "stride", "padding", "eta", "optim_type", "sign_value", "w_bound",
            "is_nonnegative", "w_decay", "g_conduct_factor", "bias", "batch_size")
    return hd.parse_config({**{k: record[k] for k in keys}, "filter_update": "vjp"})


@pytest.mark.parametrize("record", META["deconv_nag"], ids=lambda r: f"n{r['index']}")
def test_deconv_nag_matches_ngclearn(record):
    """nag for HebbianDeconvSynapse, ngclearn's formula (momentum 0.9, float32 step count)."""
    cfg = _deconv_config(record)
    assert cfg.optim_type == "nag"
    prefix = f"c{record['index']}"
    state = hd.init(cfg, seed=record["seed"])
    check(f"{prefix}/weights0", state.weights)
    for step, op in enumerate(record["ops"]):
        key = f"{prefix}/{step}"
        if op["op"] == "forward":
            state = hd.deconv.forward(cfg, state, ARRAYS[f"{key}/inputs"])
            check(f"{key}/outputs", state.outputs)
        elif op["op"] == "evolve":
            state = hd.evolve(cfg, state, ARRAYS[f"{key}/pre"], ARRAYS[f"{key}/post"])
            check(f"{key}/dWeights", state.dWeights)
            check(f"{key}/weights", state.weights)
        elif op["op"] == "backtransmit":
            state = hd.backtransmit(cfg, state, ARRAYS[f"{key}/post"] if op["with_post"] else None)
            check(f"{key}/dInputs", state.dInputs)
        else:
            state = hd.reset(cfg, state)


def test_reference_jax_version(capsys):
    if not SAME_JAX:
        with capsys.disabled():
            print(f"\ndense conformance: JAX {jax.__version__} here, vectors made with {META['jax']}: "
                  "comparing within 1e-5 of the largest magnitude instead of bit for bit")
    elif reproduced() is None:
        with capsys.disabled():
            print("\ndense conformance: this CPU reproduces none of the stored vectors (the base ones, "
                  f"{', '.join(VARIANTS) or 'no variants'}): comparing within 1e-5 of the largest magnitude; "
                  "scripts/make_reference.py --variant NAME stores its own")
    assert META["ngclearn"] == "3.2.3"


def test_variants_change_only_what_a_cpu_changes():
    """A variant holds arrays of the base sample that differ from the base ones, each within float32 rounding of
    it, among them first forwards that can be recomputed without the service: what tells which vectors a CPU
    reproduces."""
    for name, (record, arrays) in VARIANTS.items():
        assert record["jax"] == META["jax"] and record["ngclearn"] == META["ngclearn"] and record["cpu"]
        assert sorted(arrays) == record["arrays"] and arrays
        for key, value in arrays.items():
            assert not np.array_equal(value, ARRAYS[key]), (name, key)
            np.testing.assert_allclose(value, ARRAYS[key], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {key}")
        assert any(key.endswith("/0/outputs") and probed(int(key.split("/")[0][1:])) for key in arrays), name
