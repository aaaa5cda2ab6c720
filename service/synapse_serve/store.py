"""Instance files: one safetensors file per instance, written atomically.

The same format serves persistence, export and import. A file holds every
compartment as a tensor (the optimizer state under its path, e.g.
``opt_state/0/mu/0``) and, in the header's ``__metadata__``, a JSON record:
format version, kind, config, seed, version, counters, owner, durability mode,
creation and save times, and a
SHA-256 over the rest of the header and the data, so truncation, bit flips
and tampering are caught before anything is used.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``,
then the data (little-endian, C order). Written here directly (the format is
small) so that reading validates every offset and size before touching data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synapse_client._codec import numpy_dtype, wire_dtype_name

FORMAT = "synapse-serve"
FORMAT_VERSION = 1
MAX_HEADER = 16 << 20
_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32",
          "int64": "I64", "uint32": "U32", "uint8": "U8", "bool": "BOOL"}
_FROM_ST = {v: k for k, v in _TO_ST.items()}
SUFFIX = ".safetensors"


class CorruptFile(ValueError):
    """An instance file that is truncated, altered, or of another format version."""


@dataclass
class Record:
    """Everything needed to continue an instance exactly."""

    kind: str
    config: dict[str, Any]
    seed: int
    version: int
    counters: dict[str, int]
    created_at: float
    arrays: dict[str, np.ndarray]
    saved_at: float = 0.0  # when this copy was taken
    durability: str | None = None  # the instance's own mode; None follows the server's
    owner: str = "local"  # who the instance belongs to; one owner until authentication exists


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def encode(record: Record) -> bytes:
    """The safetensors bytes of a record (checksummed)."""
    index, chunks, offset = {}, [], 0
    for name in sorted(record.arrays):
        array = np.asarray(record.arrays[name])  # not ascontiguousarray: it turns 0-d into 1-d
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()
        index[name] = {"dtype": _TO_ST[wire_dtype_name(array.dtype)], "shape": list(array.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": record.kind, "config": record.config,
            "seed": record.seed, "version": record.version, "counters": record.counters,
            "created_at": record.created_at, "saved_at": record.saved_at, "durability": record.durability, "owner": record.owner}
    body = {"record": json.dumps(meta, sort_keys=True)}
    checksum = hashlib.sha256(_canonical({**index, "__metadata__": body}) + data).hexdigest()
    header = json.dumps({**index, "__metadata__": {**body, "sha256": checksum}}).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(header)) + header + data


def decode(blob: bytes) -> Record:
    """A record from safetensors bytes; CorruptFile says exactly what is wrong."""
    if len(blob) < 8:
        raise CorruptFile(f"file of {len(blob)} bytes is too short for a header")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > MAX_HEADER or 8 + length > len(blob):
        raise CorruptFile(f"header length {length} does not fit a file of {len(blob)} bytes (truncated?)")
    try:
        header = json.loads(blob[8:8 + length])
        meta_strings = header.pop("__metadata__")
        record = json.loads(meta_strings["record"])
        checksum = meta_strings["sha256"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFile(f"unreadable header: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CorruptFile("not a synapse-serve instance file")
    if record.get("format_version") != FORMAT_VERSION:
        raise CorruptFile(f"format version {record.get('format_version')!r}; this server reads {FORMAT_VERSION}")
    data = memoryview(blob)[8 + length:]
    expected = hashlib.sha256(
        _canonical({**header, "__metadata__": {"record": meta_strings["record"]}}) + bytes(data)).hexdigest()
    if checksum != expected:
        raise CorruptFile("checksum mismatch: the file was altered or damaged")
    arrays = {}
    for name, entry in header.items():
        try:
            dtype = numpy_dtype(_FROM_ST[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFile(f"tensor {name!r}: bad index entry ({exc})") from None
        if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * dtype.itemsize:
            raise CorruptFile(f"tensor {name!r}: offsets {begin}..{end} do not match shape {list(shape)}")
        arrays[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).copy()
    try:
        return Record(kind=str(record["kind"]), config=dict(record["config"]), seed=int(record["seed"]),
                      version=int(record["version"]), counters={str(k): int(v) for k, v in record["counters"].items()},
                      created_at=float(record["created_at"]), arrays=arrays, saved_at=float(record["saved_at"]),
                      durability=record["durability"], owner=str(record["owner"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptFile(f"record is incomplete: {exc}") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename over ``path``, fsync the directory: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Instance files under ``root/instances/<owner>/``; damaged ones go to ``root/quarantine``, never overwritten."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.instances = self.root / "instances"
        self.quarantine = self.root / "quarantine"
        self.snapshots = self.root / "snapshots"
        self.evicted = self.root / "evicted"

    def prepare(self) -> list[str]:
        """Create the directories and delete temporary files a crash left behind; returns what was removed."""
        self.instances.mkdir(parents=True, exist_ok=True)
        removed = []
        for tmp in self.instances.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
        return removed

    def path(self, key: str) -> Path:
        """``instances/<owner>/<name>.safetensors`` for the key ``owner/name``."""
        return self.instances / f"{key}{SUFFIX}"

    def save(self, key: str, record: Record) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, encode(record))

    def remove(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        if path.parent.is_dir():
            fsync_dir(path.parent)

    def save_evicted(self, key: str, record: Record) -> Path:
        """``evicted/<owner>/<name>-<saved_at>.safetensors``: an export, written before the instance goes."""
        path = self.evicted / f"{key}-{int(record.saved_at * 1000)}{SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, encode(record))
        return path

    # --- snapshots: named point-in-time copies, one file each under snapshots/<instance>/ ---

    def snapshot_path(self, key: str, snapshot: str) -> Path:
        """``snapshots/<owner>/<name>/<snapshot>.safetensors``."""
        return self.snapshots / key / f"{snapshot}{SUFFIX}"

    def save_snapshot(self, name: str, snapshot: str, record: Record) -> None:
        path = self.snapshot_path(name, snapshot)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, encode(record))

    def list_snapshots(self, name: str) -> list[Path]:
        return sorted((self.snapshots / name).glob(f"*{SUFFIX}"))

    def remove_snapshots(self, name: str) -> None:
        for path in self.list_snapshots(name):
            path.unlink(missing_ok=True)
        (self.snapshots / name).rmdir() if (self.snapshots / name).is_dir() else None

    def load_all(self) -> tuple[dict[str, Record], dict[str, str]]:
        """Every readable record by key, and for each unreadable file the reason (the file is quarantined)."""
        records, errors = {}, {}
        for path in sorted(self.instances.glob(f"*/*{SUFFIX}")):
            key = f"{path.parent.name}/{path.name[: -len(SUFFIX)]}"
            try:
                records[key] = decode(path.read_bytes())
            except (CorruptFile, OSError) as exc:
                errors[key] = str(exc)
                self.quarantine.mkdir(parents=True, exist_ok=True)
                os.replace(path, self.quarantine / f"{path.parent.name}__{path.name}.{uuid.uuid4().hex[:8]}")
        return records, errors
