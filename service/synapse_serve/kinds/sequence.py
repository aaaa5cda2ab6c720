"""T steps of one operation in one compiled call: ``lax.scan`` over a leading time axis.

Any operation of any kind runs as a sequence: its tensors arrive as ``(T, batch, …)``, step ``t``
runs the operation's own function on ``state`` and the ``t``-th slice of each tensor (an optional
tensor left out reads the compartment, as a single call does), and the state after the last step
is the instance's new state. The compartments asked for come back after every ``every``-th step
(``(T // every, batch, …)``), or after the last step alone (``last``: no time axis), so a long
sequence need not come back whole. The step is the operation's own function, so each step
computes what a separate call would (tests/kinds/test_sequence.py checks bit-identity).
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
    ``None`` at every step. The first group of steps runs before the scan: its first step may change
    the batch of the signal compartments, which a scan's carry cannot.
    """

    def run(config: Any, state: Any, *sequences: Any) -> tuple[Any, dict[str, Any]]:
        steps = next(s.shape[0] for s in sequences if s is not None)
        size = steps if last else every

        def advance(state: Any, tensors: tuple) -> tuple[Any, None]:
            return step(config, state, *tensors), None

        def run_steps(state: Any, part: tuple) -> Any:
            return lax.scan(advance, state, part)[0] if _length(part) else state

        def group(state: Any, part: tuple) -> tuple[Any, dict[str, Any]]:
            state = run_steps(state, part)
            return state, _picked(state, returned)

        state = step(config, state, *_at(sequences, 0))
        state = run_steps(state, _slice(sequences, 1, size))
        if last:
            return state, _picked(state, returned)
        first = _picked(state, returned)
        groups = (steps - size) // size
        body = _slice(sequences, size, size + groups * size)
        state, kept = lax.scan(group, state, tuple(None if s is None else s.reshape(groups, size, *s.shape[1:])
                                                  for s in body))
        state = run_steps(state, _slice(sequences, size + groups * size, steps))
        return state, {name: jnp.concatenate([first[name][None], kept[name]]) for name in returned}

    return jax.jit(run, static_argnums=0, donate_argnums=1)


def _picked(state: Any, returned: tuple[str, ...]) -> dict[str, Any]:
    leaves = compartment_paths(state)
    return {name: leaves[name] for name in returned}


def _at(sequences: tuple, index: int) -> tuple:
    return tuple(None if s is None else s[index] for s in sequences)


def _slice(sequences: tuple, start: int, stop: int) -> tuple:
    return tuple(None if s is None else s[start:stop] for s in sequences)


def _length(part: tuple) -> int:
    return next(s.shape[0] for s in part if s is not None)
