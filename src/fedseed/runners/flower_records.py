"""How fedseed's messages ride in Flower messages, and the checks on the way out of one.

Flower carries; fedseed's wire codec serialises. A round task or reply crosses as
one wire frame, raw bytes in a ``uint8`` :class:`~flwr.app.Array` (Flower chunks
large arrays, so dense methods fit too), beside a ``ConfigRecord`` of plain
scalars the runner routes by. Nothing is pickled and no fedseed object is built
from Flower data except through :func:`fedseed.wire.decode`.

    train instruction   "fedseed": {round, client, since, run, base}   "payload": {"frame": task bytes}
    train answer        "fedseed": {round, client, position}           "payload": {"frame": reply bytes}
                        "metrics": {loss, num-examples} (what the reply says, as Flower strategies expect)
    stale answer        "fedseed": {round, client, position, stale}    (no payload: the node's copy is not at ``since``)
    roll call (query)   "fedseed": {run}
    presence            "fedseed": {client, position}

``run`` names the experiment (a hash of the ledger header), so a node's cache of
another run is never used; ``base`` is the content hash of the server's base
weights, which a node checks its own against before training. Every read
function validates every field and raises :class:`RecordError` naming it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedseed import wire
from fedseed.ledger import LedgerHeader

HEADER = "fedseed"  # the ConfigRecord of plain scalars
PAYLOAD = "payload"  # the ArrayRecord holding the wire frame
METRICS = "metrics"  # the reply's loss and example count, for Flower tools that read them
FRAME = "frame"
TRAIN = "train"
ROLL_CALL = "query"
MAX_U32 = 2**32 - 1


class RecordError(ValueError):
    """A Flower message does not have fedseed's layout; the text names the field."""


def run_id(header: LedgerHeader) -> str:
    """The experiment's name on the wire: 16 hex digits of the sha256 of its encoded ledger header."""
    return hashlib.sha256(wire.encode(header)).hexdigest()[:16]


@dataclass(frozen=True)
class Instruction:
    """Server -> node: train ``client`` in ``round`` from a copy at ledger position ``since``."""

    round: int
    client: int
    since: int
    run: str
    base: str
    frame: bytes  # the encoded task


@dataclass(frozen=True)
class Answer:
    """Node -> server: the encoded reply (empty when ``stale``) and where the node's copy now is."""

    round: int
    client: int
    position: int  # ledger position of the node's cached copy after this message (0: base weights)
    frame: bytes
    stale: bool = False  # the node's copy was not at the instruction's ``since``; resend with ``position``
    # what the encoded reply says, written beside it for Flower tools; never read back (the server trusts the frame)
    loss: float = field(default=0.0, compare=False)
    num_examples: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Presence:
    """Node -> server, answering a roll call: which client it is and where its cached copy is."""

    client: int
    position: int


def _frame(data: bytes) -> ArrayRecord:
    return ArrayRecord({FRAME: Array(dtype="uint8", shape=(len(data),), stype="raw", data=data)})


def instruction_message(order: Instruction, node_id: int, ttl: float) -> Message:
    header = ConfigRecord({"round": order.round, "client": order.client, "since": order.since, "run": order.run,
                           "base": order.base})
    return Message(RecordDict({HEADER: header, PAYLOAD: _frame(order.frame)}), dst_node_id=node_id,
                   message_type=TRAIN, group_id=str(order.round), ttl=ttl)


def answer_message(answer: Answer, reply_to: Message) -> Message:
    header = ConfigRecord({"round": answer.round, "client": answer.client, "position": answer.position})
    if answer.stale:
        header["stale"] = True
        return Message(RecordDict({HEADER: header}), reply_to=reply_to)
    metrics = MetricRecord({"loss": float(answer.loss), "num-examples": int(answer.num_examples)})
    return Message(RecordDict({HEADER: header, PAYLOAD: _frame(answer.frame), METRICS: metrics}), reply_to=reply_to)


def roll_call_message(run: str, node_id: int, ttl: float) -> Message:
    return Message(RecordDict({HEADER: ConfigRecord({"run": run})}), dst_node_id=node_id, message_type=ROLL_CALL,
                   group_id="roll-call", ttl=ttl)


def presence_message(presence: Presence, reply_to: Message) -> Message:
    header = ConfigRecord({"client": presence.client, "position": presence.position})
    return Message(RecordDict({HEADER: header}), reply_to=reply_to)


def _header(msg: Message) -> ConfigRecord:
    content = msg.content
    if HEADER not in content.config_records:
        raise RecordError(f"the message has no `{HEADER}` ConfigRecord; is it from a fedseed node or server?")
    return content.config_records[HEADER]


def _int(header: ConfigRecord, key: str, low: int, high: int = MAX_U32) -> int:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecordError(f"`{HEADER}.{key}` must be an int in [{low}, {high}], got {value!r}")
    return value


def _hex(header: ConfigRecord, key: str, length: int) -> str:
    value = header.get(key)
    if not isinstance(value, str) or len(value) != length or any(ch not in "0123456789abcdef" for ch in value):
        raise RecordError(f"`{HEADER}.{key}` must be {length} lowercase hex digits, got {value!r}")
    return value


def _payload(msg: Message) -> bytes:
    records = msg.content.array_records
    if PAYLOAD not in records or FRAME not in records[PAYLOAD]:
        raise RecordError(f"the message has no `{PAYLOAD}.{FRAME}` array holding the encoded fedseed message")
    arr = records[PAYLOAD][FRAME]
    if arr.dtype != "uint8" or arr.stype != "raw" or len(arr.shape) != 1 or arr.shape[0] != len(arr.data):
        raise RecordError(f"`{PAYLOAD}.{FRAME}` must be raw uint8 bytes of its shape, got dtype {arr.dtype!r}, "
                          f"stype {arr.stype!r}, shape {arr.shape}")
    return bytes(arr.data)


def read_instruction(msg: Message) -> Instruction:
    header = _header(msg)
    rnd = _int(header, "round", 1)
    return Instruction(rnd, _int(header, "client", 0), _int(header, "since", 0, rnd - 1), _hex(header, "run", 16),
                       _hex(header, "base", 64), _payload(msg))


def read_answer(msg: Message) -> Answer:
    header = _header(msg)
    rnd, client, position = _int(header, "round", 1), _int(header, "client", 0), _int(header, "position", 0)
    if header.get("stale", False) is True:
        return Answer(rnd, client, position, b"", stale=True)
    return Answer(rnd, client, position, _payload(msg))


def read_roll_call(msg: Message) -> str:
    return _hex(_header(msg), "run", 16)


def read_presence(msg: Message) -> Presence:
    header = _header(msg)
    return Presence(_int(header, "client", 0), _int(header, "position", 0))


def flower_bytes(msg: Message) -> int:
    """What Flower counts for ``msg``'s content: each record's ``count_bytes()`` (public API; no HTTP framing).

    An error reply (a node that vanished, a ClientApp that raised) has no content: 0.
    """
    if not msg.has_content():
        return 0
    return sum(record.count_bytes() for record in msg.content.values())
