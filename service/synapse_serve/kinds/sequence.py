"""T steps of one operation in one compiled call: ``lax.scan`` over a leading time axis.

Any operation of any kind runs as a sequence: its tensors arrive as ``(T, batch, …)``, step ``t``
runs the operation's own function on ``state`` and the ``t``-th slice of each tensor (an optional
tensor left out reads the compartment, as a single call does), and the state after the last step
is the instance's new state. The compartments asked for come back after every ``every``-th step
(``(T // every, batch, …)``), or after the last step alone (``last``: no time axis), so a long
sequence need not come back whole. The step is the operation's own function, so each step
computes what a separate call would (tests/registry/test_many_ops.py checks bit-identity) — but
for one thing XLA does its own way inside a loop: on the CPU it runs a convolution with Eigen's
kernel only outside loops, so the deconvolution's filter gradient (its evolve) comes out within
float32 rounding of a separate call's, not bit for bit, at most sizes (docs/conformance.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax import numpy as jnp

from synapse_serve.kinds.base import compartment_paths


@functools.lru_cache(maxsize=512)
def sequence_fn(step: Callable[..., Any], returned: tuple[str, ...], every: int, last: bool) -> Callable[..., Any]:
    """``fn(config, state, *sequences) -> (state, {compartment: kept values})``, jitted (state donated).

    ``step`` is an operation's ``fn(config, state, *tensors) -> state``; a ``None`` sequence stays
    ``None`` at every step. The first step runs before the loop: it may change the batch of the
    signal compartments, which a loop's carry cannot. One flat loop, never a loop in a loop: XLA
    compiled a nested loop's body its own way (an evolve with ``every=2`` came out ulps apart from
    the separate calls, the dense kind's too); each step writes what it keeps at its group's
    index, so the last step of each group of ``every`` is what stays.
    """

    def run(config: Any, state: Any, *sequences: Any) -> tuple[Any, dict[str, Any]]:
        steps = next(s.shape[0] for s in sequences if s is not None)
        one = functools.partial(step, config)

        def advance(state: Any, tensors: tuple) -> tuple[Any, None]:
            return one(state, *tensors), None

        def keep(carry: tuple, item: tuple) -> tuple[tuple, None]:
            state, kept = carry
            index, tensors = item
            state = one(state, *tensors)
            picked = _picked(state, returned)
            return (state, {name: lax.dynamic_update_index_in_dim(kept[name], picked[name], index // every, 0)
                            for name in returned}), None

        state = one(state, *_at(sequences, 0))
        if last:
            state = _run_steps(advance, state, _slice(sequences, 1, steps))
            return state, _picked(state, returned)
        groups = steps // every  # the steps after the last whole group are run, not kept
        first = _picked(state, returned)
        kept = {name: jnp.zeros((groups, *value.shape), value.dtype).at[0].set(value) for name, value in first.items()}
        if groups * every > 1:
            (state, kept), _ = lax.scan(keep, (state, kept), (jnp.arange(1, groups * every),
                                                              _slice(sequences, 1, groups * every)))
        state = _run_steps(advance, state, _slice(sequences, groups * every, steps))
        return state, kept

    return jax.jit(run, static_argnums=0, donate_argnums=1)


def _run_steps(advance: Callable[..., Any], state: Any, part: tuple) -> Any:
    return lax.scan(advance, state, part)[0] if _length(part) else state


def _picked(state: Any, returned: tuple[str, ...]) -> dict[str, Any]:
    leaves = compartment_paths(state)
    return {name: leaves[name] for name in returned}


def _at(sequences: tuple, index: int) -> tuple:
    return tuple(None if s is None else s[index] for s in sequences)


def _slice(sequences: tuple, start: int, stop: int) -> tuple:
    return tuple(None if s is None else s[start:stop] for s in sequences)


def _length(part: tuple) -> int:
    return next(s.shape[0] for s in part if s is not None)
