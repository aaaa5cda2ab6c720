"""The optional filter normalisation (issue 14): ``w_norm`` rescales each filter after every evolve — off by
default (ngclearn's numbers untouched), the same as the renormalisation a sparse-coding loop writes by hand, for
both learning kinds, in evolve, step, sequences and packed calls alike."""

from __future__ import annotations

import numpy as np
import pytest

from synapse_client import Ref, UnprocessableEntityError
from synapse_serve.kinds import hebbian, hebbian_deconv

DECONV = {"shape": [3, 3, 16, 2], "x_shape": [8, 8], "eta": 0.01, "sign_value": -1.0,
          "filter_init": {"dist": "uniform", "low": -0.1, "high": 0.1}}
DENSE = {"shape": [6, 4], "eta": 0.1, "w_bound": 0.0}


def _by_hand(w: np.ndarray, axes: tuple[int, ...], norm: float) -> np.ndarray:
    """What the user loop of bench/loop.py writes after each evolve."""
    return w / (np.sqrt((w ** 2).sum(axis=axes, keepdims=True)) + 1e-8) * norm


def _signals(seed: int, pre_shape: tuple, post_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(pre_shape, np.float32), rng.random(post_shape, np.float32)


def test_off_by_default_and_nothing_changes():
    assert hebbian.parse_config(DENSE).w_norm == hebbian_deconv.parse_config(DECONV).w_norm == 0.0
    cfg, off = hebbian.parse_config(DENSE), hebbian.parse_config({**DENSE, "w_norm": 0.0, "w_norm_per": "in"})
    pre, post = _signals(0, (3, 6), (3, 4))
    a = hebbian.evolve(cfg, hebbian.init(cfg, seed=2), pre, post)
    b = hebbian.evolve(off, hebbian.init(off, seed=2), pre, post)
    np.testing.assert_array_equal(a.weights, b.weights)


@pytest.mark.parametrize(("per", "axes"), [("in", (0, 1, 3)), ("out", (0, 1, 2))])
def test_the_deconvolution_rescales_each_filter_as_the_loop_does_by_hand(per, axes):
    normed = hebbian_deconv.parse_config({**DECONV, "w_norm": 0.5, "w_norm_per": per})
    plain = hebbian_deconv.parse_config(DECONV)
    state, reference = hebbian_deconv.init(normed, seed=1), hebbian_deconv.init(plain, seed=1)
    for seed in range(3):
        pre, post = _signals(seed, (4, 8, 8, 16), (4, 8, 8, 2))
        state = hebbian_deconv.evolve(normed, state, pre, post)
        reference = hebbian_deconv.evolve(plain, reference, pre, post)
        reference = reference._replace(weights=_by_hand(np.asarray(reference.weights), axes, 0.5))
        np.testing.assert_allclose(state.weights, reference.weights, rtol=2e-6, atol=1e-7)
    norms = np.sqrt((np.asarray(state.weights) ** 2).sum(axis=axes))
    np.testing.assert_allclose(norms, 0.5, rtol=1e-6)
    assert norms.size == (16 if per == "in" else 2)


@pytest.mark.parametrize(("per", "axis"), [("out", 0), ("in", 1)])
@pytest.mark.parametrize("optim_type", ["sgd", "adam", "nag"])
def test_the_dense_kind_rescales_columns_or_rows_after_the_clip_and_the_mask(per, axis, optim_type):
    cfg = hebbian.parse_config({**DENSE, "w_norm": 2.0, "w_norm_per": per, "optim_type": optim_type,
                                "w_bound": 0.3, "p_conn": 0.5})
    state = hebbian.init(cfg, seed=4)
    mask = np.asarray(state.mask)
    pre, post = _signals(1, (3, 6), (3, 4))
    state = hebbian.evolve(cfg, state, pre, post)
    w = np.asarray(state.weights)
    np.testing.assert_array_equal(w[mask == 0], 0.0)  # the mask holds
    norms = np.linalg.norm(w, axis=axis)
    np.testing.assert_allclose(norms[norms > 0], 2.0, rtol=1e-6)  # past the clip: the norm is what was asked


def test_step_sequences_and_packed_calls_apply_it_too(client):
    config = {**DENSE, "w_norm": 1.0}
    pre, post = _signals(5, (4, 3, 6), (4, 3, 4))
    one = client.create("norm-one", kind="HebbianSynapse", config=config, seed=7)
    seq = client.create("norm-seq", kind="HebbianSynapse", config=config, seed=7)
    stepped = client.create("norm-step", kind="HebbianSynapse", config=config, seed=7)
    for t in range(4):
        one.evolve(pre[t], post[t])
        stepped.step(pre[t], post[t])
    seq.run_sequence("evolve", pre=pre, post=post)
    np.testing.assert_array_equal(seq.get("weights"), one.get("weights"))  # bit for bit: the same program
    np.testing.assert_array_equal(stepped.get("weights"), one.get("weights"))
    np.testing.assert_allclose(np.linalg.norm(one.get("weights"), axis=0), 1.0, rtol=1e-6)
    twins = [client.create(f"norm-pack-{i}", kind="HebbianSynapse", config=config, seed=7) for i in range(2)]
    client.call_many("evolve", {t.name: {"pre": pre[0], "post": post[0]} for t in twins})
    lone = client.create("norm-lone", kind="HebbianSynapse", config=config, seed=7)
    lone.evolve(pre[0], post[0])
    for twin in twins:
        np.testing.assert_array_equal(twin.get("weights"), lone.get("weights"))
    assert one.describe()["config"]["w_norm"] == 1.0 and one.describe()["config"]["w_norm_per"] == "out"
    one.evolve(Ref("pre"), Ref("post"))  # and a learning call on what it holds
    np.testing.assert_allclose(np.linalg.norm(one.get("weights"), axis=0), 1.0, rtol=1e-6)


@pytest.mark.parametrize("count", [3, 4, 5])
@pytest.mark.parametrize("per", ["out", "in"])
def test_packed_calls_on_a_population_agree_with_separate_calls(client, per, count):
    """Within float32 rounding (2e-5 of the largest weight; seen: 1 ulp apart with 3, 5 or 7 instances): inside the
    packed call's loop XLA runs the filter gradient's convolution its own way (kinds/packed.py)."""
    config = {"shape": [3, 3, 2, 3], "x_shape": [6, 6], "eta": 0.05, "w_norm": 1.0, "w_norm_per": per}
    packed = [client.create(f"pack-{per}-{count}-{i}", kind="HebbianDeconvSynapse", config=config, seed=i)
              for i in range(count)]
    alone = [client.create(f"alone-{per}-{count}-{i}", kind="HebbianDeconvSynapse", config=config, seed=i)
             for i in range(count)]
    rng = np.random.default_rng(0)
    for _ in range(3):  # the first packed call as it comes, then stacked (docs/api.md)
        pre = rng.normal(size=(count, 2, 6, 6, 2)).astype(np.float32)
        post = rng.normal(size=(count, 2, 6, 6, 3)).astype(np.float32)
        together = client.call_stacked("evolve", [s.name for s in packed], {"pre": pre, "post": post},
                                       returns=["weights"])["weights"]
        separate = np.stack([s.evolve(pre[i], post[i], returns=["weights"])["weights"] for i, s in enumerate(alone)])
        assert np.abs(together - separate).max() <= 2e-5 * np.abs(separate).max()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("w_norm", -1.0, "w_norm: -1.0 is not allowed; it must be >= 0.0"),
    ("w_norm", "big", "w_norm"),
    ("w_norm_per", "rows", "w_norm_per: 'rows' is not allowed; choose one of out, in"),
])
@pytest.mark.parametrize("kind", ["HebbianSynapse", "HebbianDeconvSynapse"])
def test_bad_values_are_a_422_naming_the_field(client, kind, field, value, message):
    config = {**(DENSE if kind == "HebbianSynapse" else DECONV), field: value}
    with pytest.raises(UnprocessableEntityError, match=message):
        client.create(f"bad-{kind}-{field}".lower(), kind=kind, config=config)
    assert not any(d["name"].startswith("bad-") for d in client.list())


def test_help_says_it_is_beyond_ngclearn(client):
    for kind in ("HebbianSynapse", "HebbianDeconvSynapse"):
        hyper = client.kind_help(kind)["hyperparameters"]
        assert "beyond ngclearn" in hyper["w_norm"]["meaning"] and hyper["w_norm"]["default"] == 0.0
