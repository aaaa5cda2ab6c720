"""A call's host tensors are read before it returns: changing them afterwards changes nothing stored.

XLA on CPU reads a 64-byte aligned host array in place, when the program runs — after JAX's
asynchronous dispatch has returned. In the in-process mode those arrays are the caller's, and a
loop that updates them in place right after a call (``z -= rate * dz``) changed what an ``evolve``
had stored (seen: about one call in three at these sizes). The arrays here are allocated 64-byte
aligned on purpose: numpy's own alignment varies with the allocation, and an unaligned array is
copied by XLA (no race) — the case to cover is the one read in place.
"""

from __future__ import annotations

import numpy as np
import pytest

from synapse_client import SynapseClient
from synapse_client._codec import packb, unpackb
from synapse_serve.local.capacity import Capacity, Limits
from synapse_serve.local.registry import Registry, _reads_caller_memory
from synapse_serve.names import InstanceKey

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [3, 3, 16, 1], "x_shape": [32, 32], "eta": 0.01,
          "filter_init": {"dist": "uniform", "low": -0.1, "high": 0.1}}
BATCH, ROUNDS = 16, 12


def aligned(shape: tuple[int, ...], fill: float) -> np.ndarray:
    """A float32 array whose data starts on a 64-byte boundary (what XLA reads in place)."""
    count = int(np.prod(shape))
    raw = np.empty(count * 4 + 64, np.uint8)
    start = -raw.ctypes.data % 64
    array = raw[start:start + count * 4].view(np.float32).reshape(shape)
    array[...] = fill
    assert array.ctypes.data % 64 == 0
    return array


def signals(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pre = aligned((BATCH, 32, 32, 16), 0.0)
    post = aligned((BATCH, 32, 32, 1), 0.0)
    pre[...] = rng.random(pre.shape, dtype=np.float32)
    post[...] = rng.random(post.shape, dtype=np.float32)
    return pre, post


def test_an_evolve_stores_the_tensors_it_was_given_when_the_caller_changes_them_next():
    registry = Registry(Capacity(Limits()))
    mine, reference = InstanceKey("local", "mine"), InstanceKey("local", "reference")
    registry.create(mine, kind=KIND, config=CONFIG)
    registry.create(reference, kind=KIND, config=CONFIG)
    for seed in range(ROUNDS):
        pre, post = signals(seed)
        registry.call(reference, "evolve", {"pre": pre.copy(), "post": post.copy()})
        registry.call(mine, "evolve", {"pre": pre, "post": post})
        pre[...] = 9.0  # the caller's next step, in place
        post[...] = 9.0
        for compartment in ("pre", "post", "weights"):
            got, _ = registry.read(mine, compartment)
            expected, _ = registry.read(reference, compartment)
            np.testing.assert_array_equal(got, expected, err_msg=f"round {seed}: {compartment}")


def test_the_in_process_client_forward_and_sequence_read_their_tensors_before_returning():
    with SynapseClient("local") as client:
        mine = client.create("mine", kind=KIND, config=CONFIG)
        reference = client.create("reference", kind=KIND, config=CONFIG)
        for seed in range(ROUNDS // 2):
            pre, post = signals(seed)
            steps_pre = aligned((2, *pre.shape), 0.0)
            steps_pre[...] = pre
            steps_post = aligned((2, *post.shape), 0.0)
            steps_post[...] = post
            reference.evolve(steps_pre.copy(), steps_post.copy())  # a T = 2 sequence
            mine.evolve(steps_pre, steps_post)
            steps_pre[...] = 9.0
            steps_post[...] = 9.0
            reference.call("forward", inputs=pre.copy(), returns=[])
            mine.call("forward", inputs=pre, returns=[])
            pre[...] = 9.0
            for compartment in ("inputs", "outputs", "pre", "post", "weights"):
                np.testing.assert_array_equal(mine.get(compartment), reference.get(compartment),
                                              err_msg=f"round {seed}: {compartment}")


@pytest.mark.parametrize("size", [4, 40_000])  # the C reader's copies and the in-place reader's views
def test_a_decoded_body_is_not_the_callers_memory(size):
    body = packb({"x": np.ones(size, np.float32)})
    assert not _reads_caller_memory([unpackb(body)["x"], None])
    if size > 1000:  # viewed in place (small bins are copied into bytes of their own)
        assert _reads_caller_memory([unpackb(bytearray(body))["x"]])  # a buffer someone may still write


def test_arrays_someone_may_change_are_the_callers_memory():
    array = np.ones(8, np.float32)
    view = array[::2]
    view.flags.writeable = False  # read-only here, but its base is not
    assert _reads_caller_memory([array])
    assert _reads_caller_memory([view])
    assert not _reads_caller_memory([None])
