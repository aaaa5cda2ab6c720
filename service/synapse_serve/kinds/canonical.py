"""An operation's convolutions written the way XLA:CPU runs them fastest, for use inside a loop.

XLA:CPU runs a convolution with Eigen's kernel when its operands are laid out (batch, spatial…,
feature) and (spatial…, in, out); its ``convolution-canonicalization`` pass transposes any other
convolution into that form — but only the convolutions of a program's entry computation, not
those in the body of a loop. A convolution that JAX's autodiff writes (a deconvolution's filter
gradient: ``f01b_i01o->01bf``) then runs as Eigen's kernel in a separate call and as XLA's own
loop nest inside ``lax.scan`` or ``lax.map``, and the two add in different orders: a sequence or a
packed call came out thousands of ulps from the separate calls after one evolve (measured on
the deconvolution at 16 latent channels, tests/registry/test_stacks.py).

``canonical_convolutions(fn)`` is ``fn`` with every convolution rewritten as that pass would
rewrite it (operands transposed to the canonical form, the result transposed back), so the
convolution in a loop's body is the one a separate call runs, and computes the same bits. In a
separate call the pass finds nothing left to do: the same program as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.extend import core as jax_core

_CALLS = ("jit", "pjit")  # a nested jitted function: its body is inlined (XLA inlines it anyway)


def canonical_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(*args)`` (arrays and pytrees of arrays, no static arguments) with its convolutions canonical, where JAX
    compiles for the CPU; elsewhere ``fn`` as it is (GPUs choose their convolutions' layouts themselves)."""

    @functools.wraps(fn)
    def rewritten(*args: Any) -> Any:
        if jax.default_backend() != "cpu":
            return fn(*args)
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree_util.tree_leaves(args)
        out = _evaluate(closed.jaxpr, closed.consts, leaves)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

    return rewritten


def _evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """``jaxpr`` run on ``args`` (traced values), each convolution canonical; other primitives as they are."""
    env: dict[Any, Any] = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, jax_core.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        values = [read(var) for var in eqn.invars]
        if eqn.primitive is lax.conv_general_dilated_p:
            outs = [_canonical_convolution(*values, **eqn.params)]
        elif eqn.primitive.name in _CALLS:
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, values)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for var, value in zip(eqn.outvars, outs):
            if not isinstance(var, jax_core.DropVar):
                env[var] = value
    return [read(var) for var in jaxpr.outvars]


def _canonical_convolution(lhs: Any, rhs: Any, *, dimension_numbers: Any, feature_group_count: int,
                           batch_group_count: int, **params: Any) -> Any:
    """The convolution with its input as (batch, spatial…, feature), its kernel as (spatial…, in, out) and its
    result as (batch, spatial…, feature), transposed back to the layout asked: XLA:CPU's canonical form."""
    if feature_group_count != 1 or batch_group_count != 1:  # not Eigen's either way: as written
        return lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=dimension_numbers,
                                               feature_group_count=feature_group_count,
                                               batch_group_count=batch_group_count, **params)
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    rank = len(lhs_spec)
    spatial = rank - 2
    lhs = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    canonical = lax.ConvDimensionNumbers(lhs_spec=(0, rank - 1, *range(1, rank - 1)),
                                         rhs_spec=(rank - 1, rank - 2, *range(spatial)),
                                         out_spec=(0, rank - 1, *range(1, rank - 1)))
    out = lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=canonical, feature_group_count=1,
                                          batch_group_count=1, **params)
    back = [0] * rank  # position d of the asked layout takes the canonical result's dimension back[d]
    back[out_spec[0]], back[out_spec[1]] = 0, rank - 1
    for i, position in enumerate(out_spec[2:]):
        back[position] = 1 + i
    return lax.transpose(out, tuple(back))
