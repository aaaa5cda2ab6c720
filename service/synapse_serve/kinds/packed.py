"""One operation on many instances of one config in one compiled call.

The instances' read compartments (and each one's tensors) are stacked along a new leading axis,
the operation's own function runs on each slice in turn (``lax.map``: one device call, each
slice computed as a separate call computes it, so the results are bit-identical; ``vmap`` would
batch the arithmetic itself into other kernels, which round differently). Each slice is fenced off
from the loop around it (``lax.optimization_barrier``: unfenced, XLA fused the loop's slicing into
the dense kind's adam update, up to 8 ulps apart), and compiled without XLA's small-loop kernel
(``LOOP_COMPILER_OPTIONS``: with it, dense calls on a single input or output came out ulps apart).
One difference remains, XLA's own: on the CPU it runs a convolution with Eigen's kernel only
outside loops, so the deconvolution's filter gradient (its evolve) comes out within float32
rounding of a separate call's, not bit for bit (docs/conformance.md). Each instance gets
back the compartments the operation writes (``kinds/lean.py``'s plan says which: a forward reads
the weights and writes inputs and outputs, so that is all that moves). Nothing is donated: a
packed call is applied to all its instances or to none (the registry commits them together).

``run_stacked`` is the same call on instances whose states are already stacked (``local/stack.py``):
the stacked compartments go in as they are and the written ones come back stacked, one buffer per
compartment instead of one per instance and compartment.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax import numpy as jnp

from synapse_serve.kinds.base import LOOP_COMPILER_OPTIONS
from synapse_serve.kinds.lean import Plan


def run_packed(plan: Plan, config: Any, states: list[Any], *tensors: Any) -> list[tuple[Any, list[Any]]]:
    """The new state of each of ``states`` (one plan's shapes) and its leaves (``plan.treedef``'s order);
    ``tensors``: per argument, the instances' tensors stacked along a new leading axis (or None)."""
    leaves = [plan.treedef.flatten_up_to(state) for state in states]
    reads = [[instance[i] for instance in leaves] for i in plan.read]
    meta = (plan.treedef, plan.read, plan.written, plan.in_specs, len(states))
    written = _packed(plan.fn, config, meta, reads, *tensors)
    out = []
    unflatten = plan.treedef.unflatten
    for instance, new in zip(leaves, written):
        for index, value in zip(plan.written, new):
            instance[index] = value
        out.append((unflatten(instance), instance))
    return out


def run_stacked(plan: Plan, config: Any, leaves: list[Any], *tensors: Any) -> list[Any]:
    """The stacked leaves (``plan.treedef``'s order, each with a leading instance axis) after the operation, each
    instance's slice computed as a separate call computes it; ``tensors`` stacked the same way (or None)."""
    meta = (plan.treedef, plan.read, plan.written, plan.in_specs)
    written = _on_stack(plan.fn, config, meta, [leaves[i] for i in plan.read], *tensors)
    out = list(leaves)
    for index, value in zip(plan.written, written):
        out[index] = value
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=LOOP_COMPILER_OPTIONS)
def _on_stack(fn: Callable[..., Any], config: Any, meta: tuple, reads: list, *tensors: Any) -> list:
    treedef, read_at, written_at, specs = meta
    return lax.map(functools.partial(_one, fn, config, treedef, read_at, written_at, specs), (reads, tensors))


def _one(fn: Callable[..., Any], config: Any, treedef: Any, read_at: tuple, written_at: tuple, specs: tuple,
         slices: tuple) -> list:
    """One instance's written leaves from its read leaves and its tensors."""
    read, sent = lax.optimization_barrier(slices)  # both sides fenced; the answer's side is the one measured
    leaves = [jnp.zeros(shape, dtype) for shape, dtype in specs]  # those never read: XLA drops them
    for index, value in zip(read_at, read):
        leaves[index] = value
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    new = jax.tree_util.tree_leaves(fn(config, state, *sent))
    return lax.optimization_barrier([new[i] for i in written_at])


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=LOOP_COMPILER_OPTIONS)
def _packed(fn: Callable[..., Any], config: Any, meta: tuple, reads: list, *tensors: Any) -> list:
    treedef, read_at, written_at, specs, count = meta
    one = functools.partial(_one, fn, config, treedef, read_at, written_at, specs)
    stacked = ([jnp.stack(values) for values in reads], tensors)
    if not jax.tree_util.tree_leaves(stacked):  # nothing read, nothing sent (a reset): the same slice, count times
        return [one(([], tuple(None for _ in tensors))) for _ in range(count)]
    out = lax.map(one, stacked)
    return [[column[i] for column in out] for i in range(count)]
