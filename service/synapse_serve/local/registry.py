"""The registry: named instances in this process, their locks, and the one commit path of every mutation.

Calls on one instance are serialized by its lock; calls on different instances run in
parallel (JAX releases the GIL while it computes). Everything a call could be refused for
is checked before its state is touched: arguments, references, If-Match, quotas and device
budgets (a call that would grow the state is measured with ``jax.eval_shape`` first). The new
state replaces the old only on success (``_commit``), and results are copied to host memory
under the lock, before any later call can donate the buffers.

Blocking and synchronous: the async facade (``local/backend.py``) decides which calls run on
the event loop and which on worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np

from synapse_serve.errors import (
    AlreadyExists,
    DamagedFile,
    InvalidConfig,
    InvalidInstanceFile,
    InvalidRequest,
    NotFound,
    NotReady,
    QuotaExceeded,
    ShapeMismatch,
    StorageError,
    SynapseServeError,
    UnknownCompartment,
    UnknownOperation,
)
from synapse_serve.kinds import Kind, get_kind
from synapse_serve.kinds.base import (
    check_finite,
    check_init_ranges,
    close_match,
    check_optimizer_value,
    checked_compartment,
    compartment_paths,
    leaf_names,
    require_int,
    state_from_compartments,
    unknown_compartment,
    with_compartment,
)
from synapse_serve.local.capacity import Capacity, Limits
from synapse_serve.local.device import device_call, reads_caller_memory
from synapse_serve.local.history import LEARNING_OPERATIONS, History, weight_stats
from synapse_serve.local.instance import (
    AnswerBudget,
    IdempotencyCache,
    Instance,
    fingerprint,
    nbytes_of,
    signature_of,
)
from synapse_serve.local.packing import PackedCalls
from synapse_serve.local.planning import Planner
from synapse_serve.local.persistence import Persistence, record_size, shown_failure
from synapse_serve.names import CompartmentRef, InstanceKey, validate_name
from synapse_serve.store import DURABILITY_MODES, CorruptFile, Record, decode, read_header, stream_record

log = logging.getLogger("synapse_serve")
MAX_IMPORTED_COUNT = 2**53  # an imported file's version and counters: room to count, and exact in JSON readers


class Busy(Exception):  # noqa: N818 - a signal, not an error: the facade runs the call on a worker instead
    """A call asked not to wait met a held lock (or an instance whose shapes changed since it looked)."""


class Registry:
    """In-process instances on the JAX devices of this process, kept in a state directory by ``persistence``."""

    def __init__(self, capacity: Capacity | None = None, persistence: Persistence | None = None, *,
                 answer_budget_bytes: int = 256 << 20, history_length: int = 256,
                 history_when_off: bool = False) -> None:
        self.capacity = capacity or Capacity(Limits())
        # statistics samples kept per instance after learning calls (0: none); for durability=off instances only
        # when asked: a sample costs a small device call per learning call, which fast memory-only loops feel
        self.history_length, self.history_when_off = history_length, history_when_off
        self.persistence = persistence or Persistence(None)
        self._instances: dict[InstanceKey, Instance] = {}
        self._lock = threading.Lock()  # guards the dicts and sets, not the instances
        # evicted copies' files: one change at a time (evicting, restoring, discarding), never waiting on an
        # instance's lock while held
        self._evicted_lock = threading.Lock()
        self._evicted_change = threading.Condition(self._evicted_lock)
        self._restoring_evicted: set[InstanceKey] = set()  # names being restored (unevict): one at a time
        self._restoring: set[InstanceKey] = set()  # stored, not loaded yet: their names are not free
        self._unloadable: dict[InstanceKey, str] = {}  # stored files that could not be loaded now
        self.answers = AnswerBudget(answer_budget_bytes)
        self.planner = Planner(self.capacity)  # a call's arguments checked and its plan, before any lock
        self.packed = PackedCalls(self)  # call_many and call_stacked (local/packing.py)
        self.on_evicted: Callable[[list[dict[str, Any]]], None] | None = None  # told what the idle evictor took

    # --- lifecycle of the registry ---

    def open(self) -> int:
        """Lock the state directory and note every stored instance (a listing: quick). Returns how many.

        Until ``load_stored`` brings a name back, calls on it answer 503 and a create of it is refused.
        """
        keys = self.persistence.open()
        with self._lock:
            self._restoring = set(keys)
        self.capacity.set_snapshot_bytes(self.persistence.snapshot_bytes())
        return len(keys)

    def load_stored(self) -> dict[str, str]:
        """Bring back every stored instance, reading only: a file that cannot be used is quarantined (never
        overwritten); one that cannot be loaded now (device or disk trouble) stays in place."""
        with self._lock:
            keys = sorted(self._restoring)
        for key in keys:
            try:
                try:
                    record = self.persistence.load(key)
                except CorruptFile as exc:
                    self.capacity.release_snapshot(key.owner, self.persistence.quarantine(key, str(exc)))
                    continue
                except OSError as exc:
                    self._not_loaded(key, shown_failure(exc))
                    continue
                try:
                    self._add_record(key, record, stored=True)
                except (InvalidRequest, NotFound) as exc:  # an unknown kind, a config or shapes that do not fit
                    self.capacity.release_snapshot(key.owner, self.persistence.quarantine(key, exc.detail))
                except (SynapseServeError, OSError) as exc:
                    self._not_loaded(key, getattr(exc, "detail", None) or shown_failure(exc))
            finally:
                with self._lock:
                    self._restoring.discard(key)
        errors = self.persistence.restore_errors
        log.info("restored %d instances; %d files not loaded", len(self._instances), len(errors))
        return errors

    def _not_loaded(self, key: InstanceKey, reason: str) -> None:
        self.persistence.not_loaded(key, reason)
        with self._lock:
            self._unloadable[key] = reason

    def start_background(self, flush_interval_s: float, evict_idle_after_s: float = 0.0) -> None:
        """The writer (interval mode; in sync mode it retries failed writes) and, if asked, the idle evictor."""
        if self.persistence.store is None:
            return
        self.persistence.start("synapse-flusher", flush_interval_s, self.flush)
        if evict_idle_after_s > 0:
            self.persistence.start("synapse-evictor", min(60.0, evict_idle_after_s / 4),
                                   lambda: self._evict_in_background(evict_idle_after_s))

    def _evict_in_background(self, idle_s: float) -> None:
        evicted = self.evict_idle(idle_s)
        if evicted and self.on_evicted is not None:  # a shard tells its deployment's directory the names are free
            self.on_evicted(evicted)

    def close(self) -> None:
        """Stop the background threads, write whatever changed, wait for the device work already dispatched,
        release the state directory."""
        self.persistence.stop()
        self.flush()
        self.settle()
        self.persistence.close()

    def settle(self) -> None:
        """Wait until every instance's state is computed. JAX dispatches asynchronously: a call is answered
        once its work is queued, and a process that exits under queued work dies in XLA's teardown (SIGSEGV)."""
        with self._lock:
            instances = list(self._instances.values())
        for instance in instances:
            with instance.lock:
                if instance.live:
                    jax.block_until_ready(instance.state)

    # --- instances ---

    def create(self, key: InstanceKey, *, kind: str, config: Mapping[str, Any], init: Mapping[str, Any] | None = None,
               seed: int = 0, durability: str | None = None, device: str | int | None = None) -> dict[str, Any]:
        """Create and describe a new instance (see docs/api.md). Name, quotas and budget are checked, and
        capacity reserved, before any work; the kind's device-dependent choices (``prepare``) come after."""
        durability = self._durability(durability)
        kind_ = get_kind(kind)
        cfg = kind_.parse_config(config)
        check_init_ranges(cfg)  # a new instance's only: stored ones load as they were accepted
        init = dict(init or {})
        unknown = set(init) - {"weights", "biases"}
        if unknown:
            raise InvalidConfig(f"init: unknown keys {sorted(map(str, unknown))}; allowed: weights, biases",
                                field="init")
        seed = require_int("seed", seed, 0, 2**63 - 1)
        self._check_batch_size(cfg)
        nbytes = kind_.state_nbytes(cfg)
        target = self.capacity.resolve(device, nbytes)
        instance = self._reserve(key, kind_, cfg, seed, target, durability, nbytes)

        def build() -> Any:
            if kind_.prepare is not None:
                instance.config = kind_.prepare(instance.config, target)
            state = kind_.init(instance.config, seed, init.get("weights"), init.get("biases"))
            # non-finite initial values: an instance unusable from its first call, whose export would not import again
            # (a red-team run: init values beyond float32's range made them Inf)
            for name, leaf in compartment_paths(state).items():
                if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) and not bool(jax.numpy.isfinite(leaf).all()):
                    raise InvalidConfig(f"the initial {name} are not finite (NaN or Inf): an init distribution "
                                        "whose values overflow float32", field="config", compartment=name)
            return state

        return self._build(instance, build)

    def import_(self, key: InstanceKey, blob: bytes) -> dict[str, Any]:
        """Create an instance from an exported file: same config, compartments, counters and version."""
        try:
            record = decode(blob)
        except CorruptFile as exc:
            raise InvalidInstanceFile(f"not a valid instance file: {exc}") from None
        return self._add_record(key, record)

    def _add_record(self, key: InstanceKey, record: Record, stored: bool = False, own: bool = False,
                    arrive: Callable[[Instance], None] | None = None,
                    settle: Callable[[Instance], None] | None = None,
                    undone: str = "nothing was kept, send it again") -> dict[str, Any]:
        """Add an instance from a record (import, start-up, an evicted one coming back).

        Anything but a stored instance is checked like a create: the record's values, and quotas and the
        budget against the larger of its state and a fresh state of its config (its reset returns there).
        ``own``: a file this server wrote of its own state (an evicted copy): parameters that learning made
        non-finite come back as they were, where an import refuses them. ``arrive``, ``settle``, ``undone``: ``_build``'s.
        """
        kind_ = get_kind(record.kind)
        cfg = kind_.parse_config(record.config)
        durability = record.durability if stored or own else self._imported_durability(record.durability)
        if not stored:
            self._check_record(kind_, record, finite=not own)
            self._check_batch_size(cfg)
        nbytes = max(int(sum(np.asarray(a).nbytes for a in record.arrays.values())),
                     0 if stored else kind_.state_nbytes(cfg))
        target = self.capacity.resolve(None, nbytes)
        instance = self._reserve(key, kind_, cfg, record.seed, target, durability, nbytes, stored=stored,
                                 record=record)
        max_batch = None if stored else self.capacity.limits.max_batch
        return self._build(instance, lambda: state_from_compartments(kind_, cfg, record.seed, record.arrays,
                                                                     max_batch), arrive, settle, undone)

    def _check_batch_size(self, cfg: Any) -> None:
        """A config's batch_size (its signals' batch at creation and after every reset) within max_batch."""
        max_batch, batch_size = self.capacity.limits.max_batch, getattr(cfg, "batch_size", None)
        if max_batch is not None and batch_size is not None and batch_size > max_batch:
            raise InvalidConfig(f"batch_size {batch_size} is over the server's max_batch of {max_batch} (the largest "
                                "batch a signal compartment may hold)", field="batch_size")

    @staticmethod
    def _check_record(kind_: Kind, record: Record, finite: bool = True) -> None:
        """Values an exported file may carry: known counters; with ``finite``, every compartment as a write of it
        is checked — finite values (signals too: a call would refuse them, and an evolve on references to them
        would make every weight NaN), optimizer step counts whole and >= 0, Adam's second moments >= 0."""
        known = set(kind_.operations) | {"restore"}
        unknown = set(record.counters) - known
        if unknown:
            raise InvalidInstanceFile(f"counters {sorted(unknown)} are not operations of {kind_.name}")
        # a file may say 2^63 - 1 (what a stored one may reach), but an instance must have room to count on: its
        # next call would store a version no file may hold, and the instance would not load again
        applied = [(f"applied[{i}].version", item.get("version")) for i, item in enumerate(record.applied or ())
                   if isinstance(item, dict) and isinstance(item.get("version"), int)]  # a retry is answered these
        for what, count in [("version", record.version), *((f"counter {k!r}", v) for k, v in record.counters.items()),
                            *applied]:
            if count > MAX_IMPORTED_COUNT:
                raise InvalidInstanceFile(f"{what} {count} is over {MAX_IMPORTED_COUNT} (2^53): no room left to count "
                                          "calls")
        for name, array in record.arrays.items() if finite else ():
            array = np.asarray(array)
            try:
                if np.issubdtype(array.dtype, np.floating):
                    check_finite(name, array)
                check_optimizer_value(name, array)
            except ShapeMismatch as exc:
                raise InvalidInstanceFile(f"compartment {exc.detail}", compartment=name) from None

    @staticmethod
    def _durability(durability: str | None) -> str | None:
        if durability is not None and (not isinstance(durability, str) or durability not in DURABILITY_MODES):
            raise InvalidConfig(f"durability: {str(durability)[:40]!r} is not allowed; choose one of "
                                f"{', '.join(DURABILITY_MODES)} (or leave it out for the server's default)",
                                field="durability")
        return durability

    def _imported_durability(self, durability: str | None) -> str | None:
        """An imported file's mode (the exporting server's choice), or this server's when that one is stronger: on a
        sync server an import of an instance that was ``off`` elsewhere answered its calls from memory only."""
        durability = self._durability(durability)
        if durability is None or _STRENGTH[durability] <= _STRENGTH[self.persistence.durability]:
            return None
        return durability

    def _refuse_case_twin(self, key: InstanceKey) -> None:
        """AlreadyExists when ``key`` differs only in case from a held name, or its owner from another owner (under
        the lock): the state directory's file system ignores case, so they would share a file or a folder — one
        instance overwriting the other's acknowledged state, or, at the next start, one owner's instances another's."""
        owner, name = key.owner.casefold(), key.name.casefold()
        owner_held = False
        for other in (*self._instances, *self._restoring, *self._unloadable):
            owner_held = owner_held or other.owner == key.owner
            if other.owner != key.owner and other.owner.casefold() == owner:
                raise AlreadyExists(f"the owner name {key.owner!r} differs only in case from another owner's, which "
                                    "this server's state directory cannot tell apart (its file system ignores case)",
                                    name=key.name)
            if other.owner == key.owner and other.name != key.name and other.name.casefold() == name:
                raise AlreadyExists(f"{key.name!r} differs only in case from the instance {other.name!r}, which this "
                                    "server's state directory cannot tell apart (its file system ignores case); "
                                    "choose another name", name=key.name)
        if owner_held or self.persistence.store is None:  # its folders are its own: a twin was refused before
            return
        if self.persistence.store.owner_twin(key.owner) is not None:  # (lists four folders)
            raise AlreadyExists(f"the owner name {key.owner!r} differs only in case from another owner's, whose files "
                                "this server's state directory holds and cannot tell apart (its file system ignores "
                                "case)", name=key.name)

    def _history_for(self, durability: str | None) -> History | None:
        """A new instance's history: ``history_length`` samples, none for a memory-only one unless asked."""
        off = (durability or self.persistence.durability) == "off"
        return History(self.history_length) if self.history_length and (self.history_when_off or not off) else None

    def _reserve(self, key: InstanceKey, kind_: Kind, cfg: Any, seed: int, device: jax.Device,
                 durability: str | None, nbytes: int, *, stored: bool = False,
                 record: Record | None = None) -> Instance:
        """Take the name and the capacity for a new instance; it is returned locked, not yet built."""
        with self._lock:
            if key in self._restoring and not stored:
                raise NotReady(f"instance {key.name!r} is stored and still being restored; retry shortly",
                               name=key.name)
            if key in self._instances:
                raise AlreadyExists(f"an instance named {key.name!r} already exists", name=key.name)
            if not stored and self.persistence.folds_case:
                self._refuse_case_twin(key)
            if not stored and self.persistence.is_stored(key):
                raise AlreadyExists(
                    f"a stored file for {key.name!r} exists but is not loaded "
                    f"({self._unloadable.get(key, 'see GET /v1/admin/storage')}); it is never overwritten",
                    name=key.name)
            self.capacity.admit(key.owner, device, nbytes, check=not stored)
            instance = Instance(key, kind_, cfg, seed, device, durability, held_bytes=nbytes,
                                answers=IdempotencyCache(self.answers, key.owner),
                                history=self._history_for(durability))
            if record is not None:
                instance.version, instance.counters = record.version, dict(record.counters)
                instance.created_at = record.created_at
                instance.stored_version = record.version if stored else 0
                if record.applied:  # a retry of a keyed call it applied before the restart, eviction or export
                    instance.answers.restore(record.applied)
            instance.lock.acquire()
            self._instances[key] = instance
        return instance

    def _build(self, instance: Instance, build: Callable[[], Any], arrive: Callable[[Instance], None] | None = None,
               settle: Callable[[Instance], None] | None = None,
               undone: str = "nothing was kept, send it again") -> dict[str, Any]:
        """Build a reserved instance's state on its device, store it (sync mode), describe it; undo on failure.

        ``arrive(instance)`` runs first and ``settle(instance)`` last (it must not raise), both while no other call
        can reach the instance: what must be in place before anyone sees it, and what may go once it is stored.
        ``undone``: what a refusal for storage says is left, and what to do."""
        try:
            if arrive is not None:
                arrive(instance)
            with jax.default_device(instance.device):
                state = jax.device_put(device_call(build), instance.device)  # committed: calls run there
            jax.block_until_ready(state)
            instance.state, instance.signature = state, signature_of(state)
            self._account(instance, nbytes_of(instance.signature), check=False)
            try:
                self.persistence.persist(instance)
            except StorageError as failed:  # undone below: not "applied in memory" as a call's 507 is
                raise StorageError(f"{instance.key.name!r} was not created: it could not be stored durably "
                                   f"({failed.reason}); {undone} once the state directory can be written",
                                   name=instance.key.name) from None
            description = instance.describe(self.persistence.mode(instance))
        except BaseException:
            with self._lock:
                self._instances.pop(instance.key, None)
            self.capacity.release(instance.key.owner, instance.device, instance.held_bytes)
            instance.state = None
            raise
        else:
            if settle is not None:
                try:
                    settle(instance)
                except Exception:  # noqa: BLE001 - the instance is built and stored: it stays
                    log.exception("%s: finishing its arrival failed", instance.key)
            return description
        finally:
            instance.lock.release()

    def delete(self, key: InstanceKey, expected_version: int | None = None) -> None:
        """Forget an instance and its files (snapshots too); calls already running on it finish first."""
        with self._hold(key, doing={"operation": "delete"}) as instance:
            instance.check_version(expected_version)
            freed = self.persistence.remove(key)  # StorageError: nothing deleted from memory
            self._forget(instance)
            if freed:
                self.capacity.release_snapshot(key.owner, freed)

    def _forget(self, instance: Instance) -> None:
        """Drop a held instance from the registry and from capacity (under its lock)."""
        with self._lock:
            del self._instances[instance.key]
        self.capacity.release(instance.key.owner, instance.device, instance.held_bytes)
        instance.answers.clear()
        instance.state = None

    def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Describe every instance of ``owner`` (everyone's if None), sorted by owner and name."""
        with self._lock:
            if any(owner is None or key.owner == owner for key in self._restoring):
                raise NotReady("stored instances are still being restored; retry shortly")
            instances = sorted((i for k, i in self._instances.items() if owner is None or k.owner == owner),
                               key=lambda i: i.key)
        out = []
        for instance in instances:
            if instance.running is not None and instance.live:
                out.append(instance.describe(self.persistence.mode(instance), meanwhile=True))
                continue
            with instance.lock:
                if instance.live:
                    out.append(instance.describe(self.persistence.mode(instance)))
        return out

    def describe(self, key: InstanceKey) -> dict[str, Any]:
        """The instance's description; while a long call holds it, at once (saying what runs and since when)."""
        instance = self._get(key)
        if instance.running is not None and instance.live:  # do not wait for the call to end
            return instance.describe(self.persistence.mode(instance), meanwhile=True)
        with self._hold(instance) as instance:
            return instance.describe(self.persistence.mode(instance))

    def learning_stats(self, key: InstanceKey) -> dict[str, Any]:
        """Statistics of the weights, the last update and the biases now (numpy's, on host copies)."""
        with self._hold(key, doing={"operation": "stats"}) as instance:
            leaves = compartment_paths(instance.host_state())  # a stacked instance stays stacked
            copies = {c: np.asarray(leaves[c]) for c in ("weights", "dWeights", "biases") if c in leaves}
            head = {"name": key.name, "owner": key.owner, "kind": instance.kind.name, "version": instance.version,
                    "counters": dict(instance.counters)}
        return {**head, **weight_stats(copies)}

    def history(self, key: InstanceKey) -> dict[str, Any]:
        """The samples kept after each learning call (oldest first) and how many are kept at most."""
        with self._hold(key, doing={"operation": "history"}) as instance:
            history, version = instance.history, instance.version
        return {"name": key.name, "owner": key.owner, "version": version,
                "length": 0 if history is None else history.length,
                "entries": [] if history is None else history.read()}

    def help(self, key: InstanceKey) -> dict[str, Any]:
        with self._hold(key, doing={"operation": "help"}) as instance:
            return instance.kind.help(instance.config)

    # --- operations ---

    def peek(self, key: InstanceKey) -> tuple[int, tuple, bool] | None:
        """Without waiting: which instance holds the name (its serial), its compartment shapes and whether its mode
        is sync; None if absent, or in a stack (a call takes it out first: device work no cost measured covers)."""
        instance = self._instances.get(key)
        if instance is None or not instance.live or instance.slot is not None:
            return None
        return instance.serial, instance.signature, self.persistence.mode(instance) == "sync"

    def call(self, key: InstanceKey, operation: str, tensors: Mapping[str, Any], returns: list[str] | None = None,
             *, idempotency_key: str | None = None, expected_version: int | None = None, wait: bool = True,
             signature: tuple | None = None, sequence: Mapping[str, Any] | None = None,
             stands_for: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run ``operation``; returns ``{"version": v, <compartment>: numpy, ...}`` (see docs/api.md).

        A tensor argument is an array or a ``CompartmentRef`` (this instance's compartment when the call
        starts, or another instance's of the same owner). Tensors with a leading time axis ``(T, batch, …)``
        make it a sequence: T steps in one compiled call (``kinds/sequence.py``), the answer's compartments
        after every ``sequence["every"]``-th step or (``sequence["last"]``) after the last. A repeated
        ``idempotency_key`` returns the first answer without running again (in sync mode, once its write
        succeeded). ``wait=False`` raises Busy instead of waiting for the lock, or when the compartment shapes
        are no longer ``signature``. ``stands_for``: tensors that are another instance's values a front read for a
        reference (``{argument: [compartment, instance]}``): the key's fingerprint names the reference instead.
        """
        instance = self._get(key)
        op = instance.kind.operations.get(operation)
        if op is None:
            close = close_match(operation, instance.kind.operations)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise UnknownOperation(f"{instance.kind.name} has no operation {str(operation)[:64]!r}{hint}; it has: "
                                   f"{', '.join(instance.kind.operations)}", operation=str(operation)[:64])
        args, steps = self.planner.bind(instance, op, tensors)
        returned = list(op.returns if returns is None else returns)
        fn, count, kept = op.fn, 1, 1
        if steps or sequence is not None:
            # one program per set of compartments, whatever their order: a list in every order compiles no more
            (fn, kept), count = self.planner.sequence(op, args, steps, sorted(returned), sequence), steps
        print_ = "" if idempotency_key is None else fingerprint(operation, args if not stands_for else [
            _stand_in(arg.name, a, stands_for) for arg, a in zip(op.args, args)], returned, sequence)
        # another instance's compartments are copied before our lock is taken: never two locks at once
        args = [self._read_for(instance, arg.name, a) if isinstance(a, CompartmentRef) and a.instance else a
                for arg, a in zip(op.args, args)]
        doing = {"operation": operation, "steps": steps} if steps else {"operation": operation}
        with self._hold(instance, wait=wait, signature=signature, doing=doing):
            if idempotency_key is not None:
                entry = instance.answers.replay(idempotency_key, print_)
                if entry is not None:
                    self.persistence.persist(instance)  # sync mode: acknowledged only once stored
                    return instance.answers.answer_of(entry, key.name)
            instance.check_version(expected_version)
            self.planner.check_returned(instance, returned)
            if any(isinstance(a, (CompartmentRef, _Fetched)) for a in args):
                # read where they are: a member of a stack stays in it until the call is admitted and runs
                leaves = compartment_paths(instance.host_state())
                args = [self._resolve(instance, arg.name, a, leaves) if isinstance(a, (CompartmentRef, _Fetched))
                        else a for arg, a in zip(op.args, args)]
                self.planner.check_batches(instance, op, args, steps)  # the resolved ones too
            new_signature, new_bytes, runner, plan = self.planner.predict(instance, op.name, fn, args)
            if steps:  # the one answer that grows with what is asked, not with what is held: bounded before it runs
                self.planner.check_sequence_answer(instance, returned, new_signature, kept, steps)
            self.capacity.resize(key.owner, instance.device, instance.held_bytes, new_bytes)  # refused before work
            try:
                out = device_call(runner, instance.config, instance.state, *args)
                if plan is not None:
                    state = out
                    result = plan.answer(state, returned)
                else:
                    state, kept = out
                    result = {c: np.asarray(kept[c]) for c in returned}
                # an answer read means the program has run (its outputs are ready together); with none, wait:
                # the caller may change its arrays once we return
                if not result and reads_caller_memory(args):
                    jax.block_until_ready(out)
            except BaseException:
                self.capacity.resize(key.owner, instance.device, new_bytes, instance.held_bytes, check=False)
                raise
            self._commit(instance, state, operation, new_signature, new_bytes, accounted=True, count=count)
            answer = {"version": instance.version, **result}
            if idempotency_key is not None:  # before the write: a retry after a 507 must not apply it again
                instance.answers.remember(idempotency_key, print_, answer)
            self.persistence.persist(instance)
            return answer

    def call_many(self, keys: list[InstanceKey], operation: str, tensors: list[Mapping[str, Any]],
                  returns: list[str] | None = None, *, idempotency_key: str | None = None) -> list[dict[str, Any]]:
        """One operation on many instances in one go, all applied or none: ``PackedCalls.call_many``."""
        return self.packed.call_many(keys, operation, tensors, returns, idempotency_key=idempotency_key)

    def call_stacked(self, keys: list[InstanceKey], operation: str, tensors: Mapping[str, Any],
                     returns: list[str] | None = None, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """``call_many`` with tensors and answers stacked along a leading instance axis:
        ``PackedCalls.call_stacked``."""
        return self.packed.call_stacked(keys, operation, tensors, returns, idempotency_key=idempotency_key)

    @staticmethod
    def _resolve(instance: Instance, argument: str, ref: CompartmentRef | _Fetched, leaves: Mapping[str, Any]) -> Any:
        """A reference's values as a buffer of the caller's own on its device (the source's buffers are donated
        by its next call); another instance's were fetched already (``_read_for``)."""
        if isinstance(ref, _Fetched):
            return ref.value
        return jax.device_put(_floating_compartment(instance, argument, ref.compartment, leaves), instance.device,
                              may_alias=False)

    def _read_for(self, caller: Instance, argument: str, ref: CompartmentRef) -> CompartmentRef | _Fetched:
        """A device copy of another instance's compartment (same owner), read under that instance's lock."""
        other = InstanceKey(caller.key.owner, validate_name(ref.instance))
        if other == caller.key:
            return ref._replace(instance=None)  # this instance: resolved under its own lock
        with self._hold(other, doing={"operation": "read"}) as source:  # read in place: a member of a stack stays in it
            value = _floating_compartment(source, argument, ref.compartment, compartment_paths(source.host_state()))
            return _Fetched(jax.device_put(value, caller.device, may_alias=False))

    def _commit(self, instance: Instance, state: Any, counter: str | None, signature: tuple, nbytes: int,
                accounted: bool = False, count: int = 1) -> None:
        """The one place a mutation lands (under the instance's lock): the new state, version, counter (``count``
        runs: a sequence's steps), last use and size. ``accounted``: capacity already counts ``nbytes`` (else it
        is resized here, unchecked)."""
        instance.state = state
        if not accounted:
            self._account(instance, nbytes, check=False)
        self._advance(instance, counter, signature, nbytes, state, count)

    @staticmethod
    def _advance(instance: Instance, counter: str | None, signature: tuple, nbytes: int, sampled: Any,
                 count: int = 1) -> None:
        """A mutation's bookkeeping (``_commit``'s; a stack's packed call, whose states stay stacked, does only
        this): version, counter, history sample (of ``sampled``: the new state, or its sample's values), last use,
        signature, size (capacity already counts it)."""
        instance.version += 1
        if counter is not None:
            instance.counters[counter] = instance.counters.get(counter, 0) + count
            if counter in LEARNING_OPERATIONS and instance.history is not None:
                if isinstance(sampled, np.ndarray):
                    instance.history.record_values(instance.version, instance.learning_steps(), sampled)
                else:
                    instance.history.record(instance.version, instance.learning_steps(), sampled)
        instance.last_used_at = time.time()
        instance.signature = signature
        instance.held_bytes = nbytes

    def _account(self, instance: Instance, nbytes: int, *, check: bool) -> None:
        """Make capacity count ``nbytes`` for the instance (checked growth raises before anything changes)."""
        self.capacity.resize(instance.key.owner, instance.device, instance.held_bytes, nbytes, check=check)
        instance.held_bytes = nbytes

    @contextmanager
    def _resized(self, instance: Instance, nbytes: int) -> Iterator[None]:
        """Capacity counts ``nbytes`` for the instance (checked first: refused before the block runs), and what it
        counted before again if the block fails (a device error mid-write left the new size counted)."""
        before = instance.held_bytes
        self._account(instance, nbytes, check=True)
        try:
            yield
        except BaseException:
            self._account(instance, before, check=False)
            raise

    def read(self, key: InstanceKey, compartment: str) -> tuple[np.ndarray, int]:
        """A host copy of one compartment and the version it belongs to."""
        with self._hold(key, doing={"operation": "read"}) as instance:
            leaves = compartment_paths(instance.host_state())  # a stacked instance stays stacked
            if compartment not in leaves:
                raise unknown_compartment(instance.kind, compartment, leaves)
            return np.asarray(leaves[compartment]), instance.version

    def write(self, key: InstanceKey, compartment: str, value: Any, expected_version: int | None = None) -> int:
        """Replace one compartment (shape, dtype, finiteness and max_batch checked); returns the new version."""
        with self._hold(key, doing={"operation": "write"}) as instance:
            instance.check_version(expected_version)
            # checked against its shapes, not its state: a refused write leaves a member of a stack in it
            layout = instance.layout()
            new = checked_compartment(instance.kind, layout, compartment, value, self.capacity.limits.max_batch)
            names = leaf_names(jax.tree_util.tree_structure(layout))
            signature = tuple((tuple(new.shape), new.dtype) if name == compartment else leaf
                              for name, leaf in zip(names, signature_of(layout)))
            with self._resized(instance, nbytes_of(signature)):  # quota and budget before it lands
                state = with_compartment(instance.state, compartment, new, instance.device)
            self._commit(instance, state, None, signature_of(state), instance.held_bytes, accounted=True)
            self.persistence.persist(instance)
            return instance.version

    # --- files: export, snapshots, eviction ---

    def export(self, key: InstanceKey) -> tuple[int, Callable[[], Iterator[bytes | memoryview]]]:
        """The instance as one file: its length, and its parts to send (host arrays taken under the lock)."""
        with self._hold(key, doing={"operation": "export"}) as instance:
            record = instance.record()
            record.arrays = {name: np.asarray(a) for name, a in record.arrays.items()}
        return stream_record(record)

    def snapshot(self, key: InstanceKey, snapshot: str) -> dict[str, Any]:
        """Store a named point-in-time copy (always on disk, whatever the mode); counted against the owner's
        snapshot quota before it is written."""
        validate_name(snapshot, "snapshot name")
        self.persistence.require_store()
        with self._hold(key, doing={"operation": "snapshot"}) as instance:
            if self.persistence.snapshot_exists(key, snapshot):
                raise AlreadyExists(f"this instance already has a snapshot {snapshot!r}", snapshot=snapshot)
            record = instance.record()
            size = record_size(record)
            self.capacity.admit_snapshot(key.owner, size)
            try:
                self.persistence.save_snapshot(key, snapshot, record)
            except BaseException:
                self.capacity.release_snapshot(key.owner, size)
                raise
        return _snapshot_info(snapshot, record)

    def snapshots(self, key: InstanceKey) -> list[dict[str, Any]]:
        """The instance's snapshots, oldest first (read from their headers)."""
        with self._hold(key, doing={"operation": "snapshots"}):
            paths = self.persistence.list_snapshots(key)
        infos = []
        for path in paths:
            snapshot = path.name[: -len(".safetensors")]
            try:
                infos.append(_snapshot_info(snapshot, read_header(path)))
            except (CorruptFile, OSError) as exc:  # listed as what it is: its name is taken, and it can be deleted
                log.warning("snapshot %s is unreadable: %s", path, exc)
                with contextlib.suppress(OSError):
                    infos.append({"snapshot": snapshot, "version": None, "counters": {},
                                  "created_at": path.stat().st_mtime, "damaged": shown_failure(exc)})
        return sorted(infos, key=lambda i: i["created_at"])

    def rollback(self, key: InstanceKey, snapshot: str, expected_version: int | None = None) -> int:
        """Replace every compartment with the snapshot's; counters keep counting; returns the new version."""
        validate_name(snapshot, "snapshot name")
        with self._hold(key, doing={"operation": "restore"}) as instance:
            instance.check_version(expected_version)
            record = self.persistence.read_snapshot(self.persistence.snapshot_path(key, snapshot))
            # the quota and the device budget before the device holds the snapshot's state, then its exact size
            with self._resized(instance, sum(np.asarray(a).nbytes for a in record.arrays.values())):
                with jax.default_device(instance.device):
                    state = device_call(state_from_compartments, instance.kind, instance.config, instance.seed,
                                        record.arrays, self.capacity.limits.max_batch)  # as an import: taken lower
                state = jax.device_put(state, instance.device)
                signature = signature_of(state)
                self._account(instance, nbytes_of(signature), check=True)
            self._commit(instance, state, "restore", signature, instance.held_bytes, accounted=True)
            self.persistence.persist(instance)
            return instance.version

    def delete_snapshot(self, key: InstanceKey, snapshot: str) -> None:
        validate_name(snapshot, "snapshot name")
        with self._hold(key, doing={"operation": "delete snapshot"}):
            freed = self.persistence.delete_snapshot(key, snapshot)
        self.capacity.release_snapshot(key.owner, freed)

    def evict_idle(self, idle_s: float, now: float | None = None,
                   stayed: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Export, then delete, every instance unused for ``idle_s`` seconds; returns what was evicted, and appends
        to ``stayed`` (if given) each idle instance that could not be, with why.

        Each is written to ``<state_dir>/evicted/<owner>/`` before it is deleted (its snapshots go beside the copy
        and come back with it); its owner sees it with ``evicted`` and brings it back with ``unevict``. Its owner
        keeps one evicted copy of a name (the latest: the one ``unevict`` brings back; older ones go once it is
        written), and the copies count against the owner's snapshot quota, as the files they are: an instance
        whose copy would not fit stays, as one used meanwhile or whose file cannot be written does.
        """
        self.persistence.require_store()
        now = time.time() if now is None else now
        with self._lock:
            candidates = [i for i in self._instances.values() if i.live and now - i.last_used_at >= idle_s]
        evicted = []
        for instance in candidates:
            with self._hold_if_there(instance, {"operation": "evict"}) as held:
                if not held or now - instance.last_used_at < idle_s:
                    continue
                with self._evicted_lock:
                    path = self._evict_one(instance)
                if isinstance(path, str):
                    if stayed is not None:
                        stayed.append({"owner": instance.key.owner, "name": instance.key.name, "reason": path})
                    continue
                state_bytes = instance.held_bytes
                self._forget(instance)
            evicted.append({"owner": instance.key.owner, "name": instance.key.name, "state_bytes": state_bytes,
                            "last_used_at": instance.last_used_at, "file": path.name})
            log.info("evicted %s (idle %.0f s) to %s", instance.key, now - instance.last_used_at, path)
        return evicted

    def _evict_one(self, instance: Instance) -> Path | str:
        """Write the instance's copy, count it, move its snapshots beside it, delete its file (under its lock and
        the evicted copies' lock); the copy's path, or why it stays (nothing of the eviction left but that and a
        log line). A marker beside the copy says the eviction is under way until the instance's file is gone:
        the next start finishes one a crash cut short (``Store._settle_evictions``)."""
        store, key = self.persistence.store, instance.key
        older = store.evicted_files(key.owner, key.name)
        record = instance.record()
        counted = self._reserve_evicted(key, record, older)  # before a byte is written: the file's size is known
        if isinstance(counted, str):
            return counted
        try:
            path = self.persistence.evict(instance, record)
        except OSError as exc:
            self.capacity.release_snapshot(key.owner, counted[0])
            log.error("could not evict %s: %s", key, exc)
            return f"its evicted copy could not be written ({exc.strerror or type(exc).__name__})"
        try:
            self._admit_evicted(key, path, *counted)
            written = path.stat().st_size
            try:  # its snapshots go with its copy: a new instance of the name must not take them over
                store.stash_snapshots(str(key), path)
                store.remove(str(key))
            except OSError as exc:
                log.error("could not evict %s: %s", key, exc)
                with contextlib.suppress(OSError):  # it stays, with its snapshots; its copy goes
                    store.unstash_snapshots(str(key), path)
                    store.remove_evicted(path)
                    self.capacity.release_snapshot(key.owner, written)
                return f"its stored file could not be removed ({exc.strerror or type(exc).__name__})"
            return path
        finally:
            with contextlib.suppress(OSError):
                store.clear_evicting(path)

    def _reserve_evicted(self, key: InstanceKey, record: Record, older: list[Path]
                         ) -> tuple[int, dict[Path, int]] | str:
        """Count an evicted copy about to be written against its owner's snapshot quota, as if the older copies of
        its name went (as each will): the bytes counted and the older copies' sizes, or why not (nothing counted,
        nothing to write) where it does not fit. Checked before the write: an owner whose quota is full had each
        idle instance written out and deleted again on every pass of the evictor (a red-team run)."""
        store = self.persistence.store
        before = {file: store.evicted_bytes(file) for file in older}
        grows = max(0, record_size(record) - sum(before.values()))
        try:
            self.capacity.admit_snapshot(key.owner, grows)
        except QuotaExceeded as exc:
            log.info("%s stays: its evicted copy would not fit its owner's quota (%s)", key, exc.detail)
            return f"its evicted copy would not fit its owner's snapshot quota ({exc.detail})"
        return grows, before

    def _admit_evicted(self, key: InstanceKey, path: Path, grows: int, before: dict[Path, int]) -> None:
        """The evicted copy written: the older copies of its name deleted (unreachable: a restore brings back the
        latest), and what was counted (``grows``, by ``_reserve_evicted``) made what the owner's copies now hold."""
        store = self.persistence.store
        written = store.evicted_bytes(path)
        kept = 0
        for file, nbytes in before.items():
            try:
                store.remove_evicted(file)  # with the snapshots it took with it
            except FileNotFoundError:
                pass
            except OSError as exc:
                kept += nbytes
                log.warning("could not delete %s, an older evicted copy of %s: %s", file, key, exc)
        # what the owner's copies now hold, against what was counted (a negative release counts a copy kept)
        self.capacity.release_snapshot(key.owner, grows - (written - sum(before.values()) + kept))

    def evicted(self, owner: str) -> list[dict[str, Any]]:
        """An owner's evicted instances (name, when, file size), oldest first."""
        return self.persistence.evicted(owner)

    def unevict(self, key: InstanceKey) -> dict[str, Any]:
        """Bring back the latest evicted copy of ``key`` as a live instance (checked like an import), its snapshots
        with it, then delete that file.

        Its snapshots come back, and its copy goes once it is stored, before any other call can reach the instance
        (a delete or a snapshot in between had orphaned them or overwritten one). One restore of a name at a time,
        and while it runs the name's copies are neither evicted over nor discarded (a discard waits for it). A marker
        beside the copy, written once the name is held, tells the next start about a restore a crash cut short.
        """
        store = self.persistence.store
        with self._evicted_change:
            while key in self._restoring_evicted:
                self._evicted_change.wait()
            path = self.persistence.latest_evicted(key)
            try:
                record = decode(path.read_bytes())
            except CorruptFile as exc:  # not the disk's fault: only a discard helps
                raise DamagedFile(f"the evicted copy of {key.name!r} is damaged ({shown_failure(exc)}) and cannot be "
                                  f"restored; discard it (DELETE /v1/evicted/{key.name})", name=key.name) from None
            except OSError as exc:
                raise StorageError(f"the evicted file of {key.name!r} is unreadable: {shown_failure(exc)}") from None
            self._restoring_evicted.add(key)
        moved = done = False

        def arrive(instance: Instance) -> None:  # the name is held: its snapshots are its own again
            nonlocal moved
            store.mark_restoring(path)
            dropped = store.unstash_snapshots(str(key), path)
            moved = True
            if dropped:
                self.capacity.release_snapshot(key.owner, dropped)

        def settle(instance: Instance) -> None:  # its copy on disk goes only once the instance is stored in its place
            nonlocal done
            stored = self.persistence.mode(instance) == "off" or instance.stored_version == instance.version \
                or self.persistence.write(instance, logging.ERROR)
            if not stored:  # (interval mode would store it only at the next flush: a crash meanwhile lost it)
                log.warning("brought back %s; its evicted file %s stays until it is stored", key, path)
                return
            try:
                nbytes = path.stat().st_size
                store.remove_evicted(path)
            except OSError as exc:
                log.warning("brought back %s; could not delete its evicted file %s: %s", key, path, exc)
            else:
                self.capacity.release_snapshot(key.owner, nbytes)
                done = True

        try:  # own: never refused for what learning made of it
            return self._add_record(key, record, own=True, arrive=arrive, settle=settle,
                                    undone="its evicted copy is kept, restore it again")
        except BaseException:  # undone: its snapshots go back beside its copy
            if moved:
                with contextlib.suppress(OSError):
                    store.stash_snapshots(str(key), path)
            done = True
            raise
        finally:
            with self._evicted_change:
                if done:  # (else the marker stays for the next start: the instance is not stored yet)
                    with contextlib.suppress(OSError):
                        store.clear_restoring(path)
                self._restoring_evicted.discard(key)
                self._evicted_change.notify_all()

    def discard_evicted(self, key: InstanceKey) -> None:
        """Delete every evicted copy of ``key`` (NotFound if there is none), its bytes released from its owner's
        snapshot quota; after a restore of the name under way (which may leave none). A live instance of the name,
        if any, is not touched."""
        with self._evicted_change:
            while key in self._restoring_evicted:
                self._evicted_change.wait()
            paths = self.persistence.evicted_files(key)
            if not paths:
                raise NotFound(f"no evicted instance named {key.name!r}", name=key.name)
            freed, failed = 0, None
            for path in paths:
                try:
                    nbytes = self.persistence.store.evicted_bytes(path)  # the copy and the snapshots it took
                    self.persistence.store.remove_evicted(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    failed = exc
                    continue
                freed += nbytes
            self.capacity.release_snapshot(key.owner, freed)
            if failed is not None:  # what could be deleted is gone and released; the rest stays listed
                log.error("could not delete an evicted copy of %s: %s", key, failed)
                raise StorageError(f"could not delete an evicted copy of {key.name!r}: {shown_failure(failed)}")

    # --- durability ---

    def flush(self) -> int:
        """Write every instance whose version moved since it was stored; returns how many were written."""
        if self.persistence.store is None:
            return 0
        written = 0
        with self._lock:
            instances = list(self._instances.values())
        for instance in instances:
            if not self.persistence.pending(instance):  # a glance first: only an instance to write is held
                continue
            # held: a consistent state, no delete racing the write, and descriptions answer meanwhile
            with self._hold_if_there(instance, {"operation": "store"}) as held:
                if held and self.persistence.pending(instance):
                    written += self.persistence.write(instance, logging.WARNING)
        with self._lock:
            live = list(self._instances.values())
        self.persistence.flushed(any(i.live and self.persistence.pending(i) for i in live))
        return written

    # --- views for operators ---

    def storage_status(self) -> dict[str, Any]:
        return {"durability": self.persistence.durability, "storage_error": self.persistence.storage_error,
                "restore_errors": dict(self.persistence.restore_errors)}

    def stats(self) -> dict[str, Any]:
        """Gauges: instances by kind and owner, state bytes by device, calls waiting by owner."""
        with self._lock:
            instances = [i for i in self._instances.values() if i.live]
        by_kind_owner: dict[tuple[str, str], int] = {}
        queues: dict[str, int] = {}
        for instance in instances:
            key = (instance.kind.name, instance.key.owner)
            by_kind_owner[key] = by_kind_owner.get(key, 0) + 1
            if instance.waiting:
                queues[instance.key.owner] = queues.get(instance.key.owner, 0) + instance.waiting
        return {"instances": by_kind_owner, "state_bytes": self.capacity.state_bytes_by_device(),
                "queue_depth": queues, "device_budget_bytes": self.capacity.limits.device_budget_bytes,
                "storage_failing": self.persistence.storage_error is not None}

    # --- locking ---

    @contextmanager
    def _hold(self, target: InstanceKey | Instance, *, wait: bool = True, signature: tuple | None = None,
              doing: dict[str, Any] | None = None) -> Iterator[Instance]:
        """The instance, locked; NotFound if it was deleted (or failed to build) while we waited.

        ``wait=False``: Busy if another call holds it, or if its shapes are no longer ``signature``.
        ``doing``: what the holder runs (``{"operation": …}``), which descriptions show meanwhile.
        """
        instance = target if isinstance(target, Instance) else self._get(target)
        self._acquire(instance, wait, signature, doing)
        try:
            yield instance
        finally:
            instance.running = None
            instance.lock.release()

    @contextmanager
    def _hold_if_there(self, instance: Instance, doing: dict[str, Any]) -> Iterator[bool]:
        """As ``_hold``, for background work over a list taken earlier: False (not held) if the instance is gone."""
        try:
            self._acquire(instance, True, None, doing)
        except NotFound:
            yield False
            return
        try:
            yield True
        finally:
            instance.running = None
            instance.lock.release()

    @contextmanager
    def _hold_all(self, instances: list[Instance], doing: dict[str, Any], at: Any) -> Iterator[None]:
        """Every instance locked (in key order: two packed calls never wait on each other crosswise), as ``_hold``
        locks one; ``at.index`` names the one an error is about."""
        held: list[Instance] = []
        try:
            for at.index in sorted(range(len(instances)), key=lambda i: instances[i].key):
                self._acquire(instances[at.index], True, None, doing)
                held.append(instances[at.index])
            at.index = None
            yield
        finally:
            for instance in held:
                instance.running = None
                instance.lock.release()

    def _acquire(self, instance: Instance, wait: bool, signature: tuple | None, doing: dict[str, Any] | None) -> None:
        """Take the instance's lock (Busy instead of waiting unless ``wait``), then check it is still there (and of
        ``signature``) and note what runs; the lock is released again if a check fails."""
        if not instance.lock.acquire(blocking=False):
            if not wait:
                raise Busy
            with self._lock:
                instance.waiting += 1  # the queue depth the metrics show
            try:
                instance.lock.acquire()
            finally:
                with self._lock:
                    instance.waiting -= 1
        try:
            if not instance.live or self._instances.get(instance.key) is not instance:
                raise NotFound(f"no instance named {instance.key.name!r}", name=instance.key.name)
            if signature is not None and instance.signature != signature:
                raise Busy
        except BaseException:
            instance.lock.release()
            raise
        if doing is not None:
            instance.settled = (instance.version, dict(instance.counters))
            instance.running = {**doing, "since": time.time()}

    def _get(self, key: InstanceKey) -> Instance:
        instance = self._instances.get(key)
        if instance is None:
            with self._lock:
                instance = self._instances.get(key)
                restoring, unloadable = key in self._restoring, self._unloadable.get(key)
            if restoring:
                raise NotReady(f"instance {key.name!r} is stored and still being restored; retry shortly",
                               name=key.name)
            if unloadable is not None:
                raise NotReady(f"instance {key.name!r} is stored but could not be loaded ({unloadable}); an "
                               "operator sees why at GET /v1/admin/storage", name=key.name,
                               headers={"Retry-After": "60"})
            if instance is None:
                raise NotFound(f"no instance named {key.name!r}", name=key.name)
        return instance

    def __len__(self) -> int:
        return len(self._instances)



class _Fetched:
    """Another instance's compartment, copied onto the caller's device before the caller's lock is taken."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


_STRENGTH = {"off": 0, "interval": 1, "sync": 2}  # how much of what was acknowledged a mode keeps across a crash


def _stand_in(argument: str, value: Any, stands_for: Mapping[str, Any]) -> Any:
    """What a keyed call's fingerprint hashes for an argument: the reference a front's read values stand for."""
    ref = stands_for.get(argument)
    if isinstance(ref, (list, tuple)) and len(ref) == 2 and all(isinstance(part, str) for part in ref):
        return CompartmentRef(ref[0], ref[1])
    return value


def _floating_compartment(instance: Instance, argument: str, name: str, leaves: Mapping[str, Any]) -> Any:
    """The floating compartment a reference names (an argument cannot be the PRNG key or a step count)."""
    value = leaves.get(name)
    if value is None or not jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
        floating = sorted(n for n, v in leaves.items() if jax.numpy.issubdtype(v.dtype, jax.numpy.floating))
        raise UnknownCompartment(f"{argument}: cannot refer to {str(name)[:128]!r}: no such floating compartment in "
                                 f"{instance.key.name!r}; it has: {', '.join(floating)}", argument=argument)
    return value


def _snapshot_info(snapshot: str, record: Record) -> dict[str, Any]:
    return {"snapshot": snapshot, "version": record.version, "counters": record.counters,
            "created_at": record.saved_at}


__all__ = ["Busy", "Registry", "device_call"]
