"""DeconvSynapse: a transposed-convolution synaptic cable (forward, reset, help).

The shared implementation of the deconvolutional kinds. ``HebbianDeconvSynapse``
(``hebbian_deconv.py``) builds on its config, initialisation and forward pass.

Forward, as in ngclearn 3.2.3::

    outputs = conv_transpose(inputs, weights, stride, padding, NHWC/HWIO/NHWC) * g_conduct_factor + biases

Example::

    >>> cfg = DeconvConfig(shape=(3, 3, 1, 4), x_shape=(8, 8), stride=2)
    >>> state = init(cfg, seed=0)
    >>> state = forward(cfg, state, np.ones((2, 8, 8, 1), np.float32))
    >>> state.outputs.shape
    (2, 16, 16, 4)
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
)

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
MAX_KERNEL = 64
MAX_MAP = 4096
MAX_CHANNELS = 65536
MAX_STRIDE = 64
# ngclearn's default filter initialiser: uniform(0.025, 0.8)
DEFAULT_FILTER_INIT = ("uniform", (("high", 0.8), ("low", 0.025)))
DEFAULT_BIAS_INIT = ("constant", (("value", 0.0),))

Pads = tuple[tuple[int, int], tuple[int, int]]


def _normalize_padding(value: Any) -> str | Pads:
    if isinstance(value, str):
        return require_choice("padding", value, ("same", "valid")).upper()
    try:
        pads = tuple(tuple(int(p) for p in pair) for pair in value)
        if len(pads) != 2 or any(len(p) != 2 for p in pads) or any(
            isinstance(p, bool) for pair in value for p in pair
        ):
            raise ValueError
        if any(p != q for pair, given in zip(pads, value) for p, q in zip(pair, given)):
            raise ValueError  # non-integral numbers
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise InvalidConfig(
            f"padding: {value!r} is not allowed; use 'SAME', 'VALID' (any case) or [[lo_h, hi_h], [lo_w, hi_w]]",
            field="padding",
        ) from None
    return pads  # type: ignore[return-value]


def transpose_pads(kernel: int, stride: int, padding: str) -> tuple[int, int]:
    """The explicit (lo, hi) pads ``lax.conv_transpose`` uses for 'SAME' or 'VALID' on one axis."""
    if padding == "SAME":
        pad_len = kernel + stride - 2
        pad_lo = kernel - 1 if stride > kernel - 1 else math.ceil(pad_len / 2)
    else:
        pad_len = kernel + stride - 2 + max(kernel - stride, 0)
        pad_lo = kernel - 1
    return pad_lo, pad_len - pad_lo


@dataclasses.dataclass(frozen=True)
class DeconvConfig:
    """Hyperparameters of a deconvolutional synapse. Frozen and hashable: a jit static argument.

    Attributes:
      shape: filter shape ``(kh, kw, c_in, c_out)``.
      x_shape: input map ``(height, width)``; inputs are ``(batch, height, width, c_in)``.
      stride: stride of the transposed convolution (both axes).
      padding: ``"SAME"``, ``"VALID"`` (any case) or explicit ``((lo_h, hi_h), (lo_w, hi_w))``.
      g_conduct_factor: output scale (ngclearn's older name: ``resist_scale``).
      bias: whether the synapse has a per-output-channel bias ``(c_out,)``.
      batch_size: batch of the compartments at init and reset; any batch works per call.
      precision: ``"highest"`` (fp32, the default: conformance), ``"high"``, ``"default"``
        (the device's default, tf32 on NVIDIA GPUs) or ``"bfloat16"`` (bfloat16 operands, float32
        accumulation; the state stays float32).
      filter_init, bias_init: distribution specs, e.g. ``{"dist": "uniform", "low": 0.025, "high": 0.8}``.
    """

    shape: tuple[int, int, int, int]
    x_shape: tuple[int, int]
    stride: int = 1
    padding: Any = "SAME"
    g_conduct_factor: float = 1.0
    bias: bool = False
    batch_size: int = 1
    precision: str = "highest"
    filter_init: Any = DEFAULT_FILTER_INIT
    bias_init: Any = DEFAULT_BIAS_INIT

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("shape", _int_tuple("shape", self.shape, 4, (MAX_KERNEL, MAX_KERNEL, MAX_CHANNELS, MAX_CHANNELS)))
        set_("x_shape", _int_tuple("x_shape", self.x_shape, 2, (MAX_MAP, MAX_MAP)))
        set_("stride", require_int("stride", self.stride, 1, MAX_STRIDE))
        set_("padding", _normalize_padding(self.padding))
        set_("g_conduct_factor", require_float("g_conduct_factor", self.g_conduct_factor))
        set_("bias", require_bool("bias", self.bias))
        set_("batch_size", require_int("batch_size", self.batch_size, 1, 1 << 20))
        set_("precision", require_choice("precision", self.precision, tuple(PRECISIONS)))
        for name in ("filter_init", "bias_init"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 2 and value[0] in DISTRIBUTIONS):
                set_(name, parse_init(name, value))
        out = self.out_map
        if min(out) < 1:
            raise InvalidConfig(
                f"padding: {self.padding!r} with stride {self.stride}, kernel {self.shape[:2]} and x_shape "
                f"{self.x_shape} gives an empty output map {out}",
                field="padding",
            )
        if isinstance(self.padding, tuple) and max(abs(p) for pair in self.padding for p in pair) > MAX_MAP:
            raise InvalidConfig(f"padding: pads must be within ±{MAX_MAP}", field="padding")

    @property
    def pads(self) -> Pads:
        """Explicit (lo, hi) pads per spatial axis, whatever form ``padding`` was given in."""
        if isinstance(self.padding, tuple):
            return self.padding
        kh, kw = self.shape[:2]
        return (transpose_pads(kh, self.stride, self.padding), transpose_pads(kw, self.stride, self.padding))

    @property
    def out_map(self) -> tuple[int, int]:
        """Output map ``(height, width)``: ``(n - 1) * stride + 1 + lo + hi - k + 1`` per axis."""
        return tuple(  # type: ignore[return-value]
            (n - 1) * self.stride + 1 + lo + hi - k + 1
            for n, k, (lo, hi) in zip(self.x_shape, self.shape[:2], self.pads)
        )

    @property
    def in_trailing(self) -> tuple[int, int, int]:
        return (*self.x_shape, self.shape[2])

    @property
    def out_trailing(self) -> tuple[int, int, int]:
        return (*self.out_map, self.shape[3])

    def trailing(self, space: str) -> tuple[int, int, int]:
        return self.in_trailing if space == "in" else self.out_trailing

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


def _int_tuple(field: str, value: Any, length: int, highs: tuple[int, ...]) -> tuple[int, ...]:
    if not is_sequence(value) or len(value) != length:
        raise InvalidConfig(f"{field}: expected {length} integers, received {value!r}", field=field)
    return tuple(require_int(f"{field}[{i}]", v, 1, high) for i, (v, high) in enumerate(zip(value, highs)))


class DeconvState(NamedTuple):
    """Compartments of a DeconvSynapse. Structure never changes; batch sizes may."""

    weights: jax.Array  # (kh, kw, c_in, c_out) float32
    biases: jax.Array  # (c_out,) float32; shape (0,) when the synapse has no bias
    inputs: jax.Array  # (batch, h, w, c_in) float32
    outputs: jax.Array  # (batch, h_out, w_out, c_out) float32
    key: jax.Array  # (2,) uint32: the PRNG key the instance was seeded with


def init_parameters(
    config: DeconvConfig, seed: int = 0, weights: Any = None, biases: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Initial ``(weights, biases, key)``: explicit tensors (exact shape, finite), else draws from the specs.

    Seeded draws follow ngclearn's key schedule, so ``seed=s`` gives the filters
    ngclearn gives a component built with ``key=PRNGKey(s)``.
    """
    if not config.bias and biases is not None:
        raise InvalidConfig("biases: given, but the config has bias = false", field="biases")
    seed32 = np.uint32(require_int("seed", seed, 0, 2**63 - 1) % (2**32))
    # one compiled call per filter shape and specs (not per config: a sweep over eta compiles nothing)
    w, b, key = _drawn_parameters(config.shape, config.bias, config.filter_init, config.bias_init, seed32)
    if weights is not None:
        w = jnp.asarray(check_parameter("weights", weights, config.shape))
    if biases is not None:
        b = jnp.asarray(check_parameter("biases", biases, (config.shape[3],)))
    return w, b, key


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _drawn_parameters(shape: tuple, bias: bool, filter_init: tuple, bias_init: tuple, seed: jax.Array):
    """Drawn (weights, biases, key) with ngclearn's key schedule."""
    key = jax.random.PRNGKey(seed)
    _, *subkeys = jax.random.split(key, 4)
    w = sample(filter_init, subkeys[0], shape)
    b = sample(bias_init, subkeys[2], (shape[3],)) if bias else jnp.zeros((0,), jnp.float32)
    return w, b, key


def init(config: DeconvConfig, seed: int = 0, weights: Any = None, biases: Any = None) -> DeconvState:
    """A fresh state: parameters from ``init_parameters``, zeroed signals of ``config.batch_size``."""
    w, b, key = init_parameters(config, seed, weights, biases)
    return DeconvState(
        weights=w,
        biases=b,
        inputs=jnp.zeros((config.batch_size, *config.in_trailing), jnp.float32),
        outputs=jnp.zeros((config.batch_size, *config.out_trailing), jnp.float32),
        key=key,
    )


def operands(config: DeconvConfig, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The operands of a convolution in the config's precision: bfloat16-rounded for ``"bfloat16"``."""
    if config.precision != "bfloat16":
        return arrays
    return tuple(a.astype(jnp.bfloat16) for a in arrays)


def parameter_count(config: DeconvConfig) -> int:
    """Numbers in the filters and biases."""
    kh, kw, c_in, c_out = config.shape
    return kh * kw * c_in * c_out + (c_out if config.bias else 0)


def state_nbytes(config: DeconvConfig) -> int:
    """Bytes of a fresh DeconvState: parameters, inputs and outputs at batch_size (float32), the key."""
    signals = config.batch_size * (math.prod(config.in_trailing) + math.prod(config.out_trailing))
    return 4 * (parameter_count(config) + signals) + 8


def conv_transpose(config: DeconvConfig, x: jax.Array, w: jax.Array) -> jax.Array:
    """The synaptic transform without scale or bias, exactly ngclearn's ``deconv2d`` (float32 result)."""
    x, w = operands(config, x, w)
    return lax.conv_transpose(
        x,
        w,
        (config.stride, config.stride),
        config.padding,
        (1, 1),
        DIMENSION_NUMBERS,
        precision=PRECISIONS[config.precision],
        preferred_element_type=jnp.float32,
    )


def _forward(config: DeconvConfig, state: Any, inputs: jax.Array) -> Any:
    outputs = conv_transpose(config, inputs, state.weights) * config.g_conduct_factor
    if config.bias:
        outputs = outputs + state.biases
    return state._replace(inputs=inputs, outputs=outputs)


RESET_FIELDS = {"inputs": "in", "outputs": "out"}

# Compiled once per (config, shapes), shared by every instance with that config.
# The state is donated: the registry swaps the returned state in and never reuses the old one.
forward = jax.jit(_forward, static_argnums=0, donate_argnums=1)
RESET = make_reset(RESET_FIELDS)
reset = RESET.fn

FORWARD = Operation(
    "forward", forward, (TensorArg("inputs", "in"),), ("outputs",),
    "outputs = conv_transpose(inputs, weights) * g_conduct_factor + biases",
)

HYPERPARAMETERS = {
    "shape": ("[int, int, int, int]", None, "filter shape (kh, kw, c_in, c_out); kernels may be non-square"),
    "x_shape": ("[int, int]", None, "input map (height, width); maps may be non-square"),
    "stride": ("int", 1, "stride of the transposed convolution, 1..64, both axes"),
    "padding": ("str | [[int, int], [int, int]]", "SAME",
                "'SAME' (output = input * stride), 'VALID' (any case) or explicit (lo, hi) pads per axis"),
    "g_conduct_factor": ("float", 1.0, "output scale g (older name: resist_scale)"),
    "bias": ("bool", False, "per-output-channel bias (c_out,); false means none, ever"),
    "batch_size": ("int", 1, "batch of the compartments at init; every call may use any batch"),
    "precision": ("str", "highest", "'highest' (fp32; conformance), 'high', 'default' (device default: tf32 "
                                    "on NVIDIA GPUs) or 'bfloat16' (bf16 operands, fp32 accumulation)"),
    "filter_init": ("dist", {"dist": "uniform", "low": 0.025, "high": 0.8},
                    "filter distribution: uniform(low, high), gaussian(mean, std) or constant(value)"),
    "bias_init": ("dist", {"dist": "constant", "value": 0.0}, "bias distribution, as filter_init"),
}

COMPARTMENTS = {
    "weights": "filters K, (kh, kw, c_in, c_out); learned",
    "biases": "bias b, (c_out,); (0,) when bias is false",
    "inputs": "last forward input, (batch, h, w, c_in)",
    "outputs": "last forward output, (batch, h_out, w_out, c_out)",
    "key": "PRNG key (uint32[2]) the instance was seeded with",
}


def parse_config(data: Mapping[str, Any]) -> DeconvConfig:
    """A DeconvConfig from plain values (JSON or msgpack); ``resist_scale`` is accepted for ``g_conduct_factor``."""
    return parse_dataclass(DeconvConfig, data, {"resist_scale": "g_conduct_factor"}, HYPERPARAMETERS)


_OPERATIONS = {"forward": FORWARD, "reset": RESET}
_DESCRIPTION = "A transposed-convolution (deconvolution) synaptic cable; ngclearn's DeconvSynapse."


def _help(config: DeconvConfig | None = None) -> dict:
    return help_dict(
        "DeconvSynapse", _DESCRIPTION, config, HYPERPARAMETERS, COMPARTMENTS,
        {"forward": FORWARD.doc}, _OPERATIONS, [],
    )


KIND = Kind(
    name="DeconvSynapse",
    description=_DESCRIPTION,
    parse_config=parse_config,
    init=init,
    operations=_OPERATIONS,
    help=_help,
    batched_compartments=frozenset({"inputs", "outputs"}),
    state_nbytes=state_nbytes,
)
