"""What learned: statistics of an instance's weights and updates, and a bounded history of them.

``weight_stats`` is computed on the host from copies of the compartments (numpy, float64
accumulation): the numbers ``GET …/stats`` answers. ``History`` keeps, per instance, one sample
after each call that applied a weight update (evolve, step, or a sequence of them): a few
reductions computed on the instance's device by one small compiled function and left there
until read, so recording costs a dispatch and no transfer; ``GET …/history`` reads them.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# operations that apply a weight update (ngclearn's evolve, and the fused step that includes it)
LEARNING_OPERATIONS = frozenset({"evolve", "step"})
# the values of one history sample, in the order the compiled sampler returns them
SAMPLE_FIELDS = ("mean", "std", "min", "max", "norm", "sparsity", "update_norm")


def _filter_axes(weights: np.ndarray) -> tuple[int, ...]:
    """The axes one filter spans: a dense synapse's output unit is a column (``n_in``), a convolution's output
    channel is ``(kh, kw, c_in)``."""
    return tuple(range(weights.ndim - 1))


def array_stats(values: np.ndarray) -> dict[str, Any]:
    """mean, std, min, max, L2 norm, mean |value| and sparsity (the fraction exactly zero) of one array."""
    flat = np.asarray(values, np.float64).ravel()
    if flat.size == 0:
        return {"size": 0}
    with np.errstate(invalid="ignore", over="ignore"):  # weights a diverged run left: their statistics are NaN
        return {"size": int(flat.size), "mean": float(flat.mean()), "std": float(flat.std()),
                "min": float(flat.min()), "max": float(flat.max()), "norm": float(np.sqrt(np.dot(flat, flat))),
                "abs_mean": float(np.abs(flat).mean()), "sparsity": float(np.count_nonzero(flat == 0) / flat.size)}


def weight_stats(compartments: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Statistics of the weights (with each filter's L2 norm: per output unit or channel), of the last update
    (``dWeights``, where the kind has one) and of the biases (where there are any)."""
    weights = np.asarray(compartments["weights"], np.float64)
    out: dict[str, Any] = {"weights": array_stats(weights)}
    with np.errstate(invalid="ignore", over="ignore"):
        out["weights"]["filter_norms"] = np.sqrt(np.square(weights).sum(axis=_filter_axes(weights))).tolist()
    update = compartments.get("dWeights")
    out["update"] = None if update is None else array_stats(update)
    biases = compartments.get("biases")
    out["biases"] = None if biases is None or np.size(biases) == 0 else array_stats(biases)
    return out


@jax.jit
def _sample(weights: jax.Array, update: jax.Array | None) -> jax.Array:
    """SAMPLE_FIELDS of the weights and the update, as one small array (computed where the weights are)."""
    w = weights.astype(jnp.float32).ravel()
    update_norm = jnp.float32(jnp.nan) if update is None else jnp.linalg.norm(update.astype(jnp.float32).ravel())
    return jnp.stack([w.mean(), w.std(), w.min(), w.max(), jnp.linalg.norm(w), jnp.mean(w == 0),
                      update_norm])


@jax.jit
def sample_stacked(weights: jax.Array, update: jax.Array | None) -> jax.Array:
    """``_sample`` of each instance of a stack (leading instance axis), one row each, computed one at a time (to
    float32 rounding of ``_sample``'s own: XLA may order a reduction inside the loop differently)."""
    return jax.lax.map(lambda pair: _sample(*pair), (weights, update))


SETTLE_EVERY = 32  # device samples waiting before the finished ones are copied to the host


class History:
    """The last ``length`` samples of one instance: ``[version, learning steps, time, values]``.

    A sample's values start as a device array (recording never waits for the device); every
    SETTLE_EVERY samples, those the device has finished are copied to host memory, where a sample
    takes about 170 bytes instead of a device buffer's ~1.6 kB.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self._samples: collections.deque = collections.deque(maxlen=length)
        self._on_device: list[list] = []

    def record(self, version: int, steps: int, state: Any) -> None:
        """One sample of the instance's new state (under its lock; dispatched, not waited for)."""
        entry = [version, steps, time.time(), _sample(state.weights, getattr(state, "dWeights", None))]
        self._samples.append(entry)
        self._on_device.append(entry)
        if len(self._on_device) >= SETTLE_EVERY:
            self._settle()

    def record_values(self, version: int, steps: int, values: np.ndarray) -> None:
        """One sample already on the host (a row of ``sample_stacked``'s, for an instance in a stack)."""
        self._samples.append([version, steps, time.time(), np.asarray(values, np.float64)])

    def _settle(self) -> None:
        waiting = []
        for entry in self._on_device:
            if entry[3].is_ready():
                entry[3] = np.asarray(entry[3], np.float64)
            else:
                waiting.append(entry)
        self._on_device = waiting

    def read(self) -> list[dict[str, Any]]:
        """Every sample kept, oldest first, as plain values (``update_norm`` None where there is no update)."""
        samples = list(self._samples)  # a copy: a call may append meanwhile
        if not samples:
            return []
        values = np.asarray(jax.device_get([s[3] for s in samples]), np.float64).reshape(len(samples), -1)
        out = []
        for (version, steps, at, _), row in zip(samples, values):
            entry = {"version": version, "steps": steps, "time": at}
            entry.update({k: (None if np.isnan(v) else float(v)) for k, v in zip(SAMPLE_FIELDS, row)})
            out.append(entry)
        return out

    def clear(self) -> None:
        self._samples.clear()
