"""A shard: one long-lived Ray actor per device, holding many instances with the local engine.

The actor runs a ``LocalBackend`` over its own state directory (``<state_dir>/shards/shard-<i>``,
on storage every node mounts) with every call in the calling actor thread, exactly as the
in-process client does: the same registry, checks, limits, durability and numbers. The actor is
threaded (``max_concurrency``), so calls on different instances run side by side and calls on
one instance wait for its lock.

When Ray restarts a shard that died, ``__init__`` runs again and restores the instances from
the directory before the actor answers anything (Ray queues calls until ``__init__`` returns).

The calls a loop makes on every step reach the shard over its direct channel (``channel.py``: a
socket of its own, not Ray's RPC) when the deployment allows it; both run ``run`` below.

Domain errors cross the process boundary as plain values (``("error", class, detail, extra,
headers)``) and are raised again, as the same class, by the front; anything else is a bug and
crosses as Ray's own error. JAX is imported only here, in the actor's process.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from synapse_serve.errors import SynapseServeError
from synapse_serve.names import InstanceKey

# what the front may ask a shard to run: the Backend methods that act on the shard's instances
CLAIM_LEASE_S = 600.0  # a name claimed for a create and never settled nor released is free again after this long
# a growth's reservation waits this long for the directory (holding the shard's capacity lock: every create and
# growth on the shard waits with it); one not answered makes the next CLAIM_BACKOFF_S count this shard's bytes alone
CLAIM_TIMEOUT_S = 5.0
CLAIM_BACKOFF_S = 10.0
ASYNC_METHODS = frozenset({
    "create", "describe", "help", "stats", "history", "list", "delete", "call", "call_many", "call_stacked",
    "read", "write", "import_", "snapshot", "snapshots", "rollback", "delete_snapshot", "evicted", "unevict",
    "discard_evicted", "evict_idle", "storage", "devices", "gauges", "probe",
})
SYNC_METHODS = frozenset({"kinds", "kind_help", "operation_names", "storage_error", "describe_setup"})


def frame_cap(settings: Any) -> int:
    """The largest request frame a shard's channel takes: a body at the limit, with a reference's values fetched
    from another shard beside it (larger requests go through Ray)."""
    return 2 * settings.max_body_bytes + (64 << 20)


def _node_address(ray: Any) -> str:
    """The address this node has in the cluster (the one Ray's own ports use), not whatever the host routes by."""
    node = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node)


def _claim_cores(count: int, wait_s: float = 5.0) -> list[int] | None:
    """Pin this process (every thread) to ``count`` cores no other shard on this node holds, and hold them while
    the process lives (a lock file per core, released by the kernel when the process ends, however it ends).

    Ray reserves CPUs by count, not which ones; without this every shard's XLA would spread its threads over all
    the node's cores and the shards would fight for them. None (not pinned, logged) if no such cores free up
    within ``wait_s`` (a shard that just died may still hold its own).
    """
    import fcntl  # noqa: PLC0415 - POSIX only, like Ray's workers

    import ray  # noqa: PLC0415 - in the actor's process

    cores = sorted(os.sched_getaffinity(0))
    folder = Path(tempfile.gettempdir()) / "synapse-serve-cores" / ray.get_runtime_context().get_node_id()
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        held: list[tuple[int, Any]] = []
        for core in cores:
            handle = (folder / f"{core}.lock").open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            held.append((core, handle))
            if len(held) == count:
                _HELD_CORES.extend(handle for _, handle in held)
                mine = {core for core, _ in held}
                for thread in os.listdir("/proc/self/task"):  # Ray's threads too: they run our calls
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(int(thread), mine)
                return sorted(mine)
        for _, handle in held:
            handle.close()
        if time.monotonic() > deadline:
            logging.getLogger("synapse_serve").warning(
                "shard: no %d free cores of %d on this node; not pinned (the shards share the cores)", count, len(cores))
            return None
        time.sleep(0.2)


_HELD_CORES: list[Any] = []  # the open, locked files that say which cores this process holds


class Shard:
    """The actor's class (wrapped by ``ray.remote`` in the front): a LocalBackend run in the actor's threads."""

    def __init__(self, index: int, settings: dict[str, Any], cores: int = 0) -> None:
        # a CPU shard is a device of ``cores`` cores of its own: pinned before JAX sizes its threads to them
        self.cores = _claim_cores(cores) if cores else None
        from synapse_serve.inprocess import _complete  # noqa: PLC0415 - JAX comes in with the local backend
        from synapse_serve.local.backend import LocalBackend
        from synapse_serve.settings import Settings

        self.index = index
        self.given = dict(settings)  # what the front that started it asked for (later fronts compare theirs)
        self._complete = _complete
        state_dir = Path(settings["state_dir"]) / "shards" / f"shard-{index}"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.settings = Settings(**{**settings, "state_dir": state_dir})
        self.backend = LocalBackend(self.settings, in_caller_thread=True)
        self.backend.registry.on_evicted = self._release_names
        # the owner byte quotas count what every shard holds (before the restore: it reports what it admits)
        self.ledger = ShardLedger(index, self.settings.ray_namespace)
        self.backend.registry.capacity.ledger = self.ledger
        self.phase = "starting"
        _complete(self.backend.start())  # the directory's lock: the dead incarnation's went with its process
        _complete(self.backend.get_ready(self._set_phase))  # restored before the first call is answered
        self.listener = None
        if self.settings.ray_direct:
            import ray  # noqa: PLC0415 - in the actor's process

            from synapse_serve.cluster.channel import Listener

            port = self.settings.ray_direct_port + index if self.settings.ray_direct_port else 0
            host = self.settings.ray_direct_host or _node_address(ray)
            try:
                self.listener = Listener(self.run, host=host, port=port, max_frame_bytes=frame_cap(self.settings),
                                         max_elements=self.settings.max_tensor_elements)
            except (OSError, OverflowError) as exc:  # a port taken or out of range: Ray carries the calls instead
                logging.getLogger("synapse_serve").warning(
                    "shard-%d: its direct channel cannot listen on %s:%d (%s); the front sends everything "
                    "through Ray", index, host, port, exc)
        self.ledger.restarted(self.usage())
        self.phase = "ready"

    def _set_phase(self, phase: str) -> None:
        self.phase = phase

    def _release_names(self, evicted: list[dict[str, Any]]) -> None:
        """The idle evictor took these instances out: the deployment's directory frees their names (else a restore
        or a create of one is refused as taken, and they count against their owners' instance quotas)."""
        import ray  # noqa: PLC0415 - in the actor's process

        try:
            directory = ray.get_actor("directory", namespace=self.settings.ray_namespace)
            for entry in evicted:
                directory.release.remote(entry["owner"], entry["name"], self.index)
        except Exception as exc:  # noqa: BLE001 - the front frees a stale name when it meets one
            logging.getLogger("synapse_serve").warning("shard-%d: the directory did not hear of %d evicted "
                                                       "instances (%s)", self.index, len(evicted), exc)

    def run(self, method: str, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """One Backend method on this shard: ``("ok", value)`` or ``("error", class, detail, extra, headers)``."""
        try:
            if method in ASYNC_METHODS:
                value = self._complete(getattr(self.backend, method)(*args, **kwargs))
            elif method in SYNC_METHODS:
                value = getattr(self.backend, method)(*args, **kwargs)
            elif method == "export":
                length, parts = self._complete(self.backend.export(*args, **kwargs))
                value = b"".join(bytes(part) for part in parts())  # one object for Ray to carry
                assert len(value) == length
            else:
                raise ValueError(f"a shard does not run {method!r}")
        except SynapseServeError as exc:
            return ("error", type(exc).__name__, exc.detail, exc.extra, exc.headers)
        return ("ok", value)

    def channel(self) -> tuple[str, int, bytes] | None:
        """Where this shard's direct channel listens and its secret (None: the deployment turned it off)."""
        return None if self.listener is None else (*self.listener.address, self.listener.secret)

    def keys(self) -> list[tuple[str, str]]:
        """Every (owner, name) this shard holds or is restoring or could not load: the names it answers for."""
        registry = self.backend.registry
        with registry._lock:
            keys = set(registry._instances) | set(registry._restoring) | set(registry._unloadable)
        return sorted((key.owner, key.name) for key in keys)

    def holds(self, owner: str, name: str) -> bool:
        """Whether ``keys`` has (owner, name): what a front looking for one name asks (not every key, per lookup)."""
        registry, key = self.backend.registry, InstanceKey(owner, name)
        with registry._lock:
            return key in registry._instances or key in registry._restoring or key in registry._unloadable

    def info(self) -> dict[str, Any]:
        """Who and where this shard is (for the front's listing, tests and operators)."""
        return {"index": self.index, "pid": os.getpid(), "host": socket.gethostname(), "phase": self.phase,
                "state_dir": str(self.settings.state_dir), "devices": self.backend.describe_setup()["devices"],
                "cores": self.cores,
                "channel": None if self.listener is None else {
                    "address": list(self.listener.address), "frames": self.listener.frames,
                    "refused": self.listener.refused}}

    def ping(self) -> int:
        return self.index

    def usage(self) -> dict[str, Any]:
        """Each owner's state and snapshot bytes here, with the ledger's sequence (a directory starting afresh)."""
        return {"seq": self.ledger.next_seq(), **self.backend.registry.capacity.usage()}

    def started_with(self) -> dict[str, Any]:
        """The settings this shard was started with (a detached shard keeps them until it is stopped)."""
        return self.given

    def close(self) -> None:
        """Write what changed and release the directory (before the actor is killed on purpose)."""
        if self.listener is not None:
            self.listener.close()
        self._complete(self.backend.close())


class ShardLedger:
    """A shard's side of the owner byte quotas across a deployment: what each owner holds here goes to the
    directory as it changes (fire and forget, in order: each report carries a sequence that a restarted shard
    continues past), and growth is reserved there first, so the quota holds for the owner's bytes on every
    shard, as on one host. Without a directory to ask, a shard checks what it holds itself (and logs why)."""

    def __init__(self, index: int, namespace: str) -> None:
        self.index, self.namespace = index, namespace
        self._epoch = time.time_ns()  # a restarted shard's sequence is past its dead incarnation's
        self._counter = itertools.count()
        self._directory: Any = None
        self._missed_at = -1.0  # when the directory was last not found (reports skip it for a second after)
        self._claim_missed_at = -CLAIM_BACKOFF_S  # when a reservation last went unanswered

    def next_seq(self) -> tuple[int, int]:
        return (self._epoch, next(self._counter))

    def _reach(self) -> Any:
        if self._directory is None:
            import ray  # noqa: PLC0415 - in the actor's process

            self._directory = ray.get_actor("directory", namespace=self.namespace)
        return self._directory

    def restarted(self, usage: dict[str, Any]) -> None:
        """Tell the directory (if there is one yet) all this shard now holds: what its dead incarnation had reserved
        for an owner it holds nothing of now was never reported again, and counted against that owner for good."""
        try:
            self._reach().restarted.remote(self.index, usage)
        except Exception:  # noqa: BLE001 - no directory yet: a new one asks every shard when it starts
            self._directory, self._missed_at = None, time.monotonic()

    def report(self, owner: str, kind: str, held: int) -> None:
        if self._directory is None and time.monotonic() - self._missed_at < 1.0:
            return  # none yet (a restore before any front made one): it asks every shard when it starts
        try:
            self._reach().report.remote(self.index, owner, kind, held, self.next_seq())
        except Exception:  # noqa: BLE001 - no directory yet: as above
            self._directory, self._missed_at = None, time.monotonic()

    def claim(self, owner: str, kind: str, held: int, more: int, quota: int) -> tuple[int, bool]:
        import ray  # noqa: PLC0415 - in the actor's process

        if time.monotonic() - self._claim_missed_at < CLAIM_BACKOFF_S:  # not waited on again at once (see above)
            return held, held + more <= quota
        try:
            total, fits = ray.get(self._reach().claim_bytes.remote(self.index, owner, kind, held, more, quota,
                                                                   self.next_seq()), timeout=CLAIM_TIMEOUT_S)
            return int(total), bool(fits)
        except Exception as exc:  # noqa: BLE001 - unreachable: this shard's own count, said loudly
            self._directory, self._claim_missed_at = None, time.monotonic()
            logging.getLogger("synapse_serve").warning(
                "shard-%d: the directory did not answer (%s); for %.0f s the owner quotas are checked on this "
                "shard's bytes alone", self.index, exc, CLAIM_BACKOFF_S)
            return held, held + more <= quota


class Directory:
    """Which shard holds each name, for every front of one deployment: a named, detached, single-threaded actor,
    so two fronts creating the same name at the same moment cannot both succeed.

    A create claims the name first (``claim``: None if it was free, else the shard holding it or -1 while
    another create of it is under way), then ``settle``s it on the shard that took it, or ``release``s it. A
    restarted directory rebuilds itself from the shards' own lists (the durable map).
    """

    def __init__(self, namespace: str, shards: int) -> None:
        import ray  # noqa: PLC0415 - in the actor's process

        self.names: dict[tuple[str, str], int] = {}
        self.claimed_at: dict[tuple[str, str], float] = {}  # when each name still claimed (-1) was claimed
        # (shard, owner, "state" | "snapshot") -> (sequence, bytes): what each owner holds on each shard
        self.usage: dict[tuple[int, str, str], tuple[tuple[int, int], int]] = {}
        for index in range(shards):
            try:
                shard = ray.get_actor(f"shard-{index}", namespace=namespace)
                for owner, name in ray.get(shard.keys.remote(), timeout=60):
                    self.names[(owner, name)] = index
                held = ray.get(shard.usage.remote(), timeout=60)
                for kind in ("state", "snapshot"):
                    for owner, nbytes in held[kind].items():
                        self.report(index, owner, kind, nbytes, tuple(held["seq"]))
            except Exception:  # noqa: BLE001 - a shard not up yet: its names are claimed when it lists them
                continue

    def claim(self, owner: str, name: str, per_owner: int | None = None, total: int | None = None
              ) -> int | str | None:
        """Reserve a free name (None), or say who holds it: a shard, or -1 (a create of it is under way); or which
        instance-count quota a new name would break ("max_instances_per_owner", "max_instances"): counted here,
        across every shard, as one server counts them."""
        holder = self.names.get((owner, name))
        if holder == -1 and time.monotonic() - self.claimed_at.get((owner, name), 0.0) > CLAIM_LEASE_S:
            # its front died between the claim and the settle (no create takes this long): the name is free again,
            # once the claiming front has looked on every shard as any create does (a red-team run: blocked for good)
            holder = None
            del self.names[(owner, name)]
        if holder is None:
            if total is not None and len(self.names) >= total:
                return "max_instances"
            if per_owner is not None and sum(o == owner for o, _ in self.names) >= per_owner:
                return "max_instances_per_owner"
            self.names[(owner, name)] = -1
            self.claimed_at[(owner, name)] = time.monotonic()
        return holder

    def settle(self, owner: str, name: str, shard: int) -> None:
        self.names[(owner, name)] = shard
        self.claimed_at.pop((owner, name), None)

    def release(self, owner: str, name: str, shard: int | None = None) -> None:
        """Forget a name (a failed create: ``shard`` None; a delete or an eviction: only if ``shard`` still holds it —
        not a claim another front's create of the name took meanwhile, which would leave the name free for a third
        create on another shard while that one runs: two instances of one name)."""
        holder = self.names.get((owner, name))
        if holder is not None and (shard is None or holder == shard):
            del self.names[(owner, name)]
            self.claimed_at.pop((owner, name), None)

    def report(self, shard: int, owner: str, kind: str, held: int, seq: tuple[int, int]) -> None:
        """What ``owner`` holds on ``shard`` now (a report older than one already heard changes nothing)."""
        known = self.usage.get((shard, owner, kind))
        if known is None or tuple(seq) > known[0]:
            self.usage[(shard, owner, kind)] = (tuple(seq), held)

    def restarted(self, shard: int, usage: dict[str, Any]) -> None:
        """``shard`` started (again) and holds ``usage`` (``ShardLedger.restarted``): what an earlier incarnation
        reported or reserved is forgotten, what this one reported since is kept."""
        seq = tuple(usage["seq"])
        for entry in [k for k, (heard, _) in self.usage.items() if k[0] == shard and heard < seq]:
            del self.usage[entry]
        for kind in ("state", "snapshot"):
            for owner, nbytes in usage[kind].items():
                self.report(shard, owner, kind, nbytes, seq)

    def claim_bytes(self, shard: int, owner: str, kind: str, held: int, more: int, quota: int,
                    seq: tuple[int, int]) -> tuple[int, bool]:
        """What ``owner`` holds across the shards (``held`` on ``shard``), and whether ``more`` fits ``quota``; a
        fit is reserved at once (the shard reports again whatever happens next)."""
        self.report(shard, owner, kind, held, seq)
        total = sum(nbytes for (_, o, k), (_, nbytes) in self.usage.items() if o == owner and k == kind)
        if total + more > quota:
            return total, False
        self.usage[(shard, owner, kind)] = (tuple(seq), held + more)
        return total, True

    def learn(self, entries: list[tuple[str, str, int]]) -> None:
        """Names a front found on shards (at its start): known holders are kept."""
        for owner, name, shard in entries:
            self.names.setdefault((owner, name), shard)
