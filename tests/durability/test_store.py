"""The instance file format: round trips, atomic writes, and every kind of damage caught."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from synapse_serve.store import CorruptFile, Record, Store, decode, encode, write_atomic


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


def test_store_cleans_stale_temporaries_and_quarantines_damage(tmp_path):
    store = Store(tmp_path)
    store.prepare()
    store.save("alice/good", record())
    store.save("bob/bad", record())
    (store.instances / "alice" / ".good.safetensors.abc.tmp").write_bytes(b"half")
    store.path("bob/bad").write_bytes(encode(record())[:-3])
    assert store.prepare() == [".good.safetensors.abc.tmp"]
    records, errors = store.load_all()
    assert set(records) == {"alice/good"} and set(errors) == {"bob/bad"}
    assert not store.path("bob/bad").exists()
    assert len(list(store.quarantine.iterdir())) == 1  # kept for a person to look at, not overwritten
