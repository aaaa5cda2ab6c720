"""Same-config instances kept stacked, so that packed calls on them need one buffer per compartment.

A packed call on separate instances passes every instance's compartments into its device call
and gets every instance's new compartments back: one buffer each way per instance and
compartment, which is most of what a packed call on many small instances costs (256 tiny
forwards: ~1.1 ms of a 2.8 ms device call splitting the outputs alone, docs/benchmarks.md). When
the same instances are packed again, the registry keeps their states stacked (``Stack``): one array per
compartment with a leading member axis, and the next packed call on them, in the same order,
runs on those arrays directly (``kinds/packed.py``'s ``run_stacked``) and leaves its results
stacked.

A member gets its own state back (``detach``: its row, one small device call) as soon as anything
but such a packed call needs it: a single call, a write, a reference, a delete. Reads that need
only host copies (the store's record, a compartment read, statistics, a description's shapes)
take them from the stack and leave the member in it. The next packed call on the whole list puts
detached members back (``readmit``: one call for all of them) if their compartments still have the
stack's shapes; otherwise it runs the usual way. Once fewer than half the members are in, the
rest are detached too, so a stack never keeps more than half its rows alive for nothing. Those
rows (of members taken out or deleted) are held memory the members' own counts miss: while the
stack holds them, their owner's quota and the device's budget count them too — checked like any
growth: a member taken out when its row would not fit them empties the stack instead (every
member its own state, the stacked arrays gone), so a quota is never exceeded by taking out.

Locking: a stack's arrays are replaced only by a packed call that holds every member's lock, and
a member is detached only by the holder of its own lock; the stack's own lock orders detaching
against reading its host copies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import numpy as jnp

from synapse_serve.errors import DeviceFull, QuotaExceeded


class Stack:
    """The states of ``members`` (one kind, config, device and signature), leaf by leaf, stacked in order."""

    def __init__(self, members: list[Any], treedef: Any, leaves: list[Any], row_bytes: int = 0,
                 charge: Callable[[int, int, bool], None] | None = None) -> None:
        self.members = members
        self.treedef = treedef
        self._leaves = leaves  # replaced (never changed in place) by each packed call on the stack
        self.lock = threading.Lock()
        self.attached = len(members)
        self.released = False  # emptied by a packed call that ran the usual way (not by calls on its members)
        self._host: list[np.ndarray] | None = None  # host copies of the leaves, until they are replaced
        # the rows of members no longer in (taken out, deleted) stay in the stacked arrays until the stack empties:
        # held memory the members' own counts miss, so their owner is charged for them meanwhile
        self._row_bytes, self._charge, self._charged = row_bytes, charge, 0

    @property
    def leaves(self) -> list[Any]:
        """The stacked leaves, in the treedef's order (empty once no member is in)."""
        return self._leaves

    def replace(self, leaves: list[Any], row_bytes: int) -> None:
        """The leaves a packed call on the stack left (under every member's lock), each row now ``row_bytes`` (a call
        at a larger batch grows every row: what a member taken out later leaves behind is charged at that size)."""
        with self.lock:
            self._leaves, self._host, self._row_bytes = leaves, None, row_bytes
            self._account()

    def _account(self, *, check: bool = False) -> bool:
        """Charge the owner for the rows of members no longer in, while the stacked arrays hold them (under
        ``lock``); with ``check``, False (nothing charged) where the growth would go over a quota or the budget."""
        wanted = (len(self.members) - self.attached) * self._row_bytes if self._leaves else 0
        if self._charge is not None and wanted != self._charged:
            try:
                self._charge(self._charged, wanted, check)
            except (QuotaExceeded, DeviceFull):
                return False
            self._charged = wanted
        return True

    @classmethod
    def form(cls, members: list[Any], states: list[Any], charge: Callable[[int, int], None] | None = None
             ) -> Stack:
        """Stack the members' states (under every member's lock) and attach them; their own buffers go."""
        treedef = jax.tree_util.tree_structure(states[0])
        flat = [treedef.flatten_up_to(state) for state in states]
        leaves = [_column(list(column)) for column in zip(*flat)]  # one compiled concatenation per compartment
        stack = cls(list(members), treedef, leaves, members[0].held_bytes, charge)
        for position, member in enumerate(members):
            member.attach(stack, position)
        return stack

    def detach(self, position: int, *, keep: bool = True) -> None:
        """Give the member at ``position`` its own state again (under its lock; without ``keep`` its row is dropped,
        as when its state is replaced anyway). Fewer than half the members left, or the row it leaves behind over
        its owner's quota or the device's budget: the rest are detached too (the stacked arrays go)."""
        with self.lock:
            member = self.members[position]
            if member.slot is None or member.slot[0] is not self:
                return
            member.detach(self.treedef.unflatten(_row(self.leaves, position)) if keep else None)
            self.attached -= 1
            if 0 < self.attached * 2 < len(self.members) or (self.attached and not self._account(check=True)):
                for at, other in enumerate(self.members):  # their holders wait on this lock to read them
                    if other.slot is not None and other.slot[0] is self:
                        other.detach(self.treedef.unflatten(_row(self.leaves, at)))
                self.attached = 0
            if self.attached == 0:
                self._leaves, self._host = [], None
            self._account()

    def release(self) -> None:
        """Detach every member still in: a packed call on them runs the usual way (members outside that call are
        detached without their locks, as ``detach`` does once fewer than half are in)."""
        with self.lock:
            for at, member in enumerate(self.members):
                if member.slot is not None and member.slot[0] is self:
                    member.detach(self.treedef.unflatten(_row(self.leaves, at)))
            self.attached, self.released = 0, True
            self._leaves, self._host = [], None
            self._account()

    def readmit(self, signature: tuple) -> bool:
        """Put every detached member back in (under every member's lock), or say False if one cannot be: gone, or
        its compartments no longer of the stack's ``signature``."""
        detached = [(at, m) for at, m in enumerate(self.members) if m.slot is None or m.slot[0] is not self]
        if not detached:
            return True
        if self.attached == 0 or any(not m.live or m.slot is not None or m.signature != signature
                                     for _, m in detached):
            return False
        # one call for all of them, their count padded to a power of two (one compiled program per size class;
        # the padding repeats the first row at its own place)
        positions = [at for at, _ in detached]
        rows = [self.treedef.flatten_up_to(member.state) for _, member in detached]
        padding = (1 << (len(rows) - 1).bit_length()) - len(rows)
        leaves = _put_rows(self.leaves, np.asarray(positions + positions[:1] * padding, np.int32),
                           rows + rows[:1] * padding)
        with self.lock:
            self._leaves, self._host = leaves, None
            for at, member in detached:
                member.attach(self, at)
            self.attached = len(self.members)
            self._account()
        return True

    def host_state(self, position: int) -> Any | None:
        """Host copies of one member's compartments (numpy views of one host copy of each stacked leaf); None once
        it is detached (it has its own state then)."""
        with self.lock:
            member = self.members[position]
            if member.slot is None or member.slot[0] is not self:
                return None
            if self._host is None:
                self._host = [np.asarray(leaf) for leaf in self._leaves]
            return self.treedef.unflatten([leaf[position] for leaf in self._host])

    def layout(self) -> Any | None:
        """A member's state as shapes and dtypes only (no values); None once no member is in."""
        leaves = self._leaves
        if not leaves:
            return None
        return self.treedef.unflatten([jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype) for leaf in leaves])

    def holds(self, instances: list[Any]) -> bool:
        """Whether ``instances`` are exactly the members, in order (attached or not)."""
        return len(instances) == len(self.members) and all(a is b for a, b in zip(instances, self.members))


@jax.jit
def _column(values: list[Any]) -> Any:
    return jnp.stack(values)


@jax.jit
def _row(leaves: list[Any], position: Any) -> list[Any]:
    return [leaf[position] for leaf in leaves]


@jax.jit
def _put_rows(leaves: list[Any], positions: Any, rows: list[list[Any]]) -> list[Any]:
    return [leaf.at[positions].set(jnp.stack(column)) for leaf, column in zip(leaves, zip(*rows))]
