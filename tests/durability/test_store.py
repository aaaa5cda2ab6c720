"""The instance file format: round trips, atomic writes, and every kind of damage caught."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from durability.files import with_record
from synapse_serve.store import (
    CorruptFile,
    Record,
    StateDirLocked,
    Store,
    decode,
    encode,
    file_size,
    stream_record,
    write_atomic,
)


def record(**overrides) -> Record:
    arrays = {"weights": np.arange(12, dtype=np.float32).reshape(3, 4), "key": np.array([1, 2], np.uint32),
              "opt_state/0/count": np.array(3, np.int32), "biases": np.zeros((0,), np.float32)}
    base = dict(kind="HebbianDeconvSynapse", config={"shape": [1, 1, 1, 1]}, seed=4, version=9,
                counters={"evolve": 8}, created_at=1.5, arrays=arrays)
    return Record(**{**base, **overrides})


def test_round_trip_is_exact():
    r = record()
    out = decode(encode(r))
    assert (out.kind, out.config, out.seed, out.version, out.counters, out.created_at) == (
        r.kind, r.config, r.seed, r.version, r.counters, r.created_at)
    for name, array in r.arrays.items():
        assert out.arrays[name].dtype == array.dtype and out.arrays[name].shape == array.shape
        np.testing.assert_array_equal(out.arrays[name], array)


def test_it_is_a_real_safetensors_file():
    blob = encode(record())
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    assert header["weights"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": header["weights"]["data_offsets"]}
    assert json.loads(header["__metadata__"]["record"])["format_version"] == 1
    assert (8 + length) % 8 == 0


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1, -30])
def test_truncation_is_caught(cut):
    blob = encode(record())
    with pytest.raises(CorruptFile):
        decode(blob[:cut])


def test_every_single_bit_flip_is_caught():
    blob = encode(record())
    rng = np.random.default_rng(0)
    for position in rng.choice(len(blob), size=200, replace=False):
        damaged = bytearray(blob)
        damaged[position] ^= 1 << int(rng.integers(8))
        with pytest.raises(CorruptFile):
            decode(bytes(damaged))


def test_other_format_versions_are_refused():
    blob = encode(record())
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    meta = json.loads(header["__metadata__"]["record"])
    meta["format_version"] = 2
    header["__metadata__"]["record"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    with pytest.raises(CorruptFile, match="format version 2"):
        decode(struct.pack("<Q", len(new)) + new + blob[8 + length:])


def test_a_header_of_millions_of_lists_is_refused_before_it_is_read(tmp_path):
    """A red-team reading (2026-11-30): an import's header (up to 16 MiB) was read by json.loads whole, ~8 million
    lists from ``[]`` — about 500 MB — before any check. Headers hold a few hundred arrays and objects."""
    import tracemalloc

    from synapse_serve.store import read_header

    blob = encode(record())
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    header["__metadata__"]["padding"] = "x"  # valid JSON, millions of lists, beside an intact record
    flood = json.dumps(header).encode().replace(b'"x"', b"[" + b"[]," * 2_000_000 + b"[]]")
    flood += b" " * (-len(flood) % 8)
    damaged = struct.pack("<Q", len(flood)) + flood + blob[8 + length:]
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFile, match="arrays and objects"):
            decode(damaged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(damaged), f"{peak / 1e6:.0f} MB to refuse a {len(damaged) / 1e6:.0f} MB file"
    (tmp_path / "flood.safetensors").write_bytes(damaged)
    with pytest.raises(CorruptFile, match="arrays and objects"):
        read_header(tmp_path / "flood.safetensors")
    assert decode(blob).version == 9  # an ordinary header is read
    # the record is a JSON text in a string of the header: there its brackets may be escapes, counted once read out
    meta = json.loads(header["__metadata__"]["record"])
    meta["padding"] = "x"
    lists = "[" + "[]," * 200_000 + "[]]"
    header["__metadata__"] = {**header["__metadata__"], "record": json.dumps(meta).replace('"x"', lists)}
    del header["__metadata__"]["padding"]
    text = json.dumps(header)
    escaped = text.replace(json.dumps(lists)[1:-1], lists.replace("[", "\\u005b").replace("]", "\\u005d"))
    assert escaped.count("[") < 100 and len(escaped) > len(text)
    hidden = escaped.encode() + b" " * (-len(escaped) % 8)
    with pytest.raises(CorruptFile, match="arrays and objects"):
        decode(struct.pack("<Q", len(hidden)) + hidden + blob[8 + length:])


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "x.safetensors"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.safetensors"
    write_atomic(target, b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("synapse_serve.store.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_store_cleans_stale_temporaries_everywhere_and_quarantines_damage(tmp_path):
    store = Store(tmp_path)
    store.prepare()
    store.save("alice/good", record())
    store.save("bob/bad", record())
    store.save_snapshot("alice/good", "s1", record())
    (store.instances / "alice" / ".good.safetensors.abc.tmp").write_bytes(b"half")
    (store.snapshots / "alice" / "good" / ".s2.safetensors.def.tmp").write_bytes(b"half")  # a crash mid-snapshot
    store.path("bob/bad").write_bytes(encode(record())[:-3])
    removed, failures = store.prepare()
    assert sorted(removed) == ["instances/alice/.good.safetensors.abc.tmp",
                               "snapshots/alice/good/.s2.safetensors.def.tmp"] and failures == []
    assert store.stored_keys() == ["alice/good", "bob/bad"]
    assert store.load("alice/good").version == 9
    with pytest.raises(CorruptFile):
        store.load("bob/bad")
    target = store.quarantine_file("bob/bad", "truncated")
    assert target.parent == store.quarantine / "bob" and not store.path("bob/bad").exists()
    assert "truncated" in target.with_name(target.name + ".reason.txt").read_text()


def test_quarantined_files_never_overwrite_each_other(tmp_path):
    """``a/b__c`` and ``a__b/c`` once mapped to one quarantine name; so did two failures of one name."""
    store = Store(tmp_path)
    store.prepare()
    kept = []
    for key in ("a/b__c", "a__b/c", "a/b__c", "a/b__c"):
        store.save(key, record(version=len(kept) + 1))
        kept.append(store.quarantine_file(key, "test"))
    assert len(set(kept)) == 4 and all(p.exists() for p in kept)
    assert sorted(decode(p.read_bytes()).version for p in kept) == [1, 2, 3, 4]  # none lost


def test_a_snapshot_crash_leaves_nothing_that_breaks_delete(tmp_path):
    store = Store(tmp_path)
    store.prepare()
    store.save_snapshot("alice/x", "s1", record())
    (store.snapshots / "alice" / "x" / ".s2.safetensors.0123.tmp").write_bytes(b"half")  # before any restart
    store.remove_snapshots("alice/x")  # the temporary goes too; the directory can go
    assert not (store.snapshots / "alice" / "x").exists()


def test_writing_streams_the_arrays_without_copying_the_state(tmp_path):
    """A 64 MiB state is written with far less than its size in extra memory (the old encoder needed ~3x)."""
    import tracemalloc

    big = np.random.default_rng(0).normal(size=(4096, 4096)).astype(np.float32)  # 64 MiB
    r = record(arrays={"weights": big, "key": np.array([1, 2], np.uint32)})
    tracemalloc.start()
    try:
        write_atomic(tmp_path / "big.safetensors", r)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.2 * big.nbytes, peak
    out = decode((tmp_path / "big.safetensors").read_bytes())
    np.testing.assert_array_equal(out.arrays["weights"], big)
    assert file_size(r) == (tmp_path / "big.safetensors").stat().st_size
    length, parts = stream_record(r)  # a download: the same bytes, streamed from the arrays
    assert length == file_size(r)
    assert b"".join(bytes(p) for p in parts()) == (tmp_path / "big.safetensors").read_bytes()


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 2**64 + 5}, "version"),
    ({"version": 0}, "version"),
    ({"version": "7"}, "version"),
    ({"durability": "bogus"}, "durability"),
    ({"counters": {"evolve": -1}}, "counter"),
    ({"counters": {"evolve": 1.5}}, "counter"),
    ({"created_at": float("nan")}, "NaN"),
    ({"saved_at": -1}, "saved_at"),
    ({"seed": -3}, "seed"),
    ({"owner": "../etc"}, "owner"),
    ({"kind": 3}, "kind"),
    ({"applied": "key"}, "applied"),
    ({"applied": [{"key": "k", "fingerprint": "0" * 64, "version": 2}]}, "applied"),
    ({"applied": [{"key": "k", "fingerprint": "xyz", "version": 2, "whole": True}]}, "applied"),
    ({"applied": [{"key": "", "fingerprint": "0" * 64, "version": 2, "whole": True}]}, "applied"),
    ({"applied": [{"key": "k", "fingerprint": "0" * 64, "version": 0, "whole": True}]}, "applied version"),
    ({"applied": [{"key": "k", "fingerprint": "0" * 64, "version": 2, "whole": True}] * 17}, "applied"),
])
def test_every_record_field_is_validated_even_with_a_valid_checksum(change, message):
    crafted = with_record(encode(record()), **change)
    with pytest.raises(CorruptFile, match=message):
        decode(crafted)
    assert decode(with_record(encode(record()))).version == 9  # the crafting itself is sound
    applied = [{"key": "evolve-1", "fingerprint": "ab" * 32, "version": 4, "whole": True}]
    assert decode(with_record(encode(record()), applied=applied)).applied == applied


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """The rename is durable only once the directory is: a crash after it could otherwise lose the new file."""
    synced = []
    real_fsync = os.fsync

    def recording(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr("synapse_serve.store.os.fsync", recording)
    write_atomic(tmp_path / "x.safetensors", b"data")
    assert synced[-1] == os.path.realpath(tmp_path)  # the last fsync is the directory's, after the rename
    assert any(p.endswith(".tmp") for p in synced[:-1])  # the file's own, before it



def test_a_directory_made_for_a_file_is_durable_too(tmp_path, monkeypatch):
    """A red-team note (2026-11-30): a new owner's ``instances/<owner>/`` (a first snapshot's, a first eviction's
    directory) was made without syncing its parent, so a power loss could take the directory with the synced file
    in it. Each directory made is synced into its parent before the file is written."""
    synced = []
    real_fsync = os.fsync

    def recording(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    store = Store(tmp_path)
    store.prepare()
    monkeypatch.setattr("synapse_serve.store.os.fsync", recording)
    store.save("alice/a", record())
    store.save_snapshot("alice/a", "s1", record())
    store.save_evicted("bob/b", record())
    for parent in ("instances", "snapshots", "snapshots/alice", "evicted"):
        assert os.path.realpath(tmp_path / parent) in synced, parent
    synced.clear()
    store.save("alice/b", record())  # nothing new made: only the file and its directory
    assert not any(p == os.path.realpath(tmp_path / "instances") for p in synced)


def test_one_server_per_state_directory(tmp_path):
    first = Store(tmp_path)
    first.lock()
    try:
        second = Store(tmp_path)
        with pytest.raises(StateDirLocked, match=rf"in use by another synapse-serve process \(pid {os.getpid()}\)"):
            second.lock()
    finally:
        first.unlock()
    second.lock()  # free again once the first is gone
    second.unlock()
