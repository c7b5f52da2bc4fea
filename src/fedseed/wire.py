"""The wire codec: the one serialiser for every message fedseed sends or stores.

A message is a frozen dataclass registered with :func:`message` under a one-byte
tag. Its fields are annotated with the wire kinds below, and that annotation *is*
the encoding: fields in declaration order, little-endian, no padding, no names.

    frame  = b"FS" | version u8 | tag u8 | field*
    u8/u32/u64/f32/f64           fixed width
    str                          u32 byte length | utf-8
    bytes                        u32 length | raw
    uint[]                       u32 count | u8 width (1, 2, 4 or 8) | count * width
                                 (the narrowest width that holds the largest value)
    f32[] / f64[]                u32 count | count * 4 or 8

``len(encode(m))`` is what every byte counter and report shows. :func:`decode`
trusts nothing: it checks the header, every length against the bytes left, that
every float is finite, that nothing trails the last field, and then runs the
message's own ``validate()``; any failure raises :class:`WireError` naming the
message and field. No pickle, no eval, no object construction beyond the
registered dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import typing
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np

MAGIC = b"FS"
# 2: Rademacher signs eight elements to a hash, rounding bits four (see docs/directions.md). A seed names a
# different direction in each version, so frames and ledgers of another version are refused, not misread.
VERSION = 2
MAX_ARRAY = 1 << 31  # elements; a larger count is a corrupt or hostile frame


class WireError(ValueError):
    """A message could not be encoded or decoded; the text names the field."""


@dataclass(frozen=True)
class Kind:
    name: str


U8 = Annotated[int, Kind("u8")]
U32 = Annotated[int, Kind("u32")]
U64 = Annotated[int, Kind("u64")]
F32 = Annotated[float, Kind("f32")]
F64 = Annotated[float, Kind("f64")]
Str = Annotated[str, Kind("str")]
Bytes = Annotated[bytes, Kind("bytes")]
UIntArray = Annotated[np.ndarray, Kind("uint[]")]
F32Array = Annotated[np.ndarray, Kind("f32[]")]
F64Array = Annotated[np.ndarray, Kind("f64[]")]

_SCALARS = {"u8": "<B", "u32": "<I", "u64": "<Q", "f32": "<f", "f64": "<d"}
_FLOAT_ARRAYS: dict[str, np.dtype] = {"f32[]": np.dtype("<f4"), "f64[]": np.dtype("<f8")}
_UINT_WIDTHS: dict[int, np.dtype] = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

M = TypeVar("M")
_REGISTRY: dict[int, type] = {}
_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {}


def message(tag: int):
    """Register a frozen dataclass as a wire message under ``tag`` (1..255)."""

    def register(cls: type[M]) -> type[M]:
        if not 1 <= tag <= 255:
            raise ValueError(f"wire tag must be in 1..255, got {tag}")
        if tag in _REGISTRY:
            raise ValueError(f"wire tag {tag} already used by {_REGISTRY[tag].__name__}")
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            meta = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Kind)]
            if not meta:
                raise TypeError(f"{cls.__name__}.{f.name} needs a wire kind annotation (U32, F32Array, ...)")
            fields.append((f.name, meta[0].name))
        _REGISTRY[tag] = cls
        _FIELDS[cls] = tuple(fields)
        cls.wire_tag = tag  # type: ignore[attr-defined]
        return cls

    return register


def encode(msg: Any) -> bytes:
    """The bytes of ``msg``; their length is what the byte counters count."""
    cls = type(msg)
    if cls not in _FIELDS:
        raise WireError(f"{cls.__name__} is not a registered wire message")
    out = [MAGIC, struct.pack("<BB", VERSION, cls.wire_tag)]
    for name, kind in _FIELDS[cls]:
        try:
            out.append(_encode_field(kind, getattr(msg, name)))
        except (struct.error, ValueError, TypeError, OverflowError) as e:
            raise WireError(f"cannot encode {cls.__name__}.{name}: {e}") from None
    return b"".join(out)


HEADER_BYTES = 4  # b"FS" | version u8 | tag u8


def uint_width(top: int) -> int:
    """Bytes per element of a ``uint[]`` whose largest value is ``top``: the narrowest of 1, 2, 4, 8 that holds it."""
    return next(w for w in (1, 2, 4, 8) if top < 1 << (8 * w))


def _prefix(kind: str) -> int:
    """Bytes before a field's payload: a length or count (and a uint[]'s width byte)."""
    return 0 if kind in _SCALARS else 5 if kind == "uint[]" else 4


def layout(msg: Any) -> dict[str, tuple[int, int, int]]:
    """``(start, payload start, end)`` of each field in ``encode(msg)``: where a test or a fault injector must look.

    The payload starts after a field's length or count (and a ``uint[]``'s width byte).
    """
    spans, pos = {}, HEADER_BYTES
    for name, kind in _FIELDS[type(msg)]:
        size = len(_encode_field(kind, getattr(msg, name)))
        spans[name] = (pos, pos + _prefix(kind), pos + size)
        pos += size
    return spans


def frame_size(cls: type, **counts: int) -> int:
    """Encoded size of a ``cls`` whose float arrays hold ``counts[name]`` values (and whose other fields are empty).

    For cost formulas that must not build a message the size of a model.
    """
    size = HEADER_BYTES
    for name, kind in _FIELDS[cls]:
        if kind in _SCALARS:
            size += struct.calcsize(_SCALARS[kind])
        elif kind in _FLOAT_ARRAYS:
            size += _prefix(kind) + _FLOAT_ARRAYS[kind].itemsize * counts.get(name, 0)
        else:
            if counts.get(name):
                raise ValueError(f"frame_size counts float arrays only, not {cls.__name__}.{name} ({kind})")
            size += _prefix(kind)
    return size


def fields(cls: type) -> tuple[tuple[str, str], ...]:
    """``(name, kind)`` of every field of a registered message, in wire order."""
    return _FIELDS[cls]


def _encode_field(kind: str, value: Any) -> bytes:
    if kind in _SCALARS:
        if kind in ("f32", "f64") and not math.isfinite(value):
            raise ValueError(f"non-finite value {value}")
        return struct.pack(_SCALARS[kind], value)
    if kind == "str":
        raw = value.encode("utf-8")
        return struct.pack("<I", len(raw)) + raw
    if kind == "bytes":
        return struct.pack("<I", len(value)) + bytes(value)
    arr = np.asarray(value).reshape(-1)
    if kind in _FLOAT_ARRAYS:
        if not np.isfinite(arr).all():
            raise ValueError("array holds non-finite values")
        return struct.pack("<I", arr.size) + arr.astype(_FLOAT_ARRAYS[kind], copy=False).tobytes()
    if kind == "uint[]":
        if arr.size and (arr.dtype.kind not in "ui" or arr.min() < 0):
            raise ValueError("uint[] needs non-negative integers")
        width = uint_width(int(arr.max()) if arr.size else 0)
        return struct.pack("<IB", arr.size, width) + arr.astype(_UINT_WIDTHS[width]).tobytes()
    raise TypeError(f"unknown wire kind {kind}")


def decode(data: bytes | bytearray | memoryview, expected: type[M] | tuple[type, ...] | None = None) -> M:
    """Parse and validate one frame; raise :class:`WireError` naming what is wrong."""
    buf = memoryview(bytes(data))
    if len(buf) < 4 or bytes(buf[:2]) != MAGIC:
        raise WireError("not a fedseed message: missing the b'FS' header")
    version, tag = buf[2], buf[3]
    if version != VERSION:
        raise WireError(f"unsupported wire version {version} (this fedseed speaks {VERSION})")
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise WireError(f"unknown message tag {tag}")
    if expected is not None:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if cls not in allowed:
            names = ", ".join(c.__name__ for c in allowed)
            raise WireError(f"expected {names}, got {cls.__name__}")
    pos = 4
    values = {}
    for name, kind in _FIELDS[cls]:
        try:
            values[name], pos = _decode_field(kind, buf, pos)
        except (WireError, struct.error, UnicodeDecodeError) as e:
            raise WireError(f"{cls.__name__}.{name}: {e}") from None
    if pos != len(buf):
        raise WireError(f"{cls.__name__}: {len(buf) - pos} unexpected bytes after the last field")
    msg = cls(**values)
    check = getattr(msg, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise WireError(f"{cls.__name__}: {e}") from None
    return msg


def _take(buf: memoryview, pos: int, n: int) -> memoryview:
    if n < 0 or pos + n > len(buf):
        raise WireError(f"truncated: needs {n} bytes at offset {pos}, {len(buf) - pos} left")
    return buf[pos : pos + n]


def _decode_field(kind: str, buf: memoryview, pos: int) -> tuple[Any, int]:
    if kind in _SCALARS:
        size = struct.calcsize(_SCALARS[kind])
        (value,) = struct.unpack(_SCALARS[kind], _take(buf, pos, size))
        if kind in ("f32", "f64") and not math.isfinite(value):
            raise WireError(f"non-finite value {value}")
        return value, pos + size
    (count,) = struct.unpack("<I", _take(buf, pos, 4))
    pos += 4
    if kind == "str":
        return str(_take(buf, pos, count), "utf-8"), pos + count
    if kind == "bytes":
        return bytes(_take(buf, pos, count)), pos + count
    if count > MAX_ARRAY:
        raise WireError(f"array of {count} elements exceeds the limit {MAX_ARRAY}")
    if kind == "uint[]":
        width = _take(buf, pos, 1)[0]
        if width not in _UINT_WIDTHS:
            raise WireError(f"invalid integer width {width}")
        raw = np.frombuffer(_take(buf, pos + 1, count * width), dtype=_UINT_WIDTHS[width])
        if width == 8 and raw.size and raw.max() >= 1 << 63:
            raise WireError("integer above 2^63 - 1")
        return raw.astype(np.int64), pos + 1 + count * width
    dtype = _FLOAT_ARRAYS[kind]
    arr = np.frombuffer(_take(buf, pos, count * dtype.itemsize), dtype=dtype).copy()
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise WireError(f"non-finite value at index {bad}")
    return arr, pos + count * dtype.itemsize
