"""The server side of a Flower run: the round loop over real nodes.

The same algorithm objects, client sampling, ledger and metrics as the
in-process runner (it shares ``begin``, ``accept``, ``close_round`` and
``finish_round`` with it), so with every node present the ledger is bit for bit
the in-process one. Only the moving differs: each task goes to the SuperNode of
its client through Flower's Grid, and replies come back when they come.

* The server reads no client's training data: it holds the model and, when
  ``data.eval_path`` names one, its own evaluation set. Aggregation weights are
  the example counts nodes declare, bounded by ``robust.max_weight``.
* Which node is which client is learned by roll call (a Flower ``query``), asked
  of every node the SuperLink lists, again every few seconds; a node that comes
  back (a new node id for the same client) takes over its client's tasks. With
  ``flower.pin_nodes`` a client id belongs to the node that first claimed it
  (kept in the run folder's ``nodes.json``), and another node's claim is refused.
* Clients come and go: the first round starts once ``flower.min_clients`` have a
  node, each round samples among the clients connected then (with every client
  connected exactly as the in-process runner samples), and a sampled client whose
  node is gone is replaced by an unsampled connected one, or dropped, after
  ``flower.grace`` seconds, not the whole round timeout.
* A round waits at most ``flower.round_timeout``, continues with the accepted
  replies if there are at least ``flower.min_replies``, and records every sampled
  client that did not contribute, and why, and every replacement.
* Each node's cached ledger position is remembered and sent as ``since``; a node
  whose copy is not there answers "stale" with its real position and is resent
  the task once.
* A reply is accepted once per (round, client), only for the current round and
  only answering the task sent; anything else is rejected by name.
* Every reply carries the fingerprint of the copy it trained from; a node whose
  copy drifted is told to rebuild from its base and the ledger (``since = 0``) and
  is resent the task once.
* The ledger is committed atomically after every round: a new run of the same
  experiment resumes from it (``flower.resume``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

import json

import numpy as np

from fedseed import wire
from fedseed.algorithms import Algorithm
from fedseed.events import training_summary
from fedseed.experiment import SAMPLE_TAG, Experiment, prepare_server, sample_clients
from fedseed.ledger import Ledger, LedgerError, write_atomically
from fedseed.report import build_report, write_report
from fedseed.runfolder import RunFolder
from fedseed.runners.flower_config import FlowerSettings, from_run_config
from fedseed.runners.flower_records import (
    Instruction,
    RecordError,
    flower_bytes,
    instruction_message,
    read_answer,
    read_presence,
    roll_call_message,
    run_id,
)
from fedseed.runners.simulation import (
    Events, Expected, Round, RoundResult, Run, accept, begin, close_round, expected, finish_round, sync_to_latest,
)

POLL = 0.5  # seconds between pulls for replies
ROLL_CALL_EVERY = 3.0  # seconds between looks for nodes not yet known
NODE_GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED)  # an expired message (3) may be a slow node
REPLACE_TAG = 0x2E91
PINS_FILE = "nodes.json"


class Pins:
    """Which SuperNode each client id belongs to, for the whole run (the run folder's ``nodes.json``).

    With node authentication a SuperNode's id belongs to its registered key, so a
    restarted node keeps it; a claim by any other node is refused.
    """

    def __init__(self, path: Path):
        self.path = path
        self.nodes: dict[int, int] = {}
        if path.is_file():
            try:
                self.nodes = {int(c): int(n) for c, n in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError):
                raise RoundFailed(f"{path} is not a client -> node id table; delete it to let nodes claim again")

    def claim(self, client: int, node_id: int) -> str | None:
        """None when ``node_id`` may serve ``client`` (pinning it on a first claim), else why not."""
        owner = self.nodes.get(client)
        if owner is None:
            self.nodes[client] = node_id
            write_atomically(self.path, json.dumps(self.nodes, sort_keys=True).encode())
            return None
        return None if owner == node_id else f"client {client} belongs to node {owner} (flower.pin_nodes)"


def sample_connected(seed: int, round: int, num_clients: int, per_round: int, connected: list[int]) -> list[int]:
    """The round's clients among those with a node; with every client connected, the in-process sample."""
    if len(connected) == num_clients:
        return sample_clients(seed, round, num_clients, per_round)
    rng = np.random.default_rng([seed, round, SAMPLE_TAG, len(connected)])
    return sorted(int(c) for c in rng.choice(connected, size=min(per_round, len(connected)), replace=False))


def replacement(seed: int, round: int, taken: set[int], connected: list[int]) -> int | None:
    """A connected client not in this round yet, drawn from ``(seed, round, how many were taken)``."""
    free = sorted(set(connected) - taken)
    if not free:
        return None
    return free[int(np.random.default_rng([seed, round, REPLACE_TAG, len(taken)]).integers(len(free)))]


class RoundFailed(RuntimeError):
    """Too few replies to aggregate; the ledger holds every earlier round, so the run can resume."""


@dataclass
class Node:
    node_id: int
    client: int
    position: int  # ledger position of the node's cached copy (0: base weights)


class Roster:
    """Which SuperNode is which fedseed client, learned by roll call, and how far each node's copy is synced."""

    def __init__(self, run: str, num_clients: int, ttl: float, pins: Pins | None = None):
        self.run, self.num_clients, self.ttl, self.pins = run, num_clients, ttl, pins
        self.clients: dict[int, Node] = {}  # client -> the node that most recently said it is that client
        self.asked: dict[str, int] = {}  # roll-call message id -> node id
        self.seen: set[int] = set()  # node ids asked (and not forgotten since)
        self.ignored: dict[int, str] = {}  # node id -> why it serves no client
        self.roll_call_bytes = 0  # Flower bytes of roll calls and answers not yet reported in a round's row
        self.last_call = -math.inf

    def call(self, grid: Grid) -> None:
        """Ask every node the SuperLink lists, and that was not asked yet, which client it is."""
        self.last_call = time.monotonic()
        new = [n for n in grid.get_node_ids() if n not in self.seen]
        if not new:
            return
        msgs = [roll_call_message(self.run, n, self.ttl) for n in new]
        for mid, msg, node_id in zip(grid.push_messages(msgs), msgs, new):
            self.seen.add(node_id)
            if mid:
                self.asked[mid] = node_id
                self.roll_call_bytes += flower_bytes(msg)

    def due(self) -> bool:
        return time.monotonic() - self.last_call >= ROLL_CALL_EVERY

    def answered(self, msg: Message) -> Node | None:
        """Record a roll-call answer; returns the node when it now serves its client."""
        node_id = self.asked.pop(msg.metadata.reply_to_message_id)
        self.roll_call_bytes += flower_bytes(msg)
        if msg.has_error():  # gone before answering; ask again if it is listed again
            self.seen.discard(node_id)
            return None
        try:
            presence = read_presence(msg)
        except RecordError as e:
            self.ignore(node_id, str(e))
            return None
        refused = self.refusal(presence.client, node_id)
        if refused:
            self.ignore(node_id, refused)
            return None
        node = Node(node_id, presence.client, presence.position)
        self.clients[presence.client] = node
        return node

    def refusal(self, client: int, node_id: int) -> str | None:
        """Why ``node_id`` may not serve ``client`` (None: it may, and now holds the pin when pins are kept)."""
        if client >= self.num_clients:
            return (f"its partition-id {client} is not a client of this run "
                    f"(federation.num_clients = {self.num_clients})")
        return self.pins.claim(client, node_id) if self.pins else None

    def ignore(self, node_id: int, why: str) -> None:
        self.ignored[node_id] = why
        print(f"node {node_id} serves no client: {why}", flush=True)

    def forget(self, node_id: int) -> None:
        """A node that stopped answering: its client has no node until one answers a roll call again."""
        self.seen.discard(node_id)
        for client, node in list(self.clients.items()):
            if node.node_id == node_id:
                del self.clients[client]

    def pull(self, grid: Grid, also: list[str]) -> list[Message]:
        ids = list(self.asked) + also
        return list(grid.pull_messages(ids)) if ids else []

    def connected(self) -> list[int]:
        return sorted(self.clients)

    def wait_for(self, grid: Grid, count: int, timeout: float) -> None:
        """Roll calls until ``count`` clients have a node (every client at most), or ``timeout`` seconds."""
        count = min(count, self.num_clients)
        deadline = time.monotonic() + timeout
        while len(self.clients) < count and time.monotonic() < deadline:
            if self.due():
                self.call(grid)
            for msg in self.pull(grid, []):
                self.answered(msg)
            time.sleep(POLL)
        if len(self.clients) < count:
            raise RoundFailed(f"{len(self.clients)} clients have a node after {timeout:g} s, a round needs {count} "
                              "(flower.min_clients); start more SuperNodes, or lower flower.min_clients, and run "
                              "again (the ledger keeps every earlier round)")
        print(f"nodes: {({c: n.node_id for c, n in sorted(self.clients.items())})}", flush=True)


@dataclass
class Sent:
    """A task in flight."""

    client: int
    node: Node
    task: Any


def _why(msg: Message) -> str:
    code, reason = msg.error.code, msg.error.reason
    labels = {ErrorCode.NODE_UNAVAILABLE: "node unavailable", ErrorCode.CLIENT_APP_CRASHED: "ClientApp crashed",
              ErrorCode.MESSAGE_UNAVAILABLE: "message expired", ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "ClientApp raised"}
    return f"{labels.get(code, 'Flower error')} (code {code}): {reason}"


class FlowerRound:
    """One round over the Grid: send, collect until the deadline, check, aggregate. Changes no server state."""

    def __init__(self, grid: Grid, exp: Experiment, server: Algorithm, roster: Roster, base: str,
                 settings: FlowerSettings, round: int, expect: Expected):
        fed, seed = exp.config.federation, exp.config.run.seed
        self.grid, self.server, self.roster, self.base, self.settings = grid, server, roster, base, settings
        self.expect, self.seed = expect, seed
        sampled = sample_connected(seed, round, fed.num_clients, fed.clients_per_round, roster.connected())
        self.result = RoundResult(round, sampled)
        self.checks = Round(server, expect, self.result)
        self.gone: dict[int, float] = {}  # client -> when it was last seen without a node
        self.replaced: dict[int, int] = {}  # dropped client -> the client that took its place
        self.sent: dict[str, Sent] = {}  # instruction message id -> what was sent this round
        self.open: set[str] = set()  # ids of those not answered yet
        self.replies: dict[int, Any] = {}  # client -> accepted reply
        self.done: set[int] = set()  # clients answered, rejected or given up on this round
        self.why = {c: "no node has answered the roll call as this client" for c in self.result.clients}
        self.nodes: dict[int, int] = {}  # client -> node id its last task went to
        self.flower_up: dict[int, int] = {}
        self.flower_down: dict[int, int] = {}
        self.resent: set[int] = set()

    @property
    def round(self) -> int:
        return self.result.round

    def waiting(self) -> list[int]:
        return [c for c in self.result.clients if c not in self.done]

    def replace_gone(self) -> None:
        """A waiting client with no node (and no task in flight) for ``flower.grace`` seconds: replaced or dropped."""
        now = time.monotonic()
        for c in self.waiting():
            if c in self.roster.clients or any(self.sent[mid].client == c for mid in self.open):
                self.gone.pop(c, None)
                continue
            since = self.gone.setdefault(c, now)
            if now - since < self.settings.grace:
                continue
            self.done.add(c)
            self.why[c] = f"no node for {self.settings.grace:g} s (flower.grace)"
            new = replacement(self.seed, self.round, set(self.result.clients),
                              self.roster.connected()) if self.settings.replace else None
            if new is not None:
                self.replaced[c] = new
                self.result.clients.append(new)
                self.why[new] = "no node has answered the roll call as this client"
                self.send(new)

    def send(self, c: int) -> None:
        """The task of client ``c`` to its node, made for the position that node's copy holds."""
        node = self.roster.clients.get(c)
        if node is None:
            return
        task = self.server.task(self.round, c, node.position)
        frame = wire.encode(task)
        order = Instruction(self.round, c, node.position, self.roster.run, self.base, frame)
        msg = instruction_message(order, node.node_id, self.settings.round_timeout)
        [mid] = list(self.grid.push_messages([msg]))
        if not mid:  # the SuperLink does not know that node (any more)
            self.why[c] = f"node {node.node_id} is unknown to the SuperLink"
            self.roster.forget(node.node_id)
            return
        self.sent[mid] = Sent(c, node, task)
        self.open.add(mid)
        self.result.downlink[c] = self.result.downlink.get(c, 0) + len(frame)
        self.flower_down[c] = self.flower_down.get(c, 0) + flower_bytes(msg)
        self.nodes[c] = node.node_id
        self.why[c] = f"no reply within {self.settings.round_timeout:g} s"

    def has_task_at(self, c: int, node_id: int) -> bool:
        return any(self.sent[mid].client == c and self.sent[mid].node.node_id == node_id for mid in self.open)

    def give_up(self, c: int) -> None:
        """No more waiting for ``c`` this round, unless a task to another node of it is still open."""
        if not any(self.sent[mid].client == c for mid in self.open):
            self.done.add(c)

    def run(self, events: Events) -> tuple[Any, RoundResult, dict[str, Any]]:
        events.round_start(self.round, self.result.clients)
        self.roster.call(self.grid)
        for c in self.result.clients:
            self.send(c)
        deadline = time.monotonic() + self.settings.round_timeout
        while True:
            self.replace_gone()
            for msg in self.roster.pull(self.grid, list(self.open)):
                mid = msg.metadata.reply_to_message_id
                if mid in self.roster.asked:
                    self.on_presence(msg)
                elif mid in self.open:
                    self.open.discard(mid)
                    self.on_answer(self.sent[mid], msg, events)
                elif mid in self.sent:  # a second answer to one instruction
                    self.reject_duplicate(self.sent[mid].client)
            if not self.waiting() or time.monotonic() >= deadline:
                break
            if self.roster.due():
                self.roster.call(self.grid)
            time.sleep(POLL)
        return self.close()

    def on_presence(self, msg: Message) -> None:
        """A node said which client it is; a waiting client whose node changed gets its task at the new node."""
        node = self.roster.answered(msg)
        if node and node.client in self.waiting() and not self.has_task_at(node.client, node.node_id):
            self.send(node.client)

    def on_answer(self, sent: Sent, msg: Message, events: Events) -> None:
        c = sent.client
        if msg.has_error():
            self.why[c] = _why(msg)
            if msg.error.code in NODE_GONE:
                self.roster.forget(sent.node.node_id)  # resent if another node answers the roll call as c
            else:  # the app raised, or the message expired (its TTL is the round's timeout)
                self.give_up(c)
            return
        try:
            answer = read_answer(msg)
            if answer.round != self.round:
                raise RecordError(f"replayed: the answer is for round {answer.round}, the current round is {self.round}")
            if answer.client != c:
                raise RecordError(f"the answer is for client {answer.client}, the task went to client {c}")
        except RecordError as e:
            self.result.reject(c, str(e))
            self.give_up(c)
            return
        if c in self.replies:
            self.reject_duplicate(c)
            return
        sent.node.position = answer.position
        if answer.stale:
            if not self.resend(c):
                self.why[c] = f"node {sent.node.node_id}'s copy is still not where it said after a resend"
                self.give_up(c)
            return
        self.flower_up[c] = self.flower_up.get(c, 0) + flower_bytes(msg)
        reply = accept(self.checks, sent.task, c, answer.frame)
        if reply is None and c in self.result.drifted:  # its cached copy drifted: rebuild from base + ledger
            if c in self.resent:
                self.result.reject(c, f"still drifted after a resync from the ledger: {self.result.drifted[c]}")
                self.give_up(c)
            else:
                sent.node.position = 0
                self.resend(c)
        elif reply is None:
            self.give_up(c)
        else:
            self.replies[c] = reply
            self.done.add(c)
            events.client_done(self.round, c)

    def resend(self, c: int) -> bool:
        """Send ``c``'s task again, once per round; False when it was resent already."""
        if c in self.resent:
            return False
        self.resent.add(c)
        self.send(c)
        return True

    def reject_duplicate(self, c: int) -> None:
        self.result.reject(c, f"duplicate reply for round {self.round} client {c} (the first one is kept)")

    def close(self) -> tuple[Any, RoundResult, dict[str, Any]]:
        dropped = {c: self.result.rejected.get(c, self.why[c]) for c in self.result.clients if c not in self.replies}
        if len(self.replies) < self.settings.min_replies:
            raise RoundFailed(
                f"round {self.round}: {len(self.replies)} accepted replies, `flower.min_replies` is "
                f"{self.settings.min_replies}; dropped: {dropped}. The ledger holds every earlier round: start the "
                "run again (flower.resume = true) once the nodes are back"
            )
        update = close_round(self.checks, [self.replies[c] for c in sorted(self.replies)])
        extra = {
            "accepted": sorted(self.replies),
            "dropped": {str(c): why for c, why in dropped.items()},
            "replaced": {str(c): new for c, new in self.replaced.items()},
            "connected": self.roster.connected(),
            "refused_nodes": {str(n): why for n, why in self.roster.ignored.items()},
            "nodes": {str(c): n for c, n in self.nodes.items()},
            "flower_uplink_bytes": {str(c): n for c, n in self.flower_up.items()},
            "flower_downlink_bytes": {str(c): n for c, n in self.flower_down.items()},
            "flower_uplink_total": sum(self.flower_up.values()),
            "flower_downlink_total": sum(self.flower_down.values()),
            "flower_roll_call_bytes": self.roster.roll_call_bytes,  # since the last row, startup included
        }
        self.roster.roll_call_bytes = 0
        return update, self.result, extra


class PrintEvents(Events):
    """One line per round on the ServerApp's stdout (``flwr log RUN_ID --stream`` or ``flwr run --stream``)."""

    def round_start(self, round: int, clients: list[int]) -> None:
        print(f"round {round}: clients {clients}", flush=True)

    def round_end(self, row: dict[str, Any]) -> None:
        n = max(len(row["accepted"]), 1)
        line = (f"round {row['round']:>3} | accepted {row['accepted']} | up {row['uplink_total'] / n:.0f} B/client "
                f"(Flower {row['flower_uplink_total'] / n:.0f} B) | down {row['downlink_total'] / n:.0f} B/client "
                f"(Flower {row['flower_downlink_total'] / n:.0f} B) | {training_summary(row)}")
        if "eval_loss" in row:
            line += f" | held-out loss {row['eval_loss']:.4f}"
        if row["dropped"]:
            line += f" | dropped {row['dropped']}"
        if row["rejected"]:
            line += f" | rejected {row['rejected']}"
        print(line + f" | {row['seconds']:.1f} s", flush=True)


def open_run(exp: Experiment, folder: RunFolder, settings: FlowerSettings) -> bool:
    """Prepare the run folder; True when an existing ledger is to be continued."""
    if folder.ledger_path.is_file() and settings.resume and not settings.overwrite:
        return True
    if folder.ledger_path.is_file() and not settings.overwrite:
        raise FileExistsError(f"{folder.path} already holds a run; set flower.resume = true to continue it, "
                              "flower.overwrite = true to replace it, or choose another run.output_dir")
    folder.create(exp.config, None, overwrite=True)  # no partition: every node brings its own data
    (folder.path / PINS_FILE).unlink(missing_ok=True)
    return False


class Session:
    """One run on the server: the experiment, the ledger, the roster; what every round of it shares."""

    def __init__(self, run_config: Mapping[str, Any], events: Events | None = None):
        cfg, self.settings = from_run_config(run_config)
        exp = prepare_server(cfg)  # the model and data.eval_path: no client's training data
        folder = RunFolder(cfg.run.output_dir)
        resume = open_run(exp, folder, self.settings)
        self.run = Run(exp, folder, exp.algorithm(), exp.algorithm(), events or PrintEvents())
        try:
            self.ledger = begin(self.run, resume)
        except LedgerError as e:
            raise LedgerError(f"{e}; set flower.overwrite = true to replace it, or choose another run.output_dir") \
                from None
        pins = Pins(self.folder.path / PINS_FILE) if self.settings.pin_nodes else None
        self.roster = Roster(run_id(self.ledger.header), cfg.federation.num_clients, self.settings.round_timeout, pins)
        self.need = self.settings.min_clients or cfg.federation.clients_per_round
        if self.ledger.rounds >= cfg.federation.rounds:
            print(f"{self.folder.path} already holds all {self.ledger.rounds} rounds of this experiment: nothing to "
                  "run (flower.overwrite = true starts it again, or choose another run.output_dir)", flush=True)

    @property
    def exp(self) -> Experiment:
        return self.run.exp

    @property
    def server(self) -> Algorithm:
        return self.run.server

    @property
    def folder(self) -> RunFolder:
        return self.run.folder

    def rounds(self) -> range:
        """The rounds still to run."""
        return range(self.ledger.rounds + 1, self.exp.config.federation.rounds + 1)

    def open_round(self, grid: Grid, round: int) -> FlowerRound:
        """Wait for enough connected clients, then the round's sample and what honest replies must say."""
        if len(self.roster.connected()) < self.need:
            self.roster.wait_for(grid, self.need, self.settings.startup_timeout)
        sync_to_latest(self.run)
        expect = expected(self.run)
        return FlowerRound(grid, self.exp, self.server, self.roster, self.exp.base_hash, self.settings, round, expect)

    def close_round(self, update: Any, result: RoundResult, started: float, extra: dict[str, Any]) -> dict[str, Any]:
        """Commit the round: the update into the server, the row into metrics.jsonl, then the ledger."""
        return finish_round(self.run, update, result, started, extra)

    def train(self, grid: Grid, round: int) -> dict[str, Any]:
        """One whole round: open it, run it over the Grid, commit it."""
        started = time.perf_counter()
        update, result, extra = self.open_round(grid, round).run(self.run.events)
        return self.close_round(update, result, started, extra)

    def report(self) -> str:
        return write_report(self.folder, _report(self.exp, self.folder, self.ledger))


def run_server(grid: Grid, run_config: Mapping[str, Any], events: Events | None = None) -> Ledger:
    """The ServerApp's main: run, or continue, the experiment the run-config describes; returns the ledger."""
    session = Session(run_config, events)
    for round in session.rounds():
        session.train(grid, round)
    print(session.report(), flush=True)
    return session.ledger


def _report(exp: Experiment, folder: RunFolder, ledger: Ledger) -> dict[str, Any]:
    """The in-process run's report, plus what Flower itself moved."""
    rows = [r for r in folder.metrics() if r["round"] > 0]
    flower = {key: sum(r.get(key, 0) for r in rows)
              for key in ("flower_uplink_total", "flower_downlink_total", "flower_roll_call_bytes")}
    return build_report(folder, ledger.header.algorithm, exp.model.numel, folder.ledger_path.stat().st_size,
                        {"engine": "flower", "flower_bytes": flower})
