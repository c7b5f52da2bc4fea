"""Property-based fuzzing of every decoder of hostile input: the wire codec and the Flower record readers.

A peer controls every byte ``wire.decode`` sees and every value in the Flower
records the runners read, so the contract is the same everywhere: return a
valid object or raise the module's own error (``WireError``, ``RecordError``),
never an ``IndexError``, ``OverflowError``, ``MemoryError`` or numpy error, and
never allocate more than a small multiple of the input however large a length
field claims to be.

The wire tests take every registered message type from ``wire._REGISTRY`` and
draw field values from the wire kinds in ``wire._FIELDS``, so a new field or
message is fuzzed without editing this file (a new kind fails loudly until the
fuzzer learns it). Cases per decoder (hypothesis ``max_examples``, see
:data:`CASES`), derandomized so every run tries the same inputs:

    wire.decode, per message type   120 arbitrary byte strings (bare, or after the type's header)
                                    150 frames of hostile fields (lengths up to 2^32 - 1, bad widths, NaN)
                                    200 mutations of a well-formed frame (flip, truncate, extend, splice, overwrite)
                                    = 470 per type
    read_instruction, read_answer,  300 record layouts each (wrong types, missing keys, huge or negative
    read_presence, read_roll_call       ints, bad hex, arbitrary arrays and bytes)
    Flower writers -> readers       100 valid records per writer, read back through Flower's protobuf serde
"""

from __future__ import annotations

import math
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedseed.algorithms.registry  # noqa: F401  (imports, so registers, every method's task, reply and update)
import fedseed.ledger  # noqa: F401  (registers LedgerHeader)
from fedseed import wire

CASES = {
    "wire.decode arbitrary bytes": 120,
    "wire.decode hostile fields": 150,
    "wire.decode mutated frames": 200,
    "flower record readers": 300,
    "flower writers round trip": 100,
}

MESSAGES = sorted(wire._REGISTRY.items())  # (tag, class); after the imports above: 1, 10-12, 20-22, 30-32, 40-42
MESSAGE_IDS = [f"{cls.__name__}-{tag}" for tag, cls in MESSAGES]
HEADER_BYTES = wire.MAGIC + bytes([wire.VERSION])

INT_RANGES = {"u8": (0, 2**8 - 1), "u32": (0, 2**32 - 1), "u64": (0, 2**64 - 1)}
FLOAT_KINDS = {"f32": 4, "f64": 8}
FLOAT_ARRAYS = {"f32[]": np.float32, "f64[]": np.float64}
UINT_MAX = 2**63 - 1  # the largest value a uint[] element may carry
HOSTILE_COUNTS = [2**30, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1]  # around MAX_ARRAY and the u32 ceiling
MEMORY_SLACK = 256 * 1024  # bytes a decode may allocate beyond a small multiple of its input


def _fuzz(cases: str) -> Callable:
    """Hypothesis settings for one property: a fixed case count, derandomized, no example database."""
    return settings(max_examples=CASES[cases], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- field values from wire kinds ----------------------------------------------------------


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Small values (so cross-field checks like ``skipped <= steps`` pass now and then), edges, anything."""
    return st.one_of(st.integers(max(low, -2), min(high, 4)), st.sampled_from([low, high]), st.integers(low, high))


F32_VALUES = st.floats(width=32, allow_nan=False, allow_infinity=False)
F64_VALUES = st.floats(allow_nan=False, allow_infinity=False)
UINT_VALUES = st.one_of(st.integers(0, 3), st.integers(0, 2**8), st.integers(0, 2**16), st.integers(0, UINT_MAX))


def _value(kind: str, size: int | None = None) -> st.SearchStrategy[Any]:
    """Values ``wire.encode`` accepts for a field of ``kind``: in-range ints, finite floats, 1-D arrays.

    ``size`` fixes the length of an array (None: any length up to 6).
    """
    if kind in INT_RANGES:
        return _ints(*INT_RANGES[kind])
    if kind == "f32":
        return F32_VALUES
    if kind == "f64":
        return F64_VALUES
    if kind == "str":
        return st.text(max_size=24)
    if kind == "bytes":
        return st.binary(max_size=24)
    lengths = {"min_size": size or 0, "max_size": 6 if size is None else size}
    if kind == "uint[]":
        return st.lists(UINT_VALUES, **lengths).map(lambda v: np.array(v, dtype=np.int64))
    if kind in FLOAT_ARRAYS:
        elements = F32_VALUES if kind == "f32[]" else F64_VALUES
        return st.lists(elements, **lengths).map(lambda v, t=FLOAT_ARRAYS[kind]: np.array(v, dtype=t))
    raise AssertionError(f"no fuzz strategy for wire kind {kind!r}: teach tests/test_wire_fuzz.py the new kind")


@st.composite
def _messages(draw: st.DrawFn, cls: type) -> Any:
    """An instance of ``cls`` with every field drawn from its kind (it need not pass ``validate``).

    Half the time every array has one shared length, so the messages' size checks
    (``seed_ids`` against ``values`` and the like) pass often enough to reach a decode.
    """
    size = draw(st.one_of(st.none(), st.integers(0, 4)))
    return cls(**{name: draw(_value(kind, size)) for name, kind in wire._FIELDS[cls]})


# -- hostile frames -------------------------------------------------------------------------


def _float_bytes(size: int) -> st.SearchStrategy[bytes]:
    fmt = "<f" if size == 4 else "<d"
    special = [struct.pack(fmt, v) for v in (math.nan, math.inf, -math.inf, -0.0)]
    return st.one_of(st.sampled_from(special), st.binary(min_size=size, max_size=size))


@st.composite
def _hostile_field(draw: st.DrawFn, kind: str) -> bytes:
    """Raw bytes for one field: right-sized or not, lengths up to 2^32 - 1, any uint width, NaN floats."""
    if kind in FLOAT_KINDS:
        return draw(_float_bytes(FLOAT_KINDS[kind]))
    if kind in INT_RANGES:
        size = {"u8": 1, "u32": 4}.get(kind, 8)
        return draw(st.binary(min_size=size, max_size=size))
    count = draw(st.one_of(st.integers(0, 8), st.sampled_from(HOSTILE_COUNTS), st.integers(0, 2**32 - 1)))
    head = struct.pack("<I", count)
    width = 1
    if kind == "uint[]":
        width = draw(st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(0, 255)))
        head += bytes([width])
    elif kind in FLOAT_ARRAYS:
        width = np.dtype(FLOAT_ARRAYS[kind]).itemsize
    size = count * max(width, 1)
    if size <= 128 and draw(st.booleans()):  # exactly the bytes promised
        if kind in FLOAT_ARRAYS:
            return head + b"".join(draw(st.lists(_float_bytes(width), min_size=count, max_size=count)))
        return head + draw(st.binary(min_size=size, max_size=size))
    return head + draw(st.binary(max_size=64))


@st.composite
def _hostile_frames(draw: st.DrawFn, cls: type) -> bytes:
    """The type's header, then a hostile encoding of each field in order, then maybe trailing junk."""
    fields = [draw(_hostile_field(kind)) for _, kind in wire._FIELDS[cls]]
    return HEADER_BYTES + bytes([cls.wire_tag]) + b"".join(fields) + draw(st.binary(max_size=3))


@st.composite
def _mutated_frames(draw: st.DrawFn, cls: type) -> tuple[Any, bytes, bytes]:
    """(message, its canonical frame, the frame after 0-3 random edits)."""
    original = draw(_messages(cls))
    canonical = wire.encode(original)
    frame = bytearray(canonical)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "count"]))
        at = draw(st.integers(0, len(frame)))
        if op == "flip" and at < len(frame):
            frame[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del frame[at:]
        elif op == "extend":
            frame += draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            end = draw(st.integers(at, min(len(frame), at + 16)))
            frame[at:end] = draw(st.binary(max_size=16))
        elif op == "count":  # overwrite 4 bytes with a hostile length, wherever a length field may sit
            frame[at : at + 4] = struct.pack("<I", draw(st.sampled_from(HOSTILE_COUNTS + [0, 1, 255, 256])))
    return original, canonical, bytes(frame)


# -- what every decoded message must satisfy ------------------------------------------------


def _decode(data: bytes) -> Any | None:
    """``wire.decode(data)``, or None where it raised ``WireError``; any other exception fails the test.

    The decode runs under tracemalloc (numpy reports its buffers there too), so a
    length field that makes the codec allocate what it claims instead of what is
    there fails here, not by exhausting the machine.
    """
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        msg = wire.decode(data)
    except wire.WireError:
        msg = None
    finally:
        peak = tracemalloc.get_traced_memory()[1] - before
        if not tracing:
            tracemalloc.stop()
    assert peak <= MEMORY_SLACK + 32 * len(data), f"decoding {len(data)} bytes peaked at {peak} bytes"
    if msg is not None:
        assert type(msg) is wire._REGISTRY[data[3]]
        _check_fields(msg)
        _check_reencodes(msg, data)
    return msg


def _check_fields(msg: Any) -> None:
    """Ints in their kind's range, floats finite, uint[] non-negative ints, arrays 1-D of the kind's dtype."""
    for name, kind in wire._FIELDS[type(msg)]:
        value = getattr(msg, name)
        where = f"{type(msg).__name__}.{name}"
        if kind in INT_RANGES:
            low, high = INT_RANGES[kind]
            assert isinstance(value, int) and low <= value <= high, f"{where} = {value!r}"
        elif kind in FLOAT_KINDS:
            assert isinstance(value, float) and math.isfinite(value), f"{where} = {value!r}"
        elif kind == "str":
            assert isinstance(value, str), where
        elif kind == "bytes":
            assert isinstance(value, bytes), where
        elif kind == "uint[]":
            assert value.ndim == 1 and value.dtype.kind in "iu" and (value >= 0).all(), f"{where} = {value!r}"
        else:
            assert value.ndim == 1 and value.dtype == FLOAT_ARRAYS[kind] and np.isfinite(value).all(), where


def _check_reencodes(msg: Any, data: bytes) -> None:
    """Re-encoding a decoded message gives the same message again, in at most as many bytes.

    Not byte-equal in general: a hostile frame may spell a uint[] in a wider width
    than the narrowest one ``encode`` picks.
    """
    again = wire.encode(msg)
    assert len(again) <= len(data)
    _assert_same(wire.decode(again), msg)


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    for name, _ in wire._FIELDS[type(a)]:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{type(a).__name__}.{name}: {x!r} != {y!r}"
        else:
            assert type(x) is type(y) and x == y, f"{type(a).__name__}.{name}: {x!r} != {y!r}"


def _is_valid(msg: Any) -> bool:
    """Whether the message's own ``validate`` (the last step of decode) accepts it."""
    try:
        getattr(msg, "validate", lambda: None)()
    except ValueError:
        return False
    return True


# -- wire.decode ----------------------------------------------------------------------------


def test_every_message_family_is_fuzzed():
    """The registry really holds every method's messages (an import that stopped registering fails here)."""
    assert {1, 10, 11, 12, 20, 21, 22, 30, 31, 32, 40, 41, 42} <= set(wire._REGISTRY)


@pytest.mark.parametrize("cls", [cls for _, cls in MESSAGES], ids=MESSAGE_IDS)
@_fuzz("wire.decode arbitrary bytes")
@given(data=st.data())
def test_arbitrary_bytes_decode_or_raise_wire_error(cls, data):
    raw = data.draw(st.one_of(st.binary(max_size=64), st.binary(max_size=96).map(
        lambda tail: HEADER_BYTES + bytes([cls.wire_tag]) + tail)))
    _decode(raw)


@pytest.mark.parametrize("cls", [cls for _, cls in MESSAGES], ids=MESSAGE_IDS)
@_fuzz("wire.decode hostile fields")
@given(data=st.data())
def test_hostile_fields_decode_or_raise_wire_error(cls, data):
    _decode(data.draw(_hostile_frames(cls)))


@pytest.mark.parametrize("cls", [cls for _, cls in MESSAGES], ids=MESSAGE_IDS)
@_fuzz("wire.decode mutated frames")
@given(data=st.data())
def test_mutated_frames_decode_or_raise_wire_error(cls, data):
    original, canonical, frame = data.draw(_mutated_frames(cls))
    msg = _decode(frame)
    if frame == canonical:  # untouched: decodes exactly when the message validates, to the same bytes
        assert (msg is not None) == _is_valid(original)
        if msg is not None:
            _assert_same(msg, original)
            assert wire.encode(msg) == canonical


# -- Flower record readers ------------------------------------------------------------------

KEYS = ("round", "client", "since", "position", "run", "base", "stale")
HEX = "0123456789abcdef"
MAX_U32 = 2**32 - 1

CONFIG_VALUES = st.one_of(
    st.integers(-(2**70), 2**70), st.booleans(), st.floats(), st.text(max_size=24), st.binary(max_size=24),
    st.lists(st.integers(-(2**70), 2**70), max_size=3), st.lists(st.floats(), max_size=3),
    st.lists(st.text(max_size=8), max_size=3), st.lists(st.binary(max_size=8), max_size=3),
    st.lists(st.booleans(), max_size=3),
)
HOSTILE_INTS = st.one_of(st.sampled_from([-1, 0, MAX_U32, MAX_U32 + 1, 2**63 - 1, -(2**63), 2**64]),
                         st.integers(-(2**70), 2**70))


def _hex_text(length: int) -> st.SearchStrategy[str]:
    return st.text(HEX, min_size=length, max_size=length)


def _hostile_value(key: str) -> st.SearchStrategy[Any]:
    """A wrong value for ``key``: out of range, the wrong type, or nearly right (uppercase or short hex)."""
    if key in ("run", "base"):
        length = 16 if key == "run" else 64
        near = st.one_of(_hex_text(length).map(str.upper), _hex_text(length - 1), _hex_text(length + 1),
                         st.text(min_size=length, max_size=length))
        return st.one_of(near, CONFIG_VALUES)
    if key == "stale":
        return st.one_of(st.just(True), st.just(1), st.just("true"), CONFIG_VALUES)
    return st.one_of(HOSTILE_INTS, st.just(True), CONFIG_VALUES)


@st.composite
def _valid_header(draw: st.DrawFn) -> dict[str, Any]:
    rnd = draw(_ints(1, MAX_U32))
    return {"round": rnd, "client": draw(_ints(0, MAX_U32)), "since": draw(st.integers(0, min(rnd - 1, 8))),
            "position": draw(_ints(0, MAX_U32)), "run": draw(_hex_text(16)), "base": draw(_hex_text(64))}


@st.composite
def _layouts(draw: st.DrawFn) -> dict[str, Any]:
    """A plain description of a Flower message's content: a header that is valid until edited, and a payload.

    Kept free of Flower types so the strategies exist without flwr installed.
    """
    header = draw(_valid_header())
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        if draw(st.booleans()):
            header.pop(key, None)
        else:
            header[key] = draw(_hostile_value(key))
    header.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in KEYS), CONFIG_VALUES,
                                       max_size=2)))
    data = draw(st.binary(max_size=48))
    return {
        "header": header,
        "header_as": draw(st.sampled_from(["config"] * 5 + ["metric", "array", "absent"])),
        "data": data,
        "payload_as": draw(st.sampled_from(["frame"] * 3 + ["numpy", "config", "other key", "absent"])),
        "dtype": draw(st.one_of(st.just("uint8"), st.sampled_from(["float32", "int8", ""]), st.text(max_size=6))),
        "stype": draw(st.one_of(st.just("raw"), st.sampled_from(["numpy.ndarray", "torch"]), st.text(max_size=6))),
        "shape": draw(st.one_of(st.just((len(data),)), st.lists(HOSTILE_INTS, max_size=3).map(tuple))),
    }


def _metadata() -> Any:
    from flwr.app import Metadata

    return Metadata(run_id=1, message_id="fuzz", src_node_id=1, dst_node_id=2, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=30.0, message_type="train")


def _flower_message(records: Any, layout: dict[str, Any]) -> Any:
    """The Flower message a hostile peer could send with ``layout``'s content."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    content = RecordDict()
    header = layout["header"]
    if layout["header_as"] == "config":
        content[records.HEADER] = ConfigRecord(header)
    elif layout["header_as"] == "metric":
        content[records.HEADER] = MetricRecord({k: v for k, v in header.items() if type(v) in (int, float)})
    elif layout["header_as"] == "array":
        content[records.HEADER] = ArrayRecord({records.FRAME: Array(np.zeros(2, np.uint8))})
    data = layout["data"]
    if layout["payload_as"] in ("frame", "other key"):
        key = records.FRAME if layout["payload_as"] == "frame" else "frame2"
        array = Array(dtype=layout["dtype"], shape=layout["shape"], stype=layout["stype"], data=data)
        content[records.PAYLOAD] = ArrayRecord({key: array})
    elif layout["payload_as"] == "numpy":
        content[records.PAYLOAD] = ArrayRecord({records.FRAME: Array(np.frombuffer(data, np.uint8))})
    elif layout["payload_as"] == "config":
        content[records.PAYLOAD] = ConfigRecord({records.FRAME: data})
    return Message(content, metadata=_metadata())


def _check_read(reader: str, out: Any, layout: dict[str, Any]) -> None:
    """What a reader returned is in range and is exactly what the records said."""
    header = layout["header"]

    def fits(key: str, low: int, high: int = MAX_U32) -> None:
        value = getattr(out, key)
        assert type(value) is int and low <= value <= high and value == header[key], f"{key} = {value!r}"

    def hex_digits(value: str, length: int) -> None:
        assert isinstance(value, str) and len(value) == length and set(value) <= set(HEX), repr(value)

    if reader == "read_roll_call":
        hex_digits(out, 16)
        assert out == header["run"]
        return
    fits("client", 0)
    if reader == "read_presence":
        fits("position", 0)
        return
    fits("round", 1)
    if reader == "read_instruction":
        fits("since", 0, out.round - 1)
        hex_digits(out.run, 16)
        hex_digits(out.base, 64)
        _check_payload(out.frame, layout)
        return
    fits("position", 0)
    if out.stale:
        assert header["stale"] is True and out.frame == b""
    else:
        assert header.get("stale", False) is not True
        _check_payload(out.frame, layout)


def _check_payload(frame: bytes, layout: dict[str, Any]) -> None:
    """A frame is only read out of a raw uint8 array of its own length under ``payload.frame``."""
    assert layout["payload_as"] == "frame" and layout["dtype"] == "uint8" and layout["stype"] == "raw"
    assert layout["shape"] == (len(layout["data"]),) and frame == layout["data"]


@pytest.fixture(scope="module")
def records():
    pytest.importorskip("flwr")
    from fedseed.runners import flower_records

    return flower_records


@pytest.mark.parametrize("reader", ["read_instruction", "read_answer", "read_presence", "read_roll_call"])
@_fuzz("flower record readers")
@given(layout=_layouts())
def test_flower_readers_return_a_valid_object_or_raise_record_error(records, reader, layout):
    msg = _flower_message(records, layout)
    try:
        out = getattr(records, reader)(msg)
    except records.RecordError:
        return
    _check_read(reader, out, layout)


@st.composite
def _orders(draw: st.DrawFn) -> dict[str, Any]:
    header = draw(_valid_header())
    return {**header, "frame": draw(st.binary(max_size=48)), "stale": draw(st.booleans()),
            "loss": draw(st.floats(allow_nan=False, allow_infinity=False)), "examples": draw(st.integers(0, 2**31))}


@_fuzz("flower writers round trip")
@given(order=_orders())
def test_flower_writers_round_trip_through_serde(records, order):
    """What the writers build, Flower's serde carries and the readers give back unchanged."""
    from flwr.app import Message, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    def carried(msg: Message) -> Message:
        return message_from_proto(message_to_proto(msg))

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Message() needs a running task
    try:
        ins = records.Instruction(order["round"], order["client"], order["since"], order["run"], order["base"],
                                  order["frame"])
        assert records.read_instruction(carried(records.instruction_message(ins, 2, 30.0))) == ins
        assert records.read_roll_call(carried(records.roll_call_message(order["run"], 2, 30.0))) == order["run"]
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    asked = Message(RecordDict(), metadata=_metadata())
    answer = records.Answer(order["round"], order["client"], order["position"], b"", stale=True) if order["stale"] \
        else records.Answer(order["round"], order["client"], order["position"], order["frame"], loss=order["loss"],
                            num_examples=order["examples"])
    message = carried(records.answer_message(answer, asked))
    assert records.read_answer(message) == answer
    if not answer.stale:  # the reply's loss and example count ride beside it for Flower tools
        assert dict(message.content[records.METRICS]) == {"loss": answer.loss, "num-examples": answer.num_examples}
    presence = records.Presence(order["client"], order["position"])
    assert records.read_presence(carried(records.presence_message(presence, asked))) == presence
