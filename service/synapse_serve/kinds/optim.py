"""ngclearn 3.2.3's optimizers, exactly: sgd, adam and nag over a tuple of parameters.

Each is a pair of pure functions — ``init(params) -> state`` and
``update(state, params, grads) -> (state, params)`` — in the optax style, but with ngclearn's
arithmetic (``ngclearn/utils/optim/{sgd,adam,nag}.py``), so a synapse evolved here and in ngclearn
gives the same bits when each evolve is one jitted program (measured: docs/conformance.md).
Every update *subtracts* ``eta * grad``: with ngclearn's default ``sign_value = +1`` a Hebbian
term is descended.

::

    sgd:   t += 1;  p <- p - g * eta
    adam:  t += 1;  m <- .9 m + (1 - .9) g;  v <- .999 v + (1 - .999) g²
           p <- p - eta * (m / (1 - .9^t)) / (sqrt(v / (1 - .999^t)) + 1e-8)
    nag:   t += 1;  phi_new <- p - g * eta;  p <- phi_new + (phi_new - phi) * (.9 * (t > 1));  phi <- phi_new

The step count ``t`` is a float32 scalar, as in ngclearn (optax counts in int32).

Example::

    >>> import jax.numpy as jnp
    >>> state = init("nag", (jnp.ones(2),))
    >>> state, (p,) = update("nag", 0.1, state, (jnp.ones(2),), (jnp.ones(2),))
    >>> p.tolist(), float(state.count)
    ([0.8999999761581421, 0.8999999761581421], 1.0)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax import numpy as jnp

OPTIMIZERS = ("sgd", "adam", "nag")
BETA1, BETA2, EPS, MOMENTUM = 0.9, 0.999, 1e-8, 0.9


class SgdState(NamedTuple):
    count: jax.Array  # shape=(), float32: steps taken


class AdamState(NamedTuple):
    count: jax.Array  # shape=(), float32
    mu: tuple  # first moments, one per parameter, float32
    nu: tuple  # second moments, one per parameter, float32


class NagState(NamedTuple):
    count: jax.Array  # shape=(), float32
    phi: tuple  # the last "phantom" point per parameter (before any clipping), float32


def init(optim_type: str, params: tuple) -> Any:
    """The initial state for ``params`` (a tuple of arrays)."""
    count = jnp.zeros((), jnp.float32)
    if optim_type == "sgd":
        return SgdState(count)
    zeros = tuple(jnp.zeros(p.shape, jnp.float32) for p in params)
    if optim_type == "adam":
        return AdamState(count, zeros, tuple(jnp.zeros(p.shape, jnp.float32) for p in params))
    return NagState(count, zeros)


def update(optim_type: str, eta: float, state: Any, params: tuple, grads: tuple) -> tuple[Any, tuple]:
    """One step: the new state and parameters (``eta`` a Python float, static)."""
    count = state.count + 1
    if optim_type == "sgd":
        return SgdState(count), tuple(p - g * eta for p, g in zip(params, grads))
    if optim_type == "adam":
        mu = tuple(BETA1 * m + (1. - BETA1) * g for m, g in zip(state.mu, grads))
        nu = tuple(BETA2 * v + (1. - BETA2) * jnp.square(g) for v, g in zip(state.nu, grads))
        new = tuple(p - eta * (m / (1. - jnp.power(BETA1, count))) / (jnp.sqrt(v / (1. - jnp.power(BETA2, count)))
                                                                      + EPS)
                    for p, m, v in zip(params, mu, nu))
        return AdamState(count, mu, nu), new
    phi = tuple(p - g * eta for p, g in zip(params, grads))
    new = tuple(f + (f - old) * (MOMENTUM * (count > 1.)) for f, old in zip(phi, state.phi))
    return NagState(count, phi), new
