"""Which sequences are written out, and in how many programs (kinds/convolutions.py)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from synapse_serve.kinds import get_kind
from synapse_serve.kinds.convolutions import WRITTEN_OUT, convolves, pieces
from synapse_serve.local.registry import Registry
from synapse_serve.names import InstanceKey


@pytest.mark.parametrize("kind, config, expected", [
    ("HebbianDeconvSynapse", {"shape": [3, 3, 2, 4], "x_shape": [6, 6]}, True),
    ("HebbianSynapse", {"shape": [6, 4]}, False),
])
def test_an_operation_convolves_when_its_program_holds_a_convolution(kind, config, expected):
    kind_ = get_kind(kind)
    cfg = kind_.parse_config(config)
    state = kind_.init(cfg, 0, None, None)
    pre = np.zeros((2, *cfg.trailing("in")), np.float32)
    post = np.zeros((2, *cfg.trailing("out")), np.float32)
    for operation, tensors in (("forward", (pre,)), ("evolve", (pre, post)), ("backtransmit", (post,))):
        jaxpr = jax.make_jaxpr(functools.partial(kind_.operations[operation].fn, cfg))(state, *tensors).jaxpr
        assert convolves(jaxpr) is expected, operation


def test_the_pieces_cover_the_steps_keep_the_right_ones_and_repeat_at_most_four_programs():
    for steps in [*range(1, 140), 311, 1000, 4099]:
        for every in sorted({*range(1, min(steps, 70) + 1), steps, max(1, steps // 2)}):
            for last in (False, True) if every == 1 else (False,):
                shares = pieces(steps, every, last)
                assert shares[0][0] == 0 and shares[-1][1] == steps
                assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))  # contiguous, in order
                assert all(0 < stop - start <= WRITTEN_OUT for start, stop, _ in shares)
                kept = [start + k for start, stop, keep in shares for k in keep]
                assert kept == ([] if last else [t for t in range(steps) if (t + 1) % every == 0]), (steps, every)
                programs = {(stop - start, keep) for start, stop, keep in shares}
                assert len(programs) <= 4, (steps, every, programs)


def test_a_long_sequence_with_an_awkward_every_compiles_a_few_programs_and_is_the_separate_calls():
    """every=31 over 100 steps: kept positions fall at another place in each 32-step share unless the shares follow
    the groups (one program per pattern: dozens of compiles for one request)."""
    from synapse_serve.kinds import sequence

    registry = Registry()
    config = {"shape": [3, 3, 2, 4], "x_shape": [6, 6], "eta": 0.05, "optim_type": "adam"}
    for name in ("seq", "calls"):
        registry.create(InstanceKey.of("me", name), kind="HebbianDeconvSynapse", config=config, seed=2)
    rng = np.random.default_rng(0)
    steps = 100
    pre = rng.normal(size=(steps, 2, 6, 6, 2)).astype(np.float32)
    post = rng.normal(size=(steps, 2, 6, 6, 4)).astype(np.float32)
    before = sequence._written_out.cache_info().misses
    answer = registry.call(InstanceKey.of("me", "seq"), "evolve", {"pre": pre, "post": post}, ["weights"],
                           sequence={"every": 31})
    assert sequence._written_out.cache_info().misses - before <= 4
    weights = [registry.call(InstanceKey.of("me", "calls"), "evolve", {"pre": pre[t], "post": post[t]},
                             ["weights"])["weights"] for t in range(steps)]
    assert answer["weights"].tobytes() == np.stack([weights[30], weights[61], weights[92]]).tobytes()
    for compartment in ("weights", "opt_state/0/mu/0", "opt_state/0/nu/0"):
        assert (registry.read(InstanceKey.of("me", "seq"), compartment)[0].tobytes()
                == registry.read(InstanceKey.of("me", "calls"), compartment)[0].tobytes()), compartment


def test_a_sequence_whose_later_program_fails_leaves_the_instance_as_it_was(monkeypatch):
    """The instance's buffers go to the first of several programs undonated: a later one failing (to compile, to
    run: here, the second raises) leaves the state whole, and the instance answers the next call."""
    from synapse_serve.errors import DeviceError
    from synapse_serve.kinds import sequence

    registry = Registry()
    key = InstanceKey.of("me", "fails")
    registry.create(key, kind="HebbianDeconvSynapse", config={"shape": [3, 3, 2, 4], "x_shape": [6, 6], "eta": 0.1})
    weights = registry.read(key, "weights")[0]
    real = sequence._written_out
    calls = []

    def failing_second(*args):
        program = real(*args)

        def run(*inner):
            if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(inner[1:])):
                return program(*inner)  # the registry's shape prediction traces it: not a run
            calls.append(1)
            if len(calls) == 2:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory (injected)")
            return program(*inner)
        return run

    monkeypatch.setattr(sequence, "_written_out", failing_second)
    pre = np.ones((40, 2, 6, 6, 2), np.float32)
    post = np.ones((40, 2, 6, 6, 4), np.float32)
    with pytest.raises(DeviceError):
        registry.call(key, "evolve", {"pre": pre, "post": post}, sequence={"last": True})
    assert len(calls) == 2
    assert registry.read(key, "weights")[0].tobytes() == weights.tobytes()
    assert registry.describe(key)["version"] == 1
    monkeypatch.setattr(sequence, "_written_out", real)
    registry.call(key, "evolve", {"pre": pre, "post": post}, sequence={"last": True})  # the instance still works
    assert registry.read(key, "weights")[0].tobytes() != weights.tobytes()
