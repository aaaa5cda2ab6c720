"""The dense kinds (DenseSynapse, HebbianSynapse): ngclearn's defects fixed, each with a test; properties;
help that tells the truth. The numbers themselves are checked against ngclearn in test_dense_conformance.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_serve.errors import InvalidConfig, ShapeMismatch
from synapse_serve.kinds import KINDS, dense, hebbian
from synapse_serve.kinds.base import compartment_paths

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(**overrides) -> hebbian.HebbianConfig:
    return hebbian.parse_config({"shape": [5, 3], "eta": 0.1, "w_bound": 0.0, **overrides})


def rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- ngclearn 3.2.3's defects, fixed ---


def test_w_decay_is_the_l2_prior_it_always_meant():
    """ngclearn: any keyword w_decay (even 0.0) crashes at construction (it is rebound onto prior)."""
    cfg = make(w_decay=0.1)
    assert cfg.prior == ("l2", 0.1) and cfg.to_dict()["w_decay"] == 0.0
    assert hebbian.parse_config(cfg.to_dict()) == cfg  # round-trips
    pre, post = rand((2, 5), 1), rand((2, 3), 2)
    a = hebbian.evolve(cfg, hebbian.init(cfg, seed=3), pre, post)
    b = hebbian.evolve(make(prior=["l2", 0.1]), hebbian.init(make(prior=["l2", 0.1]), seed=3), pre, post)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert make(w_decay=0.0).prior == ("constant", 0.0)
    with pytest.raises(InvalidConfig, match="another name for prior"):
        make(w_decay=0.1, prior=["l1", 0.1])


def test_elastic_net_takes_a_list_and_refuses_a_scalar():
    """ngclearn: a scalar lambda crashes at the first evolve, and so does a list (what JSON gives)."""
    cfg = make(prior=["elastic_net", [0.5, 0.3]], eta=0.0)
    state = hebbian.init(cfg, seed=1)
    w = np.asarray(state.weights).copy()
    pre, post = rand((2, 5), 1), rand((2, 3), 2)
    out = hebbian.calc_update(cfg, state, pre, post)
    expected = (pre.T @ post + (-np.sign(w) * 0.3 - w * (1 - 0.3) / 2) * 0.5)  # ngclearn's formula, L2 part halved
    np.testing.assert_allclose(out.dWeights, expected, rtol=1e-5, atol=1e-6)
    assert make(prior=["l1l2", [0.5, 0.3]]).prior == cfg.prior
    with pytest.raises(InvalidConfig, match=r"elastic_net needs lambda = \[scale, l1_ratio\]"):
        make(prior=["elastic_net", 0.01])


@pytest.mark.parametrize(("name", "message"), [("L2", "did you mean 'l2'"), ("Ridge", "did you mean 'ridge'"),
                                               ("foo", "choose one of"), ("Elastic_Net", "did you mean 'elastic_net'"),
                                               (5, "choose one of")])
def test_unknown_or_miscased_prior_names_are_refused(name, message):
    """ngclearn: "L2", "Ridge", "foo" silently mean no prior; a number raises AttributeError."""
    with pytest.raises(InvalidConfig, match=message):
        make(prior=[name, 0.1])
    assert make(prior=["GAUSSIAN", 0.1]).prior == ("l2", 0.1)  # these two are case-insensitive in ngclearn
    assert make(prior=["Laplacian", 0.1]).prior == ("l1", 0.1)


@pytest.mark.parametrize("optim_type", ["sgd", "adam", "nag"])
def test_a_sparse_synapse_stays_sparse(optim_type):
    """ngclearn: the p_conn mask is applied once at init and forgotten; every evolve refills the gaps."""
    cfg = make(p_conn=0.5, optim_type=optim_type, shape=[8, 6], w_bound=1.0)
    state = hebbian.init(cfg, seed=1)
    mask = np.asarray(state.mask)
    assert mask.shape == (8, 6) and 0 < mask.sum() < mask.size
    assert not np.asarray(state.weights)[mask == 0].any()
    for i in range(5):
        state = hebbian.evolve(cfg, state, np.ones((3, 8), np.float32), rand((3, 6), i))
    assert not np.asarray(state.weights)[mask == 0].any() and np.asarray(state.weights)[mask == 1].any()
    explicit = hebbian.init(cfg, seed=1, weights=np.ones((8, 6), np.float32))  # explicit weights are masked too
    np.testing.assert_array_equal(explicit.weights, mask)
    assert hebbian.init(make(), seed=1).mask.shape == (0,)  # p_conn = 1: no mask at all


def test_any_batch_works_and_is_checked():
    """ngclearn: a batch of 1 is repeated to batch_size rows; any other mismatch crashes."""
    cfg = make(batch_size=2, bias=True)
    state = hebbian.init(cfg, seed=0)
    x1 = rand((1, 5))
    state = dense.forward(cfg, state, x1)
    assert state.outputs.shape == (1, 3)  # one row, not two copies
    np.testing.assert_allclose(state.outputs, x1 @ np.asarray(state.weights) + np.asarray(state.biases), rtol=1e-6)
    assert dense.forward(cfg, state, rand((7, 5))).outputs.shape == (7, 3)
    from synapse_serve.kinds.base import check_tensor

    with pytest.raises(ShapeMismatch, match=r"expected shape \(batch, 5\), received \(2, 4\)"):
        check_tensor("inputs", rand((2, 4)), cfg.trailing("in"))


def test_dbiases_keeps_one_shape():
    """ngclearn: dBiases is (n,) at init and after reset but (1, n) after evolve."""
    cfg = make(bias=True)
    state = hebbian.init(cfg, seed=0)
    shapes = [state.dBiases.shape]
    state = hebbian.evolve(cfg, state, rand((2, 5)), rand((2, 3)))
    shapes.append(state.dBiases.shape)
    shapes.append(hebbian.reset(cfg, state).dBiases.shape)
    assert shapes == [(3,), (3,), (3,)]
    assert hebbian.init(make(), seed=0).dBiases.shape == (0,)  # no bias: no bias update, ever


@pytest.mark.parametrize(("field", "value", "message"), [
    ("p_release_mean", 0.5, "stochastic release is not supported"),
    ("max_delay_steps", 2, "axonal delays are not supported"),
    ("optim_type", "rmsprop", "choose one of sgd, adam, nag"),
    ("optim_type", "SGD ", "choose one of"),
    ("p_conn", 0.0, "connects nothing"),
    ("shape", [3], r"expected \[n_in, n_out\]"),
])
def test_what_ngclearn_mis_computes_or_crashes_on_is_a_clear_422(field, value, message):
    with pytest.raises(InvalidConfig, match=message):
        make(**{field: value})
    assert make(p_release_mean=1, max_delay_steps=0).p_release_mean == 1.0  # the neutral values are accepted


# --- properties ---


@FAST
@given(optim_type=st.sampled_from(["sgd", "adam", "nag"]), bias=st.booleans(), p_conn=st.sampled_from([1.0, 0.4]),
       seed=st.integers(0, 1000))
def test_step_is_forward_evolve_backtransmit_bit_for_bit(optim_type, bias, p_conn, seed):
    cfg = make(optim_type=optim_type, bias=bias, p_conn=p_conn, w_bound=1.0, prior=["l1", 0.01])
    fused, split = hebbian.init(cfg, seed=seed), hebbian.init(cfg, seed=seed)
    for i in range(3):
        x, post = rand((2, 5), seed + i), rand((2, 3), seed + 50 + i)
        fused = hebbian.step(cfg, fused, x, post)
        split = hebbian.backtransmit(cfg, hebbian.evolve(cfg, dense.forward(cfg, split, x), x, post), post)
    a, b = compartment_paths(fused), compartment_paths(split)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_backtransmit_is_the_signed_transpose_through_the_mask():
    cfg = make(p_conn=0.5, sign_value=-1.0, g_conduct_factor=3.0)
    state = hebbian.init(cfg, seed=2)
    post = rand((4, 3))
    w = np.asarray(state.weights) * np.asarray(state.mask)  # read before the call donates the state
    out = hebbian.backtransmit(cfg, state, post)
    np.testing.assert_allclose(out.dInputs, -post @ w.T, rtol=1e-6, atol=1e-7)  # g is not applied
    np.testing.assert_array_equal(hebbian.backtransmit(cfg, out, None).dInputs, out.dInputs)  # the stored post


def test_calc_update_changes_nothing_learned():
    cfg = make(optim_type="adam", bias=True)
    state = hebbian.init(cfg, seed=0)
    before = {k: np.asarray(v).copy() for k, v in compartment_paths(state).items()}
    state = hebbian.calc_update(cfg, state, rand((2, 5)), rand((2, 3)))
    after = compartment_paths(state)
    for name in ("weights", "biases", "opt_state/count", "opt_state/mu/0", "opt_state/nu/0"):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert np.asarray(after["dWeights"]).any()


@FAST
@given(seed=st.integers(0, 1000), bound=st.sampled_from([0.5, 1.0, 2.0]), nonneg=st.booleans(),
       optim_type=st.sampled_from(["sgd", "adam", "nag"]), sign=st.sampled_from([1.0, -1.0]))
def test_bounds_and_non_negativity_hold_after_evolve(seed, bound, nonneg, optim_type, sign):
    cfg = make(w_bound=bound, is_nonnegative=nonneg, optim_type=optim_type, sign_value=sign, eta=1.0)
    state = hebbian.init(cfg, seed=seed)
    for step in range(3):
        state = hebbian.evolve(cfg, state, rand((2, 5), seed + step) * 10, rand((2, 3), seed + 9 + step) * 10)
    w = np.asarray(state.weights)
    assert w.max() <= bound and w.min() >= (0.0 if nonneg else -bound)


def test_reset_returns_signals_to_batch_size_and_zeroes_the_updates():
    cfg = make(batch_size=2, bias=True, optim_type="adam")
    state = hebbian.step(cfg, hebbian.init(cfg, seed=0), rand((9, 5)), rand((9, 3)))
    kept = {k: np.asarray(v).copy() for k, v in compartment_paths(state).items()}
    state = hebbian.reset(cfg, state)
    out = compartment_paths(state)
    for name in ("inputs", "outputs", "pre", "post", "dInputs"):
        assert out[name].shape[0] == 2 and not np.asarray(out[name]).any(), name
    assert not np.asarray(out["dWeights"]).any() and not np.asarray(out["dBiases"]).any()
    for name in ("weights", "biases", "opt_state/count", "opt_state/mu/0", "key"):
        np.testing.assert_array_equal(out[name], kept[name], err_msg=name)


def test_the_default_rule_is_anti_hebbian_and_w_bound_is_on_by_default():
    """Kept from ngclearn (numbers identical), said plainly in help."""
    cfg = hebbian.parse_config({"shape": [4, 2], "eta": 0.1})
    assert cfg.w_bound == 1.0 and cfg.sign_value == 1.0
    state = hebbian.init(cfg, seed=0)
    w0 = np.asarray(state.weights).copy()
    state = hebbian.evolve(cfg, state, np.ones((1, 4), np.float32), np.ones((1, 2), np.float32))
    assert (np.asarray(state.weights) < w0).all()  # correlated pre and post lower the weights
    help_ = hebbian.KIND.help(cfg)
    assert "anti-Hebbian" in help_["hyperparameters"]["sign_value"]["meaning"]
    assert help_["hyperparameters"]["w_bound"]["default"] == 1.0


def test_help_is_truthful():
    for optim_type in ("sgd", "adam", "nag"):
        cfg = make(optim_type=optim_type, bias=True, p_conn=0.5)
        names = set(compartment_paths(hebbian.init(cfg)))
        help_ = hebbian.KIND.help(cfg)
        for compartment in help_["compartments"]:
            assert compartment in names or compartment == "opt_state/...", compartment
        assert any(n.startswith("opt_state/") for n in names)
    help_ = hebbian.KIND.help(None)
    assert set(help_["operations"]) == {"forward", "evolve", "calc_update", "backtransmit", "step", "reset"}
    assert "halved" in " ".join(help_["notes"]) and "w_decay" in help_["hyperparameters"]
    assert set(dense.KIND.help(None)["operations"]) == {"forward", "reset"}


@pytest.mark.parametrize("kind", [dense.KIND, hebbian.KIND], ids=lambda k: k.name)
@pytest.mark.parametrize("overrides", [{}, {"bias": True, "p_conn": 0.5}, {"batch_size": 7, "shape": [3, 9]}])
def test_state_size_is_known_before_the_state_is_built(kind, overrides):
    for optim_type in ("sgd", "adam", "nag") if kind is hebbian.KIND else (None,):
        extra = {"optim_type": optim_type} if optim_type else {}
        cfg = kind.parse_config({"shape": [5, 3], **overrides, **extra})
        actual = sum(np.asarray(v).nbytes for v in compartment_paths(kind.init(cfg, seed=0)).values())
        assert kind.state_nbytes(cfg) == actual


def test_seeded_init_follows_ngclearns_key_schedule():
    import jax

    cfg = make(shape=[6, 4], bias=True, p_conn=0.5, weight_init={"dist": "gaussian", "mean": 0.0, "std": 1.0},
               bias_init={"dist": "uniform", "low": -1.0, "high": 1.0})
    state = hebbian.init(cfg, seed=42)
    _, k_w, k_mask, k_b = jax.random.split(jax.random.PRNGKey(42), 4)
    w = jax.random.normal(jax.random.split(k_w, 2)[0], (6, 4))
    mask = jax.random.bernoulli(k_mask, 0.5, (6, 4))
    b = jax.random.uniform(jax.random.split(k_b, 2)[0], (1, 4), minval=-1.0, maxval=1.0)
    np.testing.assert_array_equal(state.weights, w * mask)
    np.testing.assert_array_equal(state.biases, np.asarray(b).reshape(-1))


def test_both_dense_kinds_are_registered():
    assert KINDS["DenseSynapse"] is dense.KIND and KINDS["HebbianSynapse"] is hebbian.KIND
