"""The engine's own guarantees: config validation, shapes, properties, the fixed ngclearn defects."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synapse_serve.errors import InvalidConfig, ShapeMismatch
from synapse_serve.kinds import KINDS, get_kind
from synapse_serve.kinds import deconv as dc
from synapse_serve.kinds import hebbian_deconv as hd
from synapse_serve.kinds.base import check_tensor, compartment_paths, replace_compartment

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(**overrides):
    base = {"shape": [3, 3, 2, 4], "x_shape": [6, 6], "eta": 0.05}
    return hd.parse_config({**base, **overrides})


def rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def numpy_conv_transpose(x, w, stride, pads):
    """Independent scatter-form reference: x[i] adds W[t]·x[i] to y[i*stride + lo - t], per axis."""
    b, h, wd, _ = x.shape
    kh, kw, _, c_out = w.shape
    (lo_h, hi_h), (lo_w, hi_w) = pads
    oh, ow = (h - 1) * stride + 1 + lo_h + hi_h - kh + 1, (wd - 1) * stride + 1 + lo_w + hi_w - kw + 1
    y = np.zeros((b, oh, ow, c_out), np.float64)
    for i in range(h):
        for j in range(wd):
            for p in range(kh):
                for q in range(kw):
                    oi, oj = i * stride + lo_h - p, j * stride + lo_w - q
                    if 0 <= oi < oh and 0 <= oj < ow:
                        y[:, oi, oj, :] += x[:, i, j, :].astype(np.float64) @ w[p, q].astype(np.float64)
    return y


# --- config ---


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("stride", 0, "stride: 0 is not allowed; it must be between 1 and 64"),
        ("stride", -2, "stride: -2"),
        ("padding", "full", "padding: 'full' is not allowed; choose one of same, valid"),
        ("optim_type", "rmsprop", "optim_type: 'rmsprop' is not allowed; choose one of sgd, adam"),
        ("eta", -0.1, "eta: -0.1 is not allowed; it must be >= 0.0"),
        ("shape", [3, 3, 2], "shape: expected 4 integers"),
        ("shape", [0, 3, 2, 4], "shape[0]: 0 is not allowed"),
        ("shape", [65, 3, 2, 4], "shape[0]: 65 is not allowed; it must be between 1 and 64"),
        ("x_shape", [6, "6"], "x_shape[1]: expected an integer"),
        ("w_bound", float("nan"), "w_bound: nan is not allowed; it must be finite"),
        ("precision", "fp8", "precision: 'fp8' is not allowed"),
        ("bias", "yes", "bias: expected true or false"),
        ("filter_init", {"dist": "uniform", "low": 1, "high": 0}, "filter_init: low (1.0) must be below high"),
        ("filter_init", {"dist": "beta"}, "filter_init.dist: 'beta' is not allowed"),
        ("filter_update", "fft", "filter_update: 'fft' is not allowed"),
    ],
)
def test_bad_config_names_field_value_and_allowed(field, value, fragment):
    with pytest.raises(InvalidConfig) as info:
        make(**{field: value})
    assert fragment in str(info.value)


def test_unknown_field_and_alias_clash_are_rejected():
    with pytest.raises(InvalidConfig, match="unknown field 'strides'"):
        make(strides=2)
    with pytest.raises(InvalidConfig, match="both given"):
        make(resist_scale=2.0, g_conduct_factor=2.0)


def test_config_is_frozen_hashable_and_normalised():
    cfg = make(padding="valid", resist_scale=0.5)
    assert cfg.padding == "VALID" and cfg.g_conduct_factor == 0.5
    assert hash(cfg) == hash(make(padding="VALID", g_conduct_factor=0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):  # hyperparameters are immutable after create
        cfg.eta = 1.0  # type: ignore[misc]
    assert hd.parse_config(cfg.to_dict()) == cfg


def test_default_padding_is_same_and_explicit_pads_work():
    assert make().padding == "SAME"
    cfg = make(padding=[[1, 0], [2, 1]], stride=2)
    assert cfg.out_map == (5 * 2 + 1 + 1 + 0 - 3 + 1, 5 * 2 + 1 + 2 + 1 - 3 + 1)
    with pytest.raises(InvalidConfig, match="empty output map"):
        make(padding=[[-5, -5], [0, 0]], x_shape=[2, 2])


# --- shapes ---


@FAST
@given(
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    x=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    stride=st.integers(1, 3),
    padding=st.sampled_from(["SAME", "VALID"]),
    batch=st.integers(1, 3),
)
def test_output_shape_formula(k, x, stride, padding, batch):
    cfg = dc.parse_config({"shape": [*k, 2, 3], "x_shape": list(x), "stride": stride, "padding": padding})
    state = dc.forward(cfg, dc.init(cfg), rand((batch, *x, 2)))
    expected = tuple(n * stride + (max(kk - stride, 0) if padding == "VALID" else 0) for n, kk in zip(x, k))
    assert cfg.out_map == expected
    assert state.outputs.shape == (batch, *expected, 3)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (1, 1))])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_non_square_maps_and_kernels_match_an_independent_reference(padding, stride):
    cfg = hd.parse_config({"shape": [2, 4, 3, 2], "x_shape": [5, 3], "stride": stride, "padding": padding,
                           "filter_init": {"dist": "gaussian", "mean": 0.0, "std": 1.0}})
    state = hd.init(cfg, seed=3)
    x, w = rand((2, 5, 3, 3), 1), np.asarray(state.weights)
    state = dc.forward(cfg, state, x)
    np.testing.assert_allclose(state.outputs, numpy_conv_transpose(x, w, stride, cfg.pads), rtol=1e-5, atol=1e-5)
    post = rand(state.outputs.shape, 2)
    # H and dInputs are the two gradients of <post, y>: check them against finite sums of the reference
    h = hd.filter_gradient_vjp(cfg, x, post, state.weights)
    basis_h = np.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        e = np.zeros_like(w)
        e[idx] = 1.0
        basis_h[idx] = np.sum(post * numpy_conv_transpose(x, e, stride, cfg.pads))
    np.testing.assert_allclose(h, basis_h, rtol=1e-4, atol=1e-4)
    state = hd.backtransmit(cfg, state, post)
    dx = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = 1.0
        dx[idx] = np.sum(post * numpy_conv_transpose(e, w, stride, cfg.pads))
    np.testing.assert_allclose(state.dInputs, dx, rtol=1e-4, atol=1e-4)


def test_wrong_shapes_and_dtypes_name_expected_and_received():
    cfg = make()
    with pytest.raises(ShapeMismatch, match=r"pre: expected shape \(batch, 6, 6, 2\), received \(1, 6, 5, 2\)"):
        check_tensor("pre", np.zeros((1, 6, 5, 2), np.float32), cfg.in_trailing)
    with pytest.raises(ShapeMismatch, match=r"post: expected shape \(3, 6, 6, 4\), received \(2, 6, 6, 4\)"):
        check_tensor("post", np.zeros((2, 6, 6, 4), np.float32), cfg.out_trailing, batch=3)
    with pytest.raises(ShapeMismatch, match="received dtype int32"):
        check_tensor("inputs", np.zeros((1, 6, 6, 2), np.int32), cfg.in_trailing)
    assert check_tensor("inputs", np.zeros((1, 6, 6, 2)), cfg.in_trailing).dtype == np.float32


def test_any_batch_size_per_call():
    cfg = make(batch_size=1)
    state = hd.init(cfg)
    for batch in (1, 5, 2):
        state = dc.forward(cfg, state, rand((batch, 6, 6, 2)))
        state = hd.evolve(cfg, state, rand((batch, 6, 6, 2)), rand((batch, 6, 6, 4)))
        state = hd.backtransmit(cfg, state, None)
        assert state.outputs.shape[0] == state.dInputs.shape[0] == batch


# --- properties ---


@FAST
@given(seed=st.integers(0, 1000), optim=st.sampled_from(["sgd", "adam"]), decay=st.sampled_from([0.0, 0.1]),
       bias=st.booleans())
def test_eta_zero_leaves_parameters_unchanged(seed, optim, decay, bias):
    cfg = make(eta=0.0, optim_type=optim, w_decay=decay, bias=bias)
    state = hd.init(cfg, seed=seed)
    w0, b0 = np.asarray(state.weights).copy(), np.asarray(state.biases).copy()
    state = hd.evolve(cfg, state, rand((2, 6, 6, 2), seed), rand((2, 6, 6, 4), seed + 1))
    np.testing.assert_array_equal(state.weights, w0)
    np.testing.assert_array_equal(state.biases, b0)


@FAST
@given(seed=st.integers(0, 1000), bound=st.floats(0.01, 2.0), nonneg=st.booleans(),
       optim=st.sampled_from(["sgd", "adam"]), sign=st.sampled_from([1.0, -1.0]))
def test_bounds_and_non_negativity_hold_after_evolve(seed, bound, nonneg, optim, sign):
    cfg = make(eta=0.5, w_bound=bound, is_nonnegative=nonneg, optim_type=optim, sign_value=sign,
               filter_init={"dist": "gaussian", "mean": 0.0, "std": 3.0})
    state = hd.init(cfg, seed=seed)
    for step in range(3):
        state = hd.evolve(cfg, state, rand((2, 6, 6, 2), seed + step), rand((2, 6, 6, 4), seed + 100 + step))
        w = np.asarray(state.weights)
        assert w.max() <= bound and w.min() >= (0.0 if nonneg else -bound)


@FAST
@given(seed=st.integers(0, 1000))
def test_reset_is_idempotent_and_keeps_learned_state(seed):
    cfg = make(optim_type="adam", bias=True)
    state = hd.init(cfg, seed=seed)
    state = dc.forward(cfg, state, rand((2, 6, 6, 2), seed))
    state = hd.evolve(cfg, state, rand((2, 6, 6, 2), seed), rand((2, 6, 6, 4), seed))
    state = hd.backtransmit(cfg, state, None)
    kept = {k: np.asarray(v).copy() for k, v in compartment_paths(state).items()}
    once_state = hd.reset(cfg, state)
    once = {k: np.asarray(v).copy() for k, v in compartment_paths(once_state).items()}
    twice = compartment_paths(hd.reset(cfg, once_state))
    for name, value in once.items():
        np.testing.assert_array_equal(twice[name], value)
        if name in hd.RESET_FIELDS:
            assert not value.any() and value.shape[0] == cfg.batch_size  # back to the configured batch
        else:  # weights, biases, optimizer state, dWeights, key
            np.testing.assert_array_equal(value, kept[name])


@FAST
@given(
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    x=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    stride=st.integers(1, 3),
    padding=st.sampled_from(["SAME", "VALID"]),
    seed=st.integers(0, 100),
)
def test_both_filter_update_formulations_agree(k, x, stride, padding, seed):
    cfg = hd.parse_config({"shape": [*k, 2, 3], "x_shape": list(x), "stride": stride, "padding": padding})
    pre = rand((2, *x, 2), seed)
    post = rand((2, *cfg.out_map, 3), seed + 1)
    w = hd.init(cfg, seed=seed).weights
    a = hd.filter_gradient_vjp(cfg, pre, post, w)
    b = hd.filter_gradient_adjoint(cfg, pre, post, w)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max())))


def test_filter_update_choice_is_per_config_and_per_device():
    cfg = make(stride=2)
    assert hd.choose_filter_update(cfg, "cpu").filter_update == "vjp"
    assert hd.choose_filter_update(cfg, "gpu").filter_update == "adjoint"
    assert hd.choose_filter_update(make(stride=1), "gpu").filter_update == "vjp"
    assert hd.choose_filter_update(make(filter_update="adjoint"), "cpu").filter_update == "adjoint"
    with pytest.raises(InvalidConfig, match="adjoint"):
        make(filter_update="adjoint", padding=[[5, 0], [0, 0]])


def test_timed_filter_update_keeps_the_faster_form_of_this_device(monkeypatch):
    cfg = make(stride=2, filter_update="timed", batch_size=2)
    seen = []
    real = hd.time_filter_updates
    monkeypatch.setattr(hd, "time_filter_updates", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    chosen = hd.choose_filter_update(cfg, "cpu", jax.devices()[0]).filter_update
    (timings,) = seen  # the timings the choice saw, measured on this device
    assert set(timings) == {"vjp", "adjoint"} and all(t > 0 for t in timings.values())
    assert chosen == min(timings, key=timings.get)  # the faster one is kept
    for faster, other in (("adjoint", "vjp"), ("vjp", "adjoint")):  # whichever it is
        monkeypatch.setattr(hd, "time_filter_updates", lambda *a, f=faster, o=other, **k: {f: 0.001, o: 0.002})
        assert hd.choose_filter_update(cfg, "cpu").filter_update == faster
    monkeypatch.undo()
    # a padding the adjoint form cannot take leaves only the VJP to time
    only_vjp = make(filter_update="timed", padding=[[5, 0], [0, 0]])
    assert set(hd.time_filter_updates(only_vjp, repeats=1)) == {"vjp"}
    assert hd.choose_filter_update(only_vjp, "gpu").filter_update == "vjp"


@pytest.mark.parametrize("form", ["vjp", "adjoint"])
def test_bfloat16_precision_rounds_operands_and_keeps_float32_state(form):
    exact, bf16 = make(stride=2, filter_update=form), make(stride=2, filter_update=form, precision="bfloat16")
    pre, post = rand((2, 6, 6, 2), 3), rand((2, 12, 12, 4), 4)
    results = {}
    for cfg in (exact, bf16):
        state = dc.forward(cfg, hd.init(cfg, seed=1), pre)
        outputs = np.asarray(state.outputs)
        state = hd.backtransmit(cfg, hd.evolve(cfg, state, pre, post), post)
        assert all(np.asarray(leaf).dtype != np.dtype("bfloat16") for leaf in compartment_paths(state).values())
        results[cfg.precision] = (outputs, np.asarray(state.dWeights), np.asarray(state.dInputs))
    for got, want in zip(results["bfloat16"], results["highest"]):
        error = np.abs(got - want).max() / np.abs(want).max()
        assert 0 < error < 2e-2  # bfloat16 keeps 8 bits of mantissa: rounded, but close


def test_evolve_with_adjoint_matches_vjp_end_to_end():
    states = {}
    for form in ("vjp", "adjoint"):
        cfg = make(stride=2, filter_update=form, optim_type="adam")
        state = hd.init(cfg, seed=1)
        for step in range(3):
            state = hd.evolve(cfg, state, rand((2, 6, 6, 2), step), rand((2, 12, 12, 4), step + 9))
        states[form] = np.asarray(state.weights)
    np.testing.assert_allclose(states["vjp"], states["adjoint"], rtol=1e-5, atol=1e-6)


# --- compilation ---


def test_second_call_and_second_instance_do_not_recompile():
    cfg = make(stride=2, x_shape=[5, 7], batch_size=2)  # init shapes = call shapes
    x, post = rand((2, 5, 7, 2)), rand((2, 10, 14, 4))
    a = hd.init(cfg, seed=0)
    a = dc.forward(cfg, a, x)
    a = hd.evolve(cfg, a, x, post)
    a = hd.backtransmit(cfg, a, None)
    sizes = [fn._cache_size() for fn in (dc.forward, hd.evolve, hd.backtransmit)]
    b = hd.init(hd.parse_config(cfg.to_dict()), seed=5)  # another instance, an equal config
    for state in (a, b):
        state = dc.forward(cfg, state, x)
        state = hd.evolve(cfg, state, x, post)
        state = hd.backtransmit(cfg, state, None)
    assert [fn._cache_size() for fn in (dc.forward, hd.evolve, hd.backtransmit)] == sizes


@pytest.mark.parametrize("operation", ["forward", "evolve", "backtransmit", "step", "reset"])
def test_state_is_donated(operation):
    """Every operation donates its input state (no second copy of a large state per call): a regression
    fails here, on CPU too (the JAX this suite pins donates there)."""
    cfg = make(optim_type="adam")
    state = hd.init(cfg)
    old = compartment_paths(state)
    x, post = rand((1, 6, 6, 2)), rand((1, 6, 6, 4))
    args = {"forward": (x,), "evolve": (x, post), "backtransmit": (post,), "step": (x, post), "reset": ()}
    hd.KIND.operations[operation].fn(cfg, state, *args[operation])
    # the parameters and optimizer state (what grows with the synapse) are always reused; a signal the
    # operation replaces by a new array may be left to the allocator
    kept = [name for name, leaf in old.items() if not leaf.is_deleted()]
    assert not [name for name in kept if name in ("weights", "biases", "key") or name.startswith("opt_state")], kept


def test_equal_configs_parsed_apart_share_one_compile():
    """Two instances whose configs were parsed independently (equal, not the same object) compile once."""
    from synapse_serve.local.backend import compile_stats
    from synapse_serve.local.registry import Registry
    from synapse_serve.names import InstanceKey

    stats = compile_stats()
    raw = {"shape": [3, 3, 2, 4], "x_shape": [7, 5], "eta": 0.1, "stride": 2, "optim_type": "adam", "bias": True}
    registry = Registry()
    x, post = rand((3, 7, 5, 2)), rand((3, 14, 10, 4))

    def run(name: str, seed: int) -> None:
        key = InstanceKey("local", name)
        registry.create(key, kind="HebbianDeconvSynapse", config=dict(raw), seed=seed)
        for operation, tensors in (("forward", {"inputs": x}), ("evolve", {"pre": x, "post": post}),
                                   ("backtransmit", {"post": post}), ("step", {"inputs": x, "post": post}),
                                   ("reset", {})):
            registry.call(key, operation, tensors)

    run("first", 0)
    before = stats.compilations
    run("second", 1)  # a config parsed again from the same values
    assert stats.compilations == before
    a, b = (registry._instances[InstanceKey("local", n)].config for n in ("first", "second"))
    assert a == b and a is not b and hash(a) == hash(b)


# --- the deviations table of docs/conformance.md ---


def test_no_bias_stays_no_bias():
    cfg = make(bias=False)
    state = hd.evolve(cfg, hd.init(cfg), rand((1, 6, 6, 2)), rand((1, 6, 6, 4)))
    assert state.biases.shape == (0,) and state.dBiases.shape == (0,)
    state = dc.forward(cfg, state, rand((1, 6, 6, 2)))  # ngclearn crashes here
    assert state.outputs.shape == (1, 6, 6, 4)


def test_bias_is_per_output_channel_and_its_update_sums_post():
    cfg = make(bias=True, shape=[3, 2, 2, 5], eta=0.1, sign_value=-1.0,
               bias_init={"dist": "constant", "value": 0.5})  # kernel width 2 != c_out 5: ngclearn crashes
    state = hd.init(cfg)
    assert state.biases.shape == (5,)
    post = rand((3, 6, 6, 5))
    state = hd.evolve(cfg, state, rand((3, 6, 6, 2)), post)
    expected_db = -post.sum(axis=(0, 1, 2))
    np.testing.assert_allclose(state.dBiases, expected_db, rtol=1e-6)
    np.testing.assert_allclose(state.biases, 0.5 - 0.1 * expected_db, rtol=1e-6)
    assert state.biases.shape == (5,)  # stays per channel (ngclearn's turns per-pixel)


@pytest.mark.parametrize("optim_type", ["sgd", "adam", "nag"])
def test_step_is_forward_evolve_backtransmit_bit_for_bit(optim_type):
    cfg = make(stride=2, optim_type=optim_type, bias=True, w_decay=0.01, w_bound=1.5)
    fused, split = hd.init(cfg, seed=2), hd.init(cfg, seed=2)
    for i in range(3):
        x, post = rand((2, 6, 6, 2), i), rand((2, 12, 12, 4), 50 + i)
        fused = hd.step(cfg, fused, x, post)
        split = hd.backtransmit(cfg, hd.evolve(cfg, dc.forward(cfg, split, x), x, post), post)
    a, b = compartment_paths(fused), compartment_paths(split)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_reset_called_directly_works():
    cfg = make()
    state = hd.reset(cfg, hd.init(cfg))  # ngclearn's reset() raises when called directly
    assert not np.asarray(state.inputs).any()


def test_help_is_truthful():
    cfg = make(optim_type="adam", bias=True)
    help_ = hd.KIND.help(cfg)
    names = set(compartment_paths(hd.init(cfg)))
    for compartment in help_["compartments"]:
        assert compartment in names or compartment == "opt_state/..."
    assert "filters" not in help_["compartments"]
    assert "w_decay" in help_["dynamics"]["evolve"] and "sign_value" in help_["dynamics"]["evolve"]
    assert help_["hyperparameters"]["optim_type"]["value"] == "adam"
    assert set(help_["operations"]) == {"forward", "evolve", "backtransmit", "step", "reset"}
    assert "step" in help_["dynamics"]
    assert set(dc.KIND.help(None)["operations"]) == {"forward", "reset"}


def test_kept_ngclearn_quirks():
    # w_decay enters as -w_decay*W and sgd subtracts it: with zero signals, weights grow by (1 + eta*w_decay)
    cfg = make(w_decay=0.1, eta=0.5, filter_init={"dist": "constant", "value": 1.0})
    state = hd.evolve(cfg, hd.init(cfg), np.zeros((1, 6, 6, 2), np.float32), np.zeros((1, 6, 6, 4), np.float32))
    np.testing.assert_allclose(state.weights, 1.05, rtol=1e-6)
    # is_nonnegative is ignored when w_bound == 0
    cfg = make(is_nonnegative=True, w_bound=0.0, eta=10.0)
    state = hd.init(cfg)
    x = np.ones((1, 6, 6, 2), np.float32)
    state = hd.evolve(cfg, state, x, np.ones((1, 6, 6, 4), np.float32))
    assert np.asarray(state.weights).min() < 0
    # sign_value=+1 with sgd is anti-Hebbian: correlated pre/post lower the weights
    cfg = make(eta=0.01)
    w0 = np.asarray(hd.init(cfg).weights).copy()
    state = hd.evolve(cfg, hd.init(cfg), x, np.ones((1, 6, 6, 4), np.float32))
    assert (np.asarray(state.weights) < w0).all()


def test_compartment_write_is_checked():
    cfg = make()
    state = hd.init(cfg)
    state = replace_compartment(hd.KIND, state, "weights", np.ones((3, 3, 2, 4), np.float32))
    assert float(state.weights.sum()) == 72
    with pytest.raises(ShapeMismatch, match=r"expected shape \(3, 3, 2, 4\), received \(3, 3, 4, 2\)"):
        replace_compartment(hd.KIND, state, "weights", np.ones((3, 3, 4, 2), np.float32))
    with pytest.raises(ShapeMismatch, match="finite"):
        replace_compartment(hd.KIND, state, "weights", np.full((3, 3, 2, 4), np.nan, np.float32))
    state = replace_compartment(hd.KIND, state, "inputs", np.ones((7, 6, 6, 2), np.float32))  # batch may change
    assert state.inputs.shape == (7, 6, 6, 2)


def test_seeded_default_init_is_uniform_in_ngclearn_range():
    state = hd.init(make(shape=[5, 5, 4, 8]), seed=11)
    w = np.asarray(state.weights)
    assert 0.025 <= w.min() and w.max() < 0.8
    np.testing.assert_array_equal(w, hd.init(make(shape=[5, 5, 4, 8]), seed=11).weights)
    assert not np.array_equal(w, hd.init(make(shape=[5, 5, 4, 8]), seed=12).weights)


def test_explicit_initial_tensors():
    w = rand((3, 3, 2, 4))
    state = hd.init(make(bias=True), weights=w, biases=np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(state.weights, w)
    np.testing.assert_array_equal(state.biases, np.arange(4))
    with pytest.raises(ShapeMismatch, match="weights"):
        hd.init(make(), weights=rand((3, 3, 4, 2)))
    with pytest.raises(InvalidConfig, match="bias = false"):
        hd.init(make(), biases=np.zeros(4, np.float32))


def test_kinds_registry():
    assert set(KINDS) == {"DeconvSynapse", "HebbianDeconvSynapse", "DenseSynapse", "HebbianSynapse"}
    assert get_kind("HebbianDeconvSynapse") is hd.KIND
    with pytest.raises(Exception, match="unknown kind 'os.system'"):
        get_kind("os.system")


@pytest.mark.parametrize("overrides", [{}, {"optim_type": "adam", "bias": True}, {"optim_type": "nag", "bias": True},
                                       {"stride": 3, "batch_size": 5},
                                       {"shape": [2, 4, 3, 5], "x_shape": [7, 3], "padding": "VALID"}])
def test_state_size_is_known_before_the_state_is_built(overrides):
    for kind, parse in ((hd.KIND, hd.parse_config), (dc.KIND, dc.parse_config)):
        cfg = parse({"shape": [3, 3, 2, 4], "x_shape": [6, 6],
                     **{k: v for k, v in overrides.items() if kind is hd.KIND or k != "optim_type"}})
        state = kind.init(cfg, seed=0)
        actual = sum(np.asarray(v).nbytes for v in compartment_paths(state).values())
        assert kind.state_nbytes(cfg) == actual


@pytest.mark.parametrize("module", [dc, hd], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples_run(module):
    """The examples in the kinds' docstrings are run, so they stay true."""
    import doctest

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
