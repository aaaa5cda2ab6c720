"""Argument checks passed once are not repeated for the same names and shapes, and nothing else gets past them.

The registry remembers, per instance, the (name, shape) of float32 numpy arguments that passed its
checks and the compartments a call may return (``Planner.bind``, ``Planner.check_returned``); these
tests send, after a remembered call, everything that must still be refused or converted.
"""

from __future__ import annotations

import numpy as np
import pytest

from synapse_serve.errors import InvalidRequest, MissingArgument, ShapeMismatch, UnknownCompartment
from synapse_serve.local.capacity import Capacity, Limits
from synapse_serve.local.instance import PLANS_KEPT
from synapse_serve.local.registry import Registry
from synapse_serve.names import InstanceKey

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [2, 2, 1, 2], "x_shape": [3, 3], "eta": 0.1}
A, B = InstanceKey("local", "a"), InstanceKey("local", "b")


@pytest.fixture
def registry():
    reg = Registry(Capacity(Limits(max_batch=4)))
    reg.create(A, kind=KIND, config=CONFIG)
    reg.create(InstanceKey("local", "twin"), kind=KIND, config=CONFIG)
    reg.create(B, kind=KIND, config={**CONFIG, "x_shape": [4, 4]})
    x = np.ones((2, 3, 3, 1), np.float32)
    reg.call(A, "forward", {"inputs": x})  # remembered: ("inputs", (2, 3, 3, 1)) on a
    reg.call(A, "forward", {"inputs": x})
    return reg


def test_a_remembered_shape_still_gives_the_answer_of_a_checked_call(registry):
    x = np.arange(18, dtype=np.float32).reshape(2, 3, 3, 1) / 18
    twin = InstanceKey("local", "twin")
    first = registry.call(twin, "forward", {"inputs": x})["outputs"]  # checked: the twin has not seen the shape
    again = registry.call(A, "forward", {"inputs": x})["outputs"]  # remembered on a
    np.testing.assert_array_equal(again, first)


def test_other_shapes_and_batches_are_checked_after_a_remembered_one(registry):
    with pytest.raises(ShapeMismatch, match="expected shape"):
        registry.call(A, "forward", {"inputs": np.ones((2, 4, 4, 1), np.float32)})
    with pytest.raises(ShapeMismatch, match="max_batch"):
        registry.call(A, "forward", {"inputs": np.ones((5, 3, 3, 1), np.float32)})


def test_other_dtypes_are_converted_or_refused_after_a_remembered_float32_call(registry):
    x = np.linspace(0, 1, 18).reshape(2, 3, 3, 1)
    as_float64 = registry.call(A, "forward", {"inputs": x})["outputs"]  # same shape, float64: cast to float32
    as_float32 = registry.call(A, "forward", {"inputs": x.astype(np.float32)})["outputs"]
    np.testing.assert_array_equal(as_float64, as_float32)
    with pytest.raises(ShapeMismatch, match="dtype int32"):
        registry.call(A, "forward", {"inputs": np.ones((2, 3, 3, 1), np.int32)})


def test_other_names_are_checked_after_a_remembered_call(registry):
    x = np.ones((2, 3, 3, 1), np.float32)
    with pytest.raises(InvalidRequest, match="unknown: pre"):
        registry.call(A, "forward", {"inputs": x, "pre": x})
    with pytest.raises(MissingArgument):
        registry.call(A, "forward", {})
    with pytest.raises(InvalidRequest, match="unknown: input"):
        registry.call(A, "forward", {"input": x})


def test_what_passed_on_one_instance_is_checked_on_another(registry):
    with pytest.raises(ShapeMismatch, match="expected shape"):
        registry.call(B, "forward", {"inputs": np.ones((2, 3, 3, 1), np.float32)})  # b's maps are 4x4


def test_a_sequence_of_a_remembered_shape_is_told_apart_from_a_single_call(registry):
    xs = np.ones((2, 2, 3, 3, 1), np.float32)  # (T, batch, …): two steps of the remembered batch
    assert registry.call(A, "forward", {"inputs": xs})["outputs"].shape == (2, 2, 3, 3, 2)
    with pytest.raises(ShapeMismatch, match="over the server's max_batch"):  # 3 steps of 2 samples: 6 > 4
        registry.call(A, "forward", {"inputs": np.ones((3, 2, 3, 3, 1), np.float32)})


def test_returned_compartments_are_checked_after_a_remembered_call(registry):
    x = np.ones((2, 3, 3, 1), np.float32)
    assert set(registry.call(A, "forward", {"inputs": x}, ["outputs", "inputs"])) == {"version", "outputs", "inputs"}
    assert set(registry.call(A, "forward", {"inputs": x}, ["outputs", "inputs"])) == {"version", "outputs", "inputs"}
    with pytest.raises(UnknownCompartment):
        registry.call(A, "forward", {"inputs": x}, ["outputs", "nope"])


def test_what_an_instance_remembers_is_bounded():
    registry = Registry()
    registry.create(A, kind=KIND, config=CONFIG)
    for batch in range(1, 2 * PLANS_KEPT):  # a checked shape and a plan each
        registry.call(A, "forward", {"inputs": np.ones((batch, 3, 3, 1), np.float32)})
    assert len(registry._instances[A].plans) == PLANS_KEPT
    with pytest.raises(ShapeMismatch, match="expected shape"):  # and checks go on after forgetting
        registry.call(A, "forward", {"inputs": np.ones((1, 3, 4, 1), np.float32)})
    assert registry.call(A, "forward", {"inputs": np.ones((1, 3, 3, 1), np.float32)})["outputs"].shape == (1, 3, 3, 2)
