"""Crafted instance files for the durability tests."""

from __future__ import annotations

import hashlib
import json
import struct


def with_record(blob: bytes, **changes) -> bytes:
    """The file with its record's fields changed and its checksum made valid again (a crafted file)."""
    return _resealed(blob, record_changes=changes)


def with_index(blob: bytes, **entries) -> bytes:
    """The file with tensor index entries set (``{"dtype", "shape", "data_offsets"}``), checksum valid again."""
    return _resealed(blob, index_changes=entries)


def _resealed(blob: bytes, record_changes: dict | None = None, index_changes: dict | None = None) -> bytes:
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    meta = json.loads(header["__metadata__"]["record"])
    meta.update(record_changes or {})
    header["__metadata__"]["record"] = json.dumps(meta)
    header.update(index_changes or {})
    data = blob[8 + length:]
    body = {k: v for k, v in header.items() if k != "__metadata__"}
    canonical = json.dumps({**body, "__metadata__": {"record": header["__metadata__"]["record"]}},
                           sort_keys=True, separators=(",", ":")).encode()
    header["__metadata__"]["sha256"] = hashlib.sha256(canonical + data).hexdigest()
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data
