"""T steps of one operation in one call: ``lax.scan`` over a leading time axis, or, for a step with a
convolution, the steps written out one after another.

Any operation of any kind runs as a sequence: its tensors arrive as ``(T, batch, …)``, step ``t``
runs the operation's own function on ``state`` and the ``t``-th slice of each tensor (an optional
tensor left out reads the compartment, as a single call does), and the state after the last step
is the instance's new state. The compartments asked for come back after every ``every``-th step
(``(T // every, batch, …)``), or after the last step alone (``last``: no time axis), so a long
sequence need not come back whole. The step is the operation's own function, so each step
computes what a separate call would — bit for bit for the deconvolution kind (written out, below);
for the dense kind bit for bit in 299 of 300 random configs of a fuzz run, the rest within float32
rounding: XLA generates some small products of a step another way in another program (the
filter gradient of an evolve with w_norm, nag's first sequence at a new batch; docs/conformance.md).

A step with a convolution is not scanned but written out (``kinds/convolutions.py``: inside a loop
XLA's CPU backend runs convolutions its own slower way, and the deconvolution's filter gradient
came out only within float32 rounding of a separate call's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax import numpy as jnp

from synapse_serve.kinds.base import LOOP_COMPILER_OPTIONS, compartment_paths
from synapse_serve.kinds.convolutions import convolves, pieces


@functools.lru_cache(maxsize=512)
def sequence_fn(step: Callable[..., Any], returned: tuple[str, ...], every: int, last: bool) -> Callable[..., Any]:
    """``fn(config, state, *sequences) -> (state, {compartment: kept values})`` (state donated): scanned, or
    written out for a step with a convolution (the module's docstring says why)."""
    scanned = _scanned(step, returned, every, last)

    def run(config: Any, state: Any, *sequences: Any) -> tuple[Any, dict[str, Any]]:
        if not _has_convolution(step, config, state, _at(sequences, 0)):
            return scanned(config, state, *sequences)
        shares = pieces(_length(sequences), every, last)
        if len(shares) > 1:  # the instance's own buffers are not donated to the first of several programs: if a
            state = _copy(state)  # later one failed (to compile, to run), they would be gone with nothing in place
        parts = []
        for start, stop, keep in shares:
            state, kept = _written_out(step, returned, keep)(config, state, *_slice(sequences, start, stop))
            if keep:
                parts.append(kept)
        if last:
            return state, _picked(state, returned)
        if len(parts) == 1:
            return state, parts[0]
        return state, {name: jnp.concatenate([part[name] for part in parts]) for name in returned}

    return run


@jax.jit
def _copy(state: Any) -> Any:
    return jax.tree_util.tree_map(jnp.copy, state)


_CONVOLUTION_OF: dict[tuple, bool] = {}  # (step, config) -> whether its program convolves
CONVOLUTIONS_KEPT = 4096


def _has_convolution(step: Callable[..., Any], config: Any, state: Any, tensors: tuple) -> bool:
    """Whether the step's program holds a convolution: traced once per operation and config (shapes do not change
    what a kind's function computes)."""
    key = (step, config)
    known = _CONVOLUTION_OF.get(key)
    if known is None:
        known = convolves(jax.make_jaxpr(functools.partial(step, config))(state, *tensors).jaxpr)
        if len(_CONVOLUTION_OF) >= CONVOLUTIONS_KEPT:  # configs come from requests: never an unbounded cache
            _CONVOLUTION_OF.clear()
        _CONVOLUTION_OF[key] = known
    return known


@functools.lru_cache(maxsize=512)
def _written_out(step: Callable[..., Any], returned: tuple[str, ...], keep: tuple[int, ...]) -> Callable[..., Any]:
    """``fn(config, state, *sequences) -> (state, {compartment: values after the steps in keep, stacked})``, the
    steps written out one after another, each fenced from the next; jitted (state donated)."""

    def run(config: Any, state: Any, *sequences: Any) -> tuple[Any, dict[str, Any]]:
        rows = []
        for t in range(_length(sequences)):
            state = lax.optimization_barrier(step(config, state, *_at(sequences, t)))
            if t in keep:
                rows.append(_picked(state, returned))
        return state, {name: jnp.stack([row[name] for row in rows]) for name in returned} if rows else {}

    return jax.jit(run, static_argnums=0, donate_argnums=1)


def _scanned(step: Callable[..., Any], returned: tuple[str, ...], every: int, last: bool) -> Callable[..., Any]:
    """``fn(config, state, *sequences) -> (state, {compartment: kept values})``, jitted (state donated).

    ``step`` is an operation's ``fn(config, state, *tensors) -> state``; a ``None`` sequence stays
    ``None`` at every step. The first step runs before the loop: it may change the batch of the
    signal compartments, which a loop's carry cannot. One flat loop, never a loop in a loop: XLA
    compiled a nested loop's body its own way (an evolve with ``every=2`` came out ulps apart from
    the separate calls, the dense kind's too); each step writes what it keeps at its group's
    index, so the last step of each group of ``every`` is what stays. Each step's new state is
    fenced off from the loop around it (``lax.optimization_barrier``), as a separate call's
    results are: unfenced, the dense kind's ``step`` with ``w_norm`` computed its ``dInputs`` from
    the renormalised weights another way (ulps apart). (Fencing what goes in too kept XLA from
    reusing the signal compartments' donated buffers.) Compiled with ``LOOP_COMPILER_OPTIONS``
    (``kinds/base.py``): compiled into one kernel of XLA's own, a small loop's steps came out ulps
    apart in many dense configs.
    """

    def run(config: Any, state: Any, *sequences: Any) -> tuple[Any, dict[str, Any]]:
        steps = next(s.shape[0] for s in sequences if s is not None)

        def one(state: Any, *tensors: Any) -> Any:
            return lax.optimization_barrier(step(config, state, *tensors))

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

    compiled = jax.jit(run, static_argnums=0, donate_argnums=1, compiler_options=LOOP_COMPILER_OPTIONS)
    traceable = jax.jit(run, static_argnums=0, donate_argnums=1)  # JAX takes compiler options only at the top

    def call(config: Any, state: Any, *sequences: Any) -> tuple[Any, dict[str, Any]]:
        if isinstance(jax.tree_util.tree_leaves(state)[0], jax.core.Tracer):  # inside eval_shape, say
            return traceable(config, state, *sequences)
        return compiled(config, state, *sequences)

    return call


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
