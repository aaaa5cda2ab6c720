"""Packed calls: one operation on many instances of one owner in one go, all applied or none.

Instances of one kind, config and shapes run as one device call (``kinds/packed.py``), and a list
of instances packed again is kept stacked (``local/stack.py``): its next packed calls run on the
stack's arrays. Each instance ends as a separate call would leave it — the same numbers (bit for
bit but for the cases docs/conformance.md names), version, counters, history and idempotency.

Part of the registry in a file of its own: ``PackedCalls`` composes the registry's own steps of a
call (``_get``, ``_hold_all``, ``_commit``, ``_advance``), its planner (``local/planning.py``: arguments
bound and checked, plans) and its capacity and persistence, so a packed call is checked, locked, committed and
stored exactly as a call is; it adds only what packing needs.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from synapse_serve.errors import (
    AnswerNotKept,
    InvalidRequest,
    ShapeMismatch,
    SynapseServeError,
    UnknownOperation,
)
from synapse_serve.kinds import lean
from synapse_serve.kinds.packed import run_packed, run_stacked
from synapse_serve.local.device import device_call, reads_caller_memory
from synapse_serve.local.history import LEARNING_OPERATIONS, sample_stacked
from synapse_serve.local.instance import Instance, fingerprint
from synapse_serve.local.stack import Stack
from synapse_serve.names import CompartmentRef, InstanceKey

if TYPE_CHECKING:
    from synapse_serve.local.registry import Registry

PACKS_REMEMBERED = 64  # instance lists packed lately: the second packed call on one stacks its instances ...
PACK_RUNS_AT_MOST = 64  # ... or, each time its stack was emptied by calls on its members, twice as many, up to this


class PackedCalls:
    """A registry's packed calls (``Registry.call_many`` and ``Registry.call_stacked`` are these), and the instance
    lists packed lately, from which populations are stacked."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        # instance lists packed lately: (usual runs since the last stack, runs needed to stack, the last stack)
        self._packs_seen: OrderedDict[tuple[InstanceKey, ...], tuple[int, int, Stack | None]] = OrderedDict()
        self._lock = threading.Lock()  # guards _packs_seen

    def call_many(self, keys: list[InstanceKey], operation: str, tensors: list[Mapping[str, Any]],
                  returns: list[str] | None = None, *, idempotency_key: str | None = None) -> list[dict[str, Any]]:
        """One operation on many instances in one go: all applied, or none (every check comes first).

        Instances of one kind, config and shapes run as one device call (``kinds/packed.py``); each
        answer equals a separate call's (the version, counters and idempotency of each instance as if
        it had been called alone). A repeated ``idempotency_key`` returns the first answers. An error
        names the call it is about (``calls[3] ('enc-3'): …``).
        """
        return self._packed(keys, operation, tensors, returns, idempotency_key, stacked=False)

    def call_stacked(self, keys: list[InstanceKey], operation: str, tensors: Mapping[str, Any],
                     returns: list[str] | None = None, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """``call_many`` with each tensor stacked along a leading instance axis: ``tensors[arg][i]`` is the i-th
        instance's, and the answer is ``{"versions": [v_0, …], <compartment>: (len(keys), …), …}``, each
        compartment the instances' answers stacked in the same order (so they must agree in shape: checked before
        anything runs). The same checks, all or none, and the same idempotency as ``call_many``."""
        split = []
        for name, value in tensors.items():
            if isinstance(value, CompartmentRef):
                raise InvalidRequest(f"{name}: a stacked call takes tensors, not references", argument=name)
            if value is not None and (np.ndim(value) < 1 or np.shape(value)[0] != len(keys)):
                raise ShapeMismatch(f"{name}: expected a leading axis of {len(keys)} (one slice per instance, in the "
                                    f"order of the names), received shape {tuple(np.shape(value))}", argument=name)
            split.append((name, None if value is None else np.asarray(value)))
        per_instance = [{name: None if value is None else value[i] for name, value in split} for i in range(len(keys))]
        return self._packed(keys, operation, per_instance, returns, idempotency_key, stacked=True, whole=dict(split))

    def _packed(self, keys: list[InstanceKey], operation: str, tensors: list[Mapping[str, Any]],
                returns: list[str] | None, idempotency_key: str | None, *, stacked: bool,
                whole: Mapping[str, Any] | None = None) -> Any:
        """Both forms: every member bound and checked, then every lock taken (in key order), then run on the members'
        stack if they are one, else each on its own state (one device call per group of one plan): all or none."""
        registry = self._registry
        field = "names" if stacked else "calls"
        if not keys:
            raise InvalidRequest(f"{field}: send at least one {'name' if stacked else 'call'}", argument=field)
        most = self._registry.capacity.limits.max_instances  # more would name an instance twice, or one not held
        if len(keys) > most:
            raise InvalidRequest(f"{field}: {len(keys)} instances, more than the {most} the server can hold",
                                 argument=field)
        seen: set[InstanceKey] = set()
        for key in keys:
            if key in seen:
                raise InvalidRequest(f"{field}: instance {key.name!r} appears more than once; a packed call runs "
                                     "each instance once", argument=field)
            seen.add(key)
        # the pack is part of what each instance was asked: the same key on other instances is another request
        pack = {"packed": ",".join(sorted(str(k) for k in keys))} if idempotency_key is not None else None
        bound = []
        with _naming(keys, field) as at:
            for at.index, (key, sent) in enumerate(zip(keys, tensors)):
                instance = registry._get(key)
                op = instance.kind.operations.get(operation)
                if op is None:
                    raise UnknownOperation(f"{instance.kind.name} has no operation {str(operation)[:64]!r}; it has: "
                                           f"{', '.join(instance.kind.operations)}", operation=str(operation)[:64])
                if any(isinstance(value, CompartmentRef) for value in sent.values()):
                    raise InvalidRequest("a packed call takes tensors, not references", argument="calls")
                args, steps = registry.planner.bind(instance, op, sent)
                if steps:
                    raise InvalidRequest("a packed call runs one step per instance; send (batch, …) tensors",
                                         argument="calls")
                returned = list(op.returns if returns is None else returns)
                print_ = fingerprint(operation, args, returned, pack) if idempotency_key is not None else ""
                bound.append((instance, op, args, returned, print_))
        with _naming(keys, field) as at, \
                registry._hold_all([entry[0] for entry in bound], {"operation": operation, "packed": True}, at):
            if idempotency_key is not None:
                entries = self._replay_many(bound, idempotency_key, at)
                if entries is not None:
                    replayed = [instance.answers.answer_of(entry, instance.key.name)
                                for at.index, ((instance, *_), entry) in enumerate(zip(bound, entries))]
                    at.index = None
                    return _stacked(replayed, bound[0][3]) if stacked else replayed
            # the stack of the first member still in one (those taken out may go back in)
            stack = next((entry[0].slot[0] for entry in bound if entry[0].slot is not None), None)
            if stack is not None and not stack.holds([entry[0] for entry in bound]):
                stack = None
            if stack is not None:
                on_stack = self._on_stack(stack, bound, operation, idempotency_key, whole, at)
                if on_stack is not None:
                    return on_stack if stacked else _unstacked_answers(on_stack, bound[0][3])
            answers = self._run_usual(bound, operation, idempotency_key, stacked, at)
            return _stacked(answers, bound[0][3]) if stacked else answers

    def _run_usual(self, bound: list[tuple], operation: str, idempotency_key: str | None, stacked: bool,
                   at: Any) -> list[dict[str, Any]]:
        """The bound calls run the usual way (under every lock): each member's own state in, one device call per
        group of one plan, each member committed, all stored together; their answers."""
        registry = self._registry
        for held in {id(e[0].slot[0]): e[0].slot[0] for e in bound if e[0].slot is not None}.values():
            held.release()  # the usual way reads each member's own state
        planned, resized = [], []
        try:
            for at.index, (instance, op, args, returned, _) in enumerate(bound):
                registry.planner.check_returned(instance, returned)
                signature, nbytes, _, plan = registry.planner.predict(instance, operation, op.fn, args)
                if stacked:
                    _check_stackable(returned, signature, plan, bound[0][3], planned)
                registry.capacity.resize(instance.key.owner, instance.device, instance.held_bytes, nbytes)
                resized.append((instance, nbytes))
                planned.append((signature, nbytes, plan))
            at.index = None
            new_states = self._run_packed(bound, planned)
        except BaseException:
            for instance, nbytes in resized:
                registry.capacity.resize(instance.key.owner, instance.device, nbytes, instance.held_bytes,
                                         check=False)
            raise
        answers = []
        for (instance, _, _, returned, print_), (state, leaves), (signature, nbytes, plan) in zip(
                bound, new_states, planned):
            at_leaf = plan.leaf_index
            result = {c: np.asarray(leaves[at_leaf[c]]) for c in returned}
            registry._commit(instance, state, operation, signature, nbytes, accounted=True)
            answer = {"version": instance.version, **result}
            if idempotency_key is not None:
                instance.answers.remember(idempotency_key, print_, answer)
            answers.append(answer)
        registry.persistence.persist_many([entry[0] for entry in bound])  # all or none across a crash
        self._maybe_stack([entry[0] for entry in bound], planned)
        return answers

    def _on_stack(self, stack: Stack, bound: list[tuple], operation: str, idempotency_key: str | None,
                  whole: Mapping[str, Any] | None, at: Any) -> dict[str, Any] | None:
        """A packed call on a stack's members, in its order, run on the stack's arrays (under every lock, bound and
        checked as any packed call): the stacked answer, or None where it cannot run there (the caller runs it the
        usual way, which takes the members out of the stack).

        The members share kind, config, shapes and so every check's outcome: those are made once, on the first."""
        registry = self._registry
        first, op, args, returned, _ = bound[0]
        shapes = [None if a is None else (a.shape, a.dtype) for a in args]
        if any([None if a is None else (a.shape, a.dtype) for a in entry[2]] != shapes for entry in bound[1:]):
            return None  # tensors of other shapes per instance: the usual way says which
        at.index = 0
        registry.planner.check_returned(first, returned)  # before readmit: a refused call changes no membership
        if not stack.readmit(tuple((tuple(leaf.shape[1:]), leaf.dtype) for leaf in stack.leaves)):
            return None  # a member's compartments changed shape since: the usual way
        signature, nbytes, _, plan = registry.planner.predict(first, operation, op.fn, args)
        if plan is None or not (plan.read or any(a is not None for a in args)):
            return None  # nothing read, nothing sent (a reset): one slice for all, the usual way
        # the stacked form's own tensors where the checks left their slices as they were (float32), else restacked
        tensors = tuple(None if a is None else whole[spec.name]
                        if whole is not None and getattr(whole.get(spec.name), "dtype", None) == a.dtype
                        else np.stack([entry[2][i] for entry in bound])
                        for i, (spec, a) in enumerate(zip(op.args, args)))
        resized = []
        try:
            for at.index, (instance, *_) in enumerate(bound):
                registry.capacity.resize(instance.key.owner, instance.device, instance.held_bytes, nbytes)
                resized.append(instance)
            at.index = None
            leaves = device_call(run_stacked, plan, first.config, stack.leaves, *tensors)
            samples = None
            if operation in LEARNING_OPERATIONS and any(entry[0].history is not None for entry in bound):
                at_leaf = plan.leaf_index
                update = leaves[at_leaf["dWeights"]] if "dWeights" in at_leaf else None
                samples = np.asarray(device_call(sample_stacked, leaves[at_leaf["weights"]], update))
        except BaseException:
            for instance in resized:
                registry.capacity.resize(instance.key.owner, instance.device, nbytes, instance.held_bytes, check=False)
            raise
        stack.replace(leaves, nbytes)
        answer: dict[str, Any] = {c: np.asarray(leaves[plan.leaf_index[c]]) for c in returned}
        if not answer and reads_caller_memory(list(tensors)):  # an answer read means the program has run: else wait
            jax.block_until_ready(leaves)  # (the stacked form's tensors are the caller's arrays in-process)
        versions = []
        for position, (instance, _, _, _, print_) in enumerate(bound):
            registry._advance(instance, operation, signature, nbytes, None if samples is None else samples[position])
            versions.append(instance.version)
            if idempotency_key is not None:  # its own copies: a row must not keep the whole stack's answer alive
                instance.answers.remember(idempotency_key, print_, {
                    "version": instance.version, **{c: np.array(answer[c][position]) for c in returned}})
        registry.persistence.persist_many([entry[0] for entry in bound])  # all or none across a crash
        return {"versions": versions, **answer}

    def _maybe_stack(self, instances: list[Instance], planned: list[tuple]) -> None:
        """Stack the instances of a packed call that ran as one group (one plan, one device) once the same list is
        packed a second time: its next packed calls then run on the stack (``local/stack.py``). A list whose stack
        was emptied by other calls on its members (a loop that mixes packed and separate calls) waits for twice as
        many packed calls the next time: stacking and taking out cost a device call per instance."""
        if len(instances) < 2 or planned[0][2] is None or any(p[2] is not planned[0][2] for p in planned) \
                or any(i.device != instances[0].device for i in instances):
            return
        keys = tuple(instance.key for instance in instances)
        with self._lock:
            runs, needed, last = self._packs_seen.pop(keys, (0, 2, None))
            if last is not None and last.attached == 0 and not last.released:  # emptied by other calls: back off
                runs, needed, last = 0, min(2 * needed, PACK_RUNS_AT_MOST), None
            runs += 1
            self._packs_seen[keys] = (runs, needed, last)
            while len(self._packs_seen) > PACKS_REMEMBERED:
                self._packs_seen.popitem(last=False)
        if runs >= needed:  # device work: not under the registry's lock (the instances' own are held)
            owner, device, capacity = instances[0].key.owner, instances[0].device, self._registry.capacity
            last = Stack.form(instances, [instance.state for instance in instances],
                              lambda old, new, check: capacity.resize(owner, device, old, new, check=check))
            with self._lock:
                if keys in self._packs_seen:
                    self._packs_seen[keys] = (runs, needed, last)

    def _replay_many(self, bound: list[tuple], idempotency_key: str, at: Any) -> list[Any] | None:
        """Each member's entry for this key (under every lock; its first answer, once stored), or None if the call
        never ran on any of them. A key first used for other instances or tensors is refused (422).

        A member without one, beside members with one, had the call applied and its entry left its bounded cache
        (128 keys in memory, 16 in its file): AnswerNotKept (409), nothing run again. In sync mode a packed call's
        members are stored all or none (``Store.save_many``), so no member is stored without the others; a retry
        had run such a member a second time (a red-team run: the evolve applied twice). In interval mode a crash
        may lose a member's last writes, as any instance's: the retry says so rather than guess."""
        entries = []
        for at.index, (instance, _op, _args, _returned, print_) in enumerate(bound):
            entries.append(instance.answers.replay(idempotency_key, print_))
        at.index = None
        if all(entry is None for entry in entries):
            return None
        lost = [position for position, entry in enumerate(entries) if entry is None]
        if lost:
            at.index, kept = lost[0], next(p for p, entry in enumerate(entries) if entry is not None)
            raise AnswerNotKept(
                f"this Idempotency-Key's packed call was applied ({bound[kept][0].key.name!r} keeps it, at version "
                f"{entries[kept].version}), but this member no longer keeps its entry ({len(lost)} of {len(entries)} "
                "members: each keeps its last 128 keys, 16 across a restart) and it is not run again: read the "
                "compartments you need")
        self._registry.persistence.persist_many([instance for instance, *_ in bound])  # acknowledged once stored
        return entries

    @staticmethod
    def _run_packed(bound: list[tuple], planned: list[tuple]) -> list[tuple[Any, list[Any]]]:
        """The new state of every bound call and its leaves: one device call per group of one kind, config, device
        and shapes."""
        groups: dict[tuple, list[int]] = {}
        for position, ((instance, op, args, _, _), (_, _, plan)) in enumerate(zip(bound, planned)):
            shapes = tuple(None if a is None else (a.shape, a.dtype) for a in args)
            groups.setdefault((id(plan), instance.device, shapes), []).append(position)
        new_states: list[Any] = [None] * len(bound)
        for positions in groups.values():
            first, plan = bound[positions[0]], planned[positions[0]][2]
            states = [bound[p][0].state for p in positions]
            # the sent tensors stacked here, on the host: one argument for the device call, not one per instance
            tensors = tuple(None if first[2][a] is None else np.stack([bound[p][2][a] for p in positions])
                            for a in range(len(first[2])))
            out = device_call(run_packed, plan, first[0].config, states, *tensors)
            for p, state in zip(positions, out):
                new_states[p] = state
        return new_states


class _At:
    """Which call of a packed call is being checked (None: the call as a whole)."""

    index: int | None = None


@contextlib.contextmanager
def _naming(keys: list[InstanceKey], field: str = "calls") -> Iterator[_At]:
    """A packed call's error says which of its calls it was about (the one ``at.index`` points to): ``calls[3]``,
    or ``names[3]`` in the stacked form."""
    at = _At()
    try:
        yield at
    except SynapseServeError as exc:
        if at.index is not None:
            exc.detail = f"{field}[{at.index}] ({keys[at.index].name!r}): {exc.detail}"
            exc.args = (exc.detail,)
            exc.extra.setdefault("call", at.index)
        raise


def _check_stackable(returned: list[str], signature: tuple, plan: lean.Plan, first_returned: list[str],
                     planned: list[tuple]) -> None:
    """A stacked call's instances must return the same compartments, each in one shape and dtype (the first's)."""
    if returned != first_returned:
        raise InvalidRequest(f"this instance returns {', '.join(returned)} and names[0] {', '.join(first_returned)}; "
                             "a stacked call returns the same compartments from each (name them in return)",
                             argument="names")
    if not planned:
        return
    first_signature, _, first_plan = planned[0]
    if signature is first_signature and plan is first_plan:  # one config and shapes: one prediction, shared
        return
    for name in returned:
        mine, theirs = signature[plan.leaf_index[name]], first_signature[first_plan.leaf_index[name]]
        if tuple(mine[0]) != tuple(theirs[0]) or np.dtype(mine[1]) != np.dtype(theirs[1]):
            raise InvalidRequest(f"{name} would be {tuple(mine[0])} {mine[1]} here and {tuple(theirs[0])} {theirs[1]} "
                                 "on names[0]; a stacked call returns each compartment stacked, so its instances must "
                                 "agree (pack instances of one config, or use calls)", argument="names")


def _unstacked_answers(stacked: dict[str, Any], returned: list[str]) -> list[dict[str, Any]]:
    """A stacked answer as per-instance answers (row views; a 0-d compartment's an array too, as a separate call
    answers it, never a numpy scalar: the wire writes those as numbers)."""
    return [{"version": version, **{c: stacked[c][i, ...] for c in returned}}
            for i, version in enumerate(stacked["versions"])]


def _stacked(answers: list[dict[str, Any]], returned: list[str]) -> dict[str, Any]:
    """Per-instance answers as one: their versions, and each returned compartment stacked in the same order."""
    stacked: dict[str, Any] = {"versions": [answer["version"] for answer in answers]}
    for name in returned:
        values = [answer[name] for answer in answers]
        if any(value.shape != values[0].shape or value.dtype != values[0].dtype for value in values):
            raise InvalidRequest(f"{name}: the answers kept for this Idempotency-Key differ in shape between "
                                 "instances and cannot be stacked; ask with calls", argument="names")
        stacked[name] = np.stack(values)
    return stacked

