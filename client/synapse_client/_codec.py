"""The wire format: msgpack bodies whose tensors are ``{"dtype", "shape", "data"}`` maps.

One spec, one implementation: the server imports this module. See docs/wire-format.md.

- ``data`` is a msgpack bin of ``prod(shape) * itemsize`` bytes, little-endian, C order.
- Decoding is zero-copy (``np.frombuffer`` over the received bytes, read-only),
  never pickle, never object dtypes; every length is checked before use.
- JSON bodies (for curl) carry a tensor as ``{"dtype", "shape", "values": [...]}``
  or, on input, as a plain nested list of numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np

from synapse_client._exceptions import WireError

try:  # bfloat16 needs ml_dtypes (a server dependency; optional for the client)
    import ml_dtypes

    _BFLOAT16: np.dtype | None = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised only without ml_dtypes
    _BFLOAT16 = None

DTYPES = ("float32", "float16", "bfloat16", "float64", "int32", "int64", "uint32", "uint8", "bool")
TENSOR_KEYS = frozenset({"dtype", "shape", "data"})
MAX_RANK = 32
DEFAULT_MAX_ELEMENTS = 1 << 32
MAX_DEPTH = 64  # nesting of maps/lists in a body
ZERO_COPY_BYTES = 64 << 10  # tensors and bodies this large are encoded and decoded without copies
IN_PLACE_MAX_OBJECTS = 4096


# dtype <-> wire name, looked up (numpy's dtype.name is slow enough to show in a small call's profile)
_BY_NAME = {n: np.dtype(n).newbyteorder("<") for n in DTYPES if n != "bfloat16"}
if _BFLOAT16 is not None:
    _BY_NAME["bfloat16"] = _BFLOAT16
_WIRE_NAME = {dtype: name for name, dtype in _BY_NAME.items()}


def numpy_dtype(name: Any) -> np.dtype:
    """The numpy dtype of a wire dtype name, or WireError listing the allowed names."""
    if not isinstance(name, str) or name not in DTYPES:
        raise WireError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    if name not in _BY_NAME:
        raise WireError("dtype bfloat16 needs the ml_dtypes package (pip install synapse-serve[bfloat16])")
    return _BY_NAME[name]


def wire_dtype_name(dtype: np.dtype) -> str:
    name = _WIRE_NAME.get(dtype)
    if name is not None:
        return name
    name = np.dtype(dtype).name  # e.g. a big-endian float32 is still float32 (encode_tensor swaps it)
    if name not in DTYPES:
        raise WireError(f"dtype {name} cannot be sent; allowed: {', '.join(DTYPES)}")
    return name


def check_shape(shape: Any, max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[int, ...]:
    """Validate a declared shape (before anything of that size exists) and return it as a tuple."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK:
        raise WireError(f"shape must be a list of at most {MAX_RANK} integers, received {shape!r:.80}")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise WireError(f"shape must hold non-negative integers, received {list(shape)!r:.80}")
    count = math.prod(shape)
    if count > max_elements:
        raise WireError(f"shape {list(shape)} declares {count} elements; the limit is {max_elements}")
    # an empty tensor declares 0 elements whatever its other dimensions: each is held to the limit too (numpy
    # cannot shape an array whose non-zero dimensions multiply past its index range)
    if count == 0 and math.prod(d for d in shape if d) > max_elements:
        raise WireError(f"shape {list(shape)[:8]!r:.80}: its non-zero dimensions multiply past the limit of "
                        f"{max_elements} elements")
    return tuple(shape)


def to_numpy(value: Any) -> np.ndarray:
    """numpy view of an array-like (numpy, jax or nested lists); never an object array."""
    array = np.asarray(value)
    if array.dtype == object:
        raise WireError("cannot send an object array; use numbers of one dtype")
    if array.dtype not in _WIRE_NAME and array.dtype.kind == "f" and array.dtype.name not in DTYPES:
        array = array.astype(np.float64)
    return array


def encode_tensor(value: Any) -> dict[str, Any]:
    """A wire tensor map for an array: little-endian, C order, bytes shared where possible."""
    array = to_numpy(value)
    name = wire_dtype_name(array.dtype)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return {"dtype": name, "shape": list(array.shape), "data": memoryview(flat)}


def decode_tensor(obj: dict[str, Any], max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """A read-only numpy array viewing the tensor map's bytes (no copy)."""
    dtype = numpy_dtype(obj.get("dtype"))
    shape = check_shape(obj.get("shape"), max_elements)
    data = obj.get("data")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"tensor data must be msgpack bin, received {type(data).__name__}")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise WireError(
            f"tensor of dtype {obj['dtype']} and shape {list(shape)} needs {expected} bytes, received {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Ref:
    """A tensor argument that names a compartment already on the server instead of sending it.

    ``Ref("inputs")`` is the called instance's own compartment as it is when the call
    starts; ``Ref("outputs", instance="enc")`` is another instance's of the same owner.
    On the wire: ``{"ref": "inputs"}`` or ``{"ref": "outputs", "instance": "enc"}``.

    Example::

        syn.forward(x)
        syn.evolve(pre=Ref("inputs"), post=target)  # x is not sent again
    """

    compartment: str
    instance: str | None = None

    def to_wire(self) -> dict[str, str]:
        """The wire map of this reference."""
        return {"ref": self.compartment} if self.instance is None else {
            "ref": self.compartment, "instance": self.instance}


def _default(obj: Any) -> Any:
    if isinstance(obj, Ref):
        return obj.to_wire()
    if isinstance(obj, np.generic):  # np.float32(0.01) in a config is a number, not a 0-d tensor
        return obj.item()
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        return encode_tensor(obj)
    raise _unsendable(obj)


def _unsendable(obj: Any) -> Exception:
    """Why msgpack cannot carry ``obj``: an int out of its range is a WireError (a value, like a dtype the wire
    cannot carry), another type a TypeError."""
    if isinstance(obj, int):
        return WireError(f"the integer {str(obj)[:40]} is outside what the wire carries (-2**63 to 2**64 - 1)")
    return TypeError(f"cannot encode {type(obj).__name__}")


_HELD = 1  # the extension code of an array left where it is (pack_held)


def pack_held(obj: Any) -> tuple[bytes, list[Any]]:
    """What ``packb(obj)`` sends, for a body that travels no wire (the in-process mode): the same bytes except
    that each array stays where it is, an extension value naming it in the returned list. Everything else is
    made what the wire makes it (numpy scalars numbers, tuples lists, references maps); what the wire cannot
    carry is refused as ``packb`` refuses it."""
    held: list[Any] = []

    def default(value: Any) -> Any:
        if isinstance(value, Ref):
            return value.to_wire()
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
            held.append(value)
            return msgpack.ExtType(_HELD, (len(held) - 1).to_bytes(4, "little"))
        raise _unsendable(value)

    return msgpack.packb(obj, default=default, use_bin_type=True), held


def unpack_held(data: bytes, held: list[Any], max_elements: int = DEFAULT_MAX_ELEMENTS,
                max_values: int | None = None) -> Any:
    """``pack_held``'s body decoded as ``unpackb`` decodes the wire's (the same checks and errors: WireError), its
    arrays the ones held (not copied)."""
    check_values(data, max_values)
    if max_values is not None:
        check_keys(data)

    def array(code: int, payload: bytes) -> Any:
        if code != _HELD or len(payload) != 4 or int.from_bytes(payload, "little") >= len(held):
            raise WireError("msgpack extension types are not accepted")
        return held[int.from_bytes(payload, "little")]

    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=array)
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(_not_msgpack(exc)) from None
    return _walk(obj, max_elements, 0, False)


def copied(value: Any) -> Any:
    """``value`` with every numpy array in it (in maps and lists) copied: writable, and nobody else's."""
    if isinstance(value, np.ndarray):
        return np.array(value)
    if isinstance(value, dict):
        return {key: copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copied(item) for item in value]
    return value


def packb(obj: Any) -> bytes:
    """Encode a body: arrays anywhere in it become wire tensors."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def packb_parts(obj: Any) -> list[bytes | memoryview]:
    """The same bytes as ``packb(obj)``, as parts to write one after another.

    Arrays of at least ZERO_COPY_BYTES are not copied: their part is a view of the
    array's own memory (keep the arrays alive and unchanged until the parts are sent).
    Anything else is one part, from msgpack's C packer.
    """
    if not _has_large_array(obj, 0):
        return [packb(obj)]
    parts: list[bytes | memoryview] = []
    pending: list[bytes] = []
    packer = msgpack.Packer(default=_default, use_bin_type=True)

    def emit(value: Any) -> None:
        if isinstance(value, dict):
            pending.append(packer.pack_map_header(len(value)))
            for key, item in value.items():
                pending.append(packer.pack(key))
                emit(item)
        elif isinstance(value, (list, tuple)):
            pending.append(packer.pack_array_header(len(value)))
            for item in value:
                emit(item)
        elif _is_array(value) and to_numpy(value).nbytes >= ZERO_COPY_BYTES:
            tensor = encode_tensor(value)  # {dtype, shape, data}, in that order, as packb writes it
            pending.extend([packer.pack_map_header(3), packer.pack("dtype"), packer.pack(tensor["dtype"]),
                            packer.pack("shape"), packer.pack(tensor["shape"]), packer.pack("data"),
                            _bin_header(len(tensor["data"]))])
            parts.append(b"".join(pending))
            pending.clear()
            parts.append(tensor["data"])
        else:
            pending.append(packer.pack(value))

    emit(obj)
    if pending:
        parts.append(b"".join(pending))
    return parts


def _bin_header(length: int) -> bytes:
    """msgpack's bin header in its smallest form, as msgpack itself writes it."""
    if length < 1 << 8:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 1 << 16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "__array__") and not isinstance(value, (Ref, np.generic)))


def _has_large_array(value: Any, depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return any(_has_large_array(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_large_array(v, depth + 1) for v in value)
    return _is_array(value) and to_numpy(value).nbytes >= ZERO_COPY_BYTES


class TooManyValues(WireError):
    """A body holds more values (msgpack) or containers (JSON) than the receiver's limit: each would become a Python
    object of 30-70 bytes, from as little as one byte on the wire."""


def check_values(data: bytes | bytearray | memoryview, max_values: int | None) -> None:
    """TooManyValues when the msgpack body ``data`` holds more than ``max_values`` values (every map, array, key
    and scalar counts; a tensor's bin is one), counted without building any. A body of at most ``max_values``
    bytes holds at most that many, and is not read; a longer one is read up to the limit (~0.3 µs a value)."""
    if max_values is None or len(data) <= max_values:
        return
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    end, pos, pending, count = len(view), 0, 1, 0
    table = _VALUE_TABLE
    while pending and pos < end:
        entry = table[view[pos]]
        if entry is None:  # 0xC1 starts no value: the decoder says so
            return
        count += 1
        if count > max_values:
            raise TooManyValues(f"the body holds more than {max_values} msgpack values (maps, arrays, keys, "
                                "numbers, strings); send tensors as {dtype, shape, data} maps")
        skip, width, per_length, children = entry
        pos += 1
        pending += children - 1
        if width:
            length = int.from_bytes(view[pos:pos + width], "big")
            pos += width
            if per_length:
                pending += length * per_length
            else:
                pos += length
        pos += skip


def _value_table() -> list[tuple[int, int, int, int] | None]:
    """Per msgpack type byte: (payload bytes after it, width of a length field, values per length unit (0: the
    length counts payload bytes), values it holds) — what ``check_values`` needs to step over a value."""
    table: list[tuple[int, int, int, int] | None] = [None] * 256
    for b in range(256):
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            table[b] = (0, 0, 0, 0)
        elif 0x80 <= b <= 0x8F:
            table[b] = (0, 0, 0, 2 * (b & 0x0F))
        elif 0x90 <= b <= 0x9F:
            table[b] = (0, 0, 0, b & 0x0F)
        elif 0xA0 <= b <= 0xBF:
            table[b] = (b & 0x1F, 0, 0, 0)
    for b, width in ((0xC4, 1), (0xC5, 2), (0xC6, 4), (0xD9, 1), (0xDA, 2), (0xDB, 4)):
        table[b] = (0, width, 0, 0)  # bin and str: a length, then that many bytes
    for b, size in ((0xCA, 4), (0xCB, 8), (0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8),
                    (0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
        table[b] = (size, 0, 0, 0)
    for b, width, per in ((0xDC, 2, 1), (0xDD, 4, 1), (0xDE, 2, 2), (0xDF, 4, 2)):
        table[b] = (0, width, per, 0)  # arrays and maps with a length field
    for b, size in ((0xD4, 2), (0xD5, 3), (0xD6, 5), (0xD7, 9), (0xD8, 17)):
        table[b] = (size, 0, 0, 0)  # fixed-size extensions (the wire refuses them; pack_held's arrays are one)
    for b, width in ((0xC7, 1), (0xC8, 2), (0xC9, 4)):
        table[b] = (1, width, 0, 0)  # extensions with a length: the type byte, then that many bytes
    return table


_VALUE_TABLE = _value_table()


MAX_DISTINCT_KEYS = 512  # map keys a body may spell differently: field, argument and compartment names, config fields


_first = operator.itemgetter(0)
MAX_INTERNED_KEYS = 8192  # distinct map keys the C reader may intern in this process (~100 bytes each, for good)
_INTERNABLE: set[bytes] = set()  # those keys, as bytes (a body whose keys are all here goes through the C reader)


def check_keys(data: bytes | bytearray | memoryview) -> bool:
    """TooManyValues when the msgpack body ``data`` holds more than MAX_DISTINCT_KEYS different map keys; else
    whether msgpack's C reader may decode it: every key one it may intern. That reader interns every map key, and
    on CPython 3.12 an interned string is never freed: a body of distinct keys kept ~90 bytes a key for good (a
    red-team run: 23 MB a body), and bodies of a few hundred new keys each, refused or not, grew the process
    without a bound (a later run: +150 MB for 2,000 frames). The keys are read first as bytes (not interned;
    ~2 µs for a frame); the first MAX_INTERNED_KEYS different ones the process meets may be interned (a body's
    field, argument, compartment and config names: a small vocabulary), and a body holding any other is decoded
    by the reader written here, which interns nothing (False)."""
    maps: list[list[tuple[Any, Any]]] = []  # each map's pairs (no map is built: ~2 µs for a frame)
    try:
        msgpack.unpackb(data, raw=True, strict_map_key=False, object_pairs_hook=maps.append)
    except Exception:  # noqa: BLE001 - any defect: the reader written here names it, interning nothing
        return False
    keys: set[Any] = set()
    try:
        for pairs in maps:
            keys.update(map(_first, pairs))
        odd = [key for key in keys if type(key) is not bytes]
    except TypeError:  # a key that is an array or a map
        odd = [key for pairs in maps for key, _ in pairs if type(key) is not bytes]
    if odd:  # refused now: no reader need read the rest of the body first
        what = "nil or a map" if odd[0] is None else _type_name(odd[0])  # (a map key reads as None here)
        raise WireError(f"body is not valid msgpack for this API: a map key is a {what}, not a string")
    if len(keys) > MAX_DISTINCT_KEYS:
        raise TooManyValues(f"the body's maps hold more than {MAX_DISTINCT_KEYS} different keys; a body names its "
                            "fields and tensors, and sends other names as values")
    new = keys - _INTERNABLE
    if not new:
        return True
    if len(_INTERNABLE) + len(new) > MAX_INTERNED_KEYS:
        return False
    _INTERNABLE.update(new)
    return True


def json_containers(raw: bytes) -> int:
    """At most how many arrays and objects a JSON text holds (brackets inside strings counted too: a bound)."""
    return raw.count(b"[") + raw.count(b"{")


def unpackb(data: bytes | bytearray | memoryview, max_elements: int = DEFAULT_MAX_ELEMENTS, *,
            writable: bool = False, max_values: int | None = None, bound_keys: bool = False) -> Any:
    """Decode a body: wire tensors become numpy arrays; any defect is a WireError. Map keys are strings.

    Bodies of at least ZERO_COPY_BYTES are read in place: a tensor views the body's own
    bytes (msgpack's C reader would copy every bin); others go through msgpack's C reader.
    The arrays are read-only views unless ``writable`` (what a client hands its caller): then
    they are the caller's own, writable (one copy of the body, or of each small tensor).
    With ``max_values``, a body holding more values is TooManyValues before any is built. With it or
    ``bound_keys`` (bytes another party chose), the map keys are bounded (``check_keys``).
    """
    check_values(data, max_values)
    if len(data) >= ZERO_COPY_BYTES:
        buffer = bytearray(data) if writable and not isinstance(data, bytearray) else data
        try:
            return _walk(_InPlaceReader(buffer).read_all(), max_elements, 0, False)
        except _TooManyObjects:
            pass  # a body of many small values: the C reader is faster at those
    if (max_values is not None or bound_keys) and not check_keys(data):  # the C reader would intern its keys
        buffer = bytearray(data) if writable and not isinstance(data, bytearray) else data
        return _walk(_InPlaceReader(buffer, max_objects=None).read_all(), max_elements, 0, False)
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(_not_msgpack(exc)) from None
    return _walk(obj, max_elements, 0, writable)


def _not_msgpack(exc: BaseException) -> str:
    return f"body is not valid msgpack: {type(exc).__name__}: {exc}"[:300]


class _TooManyObjects(Exception):
    """The in-place reader gives way to msgpack's C reader."""


class _InPlaceReader:
    """A msgpack reader whose bins are views of the input (no copy); everything else as msgpack reads it.

    It reads at most IN_PLACE_MAX_OBJECTS values (bodies with tensors hold few), refuses
    extension types, and checks every length against what is left before using it.
    """

    def __init__(self, data: bytes | bytearray | memoryview, max_objects: int | None = IN_PLACE_MAX_OBJECTS) -> None:
        self.view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        self.pos = 0
        self.objects = 0
        self.max_objects = max_objects if max_objects is not None else float("inf")

    def read_all(self) -> Any:
        value = self.read(0)
        if self.pos != len(self.view):
            raise WireError(f"body is not valid msgpack: ExtraData: {len(self.view) - self.pos} bytes after the body")
        return value

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.view):
            raise WireError("body is not valid msgpack: it ends in the middle of a value")
        chunk = self.view[self.pos:end]
        self.pos = end
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def read(self, depth: int) -> Any:  # noqa: C901 - one branch per msgpack type byte
        self.objects += 1
        if self.objects > self.max_objects:
            raise _TooManyObjects
        if depth > MAX_DEPTH:
            raise WireError(f"body nests deeper than {MAX_DEPTH} levels")
        b = self.take(1)[0]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0xA0 <= b <= 0xBF:
            return self.text(b & 0x1F)
        if b == 0xC0:
            return None
        if b in (0xC2, 0xC3):
            return b == 0xC3
        if b in (0xC4, 0xC5, 0xC6):
            return self.take(self.uint(1 << (b - 0xC4)))
        if b == 0xCA:
            return struct.unpack(">f", self.take(4))[0]
        if b == 0xCB:
            return struct.unpack(">d", self.take(8))[0]
        if 0xCC <= b <= 0xCF:
            return self.uint(1 << (b - 0xCC))
        if 0xD0 <= b <= 0xD3:
            return int.from_bytes(self.take(1 << (b - 0xD0)), "big", signed=True)
        if b in (0xD9, 0xDA, 0xDB):
            return self.text(self.uint(1 << (b - 0xD9)))
        if b in (0xDC, 0xDD):
            return self.array(self.uint(2 << (b - 0xDC)), depth)
        if b in (0xDE, 0xDF):
            return self.map(self.uint(2 << (b - 0xDE)), depth)
        if b in (0xC7, 0xC8, 0xC9) or 0xD4 <= b <= 0xD8:
            raise WireError("msgpack extension types are not accepted")
        raise WireError(f"body is not valid msgpack: byte 0x{b:02x} starts no value")

    def text(self, n: int) -> str:
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as exc:
            raise WireError(f"body is not valid msgpack: a string is not UTF-8: {exc}"[:300]) from None

    def count(self, n: int) -> int:
        if n > len(self.view) - self.pos:  # every element takes at least one byte
            raise WireError("body is not valid msgpack: a length runs past the end of the body")
        return n

    def array(self, n: int, depth: int) -> list[Any]:
        return [self.read(depth + 1) for _ in range(self.count(n))]

    def map(self, n: int, depth: int) -> dict[Any, Any]:
        out = {}
        for _ in range(self.count(n)):
            key = self.read(depth + 1)
            if not isinstance(key, str):
                raise WireError(f"body is not valid msgpack for this API: a map key is a {_type_name(key)}, "
                                "not a string")
            out[key] = self.read(depth + 1)
        return out


def _type_name(value: Any) -> str:
    return "bin" if isinstance(value, (bytes, memoryview)) else type(value).__name__


_LEAVES = frozenset({str, int, float, bool, type(None), bytes, np.ndarray})  # left as they are (arrays: pack_held's)


def _walk(obj: Any, max_elements: int, depth: int, writable: bool) -> Any:
    """A decoded body with its tensor maps made arrays (and each bin outside one bytes), checked: map keys are
    strings, at most MAX_DEPTH levels (a value at a deeper level is refused, as the in-place reader refuses it).
    The decoder's maps and lists are its own: changed in place, and only leaves are skipped (no call per number)."""
    if depth > MAX_DEPTH or (depth == MAX_DEPTH and isinstance(obj, (dict, list)) and obj):
        raise WireError(f"body nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise WireError(f"body is not valid msgpack for this API: a map key is a {_type_name(key)}, not a "
                                "string")
        if TENSOR_KEYS <= obj.keys() and isinstance(obj.get("data"), (bytes, memoryview)):
            if obj.keys() != TENSOR_KEYS:
                raise WireError(f"a tensor map has exactly the keys dtype, shape, data; received {sorted(obj)}")
            array = decode_tensor(obj, max_elements)
            return array.copy() if writable and not array.flags.writeable else array
        for key, value in obj.items():
            if type(value) not in _LEAVES:
                obj[key] = _walk(value, max_elements, depth + 1, writable)
        return obj
    if isinstance(obj, list):
        for at, value in enumerate(obj):
            if type(value) not in _LEAVES:
                obj[at] = _walk(value, max_elements, depth + 1, writable)
        return obj
    if isinstance(obj, (msgpack.ExtType, msgpack.Timestamp)):  # (the C reader makes type -1 a Timestamp)
        raise WireError("msgpack extension types are not accepted")
    if isinstance(obj, memoryview):  # a bin outside a tensor: what the C reader gives, bytes
        return bytes(obj)
    return obj


# --- JSON form (for curl) ---


def to_json(obj: Any, array_as: Callable[[np.ndarray], Any] | None = None) -> Any:
    """Replace arrays with ``{"dtype", "shape", "values"}`` (or what ``array_as`` makes of them) so ``json.dumps``
    can write the body."""
    if isinstance(obj, Ref):
        return obj.to_wire()
    if isinstance(obj, dict):
        return {k: to_json(v, array_as) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v, array_as) for v in obj]
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        array = to_numpy(obj)
        if array_as is not None:
            return array_as(array)
        return {"dtype": wire_dtype_name(array.dtype), "shape": list(array.shape), "values": _json_list(array)}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN or Infinity (json.dumps would write them, and strict readers refuse them)
    return obj


def _json_list(array: np.ndarray) -> Any:
    """An array's values as JSON numbers, nested lists in C order (a number for a 0-d array)."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return _json_floats(array)
    return array.astype(np.float64).tolist() if array.dtype.name in ("bfloat16", "float16") else array.tolist()


JSON_SLICE_ELEMENTS = 1 << 16  # an array's values are written this many at a time
JSON_PART_BYTES = 1 << 20


def json_parts(obj: Any) -> list[bytes]:
    """``json.dumps(to_json(obj))``, encoded, in parts of about a megabyte (``iter_json_parts``, all of them)."""
    return list(iter_json_parts(obj))


def iter_json_parts(obj: Any) -> Iterator[bytes]:
    """``json.dumps(to_json(obj))``, encoded, in parts of about a megabyte, each made when asked for, each array's
    values written a slice at a time: the whole text as Python lists of floats first cost ~50 bytes of memory per
    value (a 32 MB float32 answer peaked 500 MB above the server's size), and the whole text, even in parts, ~6
    bytes per byte of float32 values (a red-team run: 1.5 GB for an answer at the 256 MiB answer limit). Sent as
    they are made, an answer costs its arrays and about a part."""
    arrays: list[np.ndarray] = []
    marker = f"\x00array-{id(arrays):x}-"

    def placed(array: np.ndarray) -> str:  # each array a marker naming its place in ``arrays``
        arrays.append(array)
        return f"{marker}{len(arrays) - 1}"

    text = json.dumps(to_json(obj, placed))
    if not arrays:
        yield text.encode()
        return
    pending: list[str] = []
    size = 0

    def emit(piece: str) -> bytes | None:
        """Add a piece; the part it completes, if it does."""
        nonlocal size
        pending.append(piece)
        size += len(piece)
        if size < JSON_PART_BYTES:
            return None
        part = "".join(pending).encode()
        pending.clear()
        size = 0
        return part

    def values(array: np.ndarray) -> Iterator[bytes | None]:
        if array.size <= JSON_SLICE_ELEMENTS or array.ndim == 0:
            yield emit(json.dumps(_json_list(array)))
        elif array.ndim == 1:
            yield emit("[")
            for start in range(0, array.size, JSON_SLICE_ELEMENTS):
                written = json.dumps(_json_list(array[start:start + JSON_SLICE_ELEMENTS]))[1:-1]
                yield emit((", " if start else "") + written)
            yield emit("]")
        else:
            yield emit("[")
            for index in range(array.shape[0]):
                if index:
                    yield emit(", ")
                yield from values(array[index])
            yield emit("]")

    def pieces_of() -> Iterator[bytes | None]:
        quoted = json.dumps(marker)[:-1]  # the marker as json.dumps writes it, without its closing quote
        pieces = text.split(quoted)
        yield emit(pieces[0])
        for piece in pieces[1:]:
            index, rest = piece.split('"', 1)
            array = arrays[int(index)]
            yield emit(f'{{"dtype": {json.dumps(wire_dtype_name(array.dtype))}, '
                       f'"shape": {json.dumps(list(array.shape))}, "values": ')
            yield from values(array)
            yield emit("}" + rest)

    for part in pieces_of():
        if part is not None:
            yield part
    yield "".join(pending).encode()


def _json_floats(array: np.ndarray) -> list:
    """A float array's values as JSON can hold them: NaN and ±Inf as null."""
    values = array.astype(np.float64).astype(object)
    values[~np.isfinite(array)] = None
    return values.tolist()


def json_tensor(value: Any, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """A tensor from JSON: ``{"dtype", "shape", "values"}`` or a nested list of numbers (float32)."""
    if isinstance(value, dict):
        if value.keys() != {"dtype", "shape", "values"}:
            raise WireError(f"a JSON tensor has exactly the keys dtype, shape, values; received {sorted(value)}")
        dtype = numpy_dtype(value["dtype"])
        shape = check_shape(value["shape"], max_elements)
        array = _json_values(value["values"], dtype)
        if array.size != math.prod(shape):
            raise WireError(f"values hold {array.size} numbers; shape {list(shape)} needs {math.prod(shape)}")
        return array.reshape(shape)
    if isinstance(value, list):
        array = _json_values(value, np.dtype(np.float32))
        if array.size > max_elements:
            raise WireError(f"tensor has {array.size} elements; the limit is {max_elements}")
        return array
    raise WireError(f"expected a tensor (nested list or {{dtype, shape, values}}), received {type(value).__name__}")


def _json_values(values: Any, dtype: np.dtype) -> np.ndarray:
    try:
        array = np.array(values, dtype=np.float64 if dtype.kind == "f" else dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise WireError(f"tensor values must be a rectangular nested list of numbers: {exc}"[:200]) from None
    return array.astype(dtype)
