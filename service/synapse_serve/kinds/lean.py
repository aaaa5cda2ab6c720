"""An operation run on the compartments it touches, not the whole state.

A kind's operation is written as ``fn(config, state, *tensors) -> state``: clear, and the state
is one donated pytree. But each call then passes every compartment in and out of the compiled
program, which costs dispatch time on every call (~10-25 µs a call on a small CPU, measured in
docs/benchmarks.md) for compartments the operation never reads or writes (a forward reads only
the weights). So the registry runs a *plan*: traced once per shapes, the operation's program
says which compartments it reads and which it writes; the compiled call then takes the written
compartments (donated: they are replaced, and XLA may reuse their buffers) and the read-only
ones (kept), and returns only the written ones. A sent tensor the operation stores as it is (a
forward's ``inputs``) is donated too: JAX copies a host array into a buffer of the program's own
to run it anyway, and that buffer becomes the stored compartment, where the program would
otherwise copy it once more (~20 µs a forward of docs/benchmarks.md's loop, 131 KB). The computation
is the operation's own, traced from the same function; the tests check it against the
whole-state call bit for bit.

Each plan compiles its own program with its config and leaf layout closed over, not passed as
static arguments: JAX hashes and compares static arguments on every call, and a call with them
took ~15 µs longer on a 2-core CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import numpy as jnp

from synapse_serve.kinds.base import leaf_names

ANSWER_LISTS_KEPT = 64  # per plan: the compartment lists answers asked for, with their leaf positions


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to run one operation on one set of shapes: which state leaves go in, which come out."""

    fn: Callable[..., Any]  # the operation's fn(config, state, *tensors) -> state
    treedef: Any
    written: tuple[int, ...]  # leaves the operation writes (their old buffers are donated)
    kept: tuple[int, ...]  # leaves it reads and leaves as they are
    absent: tuple[tuple[int, tuple[int, ...], str], ...]  # leaves it neither reads nor writes: (index, shape, dtype)
    out_signature: tuple  # (shape, dtype) of every leaf after the call
    read: tuple[int, ...]  # every leaf it reads (kept or written)
    in_specs: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype) of every leaf before the call
    config: Any  # the config it was traced with
    stored: tuple[int, ...] = ()  # positions of the sent tensors it stores as they are (donated)

    def run(self, config: Any, state: Any, *tensors: Any) -> Any:
        """The operation's new state: the written leaves from the compiled call, the others as they were."""
        if config is not self.config and config != self.config:  # equal configs (one per instance) share a plan
            raise ValueError("a plan runs with the config it was traced with")
        if self.stored:
            tensors = _owned(tensors, self.stored)
        leaves = self.treedef.flatten_up_to(state)
        written = self.program([leaves[i] for i in self.written], [leaves[i] for i in self.kept], *tensors)
        for index, value in zip(self.written, written):
            leaves[index] = value
        return self.treedef.unflatten(leaves)

    def answer(self, state: Any, returned: list[str]) -> dict[str, np.ndarray]:
        """The compartments named in ``returned`` (known names) of a state this plan's run left, as host arrays in
        leaf order: positions looked up once per list, not every compartment's path named on every call."""
        asked = tuple(returned)
        at = self._answered.get(asked)
        if at is None:
            wanted = set(asked)
            at = tuple((index, name) for index, name in enumerate(leaf_names(self.treedef)) if name in wanted)
            if len(self._answered) < ANSWER_LISTS_KEPT:  # the lists come from requests: never an unbounded cache
                self._answered[asked] = at
        leaves = self.treedef.flatten_up_to(state)
        return {name: np.asarray(leaves[index]) for index, name in at}

    @functools.cached_property
    def _answered(self) -> dict[tuple[str, ...], tuple[tuple[int, str], ...]]:
        return {}

    @functools.cached_property
    def program(self) -> Callable[..., list]:
        """The compiled call for the plan's own config: ``program(written, kept, *tensors)`` (written donated, and
        the tensors it stores as they are)."""
        return jax.jit(functools.partial(_program, self.fn, self.config, self.meta),
                       donate_argnums=(0, *(2 + position for position in self.stored)))

    @functools.cached_property
    def leaf_index(self) -> dict[str, int]:
        """Each compartment's position among the state's leaves."""
        return {name: index for index, name in enumerate(leaf_names(self.treedef))}

    @functools.cached_property
    def meta(self) -> tuple:
        return self.treedef, self.written, self.kept, self.absent


def plan(fn: Callable[..., Any], config: Any, state: Any, *tensors: Any) -> Plan:
    """Trace ``fn`` once (shapes only) and say what it reads and writes; the registry caches plans by shapes."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    closed = jax.make_jaxpr(functools.partial(fn, config))(state, *tensors)
    out_signature = tuple((tuple(a.shape), a.dtype) for a in closed.out_avals)
    jaxpr = _body(closed.jaxpr)
    count = len(leaves)
    ins, outs = jaxpr.invars[:count], jaxpr.outvars
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    written = tuple(j for j, out in enumerate(outs) if out is not ins[j])
    used |= {id(outs[j]) for j in written}
    read = {i for i, var in enumerate(ins) if id(var) in used}
    kept = tuple(i for i in sorted(read) if i not in written)
    absent = tuple((i, tuple(leaf.shape), str(leaf.dtype)) for i, leaf in enumerate(leaves)
                   if i not in read and i not in written)
    in_specs = tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)
    sent = iter(jaxpr.invars[count:])  # one per tensor given (None is no argument)
    sent_at = {id(next(sent)): position for position, tensor in enumerate(tensors) if tensor is not None}
    stored = tuple(sorted({sent_at[id(outs[j])] for j in written if id(outs[j]) in sent_at}))
    return Plan(fn, treedef, written, kept, absent, out_signature, tuple(sorted(read)), in_specs, config, stored)


def _owned(tensors: tuple, positions: tuple[int, ...]) -> tuple:
    """The tensors, those at ``positions`` (donated) made the program's own: a host array is copied into a device
    buffer by JAX whatever happens, a device array is copied here (donating it would delete the caller's)."""
    if all(type(tensors[p]) is np.ndarray for p in positions):
        return tensors
    return tuple(jnp.array(t, copy=True) if p in positions and isinstance(t, jax.Array) else t
                 for p, t in enumerate(tensors))


def _body(jaxpr: Any) -> Any:
    """The program inside a jitted function's trace (a jit traced is one call of the inner program)."""
    while (len(jaxpr.eqns) == 1 and "jaxpr" in jaxpr.eqns[0].params
           and list(jaxpr.eqns[0].invars) == list(jaxpr.invars) and list(jaxpr.eqns[0].outvars) == list(jaxpr.outvars)):
        inner = jaxpr.eqns[0].params["jaxpr"]
        jaxpr = getattr(inner, "jaxpr", inner)
    return jaxpr


def _program(fn: Callable[..., Any], config: Any, meta: tuple, written: list, kept: list, *tensors: Any) -> list:
    """The operation on the leaves it touches: the written ones out, in ``meta``'s order."""
    treedef, written_at, kept_at, absent = meta
    leaves: list[Any] = [None] * treedef.num_leaves
    for index, value in zip(written_at, written):
        leaves[index] = value
    for index, value in zip(kept_at, kept):
        leaves[index] = value
    for index, shape, dtype in absent:  # never read: XLA drops them
        leaves[index] = jnp.zeros(shape, dtype)
    new = jax.tree_util.tree_leaves(fn(config, jax.tree_util.tree_unflatten(treedef, leaves), *tensors))
    return [new[i] for i in written_at]
