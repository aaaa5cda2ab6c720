"""One instance: its typed key, its record (state, version, counters), references and its idempotency cache.

Nothing here locks or stores: the registry holds each instance's lock while it reads or
changes one, and ``commit`` is the one place a mutation lands.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from synapse_serve import NGCLEARN_VERSION, __version__
from synapse_serve.errors import AnswerNotKept, IdempotencyKeyReused, PreconditionFailed
from synapse_serve.kinds import Kind
from synapse_serve.kinds.base import compartment_paths
from synapse_serve.local.history import LEARNING_OPERATIONS, History
from synapse_serve.local.stack import Stack
from synapse_serve.names import CompartmentRef, InstanceKey
from synapse_serve.store import APPLIED_KEPT, Record

IDEMPOTENCY_KEYS_KEPT = 128  # per instance: its most recent keyed calls (retries come soon)
PLANS_KEPT = 32  # per instance: plans of its recent call shapes, and the argument shapes checked
KEY_SCHEDULE = ("ngclearn's: key = PRNGKey(seed mod 2**32) (the key compartment); the initial draws come from "
                "split(key, 4) as ngclearn's constructors take them (dense: weights, mask, biases from parts 1-3; "
                "deconvolution: filters from part 1, biases from part 3)")


@dataclass(eq=False)
class Instance:
    """One named synapse: its kind, immutable config, current state and bookkeeping.

    ``state`` is None until the instance is built (its name is reserved meanwhile) and again
    once it is deleted: a caller that waited for its lock then finds it gone. While the instance
    is a member of a ``Stack`` (``slot``), its state is a row of the stack's arrays, and reading
    ``state`` gives it its own again (``local/stack.py``).
    """

    key: InstanceKey
    kind: Kind
    config: Any
    seed: int
    device: jax.Device  # where its state lives; every call on it runs there
    durability: str | None = None  # its own mode; None follows the server's
    _state: Any = field(default=None, repr=False)
    slot: tuple[Stack, int] | None = field(default=None, repr=False)  # (stack, position) while stacked
    version: int = 1
    stored_version: int = 0  # the version last written to the store
    counters: dict[str, int] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    held_bytes: int = 0  # the state bytes capacity counts for it (its real size, kept current)
    signature: tuple = ()  # (shape, dtype) of every compartment: says what a call will allocate
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    waiting: int = 0  # calls queued for its lock
    answers: IdempotencyCache | None = field(default=None, repr=False)
    plans: dict[tuple, Any] = field(default_factory=dict, repr=False)  # its calls' plans and checked shapes (a few)
    history: History | None = field(default=None, repr=False)  # samples after learning calls (None: not kept)
    running: dict[str, Any] | None = None  # what the call holding its lock runs, and since when
    # version and counters when that call began: what a description read meanwhile says (a call's new version is
    # not acknowledged, nor in sync mode stored, until it ends: a reader must never see it before)
    settled: tuple[int, dict[str, int]] = (0, {})
    # this instance and no other of its name (one deleted, re-created or imported under it): what a measured cost
    # is of
    serial: int = field(default_factory=itertools.count(1).__next__, repr=False)

    @property
    def state(self) -> Any:
        """Its state (the caller holds its lock): its own buffers, taken out of its stack first if it is in one."""
        slot = self.slot
        if slot is not None:
            slot[0].detach(slot[1])
        return self._state

    @state.setter
    def state(self, state: Any) -> None:
        slot = self.slot
        if slot is not None:
            slot[0].detach(slot[1], keep=False)
        self._state = state

    @property
    def live(self) -> bool:
        """Built and not deleted (without taking it out of a stack)."""
        return self._state is not None or self.slot is not None

    def attach(self, stack: Stack, position: int) -> None:
        """Its state is now row ``position`` of ``stack`` (``Stack.form``, under its lock)."""
        self._state, self.slot = None, (stack, position)

    def detach(self, state: Any) -> None:
        """Its own state again (``Stack.detach``): set before the slot is cleared."""
        self._state = state
        self.slot = None

    def host_state(self) -> Any:
        """Its state for reading on the host (the store's record): a stack's row as numpy views, without taking
        it out of the stack; otherwise its own state."""
        slot = self.slot
        if slot is not None:
            host = slot[0].host_state(slot[1])
            if host is not None:
                return host
        return self._state

    def layout(self) -> Any:
        """Its state's structure, shapes and dtypes (a description's), without taking it out of a stack."""
        slot = self.slot
        if slot is not None:
            layout = slot[0].layout()
            if layout is not None:
                return layout
        return self._state

    def learning_steps(self) -> int:
        """How many weight updates it has applied (evolve and step calls, every step of a sequence)."""
        return sum(self.counters.get(op, 0) for op in LEARNING_OPERATIONS)

    def remember_plan(self, key: tuple, plan: tuple) -> None:
        """Keep a plan for this instance's next calls of the same shapes (bounded: shapes vary little)."""
        if len(self.plans) >= PLANS_KEPT:
            self.plans.pop(next(iter(self.plans)))
        self.plans[key] = plan

    def check_version(self, expected: int | None) -> None:
        """412 unless ``expected`` (from If-Match) is None or the current version."""
        if expected is not None and expected != self.version:
            raise PreconditionFailed(
                f"instance {self.key.name!r} is at version {self.version}, not {expected} (If-Match)",
                current_version=self.version,
            )

    def record(self) -> Record:
        """What a file needs to continue exactly; the arrays are the device's (call under the lock, write before
        releasing it: the next call donates them)."""
        return Record(kind=self.kind.name, config=self.config.to_dict(), seed=self.seed, version=self.version,
                      counters=dict(self.counters), created_at=self.created_at, saved_at=time.time(),
                      durability=self.durability, owner=self.key.owner, arrays=compartment_paths(self.host_state()),
                      provenance=self.provenance(), applied=self.answers.recent() if self.answers else None)

    def provenance(self) -> dict[str, Any]:
        """Where the numbers come from: in every description and every file written of the instance."""
        return {"service": f"synapse-serve {__version__}", "kind": self.kind.name,
                "follows": f"ngclearn {NGCLEARN_VERSION}", "jax": jax.__version__, "device": device_name(self.device),
                "seed": self.seed, "key_schedule": KEY_SCHEDULE}

    def describe(self, durability: str, *, meanwhile: bool = False) -> dict[str, Any]:
        """Kind, config, compartment shapes and dtypes, device, counters, version, and what runs on it now (under
        the lock; or, ``meanwhile``, without it while a call runs: the version and counters from before that call)."""
        leaves = compartment_paths(self.layout())
        version, counters = self.settled if meanwhile else (self.version, self.counters)
        return {
            "name": self.key.name,
            "owner": self.key.owner,
            "durability": durability,
            "kind": self.kind.name,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "device": device_name(self.device),
            "version": version,
            "counters": dict(counters),
            "compartments": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in leaves.items()},
            "state_bytes": self.held_bytes,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "running": self.running,
            "history_length": 0 if self.history is None else self.history.length,
            "provenance": self.provenance(),
        }


def device_name(device: jax.Device) -> str:
    """``platform:id``, e.g. ``cpu:0`` or ``cuda:1``."""
    return f"{device.platform}:{device.id}"


def signature_of(state: Any) -> tuple:
    """(shape, dtype) of every leaf of a state, in leaf order."""
    return tuple((tuple(leaf.shape), leaf.dtype) for leaf in jax.tree_util.tree_leaves(state))


def nbytes_of(signature: tuple) -> int:
    """Bytes of a state of this signature (``math.prod``: numpy's costs ~2 µs a leaf, a write measured ~25 µs)."""
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in signature)


def answer_nbytes(answer: dict[str, Any]) -> int:
    return int(sum(getattr(v, "nbytes", 0) for v in answer.values()))


def plain_option(value: Any) -> Any:
    """A 0-d array (a frame's tensor, a numpy scalar) as the Python number or bool it holds; anything else as is.
    A sequence's options mean the same however they were spelled."""
    if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0 and value.dtype.kind in "biu":
        return value.item()
    return value


def fingerprint(operation: str, args: list[Any], returned: list[str], sequence: Any = None) -> str:
    """What a keyed request asked for, so a key reused for another request is caught.

    Tensors are hashed in place (their own buffers, no copy). A sequence's options (checked) count by what they
    ask, not how: ``{}``, ``{"every": 1}`` and ``{"last": false}`` are the same request as none, and ``every`` sent
    as a 0-d tensor the same as the number.
    """
    sequence = {name: plain_option(value) for name, value in (sequence or {}).items()}
    asked = {name: value for name, value in sequence.items()
             if (name, value) not in (("every", 1), ("last", False))}  # the defaults
    options = f"|{sorted(asked.items())!r}" if asked else ""
    digest = hashlib.sha256(f"{operation}|{returned}{options}".encode())
    for array in args:
        if array is None or isinstance(array, CompartmentRef):
            digest.update(f"-{array!r}".encode())
        else:
            array = np.asarray(array)
            digest.update(f"|{array.dtype.str}{array.shape}|".encode())
            digest.update(memoryview(array if array.flags.c_contiguous else np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


class _Entry:
    __slots__ = ("fingerprint", "version", "answer", "nbytes")

    def __init__(self, fingerprint: str, version: int, answer: dict[str, Any], nbytes: int) -> None:
        self.fingerprint, self.version, self.answer, self.nbytes = fingerprint, version, answer, nbytes


class AnswerBudget:
    """Bytes of stored answers across all instances; over the budget, the oldest answers' tensors of the owner who
    keeps the most bytes go — so one owner's keyed calls never push out another's answers while that other keeps
    less than they do (a red-team run: alice's three keyed forwards cost bob the answer his retry needed).

    An entry whose answer went keeps its key and fingerprint: a retry is still applied only once
    (AnswerNotKept instead of running again). Thread-safe.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._owners: dict[str, _OwnerAnswers] = {}  # the owners with answers kept, each's oldest first
        self._lock = threading.Lock()

    def add(self, owner: str, entry: _Entry) -> None:
        with self._lock:
            kept = self._owners.get(owner)
            if kept is None:
                kept = self._owners[owner] = _OwnerAnswers(owner)
            kept.order[id(entry)] = entry
            kept.used += entry.nbytes
            self.used += entry.nbytes
            while self.used > self.max_bytes:
                largest = max(self._owners.values(), key=lambda answers: answers.used)
                _, oldest = largest.order.popitem(last=False)
                self._drop(largest, oldest)

    def forget(self, owner: str, entry: _Entry) -> None:
        with self._lock:
            kept = self._owners.get(owner)
            if kept is not None and kept.order.pop(id(entry), None) is not None:
                self._drop(kept, entry)

    def _drop(self, kept: _OwnerAnswers, entry: _Entry) -> None:
        self.used -= entry.nbytes
        kept.used -= entry.nbytes
        entry.nbytes = 0
        if entry.answer is not None and len(entry.answer) > 1:  # {"version"} alone costs nothing to keep
            entry.answer = None
        if not kept.order:
            self._owners.pop(kept.owner, None)


class _OwnerAnswers:
    __slots__ = ("owner", "order", "used")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.order: OrderedDict[int, _Entry] = OrderedDict()
        self.used = 0


class IdempotencyCache:
    """An instance's answers to its most recent keyed calls (at most IDEMPOTENCY_KEYS_KEPT keys)."""

    def __init__(self, budget: AnswerBudget, owner: str) -> None:
        self.budget, self.owner = budget, owner
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def replay(self, key: str, fingerprint_: str) -> _Entry | None:
        """The entry of an earlier call with ``key``, or None; IdempotencyKeyReused if it asked something else."""
        entry = self._entries.get(key)
        if entry is not None and entry.fingerprint != fingerprint_:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {key[:64]!r} was used for a different request on this instance; use a new key "
                "for a new request")
        return entry

    @staticmethod
    def answer_of(entry: _Entry, name: str) -> dict[str, Any]:
        if entry.answer is None:
            raise AnswerNotKept(
                f"this Idempotency-Key's call was applied once to {name!r} (version {entry.version}); its answer "
                "is no longer kept (the server bounds stored answers by bytes), and it is not run again: read the "
                "compartments you need", version=entry.version)
        return entry.answer

    def remember(self, key: str, fingerprint_: str, answer: dict[str, Any]) -> None:
        entry = _Entry(fingerprint_, answer["version"], answer, answer_nbytes(answer))
        old = self._entries.pop(key, None)
        if old is not None:
            self.budget.forget(self.owner, old)
        self._entries[key] = entry
        self.budget.add(self.owner, entry)
        while len(self._entries) > IDEMPOTENCY_KEYS_KEPT:
            _, dropped = self._entries.popitem(last=False)
            self.budget.forget(self.owner, dropped)

    def recent(self) -> list[dict[str, Any]]:
        """The most recent keyed calls (at most APPLIED_KEPT), for the instance's file: after a restart their
        retries are answered from there, not applied again."""
        newest = list(self._entries.items())[-APPLIED_KEPT:]
        return [{"key": key, "fingerprint": entry.fingerprint, "version": entry.version,
                 "whole": entry.answer is not None and entry.answer.keys() == {"version"}} for key, entry in newest]

    def restore(self, applied: list[dict[str, Any]]) -> None:
        """Remember the keyed calls a stored file says were applied (a restarted server or shard)."""
        for item in applied:
            answer = {"version": item["version"]} if item["whole"] else None
            self._entries[item["key"]] = _Entry(item["fingerprint"], item["version"], answer, 0)

    def clear(self) -> None:
        for entry in self._entries.values():
            self.budget.forget(self.owner, entry)
        self._entries.clear()
