"""What every kind shares: the operation table, tensor checks, compartment access.

A kind is pure: a frozen, hashable config (jit-static), a ``NamedTuple`` state
with one field per compartment, and pure functions over them. It knows nothing
of HTTP, names or locks; the registry owns mutation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from synapse_serve.errors import InvalidConfig, ShapeMismatch, UnknownOperation

# Floating dtypes a tensor argument may arrive in; each is cast to float32.
_CASTABLE_FLOATS = {"float16", "bfloat16", "float32", "float64"}
_FLOAT32 = np.dtype(np.float32)


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
    """A synapse kind: its config type, init, operations and help."""

    name: str
    description: str
    parse_config: Callable[[Mapping[str, Any]], Any]
    init: Callable[..., Any]
    operations: Mapping[str, Operation]
    help: Callable[[Any], dict]
    batched_compartments: frozenset[str]
    state_nbytes: Callable[[Any], int]  # bytes of a fresh state of a config, known before it is built
    choose_filter_update: Callable[..., Any] | None = None  # (config, platform, device) -> config


def check_tensor(arg: str, value: Any, trailing: tuple[int, ...], batch: int | None = None) -> np.ndarray:
    """Return ``value`` as a float32 ``(batch, *trailing)`` array or raise ShapeMismatch.

    Any floating dtype is accepted and cast to float32 (the state's dtype);
    integer, bool and complex tensors are rejected, as is any other shape.
    """
    array = np.asarray(value)
    if (array.dtype == _FLOAT32 and array.ndim == 1 + len(trailing) and array.shape[1:] == tuple(trailing)
            and array.shape[0] >= 1 and (batch is None or array.shape[0] == batch)):
        return array  # the common case, without the general checks below
    expected = f"(batch, {', '.join(map(str, trailing))})" if batch is None else str((batch, *trailing))
    if array.dtype.name not in _CASTABLE_FLOATS:
        raise ShapeMismatch(
            f"{arg}: expected a floating tensor of shape {expected} (float32, or float16/bfloat16/float64 "
            f"cast to float32), received dtype {array.dtype.name}",
            argument=arg, expected_shape=expected, received_dtype=array.dtype.name,
        )
    ok = array.ndim == 1 + len(trailing) and array.shape[1:] == tuple(trailing) and array.shape[0] >= 1
    if ok and batch is not None and array.shape[0] != batch:
        ok = False
    if not ok:
        raise ShapeMismatch(
            f"{arg}: expected shape {expected}, received {tuple(array.shape)}",
            argument=arg, expected_shape=expected, received_shape=list(array.shape),
        )
    return array.astype(np.float32, copy=False)


def compartment_paths(state: Any) -> dict[str, Any]:
    """Flatten a state pytree into ``{"weights": …, "opt_state/1/mu/0": …}``."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return dict(zip(_leaf_names(treedef), leaves))


@functools.lru_cache(maxsize=256)
def _leaf_names(treedef: Any) -> tuple[str, ...]:
    """The path names of a state structure's leaves; computed once per structure (it never changes)."""
    paths = jax.tree_util.tree_flatten_with_path(jax.tree_util.tree_unflatten(treedef, [0] * treedef.num_leaves))[0]
    return tuple("/".join(_key_name(k) for k in path) for path, _ in paths)


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def replace_compartment(kind: Kind, state: Any, name: str, value: Any) -> Any:
    """Return ``state`` with compartment ``name`` replaced, shape and dtype checked.

    Batched compartments (inputs, outputs, …) may change their batch size;
    every other compartment must keep its exact shape and dtype.
    """
    leaves = compartment_paths(state)
    if name not in leaves:
        raise UnknownOperation(
            f"unknown compartment {name!r}; this {kind.name} has: {', '.join(sorted(leaves))}",
            compartment=name,
        )
    current = leaves[name]
    array = np.asarray(value)
    if name in kind.batched_compartments:
        new = check_tensor(name, array, tuple(current.shape[1:]))
    else:
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
    old_leaves, treedef = jax.tree_util.tree_flatten(state)
    leaves_list = [jax.numpy.asarray(new) if n == name else leaf for n, leaf in zip(_leaf_names(treedef), old_leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves_list)


# --- config field validation helpers (messages name field, value and what is allowed) ---


def require_int(field: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidConfig(f"{field}: expected an integer, received {value!r}", field=field)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidConfig(f"{field}: {value} is not allowed; it must be {allowed}", field=field)
    return int(value)


def require_float(field: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidConfig(f"{field}: expected a number, received {value!r}", field=field)
    value = float(value)
    if not math.isfinite(value):
        raise InvalidConfig(f"{field}: {value} is not allowed; it must be finite", field=field)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(
            b for b in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "") if b
        )
        raise InvalidConfig(f"{field}: {value} is not allowed; it must be {bounds}", field=field)
    return value


def require_bool(field: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidConfig(f"{field}: expected true or false, received {value!r}", field=field)
    return bool(value)


def require_choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise InvalidConfig(
            f"{field}: {value!r} is not allowed; choose one of {', '.join(choices)}", field=field
        )
    return value.lower()


def parse_dataclass(cls: type, data: Mapping[str, Any], aliases: Mapping[str, str]) -> Any:
    """Build config ``cls`` from a mapping; unknown keys and alias clashes are errors."""
    if not isinstance(data, Mapping):
        raise InvalidConfig(f"config: expected an object, received {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        target = aliases.get(key, key)
        if target not in fields:
            raise InvalidConfig(
                f"config: unknown field {key!r}; allowed fields are {', '.join(sorted(fields | set(aliases)))}",
                field=key,
            )
        if target in kwargs:
            raise InvalidConfig(f"config: {key!r} and its other name both given; use {target!r} only", field=key)
        kwargs[target] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise InvalidConfig(f"config: {exc}") from None


def state_from_compartments(kind: Kind, config: Any, seed: int, arrays: Mapping[str, Any]) -> Any:
    """Rebuild a state pytree from ``compartment_paths``-named arrays (a stored or imported instance).

    Every compartment must be present with the dtype of a fresh state, and the
    same shape (batched compartments may differ in batch only).
    """
    template = kind.init(config, seed)
    template_leaves, treedef = jax.tree_util.tree_flatten(template)
    names = _leaf_names(treedef)
    missing, extra = set(names) - set(arrays), set(arrays) - set(names)
    if missing or extra:
        raise InvalidConfig(
            f"compartments do not match a {kind.name}: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    leaves = []
    for name, leaf in zip(names, template_leaves):
        value = np.asarray(arrays[name])
        same_shape = value.shape == leaf.shape or (
            name in kind.batched_compartments and value.ndim == leaf.ndim and value.shape[1:] == leaf.shape[1:]
        )
        if value.dtype != leaf.dtype or not same_shape:
            raise InvalidConfig(
                f"compartment {name}: expected {leaf.dtype.name} {tuple(leaf.shape)}, found "
                f"{value.dtype.name} {tuple(value.shape)}"
            )
        leaves.append(jax.numpy.array(value))  # a device buffer of its own: states are donated
    return jax.tree_util.tree_unflatten(treedef, leaves)
