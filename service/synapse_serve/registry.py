"""The registry: named instances, their locks and every mutation of their state.

Calls on one instance are serialized by its lock; calls on different instances
run in parallel (JAX releases the GIL while it computes). Each operation's
state is swapped in only after the operation succeeded, and results are copied
to host memory under the lock, before any later call can donate the buffers.
Routes reach instances only through these methods (create, describe, call,
read, write, delete, list, and the export/import/snapshot ones), each keyed by
``owner/name``, so a distributed implementation can stand beside this one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import numpy as np

from synapse_serve.auth import LOCAL_OWNER
from synapse_serve.errors import (
    AlreadyExists,
    DeviceError,
    InvalidConfig,
    InvalidName,
    DeviceFull,
    NotFound,
    PreconditionFailed,
    QuotaExceeded,
    ShapeMismatch,
    StorageError,
    SynapseServeError,
    UnknownOperation,
)
from synapse_serve.kinds import Kind, get_kind
from synapse_serve.kinds.base import check_tensor, compartment_paths, replace_compartment, state_from_compartments
from synapse_serve.store import CorruptFile, Record, Store, decode, encode

DURABILITY_MODES = ("sync", "interval", "off")
IDEMPOTENCY_KEYS_KEPT = 128  # per instance: the answers of its most recent keyed calls (retries come soon)
log = logging.getLogger("synapse_serve")

NAME_RULE = "1 to 128 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(name: Any) -> str:
    """``name`` if it follows NAME_RULE, else InvalidName saying the rule."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidName(f"invalid instance name {str(name)[:140]!r}: use {NAME_RULE}", name=str(name)[:140])
    return name


def qualify(owner: str, name: Any) -> str:
    """The registry key ``owner/name`` of an owner's instance (both parts validated)."""
    return f"{validate_name(owner)}/{validate_name(name)}"


def owner_of(key: str) -> str:
    return key.split("/", 1)[0]


@dataclass
class Instance:
    """One named synapse: its kind, immutable config and current state."""

    name: str  # the registry key, "owner/name"
    kind: Kind
    config: Any
    state: Any
    seed: int
    device: jax.Device  # where its state lives; every call on it runs there
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    version: int = 1
    stored_version: int = 0  # the version last written to the store
    durability: str | None = None  # this instance's own mode; None follows the registry's
    counters: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    placed_bytes: int = 0  # what its device's budget counts for it (its state at create)
    waiting: int = 0  # calls queued for its lock
    # (operation, batch) -> seconds its last run took here: says which calls are quick enough to run inline
    costs: dict[tuple[str, int | None], float] = field(default_factory=dict, repr=False)
    # Idempotency-Key -> (request fingerprint, answer), most recent last
    answers: OrderedDict[str, tuple[str, dict[str, Any]]] = field(default_factory=OrderedDict, repr=False)

    @property
    def state_bytes(self) -> int:
        return int(sum(v.size * v.dtype.itemsize for v in compartment_paths(self.state).values()))

    def check_version(self, expected: int | None) -> None:
        """412 unless ``expected`` (from If-Match) is None or the current version."""
        if expected is not None and expected != self.version:
            raise PreconditionFailed(
                f"instance {self.name.split('/', 1)[1]!r} is at version {self.version}, not {expected} (If-Match)",
                current_version=self.version,
            )

    def record(self) -> Record:
        """Host copies of everything needed to continue exactly (call under the lock)."""
        return Record(kind=self.kind.name, config=self.config.to_dict(), seed=self.seed, version=self.version,
                      counters=dict(self.counters), created_at=self.created_at, saved_at=time.time(),
                      durability=self.durability, owner=owner_of(self.name),
                      arrays={k: np.asarray(v) for k, v in compartment_paths(self.state).items()})

    def describe(self, durability: str) -> dict[str, Any]:
        """Kind, config, compartment shapes and dtypes, device, counters and version (call under the lock)."""
        leaves = compartment_paths(self.state)
        owner, name = self.name.split("/", 1)
        return {
            "name": name,
            "owner": owner,
            "durability": durability,
            "kind": self.kind.name,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "device": f"{self.device.platform}:{self.device.id}",
            "version": self.version,
            "counters": dict(self.counters),
            "compartments": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in leaves.items()},
            "state_bytes": self.state_bytes,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


class WouldBlock(Exception):  # noqa: N818 - a signal, not an error: the caller hands the call to a worker
    """An inline call that would have to wait (for the instance's lock) or could take long."""


class CompartmentRef(NamedTuple):
    """A tensor argument that names a compartment on the server instead of sending its values.

    ``instance`` None means the instance being called (its value when the call starts);
    otherwise another instance of the same owner.
    """

    compartment: str
    instance: str | None = None


def _resolve(instance: Instance, argument: str, ref: CompartmentRef, leaves: Mapping[str, Any]) -> jax.Array:
    """The compartment a reference names (call under the instance's lock)."""
    value = leaves.get(ref.compartment)
    if value is None or not jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
        raise UnknownOperation(
            f"{argument}: cannot refer to {ref.compartment!r}: no such floating compartment in "
            f"{instance.name.split('/', 1)[1]!r}; it has: {', '.join(sorted(leaves))}",
            argument=argument)
    return value


def _own_copy(value: jax.Array, caller: Instance) -> jax.Array:
    """A buffer of its own on the caller's device: the source's buffers are donated by its next call."""
    return jax.device_put(value, caller.device, may_alias=False)


def _fingerprint(operation: str, args: list[Any], returned: list[str]) -> str:
    """What a keyed request asked for, so a key reused for another request is caught."""
    digest = hashlib.sha256(f"{operation}|{returned}".encode())
    for array in args:
        if array is None or isinstance(array, CompartmentRef):
            digest.update(f"-{array!r}".encode())
        else:
            digest.update(f"{array.shape}".encode() + np.asarray(array).tobytes())
    return digest.hexdigest()


def _device_call(fn, *args):
    """Run a JAX computation; failures of the device are the server's, not the caller's."""
    try:
        return fn(*args)
    except SynapseServeError:
        raise
    except (jax.errors.JaxRuntimeError, MemoryError) as exc:  # OOM and other device faults
        raise DeviceError(f"the device failed: {str(exc).splitlines()[0][:300]}") from exc


class Registry:
    """In-process instances on the JAX devices of this process, optionally kept in a Store.

    Placement: a new instance goes to the device asked for, else to the one holding the
    fewest state bytes; ``device_budget_bytes`` refuses one that would not fit there.

    Durability: ``sync`` writes an instance's file before a mutating call is
    acknowledged; ``interval`` writes changed instances every few seconds
    (``start_flusher``) and at shutdown; ``off`` keeps everything in memory.
    """

    def __init__(self, max_instances: int = 10_000, store: Store | None = None, durability: str = "off", *,
                 max_instances_per_owner: int | None = None, max_state_bytes_per_owner: int | None = None,
                 max_batch: int | None = None, worker_threads: int = 32, inline_max_s: float = 0.0,
                 devices: list[jax.Device] | None = None, device_budget_bytes: int | None = None) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}")
        self._instances: dict[str, Instance] = {}
        self._lock = threading.Lock()  # guards the dict, not the instances
        self.max_instances = max_instances
        self.max_instances_per_owner = max_instances_per_owner
        self.max_state_bytes_per_owner = max_state_bytes_per_owner
        self.max_batch = max_batch
        self.devices = list(devices or jax.devices())
        self.device = self.devices[0]
        self.device_budget_bytes = device_budget_bytes
        # state bytes placed on each device, counted at create (import, restore) size
        self._placed_bytes: dict[jax.Device, int] = {d: 0 for d in self.devices}
        self._owned_count: Counter[str] = Counter()  # per owner, for the quotas: no scan per create
        self._owned_bytes: Counter[str] = Counter()
        self.store = store
        self.durability = durability if store is not None else "off"
        self.storage_error: str | None = None  # the last write failure, until a write succeeds
        self.restore_errors: dict[str, str] = {}
        self._flush_lock = threading.Lock()
        self._stop_flusher = threading.Event()
        self._flusher: threading.Thread | None = None
        self._evictor: threading.Thread | None = None
        # where the API runs registry work: calls on different instances proceed side by side,
        # calls on one instance wait for its lock here, never on the event loop
        self.executor = ThreadPoolExecutor(max_workers=worker_threads, thread_name_prefix="synapse-worker")
        # calls measured to take less than this may run on the event loop itself, saving the thread hop
        self.inline_max_s = inline_max_s

    # --- lifecycle ---

    def create(self, name: str, kind: str, config: Mapping[str, Any], init: Mapping[str, Any] | None = None,
               seed: int = 0, durability: str | None = None, device: str | int | None = None) -> dict[str, Any]:
        """Create and describe a new instance; 409 if the name is taken.

        ``durability`` overrides the server's mode for this instance (e.g. ``"sync"`` for one that
        must never lose an acknowledged evolve, ``"off"`` for a scratch one). ``device`` places it
        on that device (an index into ``devices`` or a name like ``"cuda:1"``; see ``device_names``).
        """
        name = self._key(name)
        if durability is not None and durability not in DURABILITY_MODES:
            raise InvalidConfig(f"durability: {durability!r} is not allowed; choose one of "
                                f"{', '.join(DURABILITY_MODES)} (or leave it out for the server's default)",
                                field="durability")
        kind_ = get_kind(kind)
        cfg = kind_.parse_config(config)
        init = dict(init or {})
        unknown = set(init) - {"weights", "biases"}
        if unknown:
            raise InvalidConfig(f"init: unknown keys {sorted(unknown)}; allowed: weights, biases", field="init")
        nbytes = kind_.state_nbytes(cfg)
        target = self._place(nbytes, device)
        if kind_.choose_filter_update is not None:
            cfg = kind_.choose_filter_update(cfg, target.platform, target)
        return self._add(name, kind_, cfg, seed, lambda: kind_.init(cfg, seed, init.get("weights"), init.get("biases")),
                         durability=durability, device=target, nbytes=nbytes)

    def placed_bytes(self, device: jax.Device) -> int:
        """State bytes the budget counts on ``device``."""
        with self._lock:
            return self._placed_bytes[device]

    def probe_devices(self) -> None:
        """A tiny computation on every device, waited for: raises if one cannot compute."""
        for device in self.devices:
            jax.block_until_ready(jax.device_put(np.ones(1, np.float32), device) + 1)

    def device_names(self) -> list[str]:
        """The devices instances can be placed on, as ``platform:id`` (``"cpu:0"``, ``"cuda:1"``)."""
        return [f"{d.platform}:{d.id}" for d in self.devices]

    def _place(self, nbytes: int, requested: str | int | None = None) -> jax.Device:
        """The device for a new instance of ``nbytes``: the one asked for, else the least filled.

        Raises DeviceFull when it would go over ``device_budget_bytes`` there.
        """
        if requested is None:
            with self._lock:
                device = min(self.devices, key=lambda d: self._placed_bytes[d])
        else:
            names = self.device_names()
            if isinstance(requested, int) and not isinstance(requested, bool) and 0 <= requested < len(names):
                device = self.devices[requested]
            elif isinstance(requested, str) and requested in names:
                device = self.devices[names.index(requested)]
            else:
                raise InvalidConfig(f"device: {requested!r} is not one of this server's devices: "
                                    f"{', '.join(names)} (or their index 0..{len(names) - 1})", field="device")
        self._check_budget(device, nbytes)
        return device

    def _check_budget(self, device: jax.Device, nbytes: int) -> None:
        if self.device_budget_bytes is None:
            return
        used = self._placed_bytes[device]
        if used + nbytes > self.device_budget_bytes:
            raise DeviceFull(
                f"device {device.platform}:{device.id} holds {used} bytes of state; this instance needs {nbytes} "
                f"more, over the device budget of {self.device_budget_bytes} bytes"
                + ("" if len(self.devices) == 1 else "; another device may have room (see GET /v1/devices)"),
                device=f"{device.platform}:{device.id}", used_bytes=used, needed_bytes=nbytes,
                budget_bytes=self.device_budget_bytes)

    def import_(self, name: str, blob: bytes) -> dict[str, Any]:
        """Create an instance from an exported file: same config, compartments, counters and version."""
        name = self._key(name)
        try:
            record = decode(blob)
        except CorruptFile as exc:
            raise InvalidConfig(f"not a valid instance file: {exc}") from None
        return self._add_record(name, record)

    def export(self, name: str) -> bytes:
        """One self-contained file (safetensors; config and metadata in its header)."""
        with self._hold(name) as instance:
            record = instance.record()
        return encode(record)

    def _add_record(self, name: str, record: Record, stored: bool = False) -> dict[str, Any]:
        """Add an instance from a record; a stored one (restore) is exempt from quotas: it was admitted before."""
        kind_ = get_kind(record.kind)
        cfg = kind_.parse_config(record.config)

        def build() -> Any:
            return state_from_compartments(kind_, cfg, record.seed, record.arrays)

        nbytes = int(sum(np.asarray(a).nbytes for a in record.arrays.values()))
        device = self._place(0 if stored else nbytes)  # a restore must not drop a stored instance: no budget
        return self._add(name, kind_, cfg, record.seed, build, record=record, stored=stored,
                         durability=record.durability, device=device, nbytes=nbytes)

    def _add(self, name: str, kind_: Kind, cfg: Any, seed: int, build, *, device: jax.Device, nbytes: int,
             record: Record | None = None, stored: bool = False, durability: str | None = None) -> dict[str, Any]:
        """Reserve the name and the device bytes, build the state outside the registry lock, persist, describe."""
        owner, bare = name.split("/", 1)
        with self._lock:  # reserve the name before the (slow) init
            if name in self._instances:
                raise AlreadyExists(f"an instance named {bare!r} already exists", name=bare)
            if not stored:  # a restored instance was admitted before: quotas lowered since must not drop it
                self._check_quotas(owner, nbytes)
                self._check_budget(device, nbytes)  # again, under the lock: creates racing for the last room
            placeholder = Instance(name, kind_, cfg, None, seed, device, durability=durability, placed_bytes=nbytes)
            self._account(placeholder, +1)
            if record is not None:
                placeholder.version, placeholder.counters = record.version, dict(record.counters)
                placeholder.created_at = record.created_at
                placeholder.stored_version = record.version if stored else 0
            placeholder.lock.acquire()
            self._instances[name] = placeholder
        try:
            with jax.default_device(device):
                placeholder.state = jax.device_put(_device_call(build), device)  # committed: calls run there
            jax.block_until_ready(placeholder.state)
            self._persist(placeholder)
            return placeholder.describe(self.mode(placeholder))
        except BaseException:
            with self._lock:
                self._instances.pop(name, None)
                self._account(placeholder, -1)
            raise
        finally:
            placeholder.lock.release()

    def delete(self, name: str, expected_version: int | None = None) -> None:
        """Forget an instance; calls already running on it finish first."""
        with self._hold(name) as instance, self._lock:
            instance.check_version(expected_version)
            del self._instances[instance.name]
            self._account(instance, -1)
            if self.store is not None:
                self.store.remove(instance.name)
                self.store.remove_snapshots(instance.name)

    def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Describe every instance of ``owner`` (everyone's if None), sorted by owner and name."""
        with self._lock:
            instances = sorted((i for k, i in self._instances.items() if owner is None or owner_of(k) == owner),
                               key=lambda i: i.name)
        out = []
        for instance in instances:
            with instance.lock:
                if instance.state is not None:
                    out.append(instance.describe(self.mode(instance)))
        return out

    def describe(self, name: str) -> dict[str, Any]:
        with self._hold(name) as instance:
            return instance.describe(self.mode(instance))

    def help(self, name: str) -> dict[str, Any]:
        with self._hold(name) as instance:
            return instance.kind.help(instance.config)

    # --- operations ---

    def call(self, name: str, operation: str, tensors: Mapping[str, Any],
             returns: list[str] | None = None, *, idempotency_key: str | None = None,
             expected_version: int | None = None, inline: bool = False) -> dict[str, Any]:
        """Run ``operation`` on the instance; returns ``{"version": v, <compartment>: numpy, ...}``.

        ``inline=True`` is the event loop asking: the call runs only if it is known to be quick
        (its last run on this instance, at this batch, took under ``inline_max_s``), needs no disk
        write and no other instance, and the instance is free right now; otherwise ``WouldBlock``
        is raised before anything is touched, and the caller hands the call to a worker thread.

        A tensor argument is an array, or a ``CompartmentRef`` to a compartment already on the
        server (this instance's, read when the call starts; or another instance's of the same
        owner), which then never crosses the network. Sent tensors are checked (shape, dtype)
        before the lock is taken and before any state is touched; the new state replaces the
        old only on success. A repeated ``idempotency_key`` returns the first answer without
        running again; ``expected_version`` (If-Match) must equal the current version.
        """
        instance = self._get(name)
        op = instance.kind.operations.get(operation)
        if op is None:
            raise UnknownOperation(
                f"{instance.kind.name} has no operation {operation!r}; it has: {', '.join(instance.kind.operations)}"
            )
        allowed = {a.name for a in op.args}
        unknown = set(tensors) - allowed
        if unknown:
            raise UnknownOperation(
                f"{operation} takes {', '.join(sorted(allowed)) or 'no tensors'}; unknown: {', '.join(sorted(unknown))}"
            )
        args: list[Any] = []
        for arg in op.args:
            value = tensors.get(arg.name)
            if value is None and not arg.optional:
                raise UnknownOperation(f"{operation} needs the tensor {arg.name!r}", argument=arg.name)
            if value is not None and not isinstance(value, CompartmentRef):
                value = check_tensor(arg.name, value, instance.config.trailing(arg.space))
            args.append(value)
        self._check_batches(instance, op, args)
        cost_key = (operation, next((a.shape[0] for a in args if isinstance(a, np.ndarray)), None))
        if inline and not (instance.costs.get(cost_key, float("inf")) < self.inline_max_s
                           and self.mode(instance) != "sync"
                           and not any(isinstance(a, CompartmentRef) and a.instance for a in args)):
            raise WouldBlock
        returned = list(op.returns if returns is None else returns)
        fingerprint = _fingerprint(operation, args, returned) if idempotency_key is not None else ""
        # another instance's compartments are copied before our lock is taken: never two locks at once
        args = [self._read_for(instance, arg.name, a) if isinstance(a, CompartmentRef) and a.instance else a
                for arg, a in zip(op.args, args)]
        with self._hold(instance.name, instance, blocking=not inline):
            if idempotency_key is not None and idempotency_key in instance.answers:
                seen, answer = instance.answers[idempotency_key]
                if seen != fingerprint:
                    raise InvalidConfig(
                        f"Idempotency-Key {idempotency_key[:64]!r} was used for a different request on this instance"
                    )
                return answer
            instance.check_version(expected_version)
            leaves = compartment_paths(instance.state)
            for compartment in returned:
                if compartment not in leaves:
                    raise UnknownOperation(
                        f"cannot return {compartment!r}: no such compartment; has: {', '.join(leaves)}"
                    )
            if any(isinstance(a, CompartmentRef) for a in args):
                args = [_own_copy(_resolve(instance, arg.name, a, leaves), instance) if isinstance(a, CompartmentRef)
                        else a
                        for arg, a in zip(op.args, args)]
                self._check_batches(instance, op, args)
            started = time.perf_counter()
            state = _device_call(op.fn, instance.config, instance.state, *args)
            result = {c: np.asarray(v) for c, v in compartment_paths(state).items() if c in returned}
            instance.costs[cost_key] = time.perf_counter() - started  # the first run includes any compile
            instance.state = state
            instance.version += 1
            instance.counters[operation] = instance.counters.get(operation, 0) + 1
            instance.last_used_at = time.time()
            self._persist(instance)
            answer = {"version": instance.version, **result}
            if idempotency_key is not None:
                instance.answers[idempotency_key] = (fingerprint, answer)
                while len(instance.answers) > IDEMPOTENCY_KEYS_KEPT:
                    instance.answers.popitem(last=False)
            return answer

    def _read_for(self, caller: Instance, argument: str, ref: CompartmentRef) -> jax.Array:
        """A device copy of another instance's compartment (same owner), read under that instance's lock."""
        other = qualify(owner_of(caller.name), ref.instance)
        if other == caller.name:
            return ref._replace(instance=None)  # this instance: resolved under its own lock
        with self._hold(other) as source:
            return _own_copy(_resolve(source, argument, ref._replace(instance=None),
                                      compartment_paths(source.state)), caller)

    def _check_batches(self, instance: Instance, op: Any, args: list[Any]) -> None:
        """Resolved arguments: each shaped for its map, all of one batch, within max_batch."""
        batch = None
        for arg, value in zip(op.args, args):
            if value is None or isinstance(value, CompartmentRef):
                continue
            trailing = tuple(instance.config.trailing(arg.space))
            if tuple(value.shape[1:]) != trailing or value.ndim != 1 + len(trailing):
                raise ShapeMismatch(f"{arg.name}: expected shape (batch, {', '.join(map(str, trailing))}), "
                                    f"received {tuple(value.shape)}", argument=arg.name)
            if batch is not None and value.shape[0] != batch:
                raise ShapeMismatch(f"{arg.name}: expected batch {batch} (as the arguments before it), received "
                                    f"{value.shape[0]}", argument=arg.name)
            batch = value.shape[0]
            if self.max_batch is not None and batch > self.max_batch:
                raise ShapeMismatch(f"{arg.name}: batch {batch} is over the server's max_batch of {self.max_batch}",
                                    argument=arg.name)

    def read(self, name: str, compartment: str) -> tuple[np.ndarray, int]:
        """A host copy of one compartment and the version it belongs to."""
        with self._hold(name) as instance:
            leaves = compartment_paths(instance.state)
            if compartment not in leaves:
                raise UnknownOperation(
                    f"unknown compartment {compartment!r}; this {instance.kind.name} has: {', '.join(leaves)}"
                )
            return np.asarray(leaves[compartment]), instance.version

    def write(self, name: str, compartment: str, value: Any, expected_version: int | None = None) -> int:
        """Replace one compartment (shape and dtype checked); returns the new version."""
        with self._hold(name) as instance:
            instance.check_version(expected_version)
            instance.state = replace_compartment(instance.kind, instance.state, compartment, value)
            instance.version += 1
            instance.last_used_at = time.time()
            self._persist(instance)
            return instance.version

    # --- operations' view: everything, eviction, gauges ---

    def evict_idle(self, idle_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Export, then delete, every instance unused for ``idle_s`` seconds; returns what was evicted.

        Each goes to ``<state_dir>/evicted/<owner>/<name>-<time>.safetensors`` (the export format:
        ``POST /v1/synapses/import`` brings it back) before it is deleted; its snapshots stay.
        An instance used meanwhile, or whose file cannot be written, stays.
        """
        store = self._require_store()
        now = time.time() if now is None else now
        with self._lock:
            candidates = [i for i in self._instances.values() if i.state is not None and now - i.last_used_at >= idle_s]
        evicted = []
        for instance in candidates:
            with instance.lock:
                if self._instances.get(instance.name) is not instance or now - instance.last_used_at < idle_s:
                    continue
                record = instance.record()
                try:
                    path = store.save_evicted(instance.name, record)
                except OSError as exc:
                    log.error("could not evict %s: %s", instance.name, exc)
                    continue
                with self._lock:
                    del self._instances[instance.name]
                    self._account(instance, -1)
                store.remove(instance.name)
            owner, name = instance.name.split("/", 1)
            evicted.append({"owner": owner, "name": name, "state_bytes": instance.state_bytes,
                            "last_used_at": instance.last_used_at, "file": str(path)})
            log.info("evicted %s (idle %.0f s) to %s", instance.name, now - instance.last_used_at, path)
        return evicted

    def stats(self) -> dict[str, Any]:
        """Gauges for the metrics: instances by kind and owner, state bytes and budget by device, queues."""
        with self._lock:
            instances = [i for i in self._instances.values() if i.state is not None]
        by_kind_owner: dict[tuple[str, str], int] = {}
        by_device = {f"{d.platform}:{d.id}": 0 for d in self.devices}
        queues = {}
        for instance in instances:
            key = (instance.kind.name, owner_of(instance.name))
            by_kind_owner[key] = by_kind_owner.get(key, 0) + 1
            by_device[f"{instance.device.platform}:{instance.device.id}"] += instance.state_bytes
            if instance.waiting:
                queues[instance.name] = instance.waiting
        return {"instances": by_kind_owner, "state_bytes": by_device, "queue_depth": queues,
                "device_budget_bytes": self.device_budget_bytes}

    # --- snapshots ---

    def snapshot(self, name: str, snapshot: str) -> dict[str, Any]:
        """Store a named point-in-time copy of the instance (always on disk, whatever the durability mode)."""
        validate_name(snapshot)
        store = self._require_store()
        with self._hold(name) as instance:
            if store.snapshot_path(instance.name, snapshot).exists():
                raise AlreadyExists(f"this instance already has a snapshot {snapshot!r}", snapshot=snapshot)
            record = instance.record()
            try:
                store.save_snapshot(instance.name, snapshot, record)
            except OSError as exc:
                raise StorageError(f"could not store snapshot {snapshot!r}: {exc}") from exc
        return self._snapshot_info(snapshot, record)

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        """The instance's snapshots, oldest first."""
        store = self._require_store()
        with self._hold(name) as instance:
            paths = store.list_snapshots(instance.name)
        infos = [self._snapshot_info(p.name[: -len(".safetensors")], self._read_snapshot(p)) for p in paths]
        return sorted(infos, key=lambda i: i["created_at"])

    def restore_snapshot(self, name: str, snapshot: str, expected_version: int | None = None) -> int:
        """Replace every compartment with the snapshot's; counters keep counting; returns the new version."""
        store = self._require_store()
        with self._hold(name) as instance:
            instance.check_version(expected_version)
            path = store.snapshot_path(instance.name, validate_name(snapshot))
            if not path.exists():
                raise NotFound(f"this instance has no snapshot {snapshot!r}", snapshot=snapshot)
            record = self._read_snapshot(path)
            state = _device_call(state_from_compartments, instance.kind, instance.config, instance.seed,
                                 record.arrays)
            instance.state = state
            instance.version += 1
            instance.counters["restore"] = instance.counters.get("restore", 0) + 1
            instance.last_used_at = time.time()
            self._persist(instance)
            return instance.version

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        store = self._require_store()
        with self._hold(name) as instance:
            path = store.snapshot_path(instance.name, validate_name(snapshot))
            if not path.exists():
                raise NotFound(f"this instance has no snapshot {snapshot!r}", snapshot=snapshot)
            path.unlink()

    @staticmethod
    def _read_snapshot(path) -> Record:
        try:
            return decode(path.read_bytes())
        except (CorruptFile, OSError) as exc:
            raise StorageError(f"snapshot {path.name} is unreadable: {exc}") from exc

    @staticmethod
    def _snapshot_info(snapshot: str, record: Record) -> dict[str, Any]:
        return {"snapshot": snapshot, "version": record.version, "counters": record.counters,
                "created_at": record.saved_at}

    def _require_store(self) -> Store:
        if self.store is None:
            raise StorageError("this server has no state directory: snapshots need one")
        return self.store

    # --- durability ---

    def mode(self, instance: Instance) -> str:
        """The durability mode in force for ``instance``."""
        if self.store is None:
            return "off"
        return instance.durability or self.durability

    def _persist(self, instance: Instance) -> None:
        """In sync mode, write the instance now (under its lock); the other modes write later or never."""
        if self.mode(instance) != "sync":
            return
        if not self._write(instance, logging.ERROR):
            raise StorageError(
                f"the call was applied in memory but could not be stored durably ({self.storage_error}); "
                "the server retries the write at its next flush",
                name=instance.name.split("/", 1)[1],
            )
        self.storage_error = None

    def _write(self, instance: Instance, failure_level: int) -> bool:
        """Store the instance (under its lock); on failure remember and log why, and say False."""
        try:
            self.store.save(instance.name, instance.record())
        except OSError as exc:
            self.storage_error = f"{type(exc).__name__}: {exc}"
            log.log(failure_level, "could not store %s: %s", instance.name, self.storage_error)
            return False
        instance.stored_version = instance.version
        return True

    def flush(self) -> int:
        """Write every instance whose version moved since it was stored; returns how many were written."""
        if self.store is None:
            return 0
        written = 0
        with self._flush_lock:
            with self._lock:
                instances = list(self._instances.values())
            for instance in instances:
                with instance.lock:  # a consistent state, and no delete can race the write
                    if instance.state is None or self._instances.get(instance.name) is not instance:
                        continue
                    if instance.stored_version == instance.version or self.mode(instance) == "off":
                        continue
                    written += self._write(instance, logging.WARNING)
            with self._lock:
                live = list(self._instances.values())
            if all(i.stored_version == i.version for i in live if i.state is not None and self.mode(i) != "off"):
                self.storage_error = None  # nothing pending any more
        return written

    def start_flusher(self, interval_s: float) -> None:
        """Write changed instances every ``interval_s`` seconds (interval mode; in sync mode it only
        retries writes that failed). Runs whenever there is a store: instances may choose their own mode."""
        if self.store is None or self._flusher is not None:
            return

        def loop() -> None:
            while not self._stop_flusher.wait(interval_s):
                self.flush()

        self._flusher = threading.Thread(target=loop, name="synapse-flusher", daemon=True)
        self._flusher.start()

    def start_evictor(self, idle_s: float) -> None:
        """Evict instances idle for ``idle_s`` seconds, checking every min(60 s, idle_s / 4)."""
        if self.store is None or self._evictor is not None:
            return

        def loop() -> None:
            while not self._stop_flusher.wait(min(60.0, idle_s / 4)):
                self.evict_idle(idle_s)

        self._evictor = threading.Thread(target=loop, name="synapse-evictor", daemon=True)
        self._evictor.start()

    def close(self) -> None:
        """Stop the flusher and write whatever changed (graceful shutdown)."""
        self._stop_flusher.set()
        for thread in (self._flusher, self._evictor):
            if thread is not None:
                thread.join()
        self.executor.shutdown(wait=True)  # calls in flight finish before the last write
        self.flush()

    def restore(self) -> dict[str, str]:
        """Load every stored instance; unreadable files are quarantined and reported, never overwritten."""
        if self.store is None:
            return {}
        removed = self.store.prepare()
        if removed:
            log.info("removed %d temporary files left by a crash", len(removed))
        records, errors = self.store.load_all()
        for name, record in records.items():
            try:
                self._add_record(name, record, stored=True)
            except SynapseServeError as exc:
                errors[name] = exc.detail
                self.store.quarantine.mkdir(parents=True, exist_ok=True)
                self.store.path(name).replace(self.store.quarantine / f"{name.replace('/', '__')}.unusable")
        for name, reason in errors.items():
            log.error("could not restore instance %s: %s", name, reason)
        self.restore_errors = errors
        log.info("restored %d instances; %d files unreadable", len(self._instances), len(errors))
        return errors

    def _check_quotas(self, owner: str, nbytes: int) -> None:
        """Quotas on instances and state bytes (counted at create size); call under the registry lock."""
        if len(self._instances) >= self.max_instances:
            raise QuotaExceeded(f"the server holds its maximum of {self.max_instances} instances",
                                quota="max_instances")
        owned, used = self._owned_count[owner], self._owned_bytes[owner]
        if self.max_instances_per_owner is not None and owned >= self.max_instances_per_owner:
            raise QuotaExceeded(f"quota max_instances_per_owner: {owner!r} already holds {owned} of "
                                f"{self.max_instances_per_owner} instances", quota="max_instances_per_owner")
        if self.max_state_bytes_per_owner is not None and used + nbytes > self.max_state_bytes_per_owner:
            raise QuotaExceeded(
                f"quota max_state_bytes_per_owner: {owner!r} holds {used} bytes; this instance needs "
                f"{nbytes} more, over the quota of {self.max_state_bytes_per_owner}",
                quota="max_state_bytes_per_owner")

    def _account(self, instance: Instance, sign: int) -> None:
        """Add (+1) or remove (-1) an instance's bytes and count; call under the registry lock."""
        owner = owner_of(instance.name)
        self._placed_bytes[instance.device] += sign * instance.placed_bytes
        self._owned_bytes[owner] += sign * instance.placed_bytes
        self._owned_count[owner] += sign

    @staticmethod
    def _key(name: str) -> str:
        """A registry key: ``owner/name`` as given, or a bare name of the local owner."""
        if isinstance(name, str) and "/" in name:
            owner, bare = name.split("/", 1)
            return qualify(owner, bare)
        return qualify(LOCAL_OWNER, name)

    @contextmanager
    def _hold(self, name: str, instance: Instance | None = None, blocking: bool = True) -> Iterator[Instance]:
        """The instance, locked; NotFound if it was deleted (or failed to init) while we waited.

        With ``blocking=False``, WouldBlock if another call holds it.
        """
        instance = instance or self._get(name)
        if not instance.lock.acquire(blocking=False):
            if not blocking:
                raise WouldBlock
            with self._lock:
                instance.waiting += 1  # the queue depth the metrics show
            try:
                instance.lock.acquire()
            finally:
                with self._lock:
                    instance.waiting -= 1
        try:
            if instance.state is None or self._instances.get(instance.name) is not instance:
                raise NotFound(f"no instance named {instance.name.split('/', 1)[1]!r}")
            yield instance
        finally:
            instance.lock.release()

    def _get(self, name: str) -> Instance:
        key = name if isinstance(name, str) and name.count("/") == 1 else None
        with self._lock:
            instance = self._instances.get(key) if key else self._instances.get(f"{LOCAL_OWNER}/{name}")
        if instance is None:
            bare = str(name).split("/", 1)[-1][:140]
            raise NotFound(f"no instance named {bare!r}", name=bare)
        return instance

    def __len__(self) -> int:
        return len(self._instances)
