"""A call's host tensors are read before it returns: changing them afterwards changes nothing stored.

XLA on CPU reads a 64-byte aligned host array in place, when the program runs — after JAX's
asynchronous dispatch has returned. In the in-process mode those arrays are the caller's, and a
loop that updates them in place right after a call (``z -= rate * dz``) changed what an ``evolve``
had stored (seen: about one call in three at these sizes). The arrays here are allocated 64-byte
aligned on purpose: numpy's own alignment varies with the allocation, and an unaligned array is
copied by XLA (no race) — the case to cover is the one read in place. The engine's own default is
synchronous CPU dispatch (no race either); these run with JAX's asynchronous default, in a fresh
interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from synapse_client._codec import packb, unpackb
from synapse_serve.local.device import reads_caller_memory

KIND = "HebbianDeconvSynapse"
CONFIG = {"shape": [3, 3, 16, 1], "x_shape": [32, 32], "eta": 0.01,
          "filter_init": {"dist": "uniform", "low": -0.1, "high": 0.1}}
BATCH, ROUNDS = 16, 12


SCENARIO = """
import jax
jax.config.update("jax_cpu_enable_async_dispatch", True)  # JAX's default: what made the race possible
import numpy as np
from synapse_client import SynapseClient
from synapse_serve.local.capacity import Capacity, Limits
from synapse_serve.local.registry import Registry
from synapse_serve.names import InstanceKey

KIND, CONFIG, BATCH, ROUNDS = {kind!r}, {config!r}, {batch}, {rounds}


def aligned(shape, fill):
    # a float32 array whose data starts on a 64-byte boundary (what XLA reads in place)
    count = int(np.prod(shape))
    raw = np.empty(count * 4 + 64, np.uint8)
    start = -raw.ctypes.data % 64
    array = raw[start:start + count * 4].view(np.float32).reshape(shape)
    array[...] = fill
    assert array.ctypes.data % 64 == 0
    return array


def signals(seed, steps=None):
    rng = np.random.default_rng(seed)
    lead = () if steps is None else (steps,)
    pre, post = aligned((*lead, BATCH, 32, 32, 16), 0.0), aligned((*lead, BATCH, 32, 32, 1), 0.0)
    pre[...] = rng.random(pre.shape, dtype=np.float32)
    post[...] = rng.random(post.shape, dtype=np.float32)
    return pre, post


def registry_evolves():
    registry = Registry(Capacity(Limits()))
    mine, reference = InstanceKey("local", "mine"), InstanceKey("local", "reference")
    registry.create(mine, kind=KIND, config=CONFIG)
    registry.create(reference, kind=KIND, config=CONFIG)
    for seed in range(ROUNDS):
        pre, post = signals(seed)
        registry.call(reference, "evolve", {{"pre": pre.copy(), "post": post.copy()}})
        registry.call(mine, "evolve", {{"pre": pre, "post": post}})
        pre[...] = 9.0  # the caller's next step, in place
        post[...] = 9.0
        for compartment in ("pre", "post", "weights"):
            got, expected = registry.read(mine, compartment)[0], registry.read(reference, compartment)[0]
            assert np.array_equal(got, expected), f"round {{seed}}: {{compartment}}"


def stacked_evolves():
    # from the second packed call on, the population is stacked and the stacked form's tensors go in as they are
    registry = Registry(Capacity(Limits()))
    mine = [InstanceKey("local", f"mine-{{i}}") for i in range(3)]
    reference = [InstanceKey("local", f"reference-{{i}}") for i in range(3)]
    for i, (a, b) in enumerate(zip(mine, reference)):
        registry.create(a, kind=KIND, config=CONFIG, seed=i)
        registry.create(b, kind=KIND, config=CONFIG, seed=i)
    for seed in range(ROUNDS // 2):
        pre, post = signals(seed, steps=3)  # (instances, batch, ...)
        registry.call_stacked(reference, "evolve", {{"pre": pre.copy(), "post": post.copy()}}, [])
        registry.call_stacked(mine, "evolve", {{"pre": pre, "post": post}}, [])
        pre[...] = 9.0
        post[...] = 9.0
        for a, b in zip(mine, reference):
            for compartment in ("pre", "post", "weights"):
                got, expected = registry.read(a, compartment)[0], registry.read(b, compartment)[0]
                assert np.array_equal(got, expected), f"round {{seed}}: {{a.name}} {{compartment}}"


def client_calls():
    with SynapseClient("local", local_settings={{"cpu_async_dispatch": True}}) as client:
        mine = client.create("mine", kind=KIND, config=CONFIG)
        reference = client.create("reference", kind=KIND, config=CONFIG)
        for seed in range(ROUNDS // 2):
            steps_pre, steps_post = signals(seed, steps=2)
            reference.evolve(steps_pre.copy(), steps_post.copy())  # a T = 2 sequence
            mine.evolve(steps_pre, steps_post)
            steps_pre[...] = 9.0
            steps_post[...] = 9.0
            pre, _ = signals(seed + 100)
            reference.call("forward", inputs=pre.copy(), returns=[])
            mine.call("forward", inputs=pre, returns=[])
            pre[...] = 9.0
            weights = aligned(reference.weights.shape, 0.0)  # a write: the new weights are copied, not viewed
            weights[...] = reference.weights * 0.5
            reference.set("weights", weights.copy())
            mine.set("weights", weights)
            weights[...] = 9.0
            for compartment in ("inputs", "outputs", "pre", "post", "weights"):
                assert np.array_equal(mine.get(compartment), reference.get(compartment)), f"round {{seed}}: {{compartment}}"


{scenario}()
print("same")
"""


def run_scenario(scenario: str) -> None:
    """Run the scenario in a fresh interpreter: JAX's asynchronous CPU dispatch is chosen before JAX starts
    (this process may have started it synchronous: the engine's default)."""
    script = SCENARIO.format(kind=KIND, config=CONFIG, batch=BATCH, rounds=ROUNDS, scenario=scenario)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert (result.returncode, result.stdout.strip()) == (0, "same"), result.stderr[-3000:]


def test_an_evolve_stores_the_tensors_it_was_given_when_the_caller_changes_them_next():
    run_scenario("registry_evolves")


def test_the_in_process_client_forward_sequence_and_write_read_their_tensors_before_returning():
    run_scenario("client_calls")


def test_a_packed_call_on_a_stack_reads_the_callers_stacked_tensors_before_returning():
    run_scenario("stacked_evolves")


@pytest.mark.parametrize("size", [4, 40_000])  # the C reader's copies and the in-place reader's views
def test_a_decoded_body_is_not_the_callers_memory(size):
    body = packb({"x": np.ones(size, np.float32)})
    assert not reads_caller_memory([unpackb(body)["x"], None])
    if size > 1000:  # viewed in place (small bins are copied into bytes of their own)
        assert reads_caller_memory([unpackb(bytearray(body))["x"]])  # a buffer someone may still write


def test_arrays_someone_may_change_are_the_callers_memory():
    array = np.ones(8, np.float32)
    view = array[::2]
    view.flags.writeable = False  # read-only here, but its base is not
    assert reads_caller_memory([array])
    assert reads_caller_memory([view])
    assert not reads_caller_memory([None])
