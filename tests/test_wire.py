"""The wire codec: exact round trips, exact sizes, and hostile bytes rejected by name."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fedseed import wire
from fedseed.algorithms.fedkseed import SeedReply, SeedTask, SeedUpdate
from fedseed.ledger import LedgerHeader


def _reply(**kw):
    base = dict(round=3, client=7, num_examples=120, steps=4, skipped=1, loss=2.5, dense=0,
                seed_ids=np.array([1, 900, 5]), values=np.array([0.5, -1.25, 3.0], np.float32))
    return SeedReply(**{**base, **kw})


def test_round_trip_is_exact():
    msgs = [
        _reply(),
        SeedTask(2, 1, np.array([0, 4, 70000]), np.array([1e-3, -2.0, 0.0], np.float32), np.zeros(0, np.float32)),
        SeedUpdate(5, np.array([2, 3]), np.array([1e-300, -7.0]), np.array([0.0, 1.5]), np.array([1, 2])),
        LedgerHeader(1, "fedkseed", '{"lr":1e-4}', 2**64 - 1, "models/é", "ab" * 32),
    ]
    for m in msgs:
        data = wire.encode(m)
        back = wire.decode(data, type(m))
        for name in m.__dataclass_fields__:
            a, b = getattr(m, name), getattr(back, name)
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, name
        assert wire.encode(back) == data


def test_frame_size_is_the_encoded_size_without_building_the_message():
    from fedseed.algorithms.dense import DenseReply

    reply = DenseReply(1, 2, 3, 4, 0, 0.5, np.zeros(1000, np.float32), 7)
    assert wire.frame_size(DenseReply, delta=1000) == len(wire.encode(reply))
    assert [wire.uint_width(v) for v in (0, 255, 256, 65535, 65536, 2**32 - 1, 2**32)] == [1, 1, 2, 2, 4, 4, 8]
    with pytest.raises(ValueError, match="float arrays only"):
        wire.frame_size(SeedReply, seed_ids=3)


def test_integer_arrays_take_the_narrowest_width():
    small = wire.encode(_reply(seed_ids=np.array([1, 2, 255]), values=np.zeros(3, np.float32)))
    wide = wire.encode(_reply(seed_ids=np.array([1, 2, 256]), values=np.zeros(3, np.float32)))
    assert len(wide) - len(small) == 3  # one more byte per id


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 10, 30, -1])
def test_truncated_bytes_are_rejected(cut):
    data = wire.encode(_reply())
    with pytest.raises(wire.WireError):
        wire.decode(data[:cut], SeedReply)


def test_corruptions_are_named():
    data = bytearray(wire.encode(_reply()))
    with pytest.raises(wire.WireError, match="header"):
        wire.decode(b"XX" + bytes(data[2:]))
    with pytest.raises(wire.WireError, match="version"):
        wire.decode(bytes(data[:2]) + b"\x09" + bytes(data[3:]))
    with pytest.raises(wire.WireError, match="unknown message tag"):
        wire.decode(bytes(data[:3]) + b"\xfe" + bytes(data[4:]))
    with pytest.raises(wire.WireError, match="expected SeedTask, got SeedReply"):
        wire.decode(bytes(data), SeedTask)
    with pytest.raises(wire.WireError, match="unexpected bytes"):
        wire.decode(bytes(data) + b"\x00", SeedReply)
    # a count that promises more elements than there are bytes
    pos = 4 + 5 * 4 + 4 + 1
    huge = bytes(data[:pos]) + struct.pack("<I", 2**31 - 1) + bytes(data[pos + 4 :])
    with pytest.raises(wire.WireError, match="SeedReply.seed_ids"):
        wire.decode(huge, SeedReply)


def test_nan_and_inf_are_rejected_both_ways():
    with pytest.raises(wire.WireError, match="loss"):
        wire.encode(_reply(loss=float("nan")))
    with pytest.raises(wire.WireError, match="values"):
        wire.encode(_reply(values=np.array([0.0, np.inf, 1.0], np.float32)))
    spans = wire.layout(_reply())
    data = bytearray(wire.encode(_reply()))
    nan = struct.pack("<f", float("nan"))
    end = spans["values"][2]
    data[end - 4 : end] = nan  # last value
    with pytest.raises(wire.WireError, match=r"SeedReply.values: non-finite value at index 2"):
        wire.decode(bytes(data), SeedReply)
    loss_at = spans["loss"][0]
    assert loss_at == 4 + 5 * 4 and spans["loss"][1] == loss_at  # a scalar's payload starts at the field
    start, payload, end = spans["seed_ids"]
    assert payload == start + 5 and end == payload + 6  # u32 count, u8 width, three 2-byte ids (900 > 255)
    data = bytearray(wire.encode(_reply()))
    data[loss_at : loss_at + 4] = nan
    with pytest.raises(wire.WireError, match="SeedReply.loss"):
        wire.decode(bytes(data), SeedReply)


def test_message_invariants_are_checked_on_decode():
    bad = _reply(seed_ids=np.array([1, 2]), values=np.zeros(3, np.float32))
    with pytest.raises(wire.WireError, match="2 seed_ids but 3 values"):
        wire.decode(wire.encode(bad), SeedReply)
    with pytest.raises(wire.WireError, match="skipped 5 > steps 4"):
        wire.decode(wire.encode(_reply(skipped=5)), SeedReply)
    unsorted = SeedTask(1, 0, np.array([4, 2]), np.zeros(2, np.float32), np.zeros(0, np.float32))
    with pytest.raises(wire.WireError, match="strictly increasing"):
        wire.decode(wire.encode(unsorted), SeedTask)
    with pytest.raises(wire.WireError, match="utf-8"):
        header = wire.encode(LedgerHeader(1, "a", "b", 0, "c", "d"))
        wire.decode(header[:-1] + b"\xff", LedgerHeader)


def test_random_garbage_is_refused_or_decodes_to_a_message_that_round_trips():
    """Any other exception fails the test. A frame that does decode may be non-canonical (an id array
    wider than it needs), but the message it yields encodes to canonical bytes that decode back to it."""
    rng = np.random.default_rng(0)
    good = wire.encode(_reply())
    refused = 0
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(0, len(data))] = rng.integers(0, 256)
        data = bytes(data[: rng.integers(0, len(data) + 1)]) if rng.random() < 0.3 else bytes(data)
        try:
            msg = wire.decode(data, SeedReply)
        except wire.WireError:
            refused += 1
        else:
            _assert_round_trips(msg, data)
    assert refused > 1000  # most mutations break a length, the header or a float
    for _ in range(500):
        data = b"FS" + bytes([wire.VERSION]) + b"\x0b" + rng.bytes(int(rng.integers(0, 64)))
        try:
            msg = wire.decode(data)
        except wire.WireError:
            continue
        _assert_round_trips(msg, data)


def _assert_round_trips(msg, data: bytes) -> None:
    canonical = wire.encode(msg)
    assert wire.encode(wire.decode(canonical, type(msg))) == canonical
    assert len(canonical) <= len(data)  # only id arrays may have been wider than needed


def test_unregistered_and_unannotated_types_are_refused():
    from dataclasses import dataclass

    with pytest.raises(wire.WireError, match="not a registered"):
        wire.encode(object())
    with pytest.raises(TypeError, match="wire kind"):
        @wire.message(250)
        @dataclass(frozen=True)
        class Bad:
            x: int
    with pytest.raises(ValueError, match="already used"):
        @wire.message(10)
        @dataclass(frozen=True)
        class Dup:
            x: wire.U8
