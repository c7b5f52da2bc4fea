"""The ledger: a run's model as the base model's identity plus every aggregated update.

Checkpoints are the ledger (kilobytes for the seed methods), not weight files.
File layout, all content encoded by the wire codec::

    b"FSLEDGER" | record(header) | record(update round 1) | record(update round 2) | ...
    record = u32 length | u32 crc32 | wire frame

Every change is atomic: the new file is written beside the old one, fsynced,
renamed over it and the folder fsynced, so a process killed at any instant leaves
either the ledger before the round or the ledger after it, never half a round and
never a round twice. A torn or corrupt tail (a copy cut short, a disk fault) is
still detected by its length or checksum and dropped by :meth:`Ledger.open` with
``repair=True`` (resume), or reported by name otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseed import wire
from fedseed.wire import U8, U64, Str, message

MAGIC = b"FSLEDGER"
FORMAT = 1


class LedgerError(ValueError):
    """The ledger file is missing, corrupt or belongs to another run/model."""


@message(1)
@dataclass(frozen=True)
class LedgerHeader:
    """Who can rebuild the model: the base model's identity and the algorithm that built the updates."""

    format: U8
    algorithm: Str
    algorithm_config: Str  # canonical JSON of what shapes the updates: the resolved method config, [robust], [faults]
    seed: U64  # run seed: fixes the seed pool and every client's randomness
    base_model: Str  # path or Hub id, as given
    base_hash: Str  # sha256 of the base weights (models.content_hash)


def _record(frame: bytes) -> bytes:
    return struct.pack("<II", len(frame), zlib.crc32(frame)) + frame


def _read_records(data: bytes, path: Path) -> tuple[list[bytes], int, str | None]:
    """Split the file into frames; returns (frames, end of the last good one, problem)."""
    if not data.startswith(MAGIC):
        raise LedgerError(f"{path} is not a fedseed ledger (missing the {MAGIC!r} header)")
    pos, frames = len(MAGIC), list[bytes]()
    while pos < len(data):
        if pos + 8 > len(data):
            return frames, pos, f"torn record header at byte {pos}"
        length, crc = struct.unpack_from("<II", data, pos)
        frame = data[pos + 8 : pos + 8 + length]
        if len(frame) != length:
            return frames, pos, f"record at byte {pos} is truncated ({len(frame)} of {length} bytes)"
        if zlib.crc32(frame) != crc:
            return frames, pos, f"record at byte {pos} fails its checksum"
        frames.append(frame)
        pos += 8 + length
    return frames, pos, None


class Ledger:
    """An append-only ledger file."""

    def __init__(self, path: Path, header: LedgerHeader, updates: list[bytes]):
        self.path = path
        self.header = header
        self.updates = updates  # encoded update frames, round 1 first

    @classmethod
    def create(cls, path: Path, header: LedgerHeader) -> "Ledger":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, MAGIC + _record(wire.encode(header)))
        return cls(path, header, [])

    @classmethod
    def open(cls, path: Path, repair: bool = False) -> "Ledger":
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"no ledger at {path}; pass the run folder of a run started with `fedseed run`")
        data = path.read_bytes()
        frames, end, problem = _read_records(data, path)
        if problem and not repair:
            raise LedgerError(f"{path}: {problem}")
        if not frames:
            raise LedgerError(f"{path} has no header record")
        try:
            header = wire.decode(frames[0], LedgerHeader)
        except wire.WireError as e:
            raise LedgerError(f"{path}: bad header: {e}") from None
        if problem:  # drop the torn tail so appends continue from the last whole round
            write_atomically(path, data[:end])
        return cls(path, header, frames[1:])

    def append(self, update: Any) -> int:
        """Encode one aggregated update and commit it to disk atomically; returns its size in bytes.

        The old file is copied (by the kernel) to a temporary beside it, the record
        appended there, and the temporary renamed over the ledger: the cost is a
        copy of the ledger per round, kilobytes for the seed methods.
        """
        frame = wire.encode(update)
        write_atomically(self.path, _record(frame), keep=True)
        self.updates.append(frame)
        return len(frame)

    def decoded(self, update_type: type) -> list[Any]:
        out: list[Any] = []
        for i, frame in enumerate(self.updates, start=1):
            try:
                out.append(wire.decode(frame, update_type))
            except wire.WireError as e:
                raise LedgerError(f"{self.path}: round {i}: {e}") from None
        return out

    @property
    def rounds(self) -> int:
        return len(self.updates)

    def check_base(self, base_model: str, base_hash: str) -> None:
        """Refuse to rebuild onto different base weights: the updates would mean nothing."""
        if base_hash != self.header.base_hash:
            raise LedgerError(
                f"base model {base_model!r} has content hash {base_hash[:16]}..., but the ledger was built on "
                f"{self.header.base_model!r} with hash {self.header.base_hash[:16]}...; load the same base model"
            )


def write_atomically(path: Path, data: bytes, keep: bool = False) -> None:
    """Make ``path`` hold ``data`` (``keep``: its old bytes followed by ``data``) in one rename.

    The ledger's every change goes through here, and so does any file a resume rewrites.

    write, fsync, rename, fsync the folder: after a crash at any point the file
    is either wholly the old one or wholly the new one.
    """
    tmp = path.with_name(path.name + ".tmp")
    if keep:
        shutil.copyfile(path, tmp)
    with open(tmp, "ab" if keep else "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
