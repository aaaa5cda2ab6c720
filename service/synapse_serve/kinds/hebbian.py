"""HebbianSynapse: a dense cable whose weights learn by a two-factor Hebbian rule — ngclearn 3.2.3's
``HebbianSynapse`` (the synapse of ngclearn's predictive-coding and sparse-coding exhibits).

Semantics of ngclearn 3.2.3 (measured; see docs/conformance.md)::

    forward:      outputs  = (inputs @ (W * mask)) * g + b
    evolve:       H        = (pre * pre_wght)ᵀ (post * post_wght)
                  dWeights = sign_value · (H · (w_bound − |W|) [if w_bound > 0] + R(W))
                  dBiases  = sign_value · Σ_batch post · post_wght                      (with a bias)
                  R(W)     = 0 | −λ·W (l2) | −λ·sign(W) (l1) | (−r·sign(W) − W·(1 − r)/2)·s (l1l2, λ = (s, r))
                  W, b     ← optimizer(W, b; dWeights, dBiases)        (sgd: W − eta·dW; adam; nag: optim.py)
                  W        ← clip(W, 0 if is_nonnegative else −w_bound, w_bound) if w_bound > 0; W ← W · mask
    calc_update:  dWeights, dBiases as in evolve; W, b and the optimizer untouched (ngclearn's calc_update)
    backtransmit: dInputs  = sign_value · post @ (W * mask)ᵀ       (g not applied; not in ngclearn)
    step:         forward(inputs); evolve(pre=inputs, post); backtransmit(post), fused (not in ngclearn)
    reset:        zero inputs, outputs, pre, post, dInputs at batch_size; zero dWeights, dBiases

The optimizer subtracts, so ngclearn's default ``sign_value = +1`` *descends* on ⟨pre·W, post⟩
(anti-Hebbian); ``sign_value = −1`` is Hebbian ascent. ``w_bound`` defaults to 1: the soft bound
and the clip are on unless ``w_bound = 0``.

Example::

    >>> cfg = HebbianConfig(shape=(4, 3), eta=0.1, optim_type="adam", bias=True)
    >>> state = init(cfg, seed=0)
    >>> x = jnp.ones((2, 4))
    >>> state = dense.forward(cfg, state, x)
    >>> state = evolve(cfg, state, x, jnp.ones((2, 3)))
    >>> float(state.opt_state.count), state.dBiases.shape
    (1.0, (3,))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
from jax import numpy as jnp

from synapse_serve.errors import InvalidConfig
from synapse_serve.kinds import dense, optim
from synapse_serve.kinds.base import (
    W_NORM_HELP,
    Kind,
    Operation,
    TensorArg,
    check_w_norm,
    help_dict,
    is_sequence,
    make_reset,
    normalized,
    parse_dataclass,
    require_bool,
    require_choice,
    require_float,
    state_nbytes_of,
)
from synapse_serve.kinds.dense import DenseConfig

# prior names ngclearn understands -> the term they add; gaussian and laplacian are case-insensitive there
PRIORS = {"constant": "constant", "none": "constant", "l2": "l2", "ridge": "l2", "gaussian": "l2", "l1": "l1",
          "lasso": "l1", "laplacian": "l1", "l1l2": "l1l2", "elastic_net": "l1l2"}


def parse_prior(value: Any) -> tuple[str, Any]:
    """``[name, lambda]`` -> ``(kind, lambda)`` with kind in constant/l1/l2/l1l2; elastic net's lambda a pair
    ``(scale, l1_ratio)``. Names as ngclearn spells them; any other spelling is refused (ngclearn ignores it)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
            and value[0] in ("constant", "l1", "l2", "l1l2"):
        return value  # already parsed
    if not is_sequence(value) or len(value) != 2:
        raise InvalidConfig(f"prior: expected [name, lambda], e.g. [\"l2\", 0.01] or [\"elastic_net\", [scale, "
                            f"l1_ratio]], received {str(value)[:80]!r}", field="prior")
    name, lam = value
    key = name.lower() if isinstance(name, str) and name.lower() in ("gaussian", "laplacian") else name
    if key is None:
        key = "constant"
    kind = PRIORS.get(key) if isinstance(key, str) else None
    if kind is None:
        choice = require_choice("prior", str(name).lower() if isinstance(name, str) else name, tuple(PRIORS))
        raise InvalidConfig(f"prior: {name!r} is not a prior name ngclearn knows (its names are case-sensitive, "
                            f"except gaussian and laplacian); did you mean {choice!r}?", field="prior")
    if kind == "l1l2":
        if not is_sequence(lam) or len(lam) != 2:
            raise InvalidConfig(f"prior: {name} needs lambda = [scale, l1_ratio], received {str(lam)[:80]!r}",
                                field="prior")
        return kind, (require_float("prior scale", lam[0]), require_float("prior l1_ratio", lam[1], 0.0, 1.0))
    return kind, (0.0 if kind == "constant" else require_float("prior lambda", lam))


@dataclasses.dataclass(frozen=True)
class HebbianConfig(DenseConfig):
    """DenseConfig plus the learning hyperparameters (all immutable after create).

    Attributes:
      eta: learning rate, >= 0.
      w_bound: soft bound ``(w_bound − |W|)`` on the Hebbian term and clip after the update; 0 turns both off.
      is_nonnegative: clip to ``[0, w_bound]`` (only when ``w_bound > 0``, as in ngclearn).
      prior: ``(kind, lambda)`` after parsing: ``constant``, ``l2``, ``l1`` or ``l1l2`` with ``(scale, l1_ratio)``.
      w_decay: ngclearn's older spelling of ``prior = ["l2", w_decay]`` (stored as that prior).
      sign_value: multiplies dWeights (the prior term too) and dBiases; +1 (the default) is anti-Hebbian.
      optim_type: ``"sgd"``, ``"adam"`` or ``"nag"`` (ngclearn's arithmetic: optim.py).
      pre_wght, post_wght: scale pre and post before their outer product.
      w_norm, w_norm_per: beyond ngclearn, off by default: after each evolve rescale each column (``"out"``)
        or row (``"in"``) of W to this L2 norm.
    """

    eta: float = 0.0
    w_bound: float = 1.0
    is_nonnegative: bool = False
    prior: Any = ("constant", 0.0)
    w_decay: float = 0.0
    sign_value: float = 1.0
    optim_type: str = "sgd"
    pre_wght: float = 1.0
    post_wght: float = 1.0
    w_norm: float = 0.0
    w_norm_per: str = "out"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_w_norm(self)
        set_ = functools.partial(object.__setattr__, self)
        set_("eta", require_float("eta", self.eta, 0.0))
        set_("w_bound", require_float("w_bound", self.w_bound, 0.0))
        set_("is_nonnegative", require_bool("is_nonnegative", self.is_nonnegative))
        set_("sign_value", require_float("sign_value", self.sign_value))
        set_("optim_type", require_choice("optim_type", self.optim_type, optim.OPTIMIZERS))
        set_("pre_wght", require_float("pre_wght", self.pre_wght))
        set_("post_wght", require_float("post_wght", self.post_wght))
        prior = parse_prior(self.prior)
        w_decay = require_float("w_decay", self.w_decay, 0.0)
        if w_decay > 0.0:
            if prior[0] != "constant":
                raise InvalidConfig("w_decay: it is another name for prior [\"l2\", w_decay]; give one of the two",
                                    field="w_decay")
            prior = ("l2", w_decay)  # as ngclearn meant it (its keyword form crashes)
        set_("prior", prior)
        set_("w_decay", 0.0)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["prior"] = [self.prior[0], list(self.prior[1]) if isinstance(self.prior[1], tuple) else self.prior[1]]
        return out


class HebbianState(NamedTuple):
    """Compartments of a HebbianSynapse. Structure never changes; batch sizes may."""

    weights: jax.Array  # (n_in, n_out) float32
    biases: jax.Array  # (n_out,) float32; (0,) without a bias
    mask: jax.Array  # (n_in, n_out) float32 of 0/1 when p_conn < 1; (0,) otherwise
    opt_state: Any  # optim.py: count, and adam's mu, nu or nag's phi over (weights, biases)
    inputs: jax.Array  # (batch, n_in) float32
    outputs: jax.Array  # (batch, n_out) float32
    pre: jax.Array  # (batch, n_in) float32: last evolve's pre
    post: jax.Array  # (batch, n_out) float32: last evolve's or backtransmit's post
    dWeights: jax.Array  # (n_in, n_out) float32: last update
    dBiases: jax.Array  # (n_out,) float32; (0,) without a bias
    dInputs: jax.Array  # (batch, n_in) float32: last backtransmit
    key: jax.Array  # (2,) uint32


def init(config: HebbianConfig, seed: int = 0, weights: Any = None, biases: Any = None) -> HebbianState:
    """A fresh state: parameters as DenseSynapse, zeroed signals and updates, a new optimizer state."""
    w, b, mask, key = dense.init_parameters(config, seed, weights, biases)
    return _fresh_state(config.optim_type, config.batch_size, config.shape, w, b, mask, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fresh_state(optim_type: str, batch: int, shape: tuple, w, b, mask, key) -> HebbianState:
    """Zeroed signals and updates and a new optimizer state around (w, b): buffers of their own (donated later)."""
    n_in, n_out = shape
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    return HebbianState(weights=w, biases=b, mask=mask, opt_state=optim.init(optim_type, (w, b)),
                        inputs=zeros((batch, n_in)), outputs=zeros((batch, n_out)), pre=zeros((batch, n_in)),
                        post=zeros((batch, n_out)), dWeights=zeros(w.shape), dBiases=zeros(b.shape),
                        dInputs=zeros((batch, n_in)), key=key)


def compute_update(config: HebbianConfig, w: jax.Array, pre: jax.Array, post: jax.Array):
    """(dWeights, dBiases), ngclearn's ``_compute_update`` term by term and in its order."""
    _pre = pre * config.pre_wght
    _post = post * config.post_wght
    d_weights = dense.matmul(config, _pre.T, _post)
    if config.w_bound > 0.0:
        d_weights = d_weights * (config.w_bound - jnp.abs(w))
    kind, lam = config.prior
    if kind == "l2":
        d_weights = d_weights + -w * lam
    elif kind == "l1":
        d_weights = d_weights + -jnp.sign(w) * lam
    elif kind == "l1l2":
        scale, ratio = lam
        d_weights = d_weights + (-jnp.sign(w) * ratio - w * (1 - ratio) / 2) * scale
    d_biases = jnp.sum(_post, axis=0) * config.sign_value if config.bias else jnp.zeros((0,), jnp.float32)
    return d_weights * config.sign_value, d_biases


def _evolve(config: HebbianConfig, state: HebbianState, pre: jax.Array, post: jax.Array) -> HebbianState:
    d_weights, d_biases = compute_update(config, state.weights, pre, post)
    opt_state, (weights, biases) = optim.update(config.optim_type, config.eta, state.opt_state,
                                                (state.weights, state.biases), (d_weights, d_biases))
    if config.w_bound > 0.0:
        weights = jnp.clip(weights, 0.0 if config.is_nonnegative else -config.w_bound, config.w_bound)
    if config.masked:
        weights = weights * state.mask
    if config.w_norm > 0.0:  # static: decided at trace time
        weights = normalized(weights, config.w_norm, (0,) if config.w_norm_per == "out" else (1,))
    return state._replace(weights=weights, biases=biases, opt_state=opt_state, pre=pre, post=post,
                          dWeights=d_weights, dBiases=d_biases)


def _calc_update(config: HebbianConfig, state: HebbianState, pre: jax.Array, post: jax.Array) -> HebbianState:
    d_weights, d_biases = compute_update(config, state.weights, pre, post)
    return state._replace(pre=pre, post=post, dWeights=d_weights, dBiases=d_biases)


def _backtransmit(config: HebbianConfig, state: HebbianState, post: jax.Array | None = None) -> HebbianState:
    post = state.post if post is None else post
    d_inputs = dense.matmul(config, post, dense.effective_weights(config, state).T) * config.sign_value
    return state._replace(post=post, dInputs=d_inputs)


def _step(config: HebbianConfig, state: HebbianState, inputs: jax.Array, post: jax.Array) -> HebbianState:
    """forward(inputs), evolve(pre=inputs, post), backtransmit(post): the three calls, in order, fused."""
    state = dense._forward(config, state, inputs)
    state = _evolve(config, state, inputs, post)
    return _backtransmit(config, state, post)


evolve = jax.jit(_evolve, static_argnums=0, donate_argnums=1)
calc_update = jax.jit(_calc_update, static_argnums=0, donate_argnums=1)
backtransmit = jax.jit(_backtransmit, static_argnums=0, donate_argnums=1)
step = jax.jit(_step, static_argnums=0, donate_argnums=1)
RESET_FIELDS = {"inputs": "in", "outputs": "out", "pre": "in", "post": "out", "dInputs": "in",
                "dWeights": "same", "dBiases": "same"}
RESET = make_reset(RESET_FIELDS)
reset = RESET.fn

EVOLVE = Operation(
    "evolve", evolve, (TensorArg("pre", "in"), TensorArg("post", "out")), (),
    "dWeights = sign_value * (H * (w_bound - |W|) + prior term), H = (pre*pre_wght)^T (post*post_wght); "
    "W, b <- optimizer; clip to w_bound; W *= mask",
)
CALC_UPDATE = Operation(
    "calc_update", calc_update, (TensorArg("pre", "in"), TensorArg("post", "out")), ("dWeights",),
    "dWeights, dBiases as evolve computes them; weights, biases and optimizer untouched",
)
BACKTRANSMIT = Operation(
    "backtransmit", backtransmit, (TensorArg("post", "out", optional=True),), ("dInputs",),
    "dInputs = sign_value * post @ (W * mask)^T (g not applied); post defaults to the stored one",
)
STEP = Operation(
    "step", step, (TensorArg("inputs", "in"), TensorArg("post", "out")), ("outputs", "dInputs"),
    "forward(inputs); evolve(pre=inputs, post); backtransmit(post) (with the updated W): one call, one compile",
)

HYPERPARAMETERS = {
    **dense.HYPERPARAMETERS,
    "eta": ("float", 0.0, "learning rate, >= 0"),
    "w_bound": ("float", 1.0, "soft bound (w_bound - |W|) on the Hebbian term and clip to [-w_bound, w_bound] "
                              "after the update (ngclearn's default is on); 0 turns both off"),
    "is_nonnegative": ("bool", False, "clip to [0, w_bound] instead; ignored when w_bound == 0 (as ngclearn)"),
    "prior": ("[name, lambda]", ["constant", 0.0],
              "weight prior added before the sign: l2|ridge|gaussian (-lambda*W), l1|lasso|laplacian "
              "(-lambda*sign W), l1l2|elastic_net with lambda [scale, l1_ratio] "
              "((-l1_ratio*sign W - W*(1-l1_ratio)/2)*scale, ngclearn's formula), constant (none)"),
    "w_decay": ("float", 0.0, "ngclearn's older name for prior [\"l2\", w_decay]; stored as that prior"),
    "sign_value": ("float", 1.0, "multiplies dWeights (prior term included) and dBiases; the optimizer subtracts, "
                                 "so +1 (the default) descends on <pre W, post> (anti-Hebbian); -1 is Hebbian ascent"),
    "optim_type": ("str", "sgd", "'sgd' (W - eta*dW), 'adam' (beta1 .9, beta2 .999, eps 1e-8, float32 step count, "
                                 "as ngclearn) or 'nag' (Nesterov, momentum 0.9, as ngclearn)"),
    "pre_wght": ("float", 1.0, "scales pre before the outer product"),
    "post_wght": ("float", 1.0, "scales post before the outer product (and the bias update)"),
    **W_NORM_HELP,
}

COMPARTMENTS = {
    **dense.COMPARTMENTS,
    "opt_state/...": "optimizer state over (weights, biases): count (float32), adam's mu/0, mu/1, nu/0, nu/1 or "
                     "nag's phi/0, phi/1 (/1: the biases; (0,) without a bias)",
    "pre": "pre-synaptic signal of the last evolve or calc_update, (batch, n_in)",
    "post": "post-synaptic signal of the last evolve, calc_update or backtransmit, (batch, n_out)",
    "dWeights": "last update dWeights, (n_in, n_out)",
    "dBiases": "last bias update dBiases, (n_out,); (0,) without a bias",
    "dInputs": "last back-transmitted signal, (batch, n_in)",
}

DYNAMICS = {
    "forward": dense.FORWARD.doc,
    "evolve": "H = (pre*pre_wght)^T (post*post_wght); dWeights = sign_value * (H*(w_bound - |W|) [if w_bound > 0] "
              "+ R(W)); dBiases = sign_value * sum_batch post*post_wght; sgd: W <- W - eta*dWeights; adam: "
              "bias-corrected moments, W <- W - eta*m_hat/(sqrt(v_hat)+1e-8); nag: phi = W - eta*dW, "
              "W <- phi + 0.9*(phi - phi_prev) after the first step; then if w_bound > 0: "
              "W <- clip(W, 0 if is_nonnegative else -w_bound, w_bound); W <- W * mask",
    "calc_update": CALC_UPDATE.doc,
    "backtransmit": BACKTRANSMIT.doc,
    "step": STEP.doc,
    "reset": RESET.doc,
}

NOTES = [
    "Kept from ngclearn for identical numbers: the optimizer subtracts, so sign_value=+1 is anti-Hebbian; w_bound "
    "defaults to 1 (soft bound and clip on); the prior is added before the sign, so the sign flips it too; the "
    "elastic net's L2 part is halved; is_nonnegative is ignored when w_bound == 0; adam counts steps in float32.",
    "Fixed against ngclearn: w_decay works (ngclearn's keyword crashes); elastic net takes [scale, l1_ratio] from "
    "JSON (ngclearn crashes on a list or a scalar); unknown or miscased prior names and optimizers are a 422 (ngclearn "
    "ignores the names or raises KeyError); the p_conn mask is kept; any batch works; dBiases keeps one shape.",
    *dense.NOTES[1:],
]

_OPERATIONS = {"forward": dense.FORWARD, "evolve": EVOLVE, "calc_update": CALC_UPDATE,
               "backtransmit": BACKTRANSMIT, "step": STEP, "reset": RESET}
_DESCRIPTION = ("A dense synaptic cable whose weights learn by a two-factor Hebbian rule; ngclearn's "
                "HebbianSynapse.")


def parse_config(data: Mapping[str, Any]) -> HebbianConfig:
    """A HebbianConfig from plain values; ``resist_scale`` is accepted for ``g_conduct_factor``."""
    return parse_dataclass(HebbianConfig, data, {"resist_scale": "g_conduct_factor"}, HYPERPARAMETERS)


def _help(config: HebbianConfig | None = None) -> dict:
    return help_dict("HebbianSynapse", _DESCRIPTION, config, HYPERPARAMETERS, COMPARTMENTS, DYNAMICS, _OPERATIONS,
                     NOTES)


KIND = Kind(
    name="HebbianSynapse",
    description=_DESCRIPTION,
    parse_config=parse_config,
    init=init,
    operations=_OPERATIONS,
    help=_help,
    batched_compartments=frozenset(name for name, space in RESET_FIELDS.items() if space != "same"),
    state_nbytes=state_nbytes_of(init),
)
