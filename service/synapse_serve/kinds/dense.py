"""DenseSynapse: a dense synaptic cable (forward, reset, help) — ngclearn 3.2.3's ``DenseSynapse``.

The shared implementation of the dense kinds: ``HebbianSynapse`` (``hebbian.py``) builds on its
config, initialisation and forward pass. Forward, as ngclearn computes it::

    outputs = (inputs @ (W * mask)) * g_conduct_factor + biases

Initialisation follows ngclearn's key schedule: ``_, k0, k1, k2 = split(PRNGKey(seed), 4)``;
weights from ``k0`` (each distribution splits its key once and draws with the first half); with
``0 < p_conn < 1`` they are multiplied by ``mask = bernoulli(k1, p_conn)``; biases from ``k2``.
Unlike ngclearn, the mask is kept (a compartment), so a sparse synapse stays sparse.

Example::

    >>> cfg = DenseConfig(shape=(4, 3), p_conn=0.5)
    >>> state = init(cfg, seed=0)
    >>> state = forward(cfg, state, np.ones((2, 4), np.float32))
    >>> state.outputs.shape, bool(((state.weights == 0) | (state.mask == 1)).all())
    ((2, 3), True)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from synapse_serve.errors import InvalidConfig
from synapse_serve.kinds.base import (
    DISTRIBUTIONS,
    PRECISIONS,
    Kind,
    Operation,
    TensorArg,
    check_parameter,
    help_dict,
    is_sequence,
    make_reset,
    parse_dataclass,
    parse_init,
    require_bool,
    require_choice,
    require_float,
    require_int,
    sample,
    state_nbytes_of,
)

MAX_UNITS = 1 << 20
MAX_WEIGHTS = 1 << 31
DEFAULT_WEIGHT_INIT = ("uniform", (("high", 0.8), ("low", 0.025)))  # ngclearn's default
DEFAULT_BIAS_INIT = ("constant", (("value", 0.0),))


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """Hyperparameters of a dense synapse. Frozen and hashable: a jit static argument.

    Attributes:
      shape: ``(n_in, n_out)``; inputs are ``(batch, n_in)``, outputs ``(batch, n_out)``.
      weight_init, bias_init: distribution specs, e.g. ``{"dist": "uniform", "low": 0.025, "high": 0.8}``.
      bias: whether the synapse has a bias ``(n_out,)``.
      p_conn: connection probability; ``< 1`` draws a connectivity mask that stays applied.
      g_conduct_factor: output scale (ngclearn's older name: ``resist_scale``).
      batch_size: batch of the signal compartments at init and after reset; any batch works per call.
      precision: ``"highest"`` (fp32, the default: conformance), ``"high"``, ``"default"`` or ``"bfloat16"``.
      p_release_mean, max_delay_steps: accepted only at their neutral values (1, 0): ngclearn 3.2.3's
        stochastic release crashes every forward and its delays break with another batch; not implemented.
    """

    shape: tuple[int, int]
    weight_init: Any = DEFAULT_WEIGHT_INIT
    bias: bool = False
    bias_init: Any = DEFAULT_BIAS_INIT
    p_conn: float = 1.0
    g_conduct_factor: float = 1.0
    batch_size: int = 1
    precision: str = "highest"
    p_release_mean: float = 1.0
    max_delay_steps: int = 0

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        shape = self.shape
        if not is_sequence(shape) or len(shape) != 2:
            raise InvalidConfig(f"shape: expected [n_in, n_out], received {str(shape)[:80]!r}", field="shape")
        set_("shape", tuple(require_int(f"shape[{i}]", v, 1, MAX_UNITS) for i, v in enumerate(shape)))
        if self.shape[0] * self.shape[1] > MAX_WEIGHTS:
            raise InvalidConfig(f"shape: {list(self.shape)} has more than {MAX_WEIGHTS} weights", field="shape")
        for name in ("weight_init", "bias_init"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 2 and value[0] in DISTRIBUTIONS):
                set_(name, parse_init(name, value))
        set_("bias", require_bool("bias", self.bias))
        set_("p_conn", require_float("p_conn", self.p_conn, 0.0, 1.0))
        if self.p_conn <= 0.0:
            raise InvalidConfig("p_conn: 0 connects nothing; it must be in (0, 1]", field="p_conn")
        set_("g_conduct_factor", require_float("g_conduct_factor", self.g_conduct_factor))
        set_("batch_size", require_int("batch_size", self.batch_size, 1, 1 << 20))
        set_("precision", require_choice("precision", self.precision, tuple(PRECISIONS)))
        if require_float("p_release_mean", self.p_release_mean) != 1.0:
            raise InvalidConfig("p_release_mean: stochastic release is not supported (ngclearn 3.2.3's crashes every "
                                "forward); leave it at 1", field="p_release_mean")
        set_("p_release_mean", 1.0)
        if require_int("max_delay_steps", self.max_delay_steps, 0) != 0:
            raise InvalidConfig("max_delay_steps: axonal delays are not supported (ngclearn 3.2.3's break with any "
                                "batch but batch_size); leave it at 0", field="max_delay_steps")

    @property
    def masked(self) -> bool:
        """Whether a connectivity mask exists (``p_conn < 1``)."""
        return self.p_conn < 1.0

    def trailing(self, space: str) -> tuple[int]:
        return (self.shape[0],) if space == "in" else (self.shape[1],)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values (round-trips through ``parse_config``)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_init"):
                value = {"dist": value[0], **dict(value[1])}
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[field.name] = value
        return out


class DenseState(NamedTuple):
    """Compartments of a DenseSynapse. Structure never changes; batch sizes may."""

    weights: jax.Array  # (n_in, n_out) float32
    biases: jax.Array  # (n_out,) float32; (0,) without a bias
    mask: jax.Array  # (n_in, n_out) float32 of 0/1 when p_conn < 1; (0,) otherwise
    inputs: jax.Array  # (batch, n_in) float32
    outputs: jax.Array  # (batch, n_out) float32
    key: jax.Array  # (2,) uint32: the PRNG key the instance was seeded with


def init_parameters(config: DenseConfig, seed: int = 0, weights: Any = None,
                    biases: Any = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Initial ``(weights, biases, mask, key)`` with ngclearn's key schedule; explicit weights are masked too
    (in ngclearn they go through the initializer)."""
    if not config.bias and biases is not None:
        raise InvalidConfig("biases: given, but the config has bias = false", field="biases")
    seed32 = np.uint32(require_int("seed", seed, 0, 2**63 - 1) % (2**32))
    w, b, mask, key = _drawn(config.shape, config.bias, config.weight_init, config.bias_init, config.p_conn, seed32)
    if weights is not None:
        w = jnp.asarray(check_parameter("weights", weights, config.shape))
        if config.masked:
            w = w * mask
    if biases is not None:
        b = jnp.asarray(check_parameter("biases", biases, (config.shape[1],)))
    return w, b, mask, key


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _drawn(shape: tuple, bias: bool, weight_init: tuple, bias_init: tuple, p_conn: float, seed: jax.Array):
    key = jax.random.PRNGKey(seed)
    _, k_weights, k_mask, k_biases = jax.random.split(key, 4)
    w = sample(weight_init, k_weights, shape)
    mask = jnp.zeros((0,), jnp.float32)
    if 0.0 < p_conn < 1.0:
        mask = jax.random.bernoulli(k_mask, p=p_conn, shape=shape).astype(jnp.float32)
        w = w * mask
    b = sample(bias_init, k_biases, (1, shape[1])).reshape(-1) if bias else jnp.zeros((0,), jnp.float32)
    return w, b, mask, key


def init(config: DenseConfig, seed: int = 0, weights: Any = None, biases: Any = None) -> DenseState:
    """A fresh state: parameters from ``init_parameters``, zeroed signals of ``config.batch_size``."""
    w, b, mask, key = init_parameters(config, seed, weights, biases)
    n_in, n_out = config.shape
    return DenseState(weights=w, biases=b, mask=mask, key=key,
                      inputs=jnp.zeros((config.batch_size, n_in), jnp.float32),
                      outputs=jnp.zeros((config.batch_size, n_out), jnp.float32))


def effective_weights(config: DenseConfig, state: Any) -> jax.Array:
    """``W * mask`` (the mask only where there is one)."""
    return state.weights * state.mask if config.masked else state.weights


def matmul(config: DenseConfig, a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in the config's precision (bfloat16 operands for ``"bfloat16"``), float32."""
    if config.precision == "bfloat16":
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    return jnp.matmul(a, b, precision=PRECISIONS[config.precision], preferred_element_type=jnp.float32)


def _forward(config: DenseConfig, state: Any, inputs: jax.Array) -> Any:
    product = matmul(config, inputs, effective_weights(config, state))
    if config.shape[0] == 1:
        # one input unit: XLA turns the product into a multiply and would fuse it with the bias add (one
        # rounding); ngclearn's multiply by its gate of ones keeps the product rounded on its own
        product = lax.optimization_barrier(product)
    outputs = product * config.g_conduct_factor
    if config.bias:
        outputs = outputs + state.biases
    return state._replace(inputs=inputs, outputs=outputs)


forward = jax.jit(_forward, static_argnums=0, donate_argnums=1)
FORWARD = Operation("forward", forward, (TensorArg("inputs", "in"),), ("outputs",),
                    "outputs = (inputs @ (weights * mask)) * g_conduct_factor + biases")
RESET_FIELDS = {"inputs": "in", "outputs": "out"}
RESET = make_reset(RESET_FIELDS)
reset = RESET.fn

HYPERPARAMETERS = {
    "shape": ("[int, int]", None, "(n_in, n_out): inputs (batch, n_in), outputs (batch, n_out)"),
    "weight_init": ("dist", {"dist": "uniform", "low": 0.025, "high": 0.8},
                    "weight distribution: uniform(low, high), gaussian(mean, std) or constant(value)"),
    "bias": ("bool", False, "a bias (n_out,); false means none, ever"),
    "bias_init": ("dist", {"dist": "constant", "value": 0.0}, "bias distribution, as weight_init"),
    "p_conn": ("float", 1.0, "connection probability in (0, 1]: below 1 a bernoulli mask is drawn and kept"),
    "g_conduct_factor": ("float", 1.0, "output scale g (older name: resist_scale)"),
    "batch_size": ("int", 1, "batch of the signals at init and after reset; every call may use any batch"),
    "precision": ("str", "highest", "'highest' (fp32; conformance), 'high', 'default' (device default: tf32 on "
                                    "NVIDIA GPUs) or 'bfloat16' (bf16 operands, fp32 accumulation)"),
    "p_release_mean": ("float", 1.0, "only 1: stochastic release is not supported (ngclearn 3.2.3's crashes)"),
    "max_delay_steps": ("int", 0, "only 0: axonal delays are not supported (ngclearn 3.2.3's break with a batch)"),
}

COMPARTMENTS = {
    "weights": "W, (n_in, n_out); learned in HebbianSynapse",
    "biases": "b, (n_out,); (0,) when bias is false",
    "mask": "connectivity mask (n_in, n_out) of 0 and 1 when p_conn < 1, applied in forward and after every "
            "update; (0,) otherwise",
    "inputs": "last forward input, (batch, n_in)",
    "outputs": "last forward output, (batch, n_out)",
    "key": "PRNG key (uint32[2]) the instance was seeded with",
}

NOTES = [
    "Fixed against ngclearn: the p_conn mask is kept (ngclearn forgets it, so a sparse synapse fills in); any batch "
    "works per call (ngclearn repeats a batch of 1 to batch_size rows and fails on other batches); biases are (n_out,).",
    "Refused with a 422 instead of mis-computed: p_release_mean other than 1, max_delay_steps other than 0.",
    "Hyperparameters are immutable after create.",
]


def parse_config(data: Mapping[str, Any]) -> DenseConfig:
    """A DenseConfig from plain values; ``resist_scale`` is accepted for ``g_conduct_factor``."""
    return parse_dataclass(DenseConfig, data, {"resist_scale": "g_conduct_factor"}, HYPERPARAMETERS)


_OPERATIONS = {"forward": FORWARD, "reset": RESET}
_DESCRIPTION = "A dense synaptic cable, outputs = (inputs @ (W * mask)) * g + b; ngclearn's DenseSynapse."


def _help(config: DenseConfig | None = None) -> dict:
    return help_dict("DenseSynapse", _DESCRIPTION, config, HYPERPARAMETERS, COMPARTMENTS,
                     {"forward": FORWARD.doc, "reset": RESET.doc}, _OPERATIONS, NOTES)


KIND = Kind(
    name="DenseSynapse",
    description=_DESCRIPTION,
    parse_config=parse_config,
    init=init,
    operations=_OPERATIONS,
    help=_help,
    batched_compartments=frozenset(RESET_FIELDS),
    state_nbytes=state_nbytes_of(init),
)
