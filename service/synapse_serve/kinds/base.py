"""The kind contract, and what every kind shares: tensor checks, compartment access, config parsing, help.

A kind is pure: it knows nothing of HTTP, names, locks or storage; the local backend
owns mutation. Adding a kind is one new file exposing ``KIND`` plus one line in
``kinds/__init__.py``. The file provides:

- a **config**: a frozen, hashable dataclass (a jit static argument) validated in
  ``__post_init__`` with messages that name the field, the value and what is allowed.
  It offers ``to_dict()`` (plain JSON values that ``parse_config`` reads back),
  ``batch_size`` (the batch of the signal compartments at init and after reset) and
  ``trailing(space)`` (the shape after the batch of an ``"in"``- or ``"out"``-shaped tensor);
- a **state**: a ``NamedTuple`` with one field per compartment (optimizer state as a
  nested pytree), whose structure never changes; only the batch of the compartments
  named in ``batched_compartments`` may change;
- ``init(config, seed, weights=None, biases=None)``: a fresh state, drawing parameters
  with ngclearn's key schedule; the kind checks explicit initial tensors itself
  (shape, dtype, finite) and raises ShapeMismatch / InvalidConfig;
- **operations**: ``Operation``s whose ``fn(config, state, *tensors) -> state`` is
  jitted once per config (``static_argnums=0``) with the state donated; the kind's
  ``reset`` zeroes the signals it names and returns them to ``config.batch_size``;
- ``help(config | None)``: built with ``help_dict`` below, true to the numbers;
- ``state_nbytes(config)``: the bytes of a fresh state, known before it is built;
- ``prepare(config, device) -> config`` (optional): settle device-dependent choices of a
  new instance's config (e.g. which formulation runs fastest there) after capacity is
  reserved; may be slow.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from synapse_serve.errors import InvalidConfig, ShapeMismatch, UnknownCompartment

# "bfloat16" multiplies bfloat16-rounded operands and accumulates in float32 (the state stays float32).
PRECISIONS = {"highest": lax.Precision.HIGHEST, "high": lax.Precision.HIGH, "default": lax.Precision.DEFAULT,
              "bfloat16": lax.Precision.DEFAULT}
DISTRIBUTIONS = {"uniform": ("low", "high"), "gaussian": ("mean", "std"), "constant": ("value",)}
# Floating dtypes a tensor argument may arrive in; each is cast to float32.
_CASTABLE_FLOATS = {"float16", "bfloat16", "float32", "float64"}
_FLOAT32 = np.dtype(np.float32)
# For programs that loop over steps or instances (sequences, packed calls): XLA:CPU compiles a small loop into one
# kernel of its own ("small-while-loop-hoisting"), and there a step's arithmetic was generated another way than a
# separate call's: 14 of 150 random dense sequences, 6 of 80 packed calls, came out ulps apart. Without it, 1 of
# 300 and none of 80 (docs/conformance.md), for 0.97-1.22x the time (bench/small_loops.py). A pass name the
# backend's compiler lacks (GPUs) is ignored by XLA: no effect there.
LOOP_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "small-while-loop-hoisting"}


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """A tensor argument of an operation and the map it must match.

    ``space`` is ``"in"`` (shaped like the inputs) or ``"out"`` (like the outputs).
    An optional argument left out means "use the compartment of that name".
    """

    name: str
    space: str
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Operation:
    """One operation of a kind: a compiled pure function and what it reads and writes."""

    name: str
    fn: Callable[..., Any]  # (config, state, *tensors) -> new state, jitted
    args: tuple[TensorArg, ...]
    returns: tuple[str, ...]  # compartments a caller gets back by default
    doc: str


@dataclasses.dataclass(frozen=True)
class Kind:
    """A synapse kind: its config parser, init, operations and help (see the module docstring)."""

    name: str
    description: str
    parse_config: Callable[[Mapping[str, Any]], Any]
    init: Callable[..., Any]
    operations: Mapping[str, Operation]
    help: Callable[[Any], dict]
    batched_compartments: frozenset[str]
    state_nbytes: Callable[[Any], int]  # bytes of a fresh state of a config, known before it is built
    prepare: Callable[[Any, Any], Any] | None = None  # (config, jax device) -> config, once per new instance


def check_tensor(arg: str, value: Any, trailing: tuple[int, ...], batch: int | None = None,
                 steps: bool = False) -> np.ndarray:
    """Return ``value`` as a float32 ``(batch, *trailing)`` array or raise ShapeMismatch.

    With ``steps`` (a sequence call) the array is ``(T, batch, *trailing)``. Any floating dtype is
    accepted and cast to float32 (the state's dtype); integer, bool and complex tensors are
    rejected, as is any other shape.
    """
    array = np.asarray(value)
    lead = 2 if steps else 1
    if (array.dtype == _FLOAT32 and array.ndim == lead + len(trailing) and array.shape[lead:] == tuple(trailing)
            and min(array.shape[:lead]) >= 1 and (batch is None or array.shape[lead - 1] == batch)):
        return check_finite(arg, array)  # the common case, without the general checks below
    expected = f"({'steps, ' if steps else ''}{'batch' if batch is None else batch}, {', '.join(map(str, trailing))})"
    _check_floating(arg, array, expected)
    ok = (array.ndim == lead + len(trailing) and array.shape[lead:] == tuple(trailing)
          and min(array.shape[:lead], default=0) >= 1 and (batch is None or array.shape[lead - 1] == batch))
    if not ok:
        empty = array.ndim >= lead and 0 in array.shape[:lead]
        raise ShapeMismatch(
            f"{arg}: expected shape {expected}, received {tuple(array.shape)}"
            + (f" ({'steps and batch' if steps else 'the batch'} must be at least 1)" if empty else ""),
            argument=arg, expected_shape=expected, received_shape=list(array.shape),
        )
    return check_finite(arg, array.astype(np.float32, copy=False))


def check_finite(arg: str, array: np.ndarray) -> np.ndarray:
    """``array`` unless it holds NaN or Inf (ShapeMismatch, 422): a synapse given one would spread it through its
    outputs and, learning, through every weight; refused as a compartment write is (~3 µs for 131 KB)."""
    if not np.isfinite(array).all():
        count = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ShapeMismatch(f"{arg}: values must be finite (no NaN or Inf); {count} of {array.size} are not",
                            argument=arg)
    return array


def check_parameter(arg: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An explicit parameter tensor (initial weights or biases): exactly ``shape``, floating, finite; float32."""
    array = np.asarray(value)
    expected = str(tuple(shape))
    _check_floating(arg, array, expected)
    if tuple(array.shape) != tuple(shape):
        raise ShapeMismatch(f"{arg}: expected shape {expected}, received {tuple(array.shape)}",
                            argument=arg, expected_shape=list(shape), received_shape=list(array.shape))
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise InvalidConfig(f"{arg}: initial values must be finite (no NaN or Inf)", field=arg)
    return array


def _check_floating(arg: str, array: np.ndarray, expected: str) -> None:
    if array.dtype.name not in _CASTABLE_FLOATS:
        raise ShapeMismatch(
            f"{arg}: expected a floating tensor of shape {expected} (float32, or float16/bfloat16/float64 "
            f"cast to float32), received dtype {array.dtype.name}",
            argument=arg, expected_shape=expected, received_dtype=array.dtype.name,
        )


def compartment_paths(state: Any) -> dict[str, Any]:
    """Flatten a state pytree into ``{"weights": …, "opt_state/1/mu/0": …}``."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return dict(zip(leaf_names(treedef), leaves))


@functools.lru_cache(maxsize=256)
def leaf_names(treedef: Any) -> tuple[str, ...]:
    """The path names of a state structure's leaves; computed once per structure (it never changes)."""
    paths = jax.tree_util.tree_flatten_with_path(jax.tree_util.tree_unflatten(treedef, [0] * treedef.num_leaves))[0]
    return tuple("/".join(_key_name(k) for k in path) for path, _ in paths)


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


CLOSE_MATCH_MAX = 64  # longer words get no "did you mean": difflib indexes every character of the word


def close_match(word: Any, options: Any) -> str | None:
    """The option closest to ``word`` (a caller's misspelling), or None; none for a word no name is as long as (a
    red-team run's 8 MiB operation name cost 370 MB and 1.4 s in difflib)."""
    if not isinstance(word, str) or len(word) > CLOSE_MATCH_MAX:
        return None
    close = difflib.get_close_matches(word, list(options), n=1)
    return close[0] if close else None


def unknown_compartment(kind: Kind, name: str, names: Any, doing: str = "") -> UnknownCompartment:
    """The error for a compartment the instance does not have (``doing``: e.g. "pre: cannot refer to"), with
    the closest of ``names``."""
    names = sorted(names)
    close = close_match(name, names)
    hint = f" (did you mean {close!r}?)" if close else ""
    what = f"{doing} {str(name)[:128]!r}: no such compartment" if doing else f"unknown compartment {str(name)[:128]!r}"
    return UnknownCompartment(f"{what}{hint}; this {kind.name} has: {', '.join(names)}", compartment=str(name)[:128])


def check_compartment(kind: Kind, name: str, current: Any, value: Any, max_batch: int | None = None) -> np.ndarray:
    """``value`` checked to replace compartment ``name`` (now ``current``): float32 or its own dtype.

    Batched compartments (inputs, outputs, …) may change their batch size, up to ``max_batch``;
    every other compartment must keep its exact shape and dtype, and be finite.
    """
    array = np.asarray(value)
    if name in kind.batched_compartments:
        new = check_tensor(name, array, tuple(current.shape[1:]))
        if max_batch is not None and new.shape[0] > max_batch:
            raise ShapeMismatch(f"{name}: batch {new.shape[0]} is over the server's max_batch of {max_batch}",
                                argument=name)
        return new
    if array.dtype != current.dtype and not (
        np.issubdtype(current.dtype, np.floating) and array.dtype.name in _CASTABLE_FLOATS
    ):
        raise ShapeMismatch(
            f"{name}: expected dtype {current.dtype.name}, received {array.dtype.name}",
            argument=name, expected_dtype=current.dtype.name, received_dtype=array.dtype.name,
        )
    if tuple(array.shape) != tuple(current.shape):
        raise ShapeMismatch(
            f"{name}: expected shape {tuple(current.shape)}, received {tuple(array.shape)}",
            argument=name, expected_shape=list(current.shape), received_shape=list(array.shape),
        )
    new = array.astype(current.dtype, copy=False)
    if np.issubdtype(new.dtype, np.floating) and not np.all(np.isfinite(new)):
        raise ShapeMismatch(f"{name}: values must be finite (no NaN or Inf)", argument=name)
    check_optimizer_value(name, new)
    return new


def check_optimizer_value(name: str, value: np.ndarray) -> None:
    """An optimizer's step count is a whole number of steps taken (>= 0) and Adam's second moments are averages of
    squares (>= 0): finite values outside that make the next evolve divide by zero or take a square root of a
    negative number, and every weight NaN."""
    parts = name.split("/")
    if "opt_state" not in parts:
        return
    if parts[-1] == "count" and not (np.all(value >= 0) and np.all(value == np.floor(value))):
        raise ShapeMismatch(f"{name}: an optimizer's step count is a whole number >= 0, received "
                            f"{np.asarray(value).ravel()[:4].tolist()}", argument=name)
    if "nu" in parts and not np.all(value >= 0):
        raise ShapeMismatch(f"{name}: Adam's second moments are averages of squares, never negative", argument=name)


def replace_compartment(kind: Kind, state: Any, name: str, value: Any, max_batch: int | None = None,
                        device: jax.Device | None = None) -> Any:
    """Return ``state`` with compartment ``name`` replaced by ``value``, checked (``checked_compartment``) and
    placed (``with_compartment``)."""
    return with_compartment(state, name, checked_compartment(kind, state, name, value, max_batch), device)


def checked_compartment(kind: Kind, layout: Any, name: str, value: Any, max_batch: int | None = None) -> np.ndarray:
    """``value`` checked (``check_compartment``) to replace compartment ``name`` of a state of ``layout`` (a state,
    or its shapes and dtypes only: nothing is read)."""
    old_leaves, treedef = jax.tree_util.tree_flatten(layout)
    names = leaf_names(treedef)
    if name not in names:
        raise unknown_compartment(kind, name, names)
    return check_compartment(kind, name, old_leaves[names.index(name)], value, max_batch)


def with_compartment(state: Any, name: str, new: np.ndarray, device: jax.Device | None = None) -> Any:
    """``state`` with compartment ``name`` replaced by ``new`` (checked already: ``checked_compartment``), a buffer
    of its own on ``device`` (committed there, as the rest of an instance's state: else the default device's, and
    every call would move it to the instance's device again)."""
    old_leaves, treedef = jax.tree_util.tree_flatten(state)
    names = leaf_names(treedef)
    # device_put reads a 64-byte aligned host array in place on CPU (may_alias=False too, measured with JAX 0.12):
    # the caller's array is copied first, so changing it afterwards changes nothing stored
    new = jax.numpy.asarray(new) if device is None else jax.device_put(np.array(new), device)
    leaves = [new if n == name else leaf for n, leaf in zip(names, old_leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --- config field validation helpers (messages name field, value and what is allowed) ---


def is_sequence(value: Any) -> bool:
    """Whether a config value holds several values (a list, a tuple, a 1-d array): not text, not a scalar, not a 0-d
    array (which has ``__len__`` and raises when asked it)."""
    if isinstance(value, (str, bytes)):
        return False
    try:
        len(value)
    except TypeError:
        return False
    return True


def _scalar(value: Any) -> Any:
    """A 0-d numpy array or numpy scalar as the Python number or bool it holds; anything else as given."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def require_int(field: str, value: Any, low: int, high: int | None = None) -> int:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfig(f"{field}: expected an integer, received {str(value)[:80]!r}", field=field)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidConfig(f"{field}: {str(value)[:80]} is not allowed; it must be {allowed}", field=field)
    return int(value)


def require_float(field: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfig(f"{field}: expected a number, received {str(value)[:80]!r}", field=field)
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float (JSON allows any length)
        raise InvalidConfig(f"{field}: {str(value)[:40]}… is too large; it must be a finite float",
                            field=field) from None
    if not math.isfinite(value):
        raise InvalidConfig(f"{field}: {value} is not allowed; it must be finite", field=field)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(
            b for b in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "") if b
        )
        raise InvalidConfig(f"{field}: {value} is not allowed; it must be {bounds}", field=field)
    return value


def require_bool(field: str, value: Any) -> bool:
    value = _scalar(value)
    if not isinstance(value, bool):
        raise InvalidConfig(f"{field}: expected true or false, received {str(value)[:80]!r}", field=field)
    return value


def require_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        close = close_match(value.lower(), choices) if isinstance(value, str) else None
        hint = f" (did you mean {close!r}?)" if close else ""
        raise InvalidConfig(
            f"{field}: {str(value)[:80]!r} is not allowed{hint}; choose one of {', '.join(choices)}", field=field
        )
    return value.lower()


def parse_dataclass(cls: type, data: Mapping[str, Any], aliases: Mapping[str, str],
                    meanings: Mapping[str, tuple] | None = None) -> Any:
    """Build config ``cls`` from a mapping; unknown keys (with the closest name), alias clashes and missing
    required fields are errors naming the field. ``meanings`` (the kind's help table) explains missing ones."""
    if not isinstance(data, Mapping):
        raise InvalidConfig(f"config: expected an object, received {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        target = aliases.get(key, key)
        if target not in fields:
            known = sorted(fields | set(aliases))
            close = close_match(key, known)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise InvalidConfig(
                f"config: unknown field {str(key)[:80]!r}{hint}; allowed fields are {', '.join(known)}",
                field=str(key)[:80])
        if target in kwargs:
            raise InvalidConfig(f"config: {key!r} and its other name both given; use {target!r} only", field=key)
        kwargs[target] = value
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        explained = [f"{name} ({meanings[name][2]})" if meanings and name in meanings else name for name in missing]
        raise InvalidConfig(f"config: missing required field{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(explained)}", field=missing[0])
    return cls(**kwargs)


def state_from_compartments(kind: Kind, config: Any, seed: int, arrays: Mapping[str, Any],
                            max_batch: int | None = None) -> Any:
    """Rebuild a state pytree from ``compartment_paths``-named arrays (a stored or imported instance).

    Every compartment must be present with the dtype of a fresh state, and the same shape
    (batched compartments may differ in batch only, up to ``max_batch``). The template is
    shapes only: nothing of the config's size is allocated.
    """
    template = jax.eval_shape(functools.partial(kind.init, config, seed))
    template_leaves, treedef = jax.tree_util.tree_flatten(template)
    names = leaf_names(treedef)
    missing, extra = set(names) - set(arrays), set(arrays) - set(names)
    if missing or extra:
        raise InvalidConfig(
            f"compartments do not match a {kind.name}: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    leaves = []
    for name, leaf in zip(names, template_leaves):
        value = np.asarray(arrays[name])
        batched = name in kind.batched_compartments
        same_shape = value.shape == leaf.shape or (
            batched and value.ndim == len(leaf.shape) and value.shape[1:] == leaf.shape[1:] and value.shape[0] >= 1
        )
        if value.dtype != leaf.dtype or not same_shape:
            raise InvalidConfig(
                f"compartment {name}: expected {leaf.dtype.name} {tuple(leaf.shape)}, found "
                f"{value.dtype.name} {tuple(value.shape)}"
            )
        if batched and max_batch is not None and value.shape[0] > max_batch:
            raise InvalidConfig(f"compartment {name}: batch {value.shape[0]} is over the server's max_batch of "
                                f"{max_batch}")
        leaves.append(jax.numpy.array(value))  # a device buffer of its own: states are donated
    return jax.tree_util.tree_unflatten(treedef, leaves)


def help_dict(name: str, description: str, config: Any, hyperparameters: Mapping[str, tuple],
              compartments: Mapping[str, str], dynamics: Mapping[str, str], operations: Mapping[str, Operation],
              notes: list[str]) -> dict:
    """A kind's help; with a config, each hyperparameter also shows its value.

    ``hyperparameters`` maps each name to ``(type, default, meaning)``.
    """
    values = config.to_dict() if config is not None else {}
    return {
        "kind": name,
        "description": description,
        "hyperparameters": {
            key: {"type": t, "default": d, "meaning": m, **({"value": values[key]} if key in values else {})}
            for key, (t, d, m) in hyperparameters.items()
        },
        "compartments": dict(compartments),
        "operations": {op.name: {
            "args": [{"name": a.name, "shape": "inputs-shaped" if a.space == "in" else "outputs-shaped",
                      "optional": a.optional} for a in op.args],
            "returns": list(op.returns),
            "does": op.doc,
        } for op in operations.values()},
        "dynamics": dict(dynamics),
        "notes": list(notes),
    }


# --- initialisers and reset, shared by the kinds ---


FLOAT32_MAX = float(np.finfo(np.float32).max)


def parse_init(field: str, spec: Any) -> tuple:
    """Normalise a distribution spec ``{"dist": "uniform", "low": 0, "high": 1}`` to a hashable tuple."""
    if not isinstance(spec, Mapping) or "dist" not in spec:
        raise InvalidConfig(
            f"{field}: expected {{'dist': one of {', '.join(DISTRIBUTIONS)}, ...parameters}}, received {spec!r}",
            field=field,
        )
    dist = require_choice(f"{field}.dist", spec["dist"], tuple(DISTRIBUTIONS))
    params = {k: v for k, v in spec.items() if k != "dist"}
    if set(params) != set(DISTRIBUTIONS[dist]):
        raise InvalidConfig(
            f"{field}: a {dist} distribution takes exactly {', '.join(DISTRIBUTIONS[dist])}; received "
            f"{', '.join(sorted(params)) or 'none'}",
            field=field,
        )
    values = {k: require_float(f"{field}.{k}", v) for k, v in params.items()}
    if dist == "uniform" and values["low"] >= values["high"]:
        raise InvalidConfig(f"{field}: low ({values['low']}) must be below high ({values['high']})", field=field)
    if dist == "gaussian" and values["std"] < 0:
        raise InvalidConfig(f"{field}: std ({values['std']}) must be >= 0", field=field)
    return dist, tuple(sorted(values.items()))


def check_init_ranges(config: Any) -> None:
    """A new instance's init distributions, drawn in float32: a parameter (or a uniform's ``high - low``) beyond its
    range is an infinite weight. Checked at create only: a stored, evicted or exported instance's config is read as
    it was accepted (its init is history; refusing it at load quarantined an instance a red-team run had stored and
    repaired under the release before)."""
    for field in dataclasses.fields(config):
        spec = getattr(config, field.name)
        if not (field.name.endswith("_init") and isinstance(spec, tuple) and len(spec) == 2):
            continue
        dist, params = spec
        values = dict(params)
        for name, value in values.items():
            if abs(value) > FLOAT32_MAX:
                raise InvalidConfig(f"{field.name}.{name}: {value} is beyond float32's range (±{FLOAT32_MAX:.7g}), "
                                    "which the values are drawn in", field=field.name)
        if dist == "uniform" and values["high"] - values["low"] > FLOAT32_MAX:
            raise InvalidConfig(f"{field.name}: high - low is beyond float32's range (±{FLOAT32_MAX:.7g}), which the "
                                "values are drawn in", field=field.name)


def sample(spec: tuple, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Draw from a parsed distribution spec the way ngclearn's DistributionGenerator does."""
    dist, params = spec
    p = dict(params)
    draw_key, _ = jax.random.split(key, 2)  # ngclearn splits once and draws from the first half
    if dist == "uniform":
        return jax.random.uniform(draw_key, shape, jnp.float32, minval=p["low"], maxval=p["high"])
    if dist == "gaussian":
        # ngclearn computes mean + std * normal eagerly, one rounding per step; the barriers keep XLA from
        # fusing them (a fused multiply-add, or constants folded into the sampler) inside a larger program
        drawn = lax.optimization_barrier(jax.random.normal(draw_key, shape, jnp.float32))
        return p["mean"] + lax.optimization_barrier(p["std"] * drawn)
    return jnp.full(shape, p["value"], jnp.float32)


NORM_PER = ("out", "in")  # rescale each output unit's filter, or each input's (a dictionary's atoms)
W_NORM_HELP = {
    "w_norm": ("float", 0.0, "extension beyond ngclearn (0: off): after each evolve (after the clip and the mask), "
                             "rescale each filter to L2 norm w_norm: W / (||W|| + 1e-8) * w_norm"),
    "w_norm_per": ("str", "out", "which filters w_norm rescales: 'out' (one per output unit or channel) or 'in' (one "
                                 "per input unit or channel: a dictionary's atoms in sparse coding)"),
}


def check_w_norm(config: Any) -> None:
    """Validate (in place, in a config's ``__post_init__``) the optional filter normalisation fields."""
    object.__setattr__(config, "w_norm", require_float("w_norm", config.w_norm, 0.0))
    object.__setattr__(config, "w_norm_per", require_choice("w_norm_per", config.w_norm_per, NORM_PER))


def normalized(weights: jax.Array, norm: float, axes: tuple[int, ...]) -> jax.Array:
    """Each filter of ``weights`` (the slices left after reducing ``axes``) rescaled to L2 norm ``norm``: what
    a sparse-coding loop does after each update, as it writes it (divide by the norm plus 1e-8)."""
    return weights / (jnp.sqrt(jnp.sum(weights * weights, axis=axes, keepdims=True)) + 1e-8) * norm


def make_reset(fields: Mapping[str, str]) -> Operation:
    """The reset operation of a kind: each field is zeroed. ``"in"``/``"out"`` fields are signals, zeroed at
    ``config.batch_size`` (a call at a large batch does not leave its signals resident; ngclearn's reset also
    restores the construction batch); ``"same"`` fields keep their shape. The rest stays."""

    def _reset(config: Any, state: Any) -> Any:
        return state._replace(**{
            name: jnp.zeros_like(getattr(state, name)) if space == "same"
            else jnp.zeros((config.batch_size, *config.trailing(space)), jnp.float32)
            for name, space in fields.items()})

    signals = [name for name, space in fields.items() if space != "same"]
    others = [name for name, space in fields.items() if space == "same"]
    doc = f"zero {', '.join(signals)} at the configured batch_size" + (f"; zero {', '.join(others)}" if others else "")
    return Operation("reset", jax.jit(_reset, static_argnums=0, donate_argnums=1), (), (),
                     f"{doc}; keep weights, biases, optimizer state")


def state_nbytes_of(init: Callable[..., Any]) -> Callable[[Any], int]:
    """A kind's ``state_nbytes`` from the shapes of a fresh state (traced: nothing is allocated)."""

    def nbytes(config: Any) -> int:
        shapes = jax.eval_shape(functools.partial(init, config, 0))
        return int(sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(shapes)))

    return nbytes
