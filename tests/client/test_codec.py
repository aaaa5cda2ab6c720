"""The wire format: round trips for every dtype and shape class, and clear errors for bad tensors."""

from __future__ import annotations

import math

import ml_dtypes
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from synapse_client import DTYPES, WireError, decode_tensor, packb, unpackb
from synapse_client import _codec
from synapse_client._codec import json_tensor, to_json

NUMPY_DTYPES = {name: np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name) for name in DTYPES}
SHAPES = st.one_of(
    st.just(()),  # 0-d
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),  # includes zero-size
)


def arrays(name: str):
    dtype = NUMPY_DTYPES[name]
    base = np.dtype(np.float32) if name == "bfloat16" else dtype
    strategy = hnp.arrays(base, SHAPES, elements={"allow_nan": False} if base.kind == "f" else None)
    return strategy.map(lambda a: a.astype(dtype))


@pytest.mark.parametrize("name", DTYPES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip_every_dtype_and_shape(name, data):
    array = data.draw(arrays(name))
    decoded = unpackb(packb({"t": array, "meta": [1, "x"]}))
    assert decoded["meta"] == [1, "x"]
    out = decoded["t"]
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out.reshape(-1).view(np.uint8), array.reshape(-1).view(np.uint8))


def test_decode_is_zero_copy_and_read_only():
    body = packb({"t": np.arange(1024, dtype=np.float32)})
    out = unpackb(body)["t"]
    assert not out.flags.writeable and not out.flags.owndata
    assert out.base is not None


def test_big_endian_and_non_contiguous_inputs_are_normalised():
    a = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    raw = msgpack.unpackb(packb({"t": a}))["t"]
    assert raw["dtype"] == "float32" and raw["shape"] == [3, 2]
    np.testing.assert_array_equal(np.frombuffer(raw["data"], "<f4").reshape(3, 2), a)


def test_a_plain_msgpack_library_reads_it():
    raw = msgpack.unpackb(packb({"w": np.ones((2, 3), np.float32)}))
    t = raw["w"]
    assert set(t) == {"dtype", "shape", "data"} and isinstance(t["data"], bytes)
    assert len(t["data"]) == math.prod(t["shape"]) * 4


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"dtype": "float32", "shape": [2, 2], "data": b"\0" * 15}, "needs 16 bytes, received 15"),
        ({"dtype": "float32", "shape": [1 << 20, 1 << 20], "data": b""}, "declares 1099511627776 elements"),
        ({"dtype": "complex64", "shape": [1], "data": b"\0" * 8}, "unknown dtype 'complex64'"),
        ({"dtype": "O", "shape": [1], "data": b"\0" * 8}, "unknown dtype 'O'"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "non-negative integers"),
        ({"dtype": "float32", "shape": [1.5], "data": b""}, "non-negative integers"),
        ({"dtype": "float32", "shape": "12", "data": b""}, "shape must be a list"),
        ({"dtype": "float32", "shape": [1] * 40, "data": b"\0" * 4}, "at most 32"),
    ],
)
def test_bad_tensors_are_rejected_before_allocation(tensor, message):
    with pytest.raises(WireError, match=message):
        decode_tensor(tensor)
    with pytest.raises(WireError):
        unpackb(msgpack.packb({"x": tensor}))


def test_malformed_bodies():
    with pytest.raises(WireError, match="not valid msgpack"):
        unpackb(b"\x82\xa1a")
    with pytest.raises(WireError, match="not valid msgpack|deeper than"):
        unpackb(b"\x91" * 100_000)  # nesting bomb
    with pytest.raises(WireError, match="deeper than"):
        unpackb(msgpack.packb(eval("[" * 100 + "]" * 100)))  # noqa: S307 - a literal, built here
    with pytest.raises(WireError, match="exactly the keys"):
        unpackb(msgpack.packb({"t": {"dtype": "float32", "shape": [1], "data": b"\0" * 4, "x": 1}}))
    with pytest.raises(WireError, match="extension"):
        unpackb(msgpack.packb(msgpack.ExtType(1, b"x")))
    stamped = msgpack.packb({"op": "kinds", "owner": msgpack.Timestamp(1, 2)})  # type -1: the C reader's Timestamp
    for max_values in (None, 100):  # both readers refuse it (a red-team run: one of them let it through)
        with pytest.raises(WireError, match="extension"):
            unpackb(stamped, max_values=max_values)
    with pytest.raises(WireError, match="object array"):
        packb({"t": np.array([object()], dtype=object)})


def test_max_elements_limit():
    body = packb({"t": np.zeros(100, np.uint8)})
    assert unpackb(body, max_elements=100)["t"].size == 100
    with pytest.raises(WireError, match="limit is 99"):
        unpackb(body, max_elements=99)


def test_json_form():
    out = to_json({"t": np.arange(4, dtype=np.float32).reshape(2, 2)})
    assert out == {"t": {"dtype": "float32", "shape": [2, 2], "values": [[0.0, 1.0], [2.0, 3.0]]}}
    np.testing.assert_array_equal(json_tensor(out["t"]), np.arange(4).reshape(2, 2))
    assert json_tensor([[1, 2], [3, 4]]).dtype == np.float32
    with pytest.raises(WireError, match="rectangular"):
        json_tensor([[1, 2], [3]])
    with pytest.raises(WireError, match="shape"):
        json_tensor({"dtype": "float32", "shape": [3], "values": [1, 2]})
    with pytest.raises(WireError, match="exactly the keys"):
        json_tensor({"dtype": "float32", "values": [1, 2]})


# --- large bodies: written in parts, read in place ---

BIG = 1 << 17  # over ZERO_COPY_BYTES: the in-place reader and the part-wise writer take over

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(value=msgpack_values, position=st.sampled_from(["before", "after"]))
def test_in_place_reader_reads_what_msgpack_reads(value, position):
    tensor = np.arange(BIG // 4, dtype=np.float32)
    body = {"a": value, "t": tensor} if position == "after" else {"t": tensor, "a": value}
    whole = packb(body)
    assert len(whole) >= BIG
    assert b"".join(_codec.packb_parts(body)) == whole  # the parts are exactly packb's bytes
    decoded = unpackb(whole)
    assert decoded["a"] == msgpack.unpackb(whole, raw=False)["a"]
    np.testing.assert_array_equal(decoded["t"], tensor)
    # the tensor is a view of the body's bytes, not a copy
    body_start = np.frombuffer(whole, np.uint8).ctypes.data
    assert body_start <= decoded["t"].ctypes.data < body_start + len(whole)


def test_in_place_reader_refuses_every_truncation_and_trailing_bytes():
    whole = packb({"t": np.ones(BIG // 4, np.float32), "x": [1, "two", 3.0, {"k": None}]})
    cuts = sorted({*range(0, 64), *range(len(whole) - 64, len(whole)), *range(0, len(whole), 4099)})
    for cut in cuts:
        if cut >= _codec.ZERO_COPY_BYTES:
            with pytest.raises(WireError, match="not valid msgpack"):
                unpackb(whole[:cut])
    with pytest.raises(WireError, match="ExtraData"):
        unpackb(whole + b"\x00")


@pytest.mark.parametrize(("body", "message"), [
    (b"\xdd\xff\xff\xff\xff" + b"\x00" * BIG, "runs past the end"),  # an array longer than the body
    (b"\xc6\xff\xff\xff\xff" + b"\x00" * BIG, "ends in the middle"),  # a bin longer than the body
    (b"\x81\x01\x02" + b"\x00" * BIG, "map key is a int"),
    (b"\xc1" + b"\x00" * BIG, "starts no value"),
    (b"\xd9\x02\xff\xfe" + b"\x00" * BIG, "not UTF-8"),
    (b"\xd4\x01\x00" + b"\x00" * BIG, "extension"),
])
def test_in_place_reader_errors_name_the_defect(body, message):
    with pytest.raises(WireError, match=message):
        unpackb(body)


def test_a_large_body_of_many_small_values_falls_back_to_msgpack():
    values = list(range(50_000))
    assert unpackb(packb({"v": values, "pad": b"\x00" * BIG}))["v"] == values


def _wide(value, width: int) -> bytes:
    """msgpack for ``value`` with headers of ``width`` bytes (1, 2 or 4) wherever msgpack has a choice, and
    floats as float32 when they round-trip: non-minimal forms any reader must accept, and every width the
    in-place reader handles (map16/map32, array16/array32, str8/16/32, bin8/16/32, int and uint of 1-8 bytes)."""
    import struct

    sizes = {1: (">B", 0), 2: (">H", 1), 4: (">I", 2)}
    fmt, step = sizes[width]
    if value is None or isinstance(value, bool):
        return msgpack.packb(value)
    if isinstance(value, int):
        if value >= 0:
            for code, f, top in ((0xCC, ">B", 2**8), (0xCD, ">H", 2**16), (0xCE, ">I", 2**32), (0xCF, ">Q", 2**64)):
                if value < top and struct.calcsize(f) >= width:
                    return bytes([code]) + struct.pack(f, value)
        for code, f, bits in ((0xD0, ">b", 8), (0xD1, ">h", 16), (0xD2, ">i", 32), (0xD3, ">q", 64)):
            if -(2 ** (bits - 1)) <= value < 2 ** (bits - 1) and struct.calcsize(f) >= width:
                return bytes([code]) + struct.pack(f, value)
    if isinstance(value, float):
        single = struct.unpack(">f", struct.pack(">f", value))[0] if abs(value) < 3e38 else None
        if single == value:
            return b"\xca" + struct.pack(">f", value)
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode()
        return bytes([0xD9 + step]) + struct.pack(fmt, len(raw)) + raw if len(raw) < 2 ** (8 * width) else \
            msgpack.packb(value)
    if isinstance(value, bytes):
        return bytes([0xC4 + step]) + struct.pack(fmt, len(value)) + value if len(value) < 2 ** (8 * width) else \
            msgpack.packb(value)
    if isinstance(value, list):
        head = bytes([0xDC]) + struct.pack(">H", len(value)) if width < 4 else bytes([0xDD]) + struct.pack(">I", len(value))
        return head + b"".join(_wide(v, width) for v in value)
    if isinstance(value, dict):
        head = bytes([0xDE]) + struct.pack(">H", len(value)) if width < 4 else bytes([0xDF]) + struct.pack(">I", len(value))
        return head + b"".join(_wide(k, width) + _wide(v, width) for k, v in value.items())
    raise TypeError(type(value))


wide_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, width=32) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda children: st.lists(children, min_size=0, max_size=40)
    | st.dictionaries(st.text(max_size=10), children, min_size=0, max_size=40),
    max_leaves=80,
)


@settings(max_examples=200, deadline=None)
@given(value=wide_values, width=st.sampled_from([1, 2, 4]), minimal=st.booleans())
def test_in_place_reader_reads_every_type_and_width_as_msgpack_does(value, width, minimal):
    """Every msgpack type and header width the in-place reader handles (float32 scalars, map16/32 and
    array16/32 with 16+ entries among them), in minimal and non-minimal forms: it must read what msgpack reads."""
    tensor = np.arange(BIG // 4, dtype=np.float32)
    encoded = msgpack.packb(value, use_bin_type=True, use_single_float=False) if minimal else _wide(value, width)
    whole = b"\x82\xa1a" + encoded + b"\xa1t" + packb(tensor)
    expected = msgpack.unpackb(whole, raw=False, strict_map_key=False)
    decoded = unpackb(whole)
    assert decoded["a"] == expected["a"]
    np.testing.assert_array_equal(decoded["t"], tensor)


def test_the_wide_forms_are_really_exercised():
    """The generator above does produce the headers it claims (so the test above cannot pass vacuously)."""
    body = _wide({f"k{i}": [1.5] * 20 for i in range(20)}, 4) + _wide({f"k{i}": i for i in range(17)}, 2)
    for header in (b"\xdf", b"\xdd", b"\xde", b"\xca"):
        assert header in body
    assert _wide(300, 4)[0] == 0xCE and _wide(-1, 8 // 2)[0] == 0xD2 and _wide("x", 2)[0] == 0xDA
    assert _wide(b"x", 4)[0] == 0xC6 and _wide(0.1, 1)[0] == 0xCB
