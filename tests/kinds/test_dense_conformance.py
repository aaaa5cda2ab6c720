"""The dense HebbianSynapse (and HebbianDeconvSynapse with nag) give ngclearn 3.2.3's numbers.

Golden vectors from ``scripts/make_reference.py --kind dense`` (ngclearn in its own Python 3.12
venv), replayed here without ngclearn: every forward output, update (dWeights, dBiases), weight
and bias after each evolve, and the optimizer's step count. With the JAX the vectors were made
with, every comparison is bit for bit — sgd, adam and nag alike (the optimizers follow ngclearn's
arithmetic, kinds/optim.py); with another JAX, within 1e-5 of the largest magnitude. Large arrays
are stored as SHA-256 digests of their bytes plus 16 sampled values. Inputs are regenerated from
their seeds (``numpy.random.RandomState``: a stable stream).

Where ngclearn runs incorrectly the vectors avoid it: forwards use ``batch_size`` (ngclearn's only
working batch), and a ``p_conn < 1`` synapse is given its mask as ngclearn's ``mask=`` (ngclearn
forgets its own p_conn mask after the first evolve; the service keeps it — tested separately).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from synapse_serve.kinds import dense, hebbian
from synapse_serve.kinds import hebbian_deconv as hd

DATA = Path(os.environ.get("SYNAPSE_REFERENCE_DIR", Path(__file__).resolve().parent.parent / "data"))
META = json.loads((DATA / "ngclearn_dense_reference.json").read_text())
with np.load(DATA / "ngclearn_dense_reference.npz", allow_pickle=False) as _npz:
    ARRAYS = {k: _npz[k].astype(np.float32) for k in _npz.files}
SAME_JAX = jax.__version__ == META["jax"]


def dense_signal(index: int, step: int, tag: int, shape: tuple[int, ...]) -> np.ndarray:
    """The generator's inputs (scripts/make_reference.py): gaussian values rounded to 1/16."""
    rs = np.random.RandomState([index, step, tag])
    return (np.round(rs.normal(size=shape) * 16) / 16).astype(np.float32)


def check(key: str, actual) -> None:
    """``actual`` equals what ngclearn gave for ``key`` (bit for bit with the same JAX)."""
    actual = np.ascontiguousarray(np.asarray(actual, np.float32))
    digest = META["digests"].get(key)
    if digest is not None:
        assert list(actual.shape) == digest["shape"], (key, actual.shape)
        if SAME_JAX:
            assert hashlib.sha256(actual.reshape(-1).tobytes()).hexdigest() == digest["sha256"], key
            return
        flat = actual.reshape(-1)
        expected = ARRAYS[f"{key}#samples"]
        actual = flat[np.linspace(0, flat.size - 1, 16).astype(np.int64)]
    else:
        expected = ARRAYS[key]
        assert actual.shape == expected.shape, (key, actual.shape, expected.shape)
    if SAME_JAX:
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
    assert META["ngclearn"] == "3.2.3"
