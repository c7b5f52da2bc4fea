"""A run's metrics as TensorBoard scalars, so ``tensorboard --logdir runs/`` works.

TensorBoard reads TFRecord files of ``Event`` protocol buffers. A scalar event
needs five fields, so this module writes them itself (``metrics.jsonl`` stays the
run's record; these files are a view of it) and fedseed needs no TensorBoard,
TensorFlow or protobuf package to produce them:

    record = u64 length | u32 masked crc32c(length) | data | u32 masked crc32c(data)
    Event  = wall_time (1, double) | step (2, int64) | file_version (3, string)
             | summary (5, Summary { value (1, Value { tag (1, string), simple_value (2, float) }) })
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

_CRC_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1  # Castagnoli, reflected
    _CRC_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 fields are written as their two's complement
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int = 0, file_version: str = "", scalars: dict[str, float] | None = None) -> bytes:
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                          for tag, v in scalars.items())
        out += _length_delimited(5, values)
    return out


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(crc32c(length))) + data + struct.pack("<I", _masked(crc32c(data)))


class EventFile:
    """One ``events.out.tfevents.*`` file in ``folder``, written a row at a time (each write flushed)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.fedseed"
        self._write(_event(now, file_version="brain.Event:2"))

    def scalars(self, step: int, row: dict[str, Any]) -> None:
        """Every finite number in ``row`` (booleans and nested values left out) as a scalar at ``step``."""
        values = {k: float(v) for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "round"}
        if values:
            self._write(_event(time.time(), step, scalars=values))

    def _write(self, event: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(_record(event))
