"""The lean plan runs an operation on the compartments it touches: the same state, bit for bit, as the whole-state call.

The registry runs every single call through ``kinds/lean.py``; here each operation of each kind
is run both ways from the same state and every compartment compared, and the plan's reading of
the program (what it reads, what it writes) is checked where it is known.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from synapse_serve.kinds import get_kind, lean
from synapse_serve.kinds.base import compartment_paths, leaf_names

CASES = {
    "deconv-sgd": ("HebbianDeconvSynapse", {"shape": [3, 3, 2, 3], "x_shape": [6, 6], "eta": 0.05}),
    "deconv-adam-bias": ("HebbianDeconvSynapse", {"shape": [3, 3, 2, 3], "x_shape": [7, 7], "stride": 2,
                                                  "eta": 0.05, "optim_type": "adam", "bias": True}),
    "dense-adam": ("HebbianSynapse", {"shape": [6, 4], "eta": 0.05, "optim_type": "adam", "bias": True,
                                      "w_decay": 0.01, "w_bound": 2.0}),
    "dense-nag-mask": ("HebbianSynapse", {"shape": [6, 4], "eta": 0.05, "optim_type": "nag", "p_conn": 0.6}),
    "dense-plain": ("DenseSynapse", {"shape": [6, 4], "bias": True}),
    "deconv-plain": ("DeconvSynapse", {"shape": [3, 3, 2, 3], "x_shape": [6, 6]}),
}


def arguments(config, op, batch, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, *config.trailing(arg.space))).astype(np.float32) for arg in op.args]


def copy(state):
    return jax.tree_util.tree_map(lambda leaf: leaf.copy(), state)


@pytest.mark.parametrize("case", list(CASES))
def test_every_operation_through_its_plan_is_the_whole_state_call(case):
    kind_name, raw = CASES[case]
    kind = get_kind(kind_name)
    config = kind.parse_config(raw)
    state = kind.init(config, 5)
    for round_ in range(2):  # the second round starts from states the first round left (other batches)
        for name, op in kind.operations.items():
            for batch in (1, 3):
                args = arguments(config, op, batch, seed=round_ * 10 + batch)
                whole = op.fn(config, copy(state), *args)
                planned = lean.plan(op.fn, config, state, *args).run(config, copy(state), *args)
                a, b = compartment_paths(whole), compartment_paths(planned)
                assert a.keys() == b.keys()
                for compartment in a:
                    assert a[compartment].shape == b[compartment].shape, (name, compartment)
                    assert np.array_equal(np.asarray(a[compartment]), np.asarray(b[compartment])), (name, compartment)
                state = planned


def test_the_plan_reads_what_the_operation_reads_and_writes_what_it_writes():
    kind = get_kind("HebbianDeconvSynapse")
    config = kind.parse_config(CASES["deconv-sgd"][1])
    state = kind.init(config, 0)
    x = arguments(config, kind.operations["forward"], 2, 0)[0]
    forward = lean.plan(kind.operations["forward"].fn, config, state, x)
    names = leaf_names(forward.treedef)
    assert {names[i] for i in forward.read} == {"weights"}  # no bias: the biases are never read
    assert {names[i] for i in forward.written} == {"inputs", "outputs"}
    assert forward.out_signature[names.index("outputs")] == ((2, 6, 6, 3), np.dtype("float32"))
    post = arguments(config, kind.operations["evolve"], 2, 1)
    evolve = lean.plan(kind.operations["evolve"].fn, config, state, *post)
    assert {"weights", "pre", "post", "dWeights"} <= {leaf_names(evolve.treedef)[i] for i in evolve.written}


def test_a_sent_tensor_stored_as_it_is_is_donated_and_the_callers_own_arrays_survive():
    kind = get_kind("HebbianDeconvSynapse")
    config = kind.parse_config(CASES["deconv-sgd"][1])
    state = kind.init(config, 0)
    x, = arguments(config, kind.operations["forward"], 2, 0)
    post, = arguments(config, kind.operations["backtransmit"], 2, 1)
    forward = lean.plan(kind.operations["forward"].fn, config, state, x)
    assert forward.stored == (0,)  # inputs = x: the program's own copy of x becomes the compartment
    assert lean.plan(kind.operations["backtransmit"].fn, config, state, post).stored == (0,)  # post
    assert lean.plan(kind.operations["backtransmit"].fn, config, state, None).stored == ()  # the stored post
    assert lean.plan(kind.operations["reset"].fn, config, state).stored == ()
    evolve = lean.plan(kind.operations["evolve"].fn, config, state, x, post)
    assert evolve.stored == (0, 1)  # pre and post
    mine = jax.numpy.asarray(x)  # a device array someone else holds: copied, never donated away
    new = forward.run(config, copy(state), mine)
    assert not mine.is_deleted()
    assert np.array_equal(np.asarray(new.inputs), x) and np.array_equal(np.asarray(mine), x)
    host = x.copy()
    new = forward.run(config, copy(state), host)
    host[...] = 7.0  # the caller's array, changed after the call: the stored compartment is a copy
    assert np.array_equal(np.asarray(new.inputs), x)


def test_an_answer_names_the_compartments_asked_for_in_leaf_order():
    kind = get_kind("HebbianDeconvSynapse")
    config = kind.parse_config(CASES["deconv-sgd"][1])
    state = kind.init(config, 0)
    x, = arguments(config, kind.operations["forward"], 2, 0)
    forward = lean.plan(kind.operations["forward"].fn, config, state, x)
    new = forward.run(config, copy(state), x)
    answer = forward.answer(new, ["outputs", "weights", "outputs"])
    assert list(answer) == ["weights", "outputs"]  # leaf order, each once
    assert np.array_equal(answer["outputs"], np.asarray(new.outputs))
    assert forward.answer(new, []) == {}
    for index in range(lean.ANSWER_LISTS_KEPT + 5):  # lists come from requests: the cache stays bounded
        forward.answer(new, ["outputs"] * (index + 1))
    assert len(forward._answered) == lean.ANSWER_LISTS_KEPT
