"""The resident worker: one long-lived process per node that keeps its model between rounds.

Flower 1.41 starts a fresh ClientApp process for every message: without help a
node would re-import torch, reload the model, re-hash every weight and re-tokenise
its data every round (seconds on a tiny model, minutes on a billion-parameter one).
``fedseed worker --socket PATH`` runs beside the SuperNode and holds one
:class:`~fedseed.runners.node.Node` for as long as it lives; the ClientApp of each
message hands the instruction over a Unix socket and relays the answer.

* Only the node's own user can reach it: the socket lives in a folder of mode
  0700 and is itself 0600, and every connection's peer credentials
  (``SO_PEERCRED``) must be that user's.
* What crosses the socket is two wire messages (:class:`WorkRequest`,
  :class:`WorkReply`): the run-config and node-config as JSON text, the
  instruction's fields and its task frame as bytes. Nothing is pickled.
* Training requests run one at a time; "where is your copy" requests are
  answered at once, even while a round trains.
* A worker that is absent, or dies mid-request, is not an error: the ClientApp
  does the work itself (:func:`ask` returns None). A restarted worker holds no
  copy, says so when asked, and the server's stale-copy resend brings it back.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseed import wire
from fedseed.wire import F64, U8, U32, Bytes, Str, message

TRAIN, WHERE = 1, 2
MAX_FRAME = 1 << 34  # a dense task of a 4B-parameter model still fits; anything larger is not ours
CONNECT_TIMEOUT = 2.0


@message(50)
@dataclass(frozen=True)
class WorkRequest:
    """ClientApp -> worker: train (with the instruction's fields) or say where the copy of ``run`` is."""

    kind: U8  # TRAIN or WHERE
    run_config: Str  # JSON of the Flower run-config (flat section.key -> value)
    node_config: Str  # JSON of the SuperNode's node-config
    round: U32
    client: U32
    since: U32
    run: Str
    base: Str
    frame: Bytes  # the encoded task (empty for WHERE)

    def validate(self) -> None:
        if self.kind not in (TRAIN, WHERE):
            raise ValueError(f"kind must be {TRAIN} (train) or {WHERE} (where), got {self.kind}")


@message(51)
@dataclass(frozen=True)
class WorkReply:
    """Worker -> ClientApp: the answer's fields, or the error that stopped it."""

    position: U32
    stale: U8
    frame: Bytes  # the encoded reply (empty when stale, for WHERE, or on error)
    loss: F64  # the reply's loss and example count, for the answer's MetricRecord
    num_examples: U32
    error: Str  # empty unless the request failed; then what the node's log would have said


class WorkerError(RuntimeError):
    """The worker could not do the work; the text is its own error."""


def _send(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(frame)) + frame)


def _receive(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("<Q", _exactly(sock, 8))
    if size > MAX_FRAME:
        raise wire.WireError(f"a worker frame of {size} bytes exceeds the limit {MAX_FRAME}")
    return _exactly(sock, size)


def _exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def ask(path: Path, request: WorkRequest) -> WorkReply | None:
    """The worker's reply; None when no worker listens at ``path`` or it died before answering."""
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(str(path))
        sock.settimeout(None)  # a round trains as long as it trains
        _send(sock, wire.encode(request))
        return wire.decode(_receive(sock), WorkReply)
    except (ConnectionError, FileNotFoundError, socket.timeout, OSError):
        return None
    finally:
        sock.close()


class _Handler(socketserver.BaseRequestHandler):
    server: "WorkerServer"

    def handle(self) -> None:
        sock: socket.socket = self.request
        if not self.server.trusted(sock):
            return
        try:
            request = wire.decode(_receive(sock), WorkRequest)
        except (wire.WireError, ConnectionError, struct.error):
            return
        _send(sock, wire.encode(self.server.answer(request)))


class WorkerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A Unix-socket server around one resident Node."""

    daemon_threads = True

    def __init__(self, path: Path):
        from fedseed.runners.node import Node

        self.node = Node(resident=True)
        self.lock = threading.Lock()  # one training request at a time
        self.requests = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, stat.S_IRWXU)  # 0700: nobody else can reach the socket's folder
        if path.exists():
            path.unlink()  # a dead worker's socket
        previous = os.umask(0o177)  # the socket is created 0600, with no window where it is not
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(previous)

    def trusted(self, sock: socket.socket) -> bool:
        """Only this user's processes may ask (``SO_PEERCRED``: pid, uid, gid of the peer)."""
        if not hasattr(socket, "SO_PEERCRED"):
            return True  # the socket's 0600 mode is the guard where the OS has no peer credentials
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return uid == os.getuid()

    def answer(self, request: WorkRequest) -> WorkReply:
        from fedseed.runners.flower_config import node_settings
        from fedseed.runners.flower_records import Instruction

        try:
            node = node_settings(json.loads(request.node_config))
            if request.kind == WHERE:
                return WorkReply(self.node.position(request.run, node), 0, b"", 0.0, 0, "")
            order = Instruction(request.round, request.client, request.since, request.run, request.base,
                                request.frame)
            with self.lock:
                self.requests += 1
                answer = self.node.train(order, json.loads(request.run_config), node)
            print(f"fedseed worker: round {order.round} client {order.client} since {order.since}: "
                  f"{'stale, holds ' + str(answer.position) if answer.stale else 'trained'}", flush=True)
            return WorkReply(answer.position, int(answer.stale), answer.frame, answer.loss, answer.num_examples, "")
        except Exception as e:  # the ClientApp raises it as the app's error; the worker lives on
            return WorkReply(0, 0, b"", 0.0, 0, f"{type(e).__name__}: {e}")


def _preload() -> None:
    """Import what the first round needs (torch, transformers, the methods: seconds) while no round waits for it."""
    import fedseed.experiment  # noqa: F401
    import fedseed.runners.node  # noqa: F401


def run_worker(path: Path) -> None:
    """Serve until killed; the heavy imports happen in the background from the start, not in the first round."""
    with WorkerServer(path) as server:
        print(f"fedseed worker: serving {path} (pid {os.getpid()})", flush=True)
        threading.Thread(target=_preload, daemon=True).start()  # a request meanwhile waits on the import lock
        server.serve_forever()


def cmd_worker(args: argparse.Namespace) -> int:
    run_worker(Path(args.socket).expanduser())
    return 0


def add_worker_command(sub: Any) -> None:
    """``fedseed worker --socket PATH``."""
    w = sub.add_parser("worker", help="keep a node's model, data and synced copy in memory between Flower rounds "
                                      "(start it beside the SuperNode; node-config `worker` names the socket)")
    w.add_argument("--socket", required=True, help="Unix socket path (its folder is made 0700, the socket 0600)")
    w.set_defaults(fn=cmd_worker)
