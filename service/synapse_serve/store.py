"""Instance files: one safetensors file per instance, written atomically and streamed.

The same format serves persistence, export, import and snapshots. A file holds every
compartment as a tensor (the optimizer state under its path, e.g.
``opt_state/0/mu/0``) and, in the header's ``__metadata__``, a JSON record:
format version, kind, config, seed, version, counters, owner, durability mode,
creation and save times, provenance (service and JAX versions, device, key schedule: read by
people and tools, never needed to continue), and a SHA-256 over the rest of the header and the data, so
truncation, bit flips and tampering are caught before anything is used.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``,
then the data (little-endian, C order). Written here directly (the format is small) so
that reading validates every offset, size and header field before touching data, and
writing streams each array from its own memory: no copy of the whole state is made
(the header's length does not depend on the checksum's value, so the data is written
first, hashed on the way, and the header last).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from synapse_client._codec import MAX_RANK, json_containers, numpy_dtype, wire_dtype_name
from synapse_serve.names import OWNER as _OWNER

FORMAT = "synapse-serve"
FORMAT_VERSION = 1
MAX_HEADER = 16 << 20
MAX_HEADER_CONTAINERS = 1 << 16  # a header holds a few hundred: its index, config, counters and kept retry entries
MAX_FILE_ELEMENTS = 2**40  # per tensor, counting an empty one's other dimensions: numpy's index range, with room
MAX_COUNT = 2**63 - 1  # versions, counters and seeds fit a signed 64-bit integer (msgpack, JSON readers)
APPLIED_KEPT = 16  # keyed calls a file remembers
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
DURABILITY_MODES = ("sync", "interval", "off")
_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32",
          "int64": "I64", "uint32": "U32", "uint8": "U8", "bool": "BOOL"}
_FROM_ST = {v: k for k, v in _TO_ST.items()}
SUFFIX = ".safetensors"
DELETING = ".deleting"  # the marker of a decided deletion (``Store.mark_deleted``)
STASHED = ".snapshots"  # beside an evicted copy: the evicted instance's snapshots (``Store.stash_snapshots``)
RESTORING = ".restoring"  # beside an evicted copy: the marker of a restore under way (``Store.mark_restoring``)
EVICTING = ".evicting"  # beside an evicted copy: the marker of its eviction under way (``Store.save_evicted``)
PACK_INTENT = ".intent"  # ``instances/<owner>/.pack-<id>.intent``: a packed call's files, all to be renamed in
_CHECKSUM_PLACEHOLDER = "0" * 64  # a SHA-256 in hex has this length whatever its value


class CorruptFile(ValueError):
    """An instance file that is truncated, altered, of another format version, or whose record is invalid."""


class StateDirLocked(RuntimeError):
    """Another server process holds the state directory."""


@dataclass
class Record:
    """Everything needed to continue an instance exactly.

    ``arrays`` may hold numpy or JAX arrays: writers take each one to host memory only
    when they write it.
    """

    kind: str
    config: dict[str, Any]
    seed: int
    version: int
    counters: dict[str, int]
    created_at: float
    arrays: dict[str, Any]
    saved_at: float = 0.0  # when this copy was taken
    durability: str | None = None  # the instance's own mode; None follows the server's
    owner: str = "local"  # who the instance belongs to
    provenance: dict[str, Any] | None = None  # written for the reader; never needed to continue
    # the most recent keyed calls applied: {key, fingerprint, version, whole}; a retry of one after a restart is
    # answered from here instead of being applied again (whole: its answer was the version alone)
    applied: list[dict[str, Any]] | None = None


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _host(array: Any) -> np.ndarray:
    """A C-ordered little-endian host array (a view where possible; a 0-d array stays 0-d)."""
    host = np.asarray(array)
    if host.dtype.byteorder == ">":
        host = host.astype(host.dtype.newbyteorder("<"))
    return host if host.flags.c_contiguous else np.ascontiguousarray(host)


def _bytes_of(host: np.ndarray) -> memoryview:
    return memoryview(host.reshape(-1).view(np.uint8)) if host.size else memoryview(b"")


class _Layout:
    """The header of a record's file, before the checksum is known; the data's order and offsets."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.names = sorted(record.arrays)
        index, offset = {}, 0
        for name in self.names:
            array = record.arrays[name]
            dtype = np.dtype(array.dtype)
            nbytes = math.prod(array.shape) * dtype.itemsize
            index[name] = {"dtype": _TO_ST[wire_dtype_name(dtype)], "shape": list(array.shape),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.index, self.data_bytes = index, offset
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": record.kind, "config": record.config,
                "seed": record.seed, "version": record.version, "counters": record.counters,
                "created_at": record.created_at, "saved_at": record.saved_at, "durability": record.durability,
                "owner": record.owner}
        if record.provenance is not None:
            meta["provenance"] = record.provenance
        if record.applied:
            meta["applied"] = record.applied
        self.body = {"record": json.dumps(meta, sort_keys=True, allow_nan=False)}
        self.header_bytes = len(self.header(_CHECKSUM_PLACEHOLDER))

    def hasher(self) -> Any:
        return hashlib.sha256(_canonical({**self.index, "__metadata__": self.body}))

    def header(self, checksum: str) -> bytes:
        header = json.dumps({**self.index, "__metadata__": {**self.body, "sha256": checksum}}).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
        return struct.pack("<Q", len(header)) + header

    def chunks(self) -> Iterator[memoryview]:
        """Each array's bytes in file order, one array in host memory at a time."""
        for name in self.names:
            chunk = _bytes_of(_host(self.record.arrays[name]))
            if len(chunk) != self.index[name]["data_offsets"][1] - self.index[name]["data_offsets"][0]:
                raise ValueError(f"array {name!r} changed size while it was written")
            yield chunk


def file_size(record: Record) -> int:
    """Bytes of the file ``write_record`` writes for ``record`` (known before writing)."""
    layout = _Layout(record)
    return layout.header_bytes + layout.data_bytes


def write_record(f: IO[bytes], record: Record) -> None:
    """Write ``record`` to a seekable binary file at its current position, data first, header last."""
    layout = _Layout(record)
    start = f.tell()
    f.seek(start + layout.header_bytes)
    hasher = layout.hasher()
    for chunk in layout.chunks():
        hasher.update(chunk)
        f.write(chunk)
    f.seek(start)
    f.write(layout.header(hasher.hexdigest()))
    f.seek(start + layout.header_bytes + layout.data_bytes)


def stream_record(record: Record) -> tuple[int, Callable[[], Iterator[bytes | memoryview]]]:
    """The file's length and a generator of its parts, for sending it without writing it anywhere.

    The arrays are read twice (a hashing pass, then the sending pass); keep them unchanged meanwhile.
    """
    layout = _Layout(record)
    hasher = layout.hasher()
    for chunk in layout.chunks():
        hasher.update(chunk)
    header = layout.header(hasher.hexdigest())

    def parts() -> Iterator[bytes | memoryview]:
        yield header
        yield from layout.chunks()

    return layout.header_bytes + layout.data_bytes, parts


def encode(record: Record) -> bytes:
    """The file's bytes in memory (small records, tests); files and downloads stream instead."""
    _, parts = stream_record(record)
    return b"".join(bytes(part) for part in parts())


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this format allows")


def decode(blob: bytes | bytearray | memoryview) -> Record:
    """A record from safetensors bytes; CorruptFile says exactly what is wrong.

    The arrays are read-only views of ``blob`` (no copy); keep ``blob`` or copy them.
    """
    view = memoryview(blob)
    if len(view) < 8:
        raise CorruptFile(f"file of {len(view)} bytes is too short for a header")
    (length,) = struct.unpack("<Q", view[:8])
    if length > MAX_HEADER or 8 + length > len(view):
        raise CorruptFile(f"header length {length} does not fit a file of {len(view)} bytes (truncated?)")
    try:
        header = json.loads(_bounded_header(bytes(view[8:8 + length])), parse_constant=_reject_constant)
        meta_strings = header.pop("__metadata__")
        record = json.loads(_bounded_header(meta_strings["record"]), parse_constant=_reject_constant)
        checksum = meta_strings["sha256"]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CorruptFile(f"unreadable header: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptFile("not a synapse-serve instance file")
    if record.get("format_version") != FORMAT_VERSION:
        raise CorruptFile(f"format version {record.get('format_version')!r}; this server reads {FORMAT_VERSION}")
    data = view[8 + length:]
    hasher = hashlib.sha256(_canonical({**header, "__metadata__": {"record": meta_strings["record"]}}))
    hasher.update(data)
    if checksum != hasher.hexdigest():
        raise CorruptFile("checksum mismatch: the file was altered or damaged")
    arrays = {}
    for name, entry in header.items():
        try:
            dtype = numpy_dtype(_FROM_ST[entry["dtype"]])
            shape = tuple(_count(f"tensor {name!r} shape", d, MAX_COUNT) for d in entry["shape"])
            if len(shape) > MAX_RANK or math.prod(d for d in shape if d) > MAX_FILE_ELEMENTS:
                raise ValueError(f"shape {list(shape)[:8]} (rank {len(shape)}) is not one a state array can have")
            begin, end = (_count(f"tensor {name!r} offset", o, MAX_COUNT) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFile(f"tensor {name!r}: bad index entry ({exc})") from None
        if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * dtype.itemsize:
            raise CorruptFile(f"tensor {name!r}: offsets {begin}..{end} do not match shape {list(shape)}")
        arrays[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
    return _validated(record, arrays)


def _bounded_header(raw: bytes | str) -> bytes | str:
    """``raw`` if it holds at most MAX_HEADER_CONTAINERS arrays and objects, else CorruptFile: 16 MiB of ``[]`` would
    be 8 million lists (~500 MB) before any check. The record, a JSON text in a string of the header, is counted
    again once read out of it (its brackets may be escapes there, ``\\u005b``: a red-team run's 1.3 million lists)."""
    if json_containers(raw.encode() if isinstance(raw, str) else raw) > MAX_HEADER_CONTAINERS:
        raise CorruptFile(f"the header holds more than {MAX_HEADER_CONTAINERS} arrays and objects")
    return raw


def read_header(path: Path) -> Record:
    """A file's record without its arrays, from the header alone (listings; not checksummed: use ``decode``
    before trusting the data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFile(f"file of {len(head)} bytes is too short for a header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise CorruptFile(f"header length {length} is over {MAX_HEADER}")
        raw = f.read(length)
    try:
        header = json.loads(_bounded_header(raw), parse_constant=_reject_constant)
        record = json.loads(_bounded_header(header["__metadata__"]["record"]),
                            parse_constant=_reject_constant)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptFile(f"unreadable header: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptFile("not a synapse-serve instance file")
    return _validated(record, {})


def _count(what: str, value: Any, high: int, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CorruptFile(f"{what}: {str(value)[:40]} is not an integer in [{low}, {high}]")
    return value


def _time(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CorruptFile(f"{what}: {str(value)[:40]} is not a time (a finite number of seconds >= 0)")
    return float(value)


def _validated(record: dict[str, Any], arrays: dict[str, np.ndarray]) -> Record:
    """The record's fields, each checked as the server would have written it."""
    try:
        kind, config, counters = record["kind"], record["config"], record["counters"]
        durability, owner = record["durability"], record["owner"]
        fields = (record["seed"], record["version"], record["created_at"], record["saved_at"])
    except KeyError as exc:
        raise CorruptFile(f"record is incomplete: missing {exc}") from None
    if not isinstance(kind, str) or not isinstance(config, dict):
        raise CorruptFile("record: kind must be a string and config an object")
    if not isinstance(counters, dict) or len(counters) > 64 or not all(
            isinstance(k, str) and len(k) <= 64 for k in counters):
        raise CorruptFile("record: counters must be an object of at most 64 operation names")
    if durability is not None and durability not in DURABILITY_MODES:
        raise CorruptFile(f"record: durability {str(durability)[:40]!r} is not one of {', '.join(DURABILITY_MODES)}")
    if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
        raise CorruptFile(f"record: owner {str(owner)[:70]!r} is not a valid owner name")
    seed, version, created_at, saved_at = fields
    return Record(applied=_applied(record.get("applied")), kind=kind, config=config,
                  seed=_count("record: seed", seed, MAX_COUNT),
                  version=_count("record: version", version, MAX_COUNT, low=1),
                  counters={k: _count(f"record: counter {k!r}", v, MAX_COUNT) for k, v in counters.items()},
                  created_at=_time("record: created_at", created_at), arrays=arrays,
                  saved_at=_time("record: saved_at", saved_at), durability=durability, owner=owner)


def _applied(entries: Any) -> list[dict[str, Any]] | None:
    """The keyed calls a file says were applied, each checked (at most APPLIED_KEPT)."""
    if entries is None:
        return None
    if not isinstance(entries, list) or len(entries) > APPLIED_KEPT:
        raise CorruptFile(f"record: applied must be a list of at most {APPLIED_KEPT} keyed calls")
    out = []
    for entry in entries:
        if not (isinstance(entry, dict) and set(entry) == {"key", "fingerprint", "version", "whole"}
                and isinstance(entry["key"], str) and 1 <= len(entry["key"]) <= 255 and entry["key"].isascii()
                and entry["key"].isprintable() and isinstance(entry["fingerprint"], str)
                and _FINGERPRINT.fullmatch(entry["fingerprint"]) and isinstance(entry["whole"], bool)):
            raise CorruptFile("record: an applied keyed call must be {key, fingerprint, version, whole}")
        out.append({**entry, "version": _count("record: applied version", entry["version"], MAX_COUNT, low=1)})
    return out


def make_dirs(directory: Path) -> None:
    """``mkdir -p`` whose every new directory is durable (its parent fsynced): a file synced in a directory whose
    own entry was not could vanish with it at a power loss (a new owner's first instance, a first snapshot)."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            continue
        fsync_dir(new.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, content: bytes | Record) -> None:
    """Write, fsync, rename over ``path``, fsync the directory: a crash leaves the old file or the new one.

    ``content`` is bytes or a Record (streamed from its arrays).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(content, Record):
                write_record(f, content)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _newer_of_same(candidate: Path, path: Path) -> bool:
    """Whether ``candidate`` (a packed call's file) is the instance ``path`` holds, at a later version (a file
    unreadable either way is not put over another)."""
    try:
        new, old = read_header(candidate), read_header(path)
    except (OSError, CorruptFile):
        return False
    return (new.created_at, new.seed, new.kind) == (old.created_at, old.seed, old.kind) and new.version > old.version


def _unique(directory: Path, stem: str, suffix: str = SUFFIX) -> Path:
    """A path in ``directory`` no file has: ``<stem>.<UTC time>.<random>`` plus ``suffix``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return directory / f"{stem}.{stamp}.{uuid.uuid4().hex[:8]}{suffix}"


def _move_without_overwriting(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; if ``target`` exists, fail rather than replace it."""
    try:
        os.link(source, target)  # fails with EEXIST instead of replacing
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise
        if target.exists():  # no hard links here (some filesystems): rename, after looking first
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.rename(source, target)
    else:
        os.unlink(source)
    fsync_dir(target.parent)
    with contextlib.suppress(OSError):
        fsync_dir(source.parent)


class Store:
    """The state directory: instance files under ``instances/<owner>/``, snapshots, evicted exports, quarantine.

    Damaged files go to ``quarantine/<owner>/`` under a name no other file has: never overwritten.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.instances = self.root / "instances"
        self.quarantine = self.root / "quarantine"
        self.snapshots = self.root / "snapshots"
        self.evicted = self.root / "evicted"
        self._lock_file: IO[str] | None = None

    # --- the directory as a whole ---

    def lock(self) -> None:
        """Take an exclusive lock on the state directory for this process's life.

        A second server on the same directory would overwrite the first one's acknowledged
        versions; StateDirLocked says which process holds it.
        """
        import fcntl  # POSIX; the servers this targets (Linux containers, macOS laptops) have it

        self.root.mkdir(parents=True, exist_ok=True)
        try:
            f = open(self.root / ".lock", "a+")  # noqa: SIM115 - held open while the server runs
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # a directory this process cannot write (read-only, or not its own): a server still serves what it has,
            # every write answering 507; a lock is taken all the same where the file is there to open for reading
            # (flock needs no write access), for a second server that could write here
            try:
                f = open(self.root / ".lock")  # noqa: SIM115
            except FileNotFoundError:
                return  # no server has run here, and none can write the directory: there is no one to keep out
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateDirLocked(
                    f"state directory {self.root.resolve()} is in use by another synapse-serve process "
                    f"(pid {holder}); two servers on one directory would overwrite each other's instances. "
                    "Stop the other server first, or give this one its own SYNAPSE_STATE_DIR") from None
            raise
        if f.writable():  # who holds it, for the next one's refusal
            with contextlib.suppress(OSError):  # a full disk must not stop a start-up either
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()}\n")
                f.flush()
        self._lock_file = f

    def folds_case(self) -> bool:
        """Whether the directory's file system tells names apart only up to case (macOS's, Windows', a Docker
        Desktop bind mount): there ``enc`` and ``Enc`` would be one file."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".case-probe-{os.getpid()}"
        probe.touch()
        try:
            return (self.root / probe.name.upper()).exists()
        finally:
            probe.unlink(missing_ok=True)

    def owner_twin(self, owner: str) -> str | None:
        """On a file system that ignores case: the name of another owner's folder that ``owner``'s would be (one
        differing only in case, under instances, snapshots, evicted or quarantine), else None. An owner whose only
        files are evicted copies or snapshots holds no instance the registry could see."""
        for area in (self.instances, self.snapshots, self.evicted, self.quarantine):
            try:
                names = os.listdir(area)
            except OSError:  # not there yet
                continue
            for name in names:
                if name != owner and name.casefold() == owner.casefold():
                    return name
        return None

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def prepare(self) -> tuple[list[str], list[str]]:
        """Create the directories; delete temporary files a crash left anywhere in the state directory.

        Returns (removed, failures): a read-only disk must not stop a server from serving what it has.
        """
        removed, failures = [], []
        try:
            self.instances.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            failures.append(f"cannot create {self.instances}: {exc}")
        for marker in self.instances.glob(f"*/*{DELETING}") if self.instances.is_dir() else ():
            key = f"{marker.parent.name}/{marker.name[: -len(DELETING)]}"
            try:  # a deletion decided before a crash: finished before anything is listed
                self.finish_deletion(key)
                removed.append(f"{key} (deleted before the last stop)")
            except OSError as exc:
                failures.append(f"cannot finish deleting {key}: {exc}")
        self._settle_evictions(removed, failures)
        self._finish_packs(removed, failures)
        for directory in (self.instances, self.snapshots, self.evicted):
            for tmp in directory.rglob(".*.tmp") if directory.is_dir() else ():
                try:
                    tmp.unlink()
                    removed.append(str(tmp.relative_to(self.root)))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    failures.append(f"cannot remove {tmp}: {exc}")
        return removed, failures

    def _settle_evictions(self, removed: list[str], failures: list[str]) -> None:
        """What a crash in the middle of an eviction or a restore left, settled before anything is listed.

        - An eviction's marker (written before its copy): if the copy was written and the instance's file is of
          the same instance and not newer, the eviction is finished (the snapshots beside the copy, the
          instance's file deleted: in interval mode the copy may be the newer state); a newer file keeps the
          instance (the copy goes, its snapshots back); no file (an instance never stored), the snapshots go
          beside the copy. An eviction finished deletes the name's older copies, as a live one does (a restore
          brings back the latest; the quota is not checked here: the copy is the instance's only state). The
          marker goes.
        - A restore's marker (written once the restore held the name): if the instance it brought back is stored
          (created together, not older), its copy goes, its snapshots moved back first; if not, the snapshots it
          had moved back go beside the copy again. The marker goes.
        - Snapshots beside no copy (a deletion cut short): deleted.
        - Snapshots of no instance (one lost with its state: durability off, or interval mode before its first
          write): moved to ``quarantine/<owner>/`` (a snapshot file imports as an instance), never left for a new
          instance of the name to list, restore or delete.
        """
        for marker in self.evicted.glob(f"*/*{EVICTING}") if self.evicted.is_dir() else ():
            copy = marker.with_name(marker.name[: -len(EVICTING)] + SUFFIX)
            key = f"{marker.parent.name}/{evicted_name(copy)}"
            try:
                if copy.exists() and self.path(key).is_file():
                    finished = self._finish_eviction(key, copy, removed)
                else:
                    finished = copy.exists()  # (an instance never stored, or stored no more: the copy is all of it)
                    if finished and (self.snapshots / key).is_dir() and not self.stashed(copy).exists():
                        self.stash_snapshots(key, copy)
                if finished:  # as a live eviction does: a restore brings back the latest copy, the older ones go
                    for older in self.evicted_files(marker.parent.name, evicted_name(copy)):
                        if older != copy:
                            self.remove_evicted(older)
                            removed.append(f"{older.relative_to(self.root)} (an older evicted copy of {key})")
                marker.unlink()
                fsync_dir(marker.parent)
            except OSError as exc:
                failures.append(f"cannot settle {marker}: {exc}")
        for marker in self.evicted.glob(f"*/*{RESTORING}") if self.evicted.is_dir() else ():
            copy = marker.with_name(marker.name[: -len(RESTORING)] + SUFFIX)
            key = f"{marker.parent.name}/{evicted_name(copy)}"
            try:
                if copy.exists():
                    if self._restored_from(key, copy):
                        self._drop_copy(key, copy, removed, "a restore")
                    elif not self.path(key).exists() and not self.stashed(copy).exists():
                        self.stash_snapshots(key, copy)  # (a restore whose instance was never stored)
                marker.unlink()
                fsync_dir(marker.parent)
            except OSError as exc:
                failures.append(f"cannot settle {marker}: {exc}")
        for stash in self.evicted.glob(f"*/*{STASHED}") if self.evicted.is_dir() else ():
            if stash.is_dir() and not stash.with_name(stash.name[: -len(STASHED)] + SUFFIX).exists():
                try:
                    self.remove_stash(stash.with_name(stash.name[: -len(STASHED)] + SUFFIX))
                    removed.append(f"{stash.relative_to(self.root)} (the snapshots of an evicted copy deleted)")
                except OSError as exc:
                    failures.append(f"cannot remove {stash}: {exc}")
        for directory in self.snapshots.glob("*/*") if self.snapshots.is_dir() else ():
            key = f"{directory.parent.name}/{directory.name}"
            if not directory.is_dir() or self.path(key).exists():
                continue
            try:
                target = self.quarantine_snapshots(key)
                removed.append(f"{directory.relative_to(self.root)} (snapshots of an instance that is gone: moved to "
                               f"{target.relative_to(self.root)})")
            except OSError as exc:
                failures.append(f"cannot move {directory} aside: {exc}")

    def quarantine_snapshots(self, key: str) -> Path:
        """Move an instance's snapshots to ``quarantine/<owner>/<name>.snapshots.<time>.<random>/`` (its file is gone
        or unusable: a new instance of the name must not take them over)."""
        directory = self.snapshots / key
        target = _unique(self.quarantine / directory.parent.name, f"{directory.name}.snapshots", suffix="")
        make_dirs(target.parent)
        os.rename(directory, target)
        fsync_dir(target.parent)
        fsync_dir(directory.parent)
        return target

    def _finish_eviction(self, key: str, copy: Path, removed: list[str]) -> bool:
        """An eviction a crash cut short, its copy written: finished if the instance's file is of the same instance
        and not newer (its snapshots beside the copy, its file deleted), else undone (the copy deleted); whether
        it was finished."""
        try:
            live, evicted = self.load(key), decode(copy.read_bytes())
        except (OSError, CorruptFile):
            return False  # as they are: loading reports a damaged instance file, a restore a damaged copy
        if live.created_at == evicted.created_at and live.version <= evicted.version:
            if not self.stashed(copy).exists():
                self.stash_snapshots(key, copy)
            self.remove(key)
            removed.append(f"{self.path(key).relative_to(self.root)} (its eviction the last stop cut short: "
                           "finished)")
            return True
        self._drop_copy(key, copy, removed, "an eviction")
        return False

    def _restored_from(self, key: str, copy: Path) -> bool:
        """Whether the stored instance of ``key`` is the one ``copy`` brought back (created together, not older)."""
        if not self.path(key).is_file():
            return False
        try:
            live, evicted = self.load(key), decode(copy.read_bytes())
        except (OSError, CorruptFile):
            return False
        return live.created_at == evicted.created_at and live.version >= evicted.version

    def _drop_copy(self, key: str, copy: Path, removed: list[str], what: str) -> None:
        self.unstash_snapshots(key, copy)
        self.remove_evicted(copy)
        removed.append(f"{copy.relative_to(self.root)} ({what} of {key} the last stop cut short: the instance "
                       "stays)")

    # --- instance files ---

    def path(self, key: str) -> Path:
        """``instances/<owner>/<name>.safetensors`` for the key ``owner/name``."""
        return self.instances / f"{key}{SUFFIX}"

    def stored_keys(self) -> list[str]:
        """Every ``owner/name`` with an instance file (a directory listing: nothing is read)."""
        if not self.instances.is_dir():
            return []
        return sorted(f"{p.parent.name}/{p.name[: -len(SUFFIX)]}" for p in self.instances.glob(f"*/*{SUFFIX}")
                      if not p.name.startswith("."))

    def load(self, key: str) -> Record:
        """The record of a stored instance; OSError if it cannot be read, CorruptFile if it is damaged."""
        return decode(self.path(key).read_bytes())

    def save(self, key: str, record: Record) -> None:
        path = self.path(key)
        make_dirs(path.parent)
        if (self.instances / f"{key}{DELETING}").exists():  # a deletion the disk cut short, of a name taken anew:
            self.finish_deletion(key)  # finished first, or the next start would delete this instance with it
        write_atomic(path, record)

    def save_many(self, items: list[tuple[str, Record]]) -> None:
        """Store several instances of one owner (a packed call's members) all or none across a crash: each record to
        a temporary file beside its instance's (synced), then the list of them in an intent file (written
        atomically: the commit point), then each renamed over its instance's file, and the intent removed. A start
        after a crash renames what an intent lists (``_finish_packs``) and deletes the temporary files of any pack
        not committed. OSError: nothing of it stored, or (a rename refused after the commit point) some of it —
        what was not renamed is deleted, never left for a later start to put over newer files."""
        if len(items) == 1:
            self.save(*items[0])
            return
        directory = self.path(items[0][0]).parent
        make_dirs(directory)
        written: list[tuple[Path, Path]] = []
        try:
            for key, record in items:
                path = self.path(key)
                if path.parent != directory:
                    raise ValueError("the instances of one packed call belong to one owner")
                if (self.instances / f"{key}{DELETING}").exists():  # as ``save``
                    self.finish_deletion(key)
                tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                written.append((tmp, path))
                with open(tmp, "wb") as f:
                    write_record(f, record)
                    f.flush()
                    os.fsync(f.fileno())
            intent = directory / f".pack-{uuid.uuid4().hex}{PACK_INTENT}"
            write_atomic(intent, json.dumps([tmp.name for tmp, _ in written]).encode())  # the commit point
        except BaseException:
            for tmp, _ in written:
                tmp.unlink(missing_ok=True)
            raise
        try:
            for tmp, path in written:
                os.replace(tmp, path)
            fsync_dir(directory)
        except OSError:  # the files not renamed in are stale from here on (the instances are stored again later)
            for tmp, _ in written:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                intent.unlink()
            raise
        with contextlib.suppress(OSError):  # (one left behind lists files no longer there: the start drops it)
            intent.unlink()

    def _finish_packs(self, removed: list[str], failures: list[str]) -> None:
        """The packed calls a crash cut short after their commit point: each file an intent lists renamed over its
        instance's (if still there, and the instance's file is of the same instance at an older version), then the
        intent removed. Before the temporary files are deleted: those of packs never committed go with them."""
        for intent in self.instances.glob(f"*/.pack-*{PACK_INTENT}") if self.instances.is_dir() else ():
            try:
                names = json.loads(intent.read_bytes())
                for name in names if isinstance(names, list) else ():
                    tmp = intent.parent / Path(str(name)).name  # (a name only: never a file of another folder)
                    match = re.fullmatch(r"\.(.+)\.[0-9a-f]{32}\.tmp", tmp.name)
                    if match is None or not tmp.exists():
                        continue
                    path = intent.parent / match.group(1)
                    if _newer_of_same(tmp, path):
                        os.replace(tmp, path)
                        removed.append(f"{path.relative_to(self.root)} (a packed call's, finished)")
                fsync_dir(intent.parent)
                intent.unlink()
            except (OSError, ValueError) as exc:
                failures.append(f"cannot finish the packed call {intent.name}: {exc}")

    def remove(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        if path.parent.is_dir():
            fsync_dir(path.parent)

    def mark_deleted(self, key: str) -> None:
        """The point a deletion of the instance and its snapshots is decided: ``instances/<owner>/<name>.deleting``,
        written and synced. Until it is, nothing is deleted (OSError: nothing was); once it is, the deletion
        happens whatever comes next — ``finish_deletion``, or a start-up that finds the marker (``prepare``). A
        crash between deleting the snapshots one by one and the instance file had left the instance without some
        of its snapshots."""
        marker = self.instances / f"{key}{DELETING}"
        make_dirs(marker.parent)
        with open(marker, "wb") as f:
            os.fsync(f.fileno())
        fsync_dir(marker.parent)

    def finish_deletion(self, key: str) -> None:
        """Delete what ``mark_deleted`` decided: the snapshots, the instance file, then the marker."""
        self.remove_snapshots(key)
        self.remove(key)
        marker = self.instances / f"{key}{DELETING}"
        marker.unlink(missing_ok=True)
        fsync_dir(marker.parent)

    def quarantine_file(self, key: str, reason: str) -> Path:
        """Move an instance file that cannot be used to ``quarantine/<owner>/``, with its reason beside it."""
        owner, name = key.split("/", 1)
        directory = self.quarantine / owner
        make_dirs(directory)
        target = _unique(directory, name)
        _move_without_overwriting(self.path(key), target)
        with contextlib.suppress(OSError):
            target.with_name(target.name + ".reason.txt").write_text(f"{key}: {reason}\n")
        return target

    # --- evicted instances: exports written before an idle instance is deleted ---

    def save_evicted(self, key: str, record: Record) -> Path:
        """``evicted/<owner>/<name>.<time>.<random>.safetensors``: an export, written before the instance goes, after
        a marker saying its eviction is under way (``clear_evicting`` once the instance's file is gone)."""
        owner, name = key.split("/", 1)
        directory = self.evicted / owner
        make_dirs(directory)
        path = _unique(directory, name)
        path.with_name(path.name[: -len(SUFFIX)] + EVICTING).touch()
        fsync_dir(directory)
        try:
            write_atomic(path, record)
        except BaseException:
            with contextlib.suppress(OSError):
                self.clear_evicting(path)
            raise
        return path

    def clear_evicting(self, copy: Path) -> None:
        copy.with_name(copy.name[: -len(SUFFIX)] + EVICTING).unlink(missing_ok=True)
        fsync_dir(copy.parent)

    @staticmethod
    def stashed(copy: Path) -> Path:
        """The directory beside an evicted copy that holds the evicted instance's snapshots."""
        return copy.with_name(copy.name[: -len(SUFFIX)] + STASHED)

    def stash_snapshots(self, key: str, copy: Path) -> None:
        """Move the instance's snapshots beside its evicted copy: they go and come back with it, and a new instance
        taken under the name neither sees, restores nor deletes them."""
        source = self.snapshots / key
        if source.is_dir():
            os.rename(source, self.stashed(copy))
            fsync_dir(copy.parent)
            fsync_dir(source.parent)

    def unstash_snapshots(self, key: str, copy: Path) -> int:
        """Move an evicted copy's snapshots back to its instance's; returns the bytes of those deleted instead (one
        of the same name there already, which is kept)."""
        stash, target = self.stashed(copy), self.snapshots / key
        if not stash.is_dir():
            return 0
        if not target.exists():
            make_dirs(target.parent)
            os.rename(stash, target)
            fsync_dir(target.parent)
            fsync_dir(copy.parent)
            return 0
        for path in stash.iterdir():
            with contextlib.suppress(FileExistsError):
                _move_without_overwriting(path, target / path.name)
        dropped = self.evicted_bytes(copy) - (copy.stat().st_size if copy.exists() else 0)
        self.remove_stash(copy)
        return dropped

    def remove_stash(self, copy: Path) -> None:
        stash = self.stashed(copy)
        if stash.is_dir():
            for path in stash.iterdir():
                path.unlink(missing_ok=True)
            stash.rmdir()
            fsync_dir(copy.parent)

    def evicted_bytes(self, copy: Path) -> int:
        """Bytes of an evicted copy and the snapshots beside it (0 for what is gone)."""
        total = 0
        stash = self.stashed(copy)
        for path in (copy, *(stash.iterdir() if stash.is_dir() else ())):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    def remove_evicted(self, copy: Path) -> None:
        """Delete an evicted copy, then the snapshots beside it (FileNotFoundError if the copy is gone): a crash
        in between leaves snapshots of no copy, which the next start deletes, never a copy missing some."""
        copy.unlink()
        fsync_dir(copy.parent)
        self.remove_stash(copy)

    def mark_restoring(self, copy: Path) -> None:
        """Say, durably, that the instance of this copy is being brought back (``_settle_evictions``)."""
        marker = copy.with_name(copy.name[: -len(SUFFIX)] + RESTORING)
        marker.touch()
        fsync_dir(copy.parent)

    def clear_restoring(self, copy: Path) -> None:
        copy.with_name(copy.name[: -len(SUFFIX)] + RESTORING).unlink(missing_ok=True)
        fsync_dir(copy.parent)  # a marker come back after a power loss would settle a restore that is over

    def evicted_files(self, owner: str, name: str | None = None) -> list[Path]:
        """An owner's evicted files (of one name, if given), oldest first."""
        directory = self.evicted / owner
        if not directory.is_dir():
            return []
        paths = [p for p in directory.glob(f"*{SUFFIX}") if not p.name.startswith(".")]
        if name is not None:
            paths = [p for p in paths if evicted_name(p) == name]
        return sorted(paths, key=lambda p: (p.stat().st_mtime_ns, p.name))

    # --- snapshots: named point-in-time copies, one file each under snapshots/<owner>/<name>/ ---

    def snapshot_path(self, key: str, snapshot: str) -> Path:
        """``snapshots/<owner>/<name>/<snapshot>.safetensors``."""
        return self.snapshots / key / f"{snapshot}{SUFFIX}"

    def save_snapshot(self, key: str, snapshot: str, record: Record) -> None:
        path = self.snapshot_path(key, snapshot)
        make_dirs(path.parent)
        write_atomic(path, record)

    def list_snapshots(self, key: str) -> list[Path]:
        directory = self.snapshots / key
        if not directory.is_dir():
            return []
        return sorted(p for p in directory.glob(f"*{SUFFIX}") if not p.name.startswith("."))

    def snapshot_bytes(self) -> dict[str, int]:
        """Bytes of snapshot and evicted files per owner (what the snapshot quota counts: the owner's copies on
        disk), from a directory walk."""
        used: dict[str, int] = {}
        for directory, pattern in ((self.snapshots, f"*/*/*{SUFFIX}"), (self.evicted, f"*/*{SUFFIX}"),
                                   (self.evicted, f"*/*{STASHED}/*{SUFFIX}")):
            if not directory.is_dir():
                continue
            for path in directory.glob(pattern):
                owner = path.relative_to(directory).parts[0]
                if not path.name.startswith("."):
                    with contextlib.suppress(OSError):
                        used[owner] = used.get(owner, 0) + path.stat().st_size
        return used

    def remove_snapshots(self, key: str) -> None:
        """Delete every file of the instance's snapshot directory (a crash's temporaries too), then the directory."""
        directory = self.snapshots / key
        if not directory.is_dir():
            return
        for path in directory.iterdir():
            path.unlink(missing_ok=True)
        directory.rmdir()
        fsync_dir(directory.parent)


def evicted_name(path: Path) -> str:
    """The instance name of an evicted file ``<name>.<time>.<random>.safetensors``."""
    return path.name[: -len(SUFFIX)].rsplit(".", 2)[0]
