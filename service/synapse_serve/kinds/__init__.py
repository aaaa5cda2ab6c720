"""The synapse kinds: pure JAX configs, states and operations, one file each.

Adding a kind is one new file exposing ``KIND`` plus one line in ``KINDS``.
Kinds come only from this fixed table: nothing the network sends can import code.
"""

from __future__ import annotations

from synapse_serve.errors import NotFound
from synapse_serve.kinds import deconv, dense, hebbian, hebbian_deconv
from synapse_serve.kinds.base import Kind, Operation, TensorArg

KINDS: dict[str, Kind] = {
    deconv.KIND.name: deconv.KIND,
    hebbian_deconv.KIND.name: hebbian_deconv.KIND,
    dense.KIND.name: dense.KIND,
    hebbian.KIND.name: hebbian.KIND,
}


def get_kind(name: str) -> Kind:
    """The kind called ``name``, or NotFound listing the known kinds."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise NotFound(f"unknown kind {name!r}; known kinds: {', '.join(KINDS)}", kind=str(name)) from None


__all__ = ["KINDS", "Kind", "Operation", "TensorArg", "get_kind"]
