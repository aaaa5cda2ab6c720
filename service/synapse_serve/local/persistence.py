"""Persistence: durability modes, instance writes, the background writer and evictor, start-up, snapshot and
evicted files — everything between an Instance and the state directory (``store.py`` owns the file format).

Rules learned the hard way (docs/durability.md):

- ``sync``: an acknowledged mutation is on disk; a failed write is a 507 and the write is retried.
- Start-up reads, never writes: a full or read-only disk must not cost a single instance, and a
  failed write never moves good data into quarantine. Only a file that cannot be used goes there,
  under a name no other file has.
- One process per state directory (an exclusive lock).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synapse_serve.errors import DamagedFile, NotFound, StorageError
from synapse_serve.local.instance import Instance, InstanceKey
from synapse_serve.store import DURABILITY_MODES, SUFFIX, CorruptFile, Record, Store, decode, evicted_name, file_size

log = logging.getLogger("synapse_serve")


def _not_stored(failure: str, name: str) -> StorageError:
    """The 507 of a sync-mode call applied in memory whose write failed (``reason``: this write's own failure; the
    shared field may hold a later one's)."""
    error = StorageError(
        f"the call was applied in memory but could not be stored durably ({failure}); "
        "the server retries the write at its next flush; a retry with the same Idempotency-Key "
        "answers once the write succeeds, without applying the call again", name=name)
    error.reason = failure
    return error


def shown_failure(exc: BaseException) -> str:
    """What callers may see of a failed file operation: an OSError without its file's path, which names the state
    directory, an owner and an instance (/healthz answers without a token: a red-team run read another owner's
    instance name there); anything else (a damaged file's CorruptFile) as it says itself."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror}" if exc.strerror else type(exc).__name__
    return str(exc)


class Persistence:
    """Writes instances according to their durability mode; reads them back at start-up."""

    def __init__(self, store: Store | None, durability: str = "off") -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}")
        self.store = store
        self.durability = durability if store is not None else "off"
        try:  # names differing only in case would be one file: the registry refuses the second
            self.folds_case = store is not None and store.folds_case()
        except OSError:  # a directory it cannot write to: every write says so
            self.folds_case = False
        self.storage_error: str | None = None  # the last write failure, until writes succeed again
        self.restore_errors: dict[str, str] = {}  # key -> why its file was not loaded
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- modes and writes ---

    def mode(self, instance: Instance) -> str:
        """The durability mode in force for ``instance``."""
        if self.store is None:
            return "off"
        return instance.durability or self.durability

    def persist(self, instance: Instance) -> None:
        """Sync mode: write the instance now (under its lock), or StorageError. Other modes write later or never."""
        if self.mode(instance) != "sync" or instance.stored_version == instance.version:
            return
        failure = self._store(instance, logging.ERROR)
        if failure is not None:
            raise _not_stored(failure, instance.key.name)

    def persist_many(self, instances: list[Instance]) -> None:
        """``persist`` for a packed call's members (under their locks), stored all or none across a crash
        (``Store.save_many``): a crash between two members' writes had left one at the new version and the other
        at the old (a red-team run), though the call is applied all or none."""
        due = [i for i in instances if self.mode(i) == "sync" and i.stored_version != i.version]
        if len(due) <= 1:
            for instance in due:
                self.persist(instance)
            return
        try:
            self.store.save_many([(str(i.key), i.record()) for i in due])
        except OSError as exc:
            log.error("could not store %s and %d more: %s: %s", due[0].key, len(due) - 1, type(exc).__name__, exc)
            self.storage_error = failure = shown_failure(exc)
            raise _not_stored(failure, due[0].key.name) from None
        for instance in due:
            instance.stored_version = instance.version

    def write(self, instance: Instance, failure_level: int) -> bool:
        """Store the instance (under its lock); on failure remember and log why, and say False."""
        return self._store(instance, failure_level) is None

    def _store(self, instance: Instance, failure_level: int) -> str | None:
        """Store the instance; None, or what a caller may see of the failure (also kept for /healthz until writes
        succeed again; the log has the whole error, its path included)."""
        try:
            self.store.save(str(instance.key), instance.record())
        except OSError as exc:
            log.log(failure_level, "could not store %s: %s: %s", instance.key, type(exc).__name__, exc)
            self.storage_error = failure = shown_failure(exc)
            return failure
        instance.stored_version = instance.version
        return None

    def pending(self, instance: Instance) -> bool:
        """Changed since its last write, in a mode that writes it."""
        return instance.stored_version != instance.version and self.mode(instance) != "off"

    def flushed(self, anything_pending: bool) -> None:
        if not anything_pending:
            self.storage_error = None  # nothing pending any more

    def is_stored(self, key: InstanceKey) -> bool:
        """Whether an instance file exists for ``key`` (a new instance must never overwrite one)."""
        return self.store is not None and self.store.path(str(key)).exists()

    def remove(self, key: InstanceKey) -> int:
        """Delete the instance's file and its snapshots, all or none across a crash (``Store.mark_deleted``);
        StorageError, nothing deleted, if the disk refuses to record the decision. Returns the bytes of snapshots
        removed."""
        if self.store is None:
            return 0
        try:
            freed = sum(p.stat().st_size for p in self.store.list_snapshots(str(key)))
            self.store.mark_deleted(str(key))
        except OSError as exc:
            raise StorageError(f"could not delete the files of {key.name!r}: {shown_failure(exc)}; "
                               "the instance is kept", name=key.name) from None
        try:
            self.store.finish_deletion(str(key))
        except OSError as exc:  # decided: the next start finishes it
            log.error("deleted %s; its files that remain go at the next start: %s", key, exc)
        return freed

    # --- start-up ---

    def open(self) -> list[InstanceKey]:
        """Lock the state directory, clean a crash's temporary files, and list the stored instances (no reads)."""
        if self.store is None:
            return []
        self.store.lock()
        removed, failures = self.store.prepare()
        if removed:
            log.info("removed %d temporary files left by a crash", len(removed))
        for failure in failures:
            log.warning("start-up: %s", failure)
        return [InstanceKey(*key.split("/", 1)) for key in self.store.stored_keys()]

    def load(self, key: InstanceKey) -> Record:
        """A stored instance's record: OSError if it cannot be read now, CorruptFile if it is damaged."""
        return self.store.load(str(key))

    def quarantine(self, key: InstanceKey, reason: str) -> int:
        """Move a stored file that cannot be used out of the way (never over another), its snapshots with it (a new
        instance of the name must not take them over), and remember why; the snapshots' bytes moved."""
        self.restore_errors[str(key)] = reason
        try:
            target = self.store.quarantine_file(str(key), reason)
        except OSError as exc:  # left in place: the name stays taken, nothing is lost
            log.error("could not restore %s (%s); could not quarantine it either (%s): left in place",
                      key, reason, exc)
            return 0
        log.error("could not restore %s: %s; moved to %s", key, reason, target)
        snapshots = self.store.snapshots / str(key)
        if not snapshots.is_dir():
            return 0
        moved = sum(p.stat().st_size for p in snapshots.glob(f"*{SUFFIX}"))
        try:
            log.error("%s: its snapshots moved to %s", key, self.store.quarantine_snapshots(str(key)))
        except OSError as exc:
            log.error("%s: could not move its snapshots aside (%s): a new instance of the name would list them", key,
                      exc)
            return 0
        return moved

    def not_loaded(self, key: InstanceKey, reason: str) -> None:
        """A good file that could not be loaded now (device or disk trouble): left in place, reported."""
        self.restore_errors[str(key)] = f"not loaded, file kept: {reason}"
        log.error("could not load %s now: %s; its file is kept and its name stays taken", key, reason)

    def snapshot_bytes(self) -> dict[str, int]:
        return self.store.snapshot_bytes() if self.store is not None else {}

    # --- snapshots ---

    def require_store(self) -> Store:
        if self.store is None:
            raise StorageError("this server has no state directory: snapshots need one")
        return self.store

    def snapshot_exists(self, key: InstanceKey, snapshot: str) -> bool:
        return self.require_store().snapshot_path(str(key), snapshot).exists()

    def save_snapshot(self, key: InstanceKey, snapshot: str, record: Record) -> None:
        try:
            self.require_store().save_snapshot(str(key), snapshot, record)
        except OSError as exc:
            raise StorageError(f"could not store snapshot {snapshot!r}: {shown_failure(exc)}") from None

    def snapshot_path(self, key: InstanceKey, snapshot: str) -> Path:
        path = self.require_store().snapshot_path(str(key), snapshot)
        if not path.exists():
            raise NotFound(f"this instance has no snapshot {snapshot!r}", snapshot=snapshot)
        return path

    def read_snapshot(self, path: Path) -> Record:
        """A snapshot's record: DamagedFile (409) when its file is damaged, StorageError (507) when the disk fails."""
        try:
            return decode(path.read_bytes())
        except CorruptFile as exc:
            snapshot = path.name.removesuffix(".safetensors")
            raise DamagedFile(f"snapshot {snapshot!r} is damaged ({shown_failure(exc)}) and cannot be restored; "
                              f"delete it (DELETE …/snapshots/{snapshot})", snapshot=snapshot) from exc
        except OSError as exc:
            raise StorageError(f"snapshot {path.name} is unreadable: {shown_failure(exc)}") from exc

    def list_snapshots(self, key: InstanceKey) -> list[Path]:
        return self.require_store().list_snapshots(str(key))

    def delete_snapshot(self, key: InstanceKey, snapshot: str) -> int:
        path = self.snapshot_path(key, snapshot)
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError as exc:
            raise StorageError(f"could not delete snapshot {snapshot!r}: {shown_failure(exc)}") from None
        return size

    # --- evicted instances ---

    def evict(self, instance: Instance, record: Record | None = None) -> Path:
        """Write the instance's export (``record``, if taken already) to ``evicted/<owner>/`` (under its lock);
        OSError if it cannot."""
        return self.require_store().save_evicted(str(instance.key), record or instance.record())

    def evicted(self, owner: str) -> list[dict[str, Any]]:
        """An owner's evicted instances, oldest first: name, when, and the file's size."""
        if self.store is None:
            return []
        out = []
        for path in self.store.evicted_files(owner):
            try:
                stat = path.stat()
            except OSError:
                continue
            out.append({"name": evicted_name(path), "evicted_at": stat.st_mtime, "file_bytes": stat.st_size,
                        "file": path.name})
        return out

    def evicted_files(self, key: InstanceKey) -> list[Path]:
        """The files of ``key``'s evicted copies, oldest first."""
        return self.store.evicted_files(key.owner, key.name) if self.store is not None else []

    def latest_evicted(self, key: InstanceKey) -> Path:
        paths = self.evicted_files(key)
        if not paths:
            raise NotFound(f"no evicted instance named {key.name!r}", name=key.name)
        return paths[-1]

    # --- background threads ---

    def start(self, name: str, every_s: float, work: Callable[[], Any]) -> None:
        """Run ``work`` every ``every_s`` seconds on a daemon thread until ``close``."""

        def loop() -> None:
            while not self._stop.wait(every_s):
                try:
                    work()
                except Exception:  # a background failure is logged; the loop goes on
                    log.exception("%s failed", name)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def close(self) -> None:
        if self.store is not None:
            self.store.unlock()


def record_size(record: Record) -> int:
    """Bytes the file of ``record`` will take (snapshots count against their owner's quota)."""
    return file_size(record)
