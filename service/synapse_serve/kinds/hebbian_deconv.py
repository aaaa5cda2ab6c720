"""HebbianDeconvSynapse: a deconvolutional cable whose filters learn by a two-factor Hebbian rule.

Semantics of ngclearn 3.2.3 (measured; see docs/conformance.md)::

    forward:      outputs  = conv_transpose(inputs, W) * g + b
    evolve:       H        = ∂⟨post, conv_transpose(pre, W)⟩ / ∂W          (VJP of forward w.r.t. W)
                  dWeights = sign_value · H − w_decay · W                  (decay term only if w_decay > 0)
                  dBiases  = sign_value · Σ_{batch,h,w} post               (only with bias)
                  W, b     ← optimizer(W, b; dWeights, dBiases)            (sgd: W − eta·dW; adam; nag)
                  W        ← clip(W, −w_bound, w_bound), or clip(W, 0, w_bound) if is_nonnegative,
                             only when w_bound > 0
    backtransmit: dInputs  = sign_value · ∂⟨post, conv_transpose(x, W)⟩ / ∂x   (g not applied)
    step:         forward(inputs); evolve(pre=inputs, post); backtransmit(post), fused (not in ngclearn)
    reset:        zero inputs, outputs, pre, post, dInputs at batch_size; keep W, b, optimizer state

Example::

    >>> cfg = HebbianDeconvConfig(shape=(3, 3, 1, 4), x_shape=(8, 8), eta=0.01)
    >>> state = init(cfg, seed=0)
    >>> x = np.ones((2, 8, 8, 1), np.float32)
    >>> state = deconv.forward(cfg, state, x)
    >>> y = np.asarray(state.outputs)
    >>> state = evolve(cfg, state, x, y)
    >>> state = backtransmit(cfg, state, y)
    >>> state = step(cfg, state, x, y)  # the three above in one call
    >>> state.dInputs.shape
    (2, 8, 8, 1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax import lax
from jax import numpy as jnp

from synapse_serve.errors import InvalidConfig
from synapse_serve.kinds import deconv, optim
from synapse_serve.kinds.base import (
    PRECISIONS,
    W_NORM_HELP,
    Kind,
    Operation,
    TensorArg,
    check_w_norm,
    help_dict,
    make_reset,
    normalized,
    parse_dataclass,
    require_bool,
    require_choice,
    require_float,
)
from synapse_serve.kinds.deconv import DIMENSION_NUMBERS, DeconvConfig

OPTIMIZERS = ("sgd", "adam", "nag")
FILTER_UPDATES = ("auto", "vjp", "adjoint", "timed")


@dataclasses.dataclass(frozen=True)
class HebbianDeconvConfig(DeconvConfig):
    """DeconvConfig plus the learning hyperparameters (all immutable after create).

    Attributes:
      eta: learning rate.
      w_bound: clip filters to ``[-w_bound, w_bound]`` after each evolve; 0 disables clipping.
      is_nonnegative: clip to ``[0, w_bound]`` instead (only when ``w_bound > 0``, as in ngclearn).
      w_decay: ``dWeights -= w_decay * W`` when > 0 (with sgd this makes weights grow, as in ngclearn).
      sign_value: multiplies the Hebbian term and dInputs; ngclearn's default +1 is anti-Hebbian under sgd.
      optim_type: ``"sgd"``, ``"adam"`` (beta1 .9, beta2 .999, eps 1e-8, bias-corrected; optax) or ``"nag"``
        (ngclearn's Nesterov step, momentum 0.9: optim.py).
      filter_update: how H is computed: ``"vjp"`` (VJP of forward), ``"adjoint"`` (weight gradient
        of the strided forward convolution conv_transpose is the adjoint of; much faster on GPUs
        at stride > 1), ``"auto"`` (resolved at create: see ``choose_filter_update``) or
        ``"timed"`` (both timed at create on the device in use; the faster is kept).
      w_norm, w_norm_per: beyond ngclearn, off by default: after each evolve rescale each output channel's
        filter (``"out"``: ``W[..., o]``) or each input channel's (``"in"``: ``W[:, :, i, :]``, a sparse code's
        dictionary atoms) to this L2 norm.
    """

    eta: float = 0.0
    w_bound: float = 0.0
    is_nonnegative: bool = False
    w_decay: float = 0.0
    sign_value: float = 1.0
    optim_type: str = "sgd"
    filter_update: str = "auto"
    w_norm: float = 0.0
    w_norm_per: str = "out"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_w_norm(self)
        set_ = functools.partial(object.__setattr__, self)
        set_("eta", require_float("eta", self.eta, 0.0))
        set_("w_bound", require_float("w_bound", self.w_bound, 0.0))
        set_("is_nonnegative", require_bool("is_nonnegative", self.is_nonnegative))
        set_("w_decay", require_float("w_decay", self.w_decay, 0.0))
        set_("sign_value", require_float("sign_value", self.sign_value))
        set_("optim_type", require_choice("optim_type", self.optim_type, OPTIMIZERS))
        set_("filter_update", require_choice("filter_update", self.filter_update, FILTER_UPDATES))
        if self.filter_update == "adjoint" and not adjoint_applicable(self):
            raise InvalidConfig(
                f"filter_update: 'adjoint' needs every pad <= kernel size - 1; pads {self.pads} with kernel "
                f"{self.shape[:2]} do not allow it; use 'vjp' or 'auto'",
                field="filter_update",
            )

    @property
    def optimizer(self) -> optax.GradientTransformation:
        if self.optim_type == "adam":
            return optax.adam(self.eta, b1=0.9, b2=0.999, eps=1e-8)
        return optax.sgd(self.eta)


def adjoint_applicable(config: DeconvConfig) -> bool:
    """The adjoint form pads by ``k - 1 - pad``; it needs those to be non-negative."""
    return all(lo <= k - 1 and hi <= k - 1 for (lo, hi), k in zip(config.pads, config.shape[:2]))


def choose_filter_update(config: HebbianDeconvConfig, platform: str,
                         device: jax.Device | None = None) -> HebbianDeconvConfig:
    """Resolve ``filter_update="auto"`` or ``"timed"`` for the device the instance lives on.

    ``auto``: on GPUs the adjoint form of a strided update is ~20x faster (an H200 measurement
    quoted in docs/conformance.md); at stride 1, and on CPU, the VJP is as fast and matches
    ngclearn bit for bit.
    ``timed``: both forms are compiled and timed on ``device`` (see ``time_filter_updates``);
    the compiled evolve of the winner stays in the cache for the instance to use.
    """
    if config.filter_update == "timed":
        timings = time_filter_updates(config, device)
        return dataclasses.replace(config, filter_update=min(timings, key=timings.__getitem__))
    if config.filter_update != "auto":
        return config
    fast = config.stride > 1 and platform in ("gpu", "cuda", "rocm") and adjoint_applicable(config)
    return dataclasses.replace(config, filter_update="adjoint" if fast else "vjp")


def time_filter_updates(config: HebbianDeconvConfig, device: jax.Device | None = None,
                        repeats: int = 5) -> dict[str, float]:
    """Median seconds of one evolve at ``config.batch_size`` for each applicable formulation.

    Runs on ``device`` (the default device if None) with random signals; the
    first call of each form compiles and is not counted.
    """
    forms = ["vjp"] + (["adjoint"] if adjoint_applicable(config) else [])
    rng = np.random.default_rng(0)
    pre = rng.standard_normal((config.batch_size, *config.in_trailing), np.float32)
    post = rng.standard_normal((config.batch_size, *config.out_trailing), np.float32)
    timings = {}
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        pre_d, post_d = jnp.asarray(pre), jnp.asarray(post)
        for form in forms:
            cfg = dataclasses.replace(config, filter_update=form)
            state = jax.block_until_ready(evolve(cfg, init(cfg), pre_d, post_d))  # compile
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                state = jax.block_until_ready(evolve(cfg, state, pre_d, post_d))
                samples.append(time.perf_counter() - start)
            timings[form] = float(np.median(samples))
    return timings


class HebbianDeconvState(NamedTuple):
    """Compartments of a HebbianDeconvSynapse. Structure never changes; batch sizes may."""

    weights: jax.Array  # (kh, kw, c_in, c_out) float32
    biases: jax.Array  # (c_out,) float32; shape (0,) when the synapse has no bias
    opt_state: Any  # optax state over (weights, biases); adam: (count, mu, nu), sgd: empty
    inputs: jax.Array  # (batch, h, w, c_in) float32
    outputs: jax.Array  # (batch, h_out, w_out, c_out) float32
    pre: jax.Array  # (batch, h, w, c_in) float32: last evolve's pre
    post: jax.Array  # (batch, h_out, w_out, c_out) float32: last evolve's or backtransmit's post
    dWeights: jax.Array  # (kh, kw, c_in, c_out) float32: last evolve's update
    dBiases: jax.Array  # (c_out,) float32, or (0,)
    dInputs: jax.Array  # (batch, h, w, c_in) float32: last backtransmit
    key: jax.Array  # (2,) uint32


def init(config: HebbianDeconvConfig, seed: int = 0, weights: Any = None, biases: Any = None) -> HebbianDeconvState:
    """A fresh state: parameters as DeconvSynapse, zeroed signals and deltas, a new optimizer state."""
    w, b, key = deconv.init_parameters(config, seed, weights, biases)
    in_shape = (config.batch_size, *config.in_trailing)
    out_shape = (config.batch_size, *config.out_trailing)
    return _fresh_state(config.optim_type, in_shape, out_shape, w, b, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fresh_state(optim_type: str, in_shape: tuple, out_shape: tuple, w: jax.Array, b: jax.Array,
                 key: jax.Array) -> HebbianDeconvState:
    """Zeroed signals and deltas and a new optimizer state around (w, b): one compiled call per shape.

    Every output is a buffer of its own (the state is donated by each operation).
    """
    if optim_type == "nag":
        opt_state = optim.init("nag", (w, b))
    else:  # the state's form, not eta's value
        opt_state = (optax.adam(0.0) if optim_type == "adam" else optax.sgd(0.0)).init((w, b))

    def zeros(shape: tuple[int, ...]) -> jax.Array:
        return jnp.zeros(shape, jnp.float32)

    return HebbianDeconvState(
        weights=w, biases=b, opt_state=opt_state,
        inputs=zeros(in_shape), outputs=zeros(out_shape), pre=zeros(in_shape), post=zeros(out_shape),
        dWeights=zeros(w.shape), dBiases=zeros(b.shape), dInputs=zeros(in_shape), key=key,
    )


def state_nbytes(config: HebbianDeconvConfig) -> int:
    """Bytes of a fresh HebbianDeconvState: DeconvSynapse's, plus pre, post, dInputs, the deltas and adam's moments."""
    params = deconv.parameter_count(config)
    inputs, outputs = math.prod(config.in_trailing), math.prod(config.out_trailing)
    # adam: mu, nu and an int32 count; nag: phi and a float32 count
    optimizer = {"adam": 4 * (2 * params + 1), "nag": 4 * (params + 1)}.get(config.optim_type, 0)
    return deconv.state_nbytes(config) + optimizer + 4 * (params + config.batch_size * (2 * inputs + outputs))


def filter_gradient_vjp(config: DeconvConfig, pre: jax.Array, post: jax.Array, w: jax.Array) -> jax.Array:
    """H = ∂⟨post, conv_transpose(pre, W)⟩/∂W by reverse-mode through the forward transform."""
    _, pullback = jax.vjp(lambda k: deconv.conv_transpose(config, pre, k), w)
    return pullback(post)[0]


def filter_gradient_adjoint(config: DeconvConfig, pre: jax.Array, post: jax.Array, w: jax.Array) -> jax.Array:
    """The same H as the weight gradient of the strided forward convolution.

    conv_transpose(x, W) with pads (lo, hi) is the adjoint of the strided
    convolution conv(z, Kc) with Kc = flip(W) with in/out swapped and pads
    (k-1-lo, k-1-hi). So ⟨post, conv_transpose(pre, W)⟩ = ⟨pre, conv(post, Kc)⟩,
    and H is the kernel gradient of that strided convolution, mapped back.
    """
    adjoint_pads = [(k - 1 - lo, k - 1 - hi) for (lo, hi), k in zip(config.pads, config.shape[:2])]

    def strided_conv(kc: jax.Array) -> jax.Array:
        post_, kc_ = deconv.operands(config, post, kc)
        return lax.conv_general_dilated(
            post_, kc_, (config.stride, config.stride), adjoint_pads,
            dimension_numbers=DIMENSION_NUMBERS, precision=PRECISIONS[config.precision],
            preferred_element_type=jnp.float32,
        )

    kc = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    _, pullback = jax.vjp(strided_conv, kc)
    return jnp.flip(pullback(pre)[0], (0, 1)).transpose(0, 1, 3, 2)


def input_gradient(config: DeconvConfig, post: jax.Array, w: jax.Array, batch: int) -> jax.Array:
    """∂⟨post, conv_transpose(x, W)⟩/∂x: the transform is linear in x, so x's value does not matter."""
    x = jnp.zeros((batch, *config.in_trailing), post.dtype)
    _, pullback = jax.vjp(lambda x_: deconv.conv_transpose(config, x_, w), x)
    return pullback(post)[0]


def _evolve(config: HebbianDeconvConfig, state: HebbianDeconvState, pre: jax.Array, post: jax.Array):
    if config.filter_update == "adjoint":
        hebbian = filter_gradient_adjoint(config, pre, post, state.weights)
    else:  # "vjp"; "auto" is resolved at create, and means vjp if it reaches here
        hebbian = filter_gradient_vjp(config, pre, post, state.weights)
    d_weights = hebbian * config.sign_value
    if config.w_decay > 0.0:  # static: decided at trace time
        d_weights = d_weights - state.weights * config.w_decay
    if config.bias:
        d_biases = jnp.sum(post, axis=(0, 1, 2)) * config.sign_value
    else:
        d_biases = jnp.zeros_like(state.biases)
    params = (state.weights, state.biases)
    if config.optim_type == "nag":  # ngclearn's arithmetic (optax has no equivalent)
        opt_state, (weights, biases) = optim.update("nag", config.eta, state.opt_state, params,
                                                    (d_weights, d_biases))
    else:
        updates, opt_state = config.optimizer.update((d_weights, d_biases), state.opt_state, params)
        weights, biases = optax.apply_updates(params, updates)
    if config.w_bound > 0.0:
        low = 0.0 if config.is_nonnegative else -config.w_bound
        weights = jnp.clip(weights, low, config.w_bound)
    if config.w_norm > 0.0:  # static: decided at trace time
        weights = normalized(weights, config.w_norm, (0, 1, 2) if config.w_norm_per == "out" else (0, 1, 3))
    return state._replace(
        weights=weights, biases=biases, opt_state=opt_state, pre=pre, post=post,
        dWeights=d_weights, dBiases=d_biases,
    )


def _backtransmit(config: HebbianDeconvConfig, state: HebbianDeconvState, post: jax.Array | None = None):
    post = state.post if post is None else post
    d_inputs = input_gradient(config, post, state.weights, post.shape[0]) * config.sign_value
    return state._replace(post=post, dInputs=d_inputs)


def _step(config: HebbianDeconvConfig, state: HebbianDeconvState, inputs: jax.Array, post: jax.Array):
    """forward(inputs), evolve(pre=inputs, post), backtransmit(post): the three calls, in order, fused."""
    state = deconv._forward(config, state, inputs)
    state = _evolve(config, state, inputs, post)
    return _backtransmit(config, state, post)


evolve = jax.jit(_evolve, static_argnums=0, donate_argnums=1)
backtransmit = jax.jit(_backtransmit, static_argnums=0, donate_argnums=1)
step = jax.jit(_step, static_argnums=0, donate_argnums=1)

EVOLVE = Operation(
    "evolve", evolve, (TensorArg("pre", "in"), TensorArg("post", "out")), (),
    "dWeights = sign_value * VJP_W(post) - w_decay * W; W, b <- optimizer; clip to w_bound",
)
BACKTRANSMIT = Operation(
    "backtransmit", backtransmit, (TensorArg("post", "out", optional=True),), ("dInputs",),
    "dInputs = sign_value * VJP_inputs(post) with the current W (g not applied); post defaults to the stored one",
)

RESET_FIELDS = {**deconv.RESET_FIELDS, "pre": "in", "post": "out", "dInputs": "in"}
RESET = make_reset(RESET_FIELDS)
reset = RESET.fn

STEP = Operation(
    "step", step, (TensorArg("inputs", "in"), TensorArg("post", "out")), ("outputs", "dInputs"),
    "forward(inputs); evolve(pre=inputs, post); backtransmit(post) (with the updated W): one call, one compile",
)

HYPERPARAMETERS = {
    **deconv.HYPERPARAMETERS,
    "eta": ("float", 0.0, "learning rate, >= 0"),
    "w_bound": ("float", 0.0, "clip filters to [-w_bound, w_bound] after evolve; 0 disables clipping"),
    "is_nonnegative": ("bool", False, "clip to [0, w_bound] instead; ignored when w_bound == 0 (as ngclearn)"),
    "w_decay": ("float", 0.0, "dWeights -= w_decay * W when > 0; with sgd's W - eta*dW weights grow (as ngclearn)"),
    "sign_value": ("float", 1.0, "multiplies the Hebbian term and dInputs; +1 with sgd descends on <post, y>, "
                                 "i.e. anti-Hebbian (as ngclearn); -1 is Hebbian ascent"),
    "optim_type": ("str", "sgd", "'sgd' (W - eta*dW), 'adam' (beta1 .9, beta2 .999, eps 1e-8, bias-corrected) or "
                                 "'nag' (Nesterov: phi = W - eta*dW, W <- phi + 0.9*(phi - phi_prev) after the "
                                 "first step, as ngclearn)"),
    "filter_update": ("str", "auto", "'vjp', 'adjoint' (fast strided form; equal up to rounding), 'auto' "
                                     "(adjoint on GPUs at stride > 1, else vjp) or 'timed' (both timed at create "
                                     "on the device in use, the faster kept); the description shows the choice"),
    **W_NORM_HELP,
}

COMPARTMENTS = {
    **deconv.COMPARTMENTS,
    "opt_state/...": "optimizer state over (weights, biases): adam's count, mu and nu; nag's count and phi; "
                     "nothing for sgd",
    "pre": "pre-synaptic signal of the last evolve, (batch, h, w, c_in)",
    "post": "post-synaptic signal of the last evolve or backtransmit, (batch, h_out, w_out, c_out)",
    "dWeights": "last filter update dWeights, (kh, kw, c_in, c_out)",
    "dBiases": "last bias update dBiases, (c_out,); (0,) without bias",
    "dInputs": "last back-transmitted signal, (batch, h, w, c_in)",
}

DYNAMICS = {
    "forward": deconv.FORWARD.doc,
    "evolve": "H = d<post, conv_transpose(pre, W)>/dW; dWeights = sign_value*H - w_decay*W (if w_decay > 0); "
              "dBiases = sign_value * sum_{batch,h,w} post; sgd: W <- W - eta*dWeights, b <- b - eta*dBiases; "
              "adam: bias-corrected moments, W <- W - eta*m_hat/(sqrt(v_hat)+1e-8); then if w_bound > 0: "
              "W <- clip(W, 0 if is_nonnegative else -w_bound, w_bound)",
    "backtransmit": BACKTRANSMIT.doc,
    "step": STEP.doc,
    "reset": RESET.doc,
}

NOTES = [
    "Kept from ngclearn for identical numbers: w_decay enters as -w_decay*W and sgd subtracts, so weights grow; "
    "is_nonnegative is ignored when w_bound == 0; sign_value=+1 (the default) with sgd is anti-Hebbian.",
    "Fixed against ngclearn: padding defaults to SAME; no bias stays no bias; the bias is per output channel; "
    "reset works; non-square maps and kernels work; wrong shapes are rejected; any batch per call.",
    "Hyperparameters are immutable after create.",
]

_OPERATIONS = {"forward": deconv.FORWARD, "evolve": EVOLVE, "backtransmit": BACKTRANSMIT, "step": STEP,
               "reset": RESET}
_DESCRIPTION = ("A transposed-convolution synaptic cable whose filters learn by a two-factor Hebbian rule; "
                "ngclearn's HebbianDeconvSynapse.")


def parse_config(data: Mapping[str, Any]) -> HebbianDeconvConfig:
    """A HebbianDeconvConfig from plain values; ``resist_scale`` is accepted for ``g_conduct_factor``."""
    return parse_dataclass(HebbianDeconvConfig, data, {"resist_scale": "g_conduct_factor"}, HYPERPARAMETERS)


def _help(config: HebbianDeconvConfig | None = None) -> dict:
    return help_dict(
        "HebbianDeconvSynapse", _DESCRIPTION, config, HYPERPARAMETERS, COMPARTMENTS, DYNAMICS, _OPERATIONS, NOTES,
    )


KIND = Kind(
    name="HebbianDeconvSynapse",
    description=_DESCRIPTION,
    parse_config=parse_config,
    init=init,
    operations=_OPERATIONS,
    help=_help,
    batched_compartments=frozenset({"inputs", "outputs", "pre", "post", "dInputs"}),
    state_nbytes=state_nbytes,
    prepare=lambda config, device: choose_filter_update(config, device.platform, device),
)
