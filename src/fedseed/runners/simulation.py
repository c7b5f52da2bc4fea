"""The in-process runner (the embedded default): clients one after another, one model in memory.

It only moves messages. Every task and reply is really encoded, counted and
decoded, exactly as it would cross a network, and the server side and client
side are separate algorithm objects, so nothing reaches a client except through
a message. The round loop is written once; it knows nothing of the algorithm.
A client's reply leaves it through its :class:`~fedseed.faults.Uplink`: honest
encoding, or the hostile one ``[faults]`` (or a test) installs for a client.

:class:`Run` (what a run's rounds share) and :func:`accept`, :func:`close_round`,
:func:`begin` and :func:`finish_round` are the Flower runner's too.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from fedseed import eval as evaluation
from fedseed import wire
from fedseed.algorithms import EVALUATOR, Algorithm, InvalidReply
from fedseed.events import Events
from fedseed.experiment import Experiment, sample_clients
from fedseed.faults import HONEST, Uplink, uplinks
from fedseed.ledger import FORMAT, Ledger, LedgerError, LedgerHeader, canonical_json
from fedseed.memory import release_freed_memory
from fedseed.models import DIRTY
from fedseed.runfolder import RunFolder

log = logging.getLogger("fedseed")



@dataclass
class RoundResult:
    """What one round moved and measured."""

    round: int
    clients: list[int]
    uplink: dict[int, int] = field(default_factory=dict)  # encoded reply bytes per client
    downlink: dict[int, int] = field(default_factory=dict)  # encoded task bytes per client
    train_loss: float = 0.0
    skipped_steps: int = 0
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    drifted: dict[int, str] = field(default_factory=dict)  # fingerprint mismatches: resynced from the ledger
    examples: dict[int, int] = field(default_factory=dict)  # training examples each accepted reply declared

    def reject(self, client: int, why: str) -> None:
        self.rejected[client] = why
        log.warning("round %d: rejected the reply of client %d: %s", self.round, client, why)

    def row(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "clients": self.clients,
            "uplink_bytes": {str(c): n for c, n in self.uplink.items()},
            "downlink_bytes": {str(c): n for c, n in self.downlink.items()},
            "uplink_total": sum(self.uplink.values()),
            "downlink_total": sum(self.downlink.values()),
            "train_loss": self.train_loss,
            "skipped_steps": self.skipped_steps,
            "accepted": sorted(set(self.accepted)),
            "rejected": {str(c): why for c, why in self.rejected.items()},
            "drifted": {str(c): why for c, why in self.drifted.items()},
        }


@dataclass(frozen=True)
class Expected:
    """What the server knows an honest reply of this round must say, beyond the algorithm's own checks."""

    fingerprint: int  # of the global model the round's tasks are made from; 0: not checked
    examples: dict[int, int] | None  # training examples of each client, its aggregation weight (None: not known)


@dataclass
class Round:
    """What checking one round's replies needs: the server, what honest replies say, what the round moved."""

    server: Algorithm
    expect: Expected
    result: RoundResult


@dataclass
class Run:
    """A run's moving parts, shared by every round and by both runners.

    ``evaluator`` syncs the runner's own copy of the model to the global one (to
    fingerprint and evaluate it; in-process it is also every client's algorithm).
    """

    exp: Experiment
    folder: RunFolder
    server: Algorithm
    evaluator: Algorithm
    events: Events
    ledger: Ledger | None = None  # set by begin
    examples: dict[int, int] = field(default_factory=dict)  # training examples per client, as far as known


def expected(run: Run) -> Expected:
    """What honest replies of the next round say: the fingerprint of the runner's copy (synced first by the caller)."""
    exp = run.exp
    fingerprint = exp.model.fingerprint(exp.config.run.seed, run.server.committed, exp.config.robust.fingerprint_samples)
    known = exp.client_examples() if exp.data.partition else None
    return Expected(fingerprint, known)


def ledger_header(exp: Experiment, algo: Algorithm) -> LedgerHeader:
    """The header names everything that shapes the updates, resolved (defaults written out), so resume can compare."""
    cfg = exp.config
    shaping = {"algorithm": dataclasses.asdict(algo.config), "robust": dataclasses.asdict(cfg.robust),
               "faults": dataclasses.asdict(cfg.faults)}
    if cfg.privacy.on:  # absent when off, so a run without privacy writes the header it always did
        shaping["privacy"] = {k: v for k, v in dataclasses.asdict(cfg.privacy).items() if k != "noise_seed"}
    return LedgerHeader(FORMAT, algo.name, canonical_json(shaping), cfg.run.seed, cfg.model.name_or_path, exp.base_hash)


def open_ledger(folder: RunFolder, exp: Experiment, server: Algorithm, resume: bool) -> Ledger:
    """A new ledger, or the run's existing one replayed into ``server`` after checking it is this run's."""
    header = ledger_header(exp, server)
    if not resume or not folder.ledger_path.exists():  # killed before its first commit: nothing to continue
        return Ledger.create(folder.ledger_path, header)
    ledger = Ledger.open(folder.ledger_path, repair=True)
    ledger.check_base(exp.config.model.name_or_path, exp.base_hash)
    mine = (header.algorithm, header.algorithm_config, header.seed)
    theirs = (ledger.header.algorithm, ledger.header.algorithm_config, ledger.header.seed)
    if mine != theirs:
        raise LedgerError(f"{folder.ledger_path} was written with algorithm/hyperparameters/seed {theirs}, not {mine}")
    for update in ledger.decoded(server.Update):
        server.commit(update)
    return ledger


def accept(rnd: Round, task: Any, c: int, up: bytes) -> Any | None:
    """Decode and check client ``c``'s encoded reply; a rejected one is recorded with its reason, and None returned.

    A reply whose fingerprint is not the global model's goes to ``result.drifted``
    instead: its client's copy drifted, and the caller resyncs it from the ledger.
    """
    server, result, expect = rnd.server, rnd.result, rnd.expect
    result.uplink[c] = result.uplink.get(c, 0) + len(up)
    try:
        if c in result.accepted:
            raise InvalidReply(f"duplicate reply of client {c} for round {result.round} (the first one is kept)")
        reply = wire.decode(up, server.Reply)
        server.check(reply, task)
        if expect.examples is not None and reply.num_examples != expect.examples[c]:
            raise InvalidReply(f"`num_examples` is {reply.num_examples}, but client {c} holds "
                               f"{expect.examples[c]} training examples")
    except (wire.WireError, InvalidReply) as e:
        result.reject(c, str(e))
        return None
    if expect.fingerprint and reply.fingerprint != expect.fingerprint:
        result.drifted[c] = (f"model fingerprint {reply.fingerprint:016x}, the global model's at position "
                             f"{server.committed} is {expect.fingerprint:016x}")
        log.warning("round %d: client %d's copy drifted (%s); resyncing it from the ledger",
                    result.round, c, result.drifted[c])
        return None
    result.accepted.append(c)
    result.skipped_steps += reply.skipped
    return reply


def close_round(rnd: Round, replies: list[Any]) -> Any:
    """The round's update from its accepted replies (arrival order does not matter)."""
    result = rnd.result
    if not replies:
        raise InvalidReply(f"round {result.round}: every reply was rejected, nothing to aggregate: {result.rejected}. "
                           "The ledger holds every earlier round; fix the clients and continue with --resume")
    result.train_loss = sum(r.loss for r in replies) / len(replies)
    result.examples = {r.client: r.num_examples for r in replies}
    return rnd.server.aggregate(result.round, replies)


def run_round(run: Run, round: int, uplink: Callable[[int], Uplink]) -> tuple[Any, RoundResult]:
    """Tasks out, local training, replies back and checked, aggregation. Changes no server state."""
    fed = run.exp.config.federation
    result = RoundResult(round, sample_clients(run.exp.config.run.seed, round, fed.num_clients, fed.clients_per_round))
    run.events.round_start(round, result.clients)
    sync_to_latest(run)
    rnd = Round(run.server, expected(run), result)
    replies = []
    for c in result.clients:
        reply = exchange_or_resync(run, rnd, c, uplink(c))
        if reply is not None:
            replies.append(reply)
            run.events.client_done(round, c)
    return close_round(rnd, replies), result


def exchange_or_resync(run: Run, rnd: Round, c: int, uplink: Uplink) -> Any | None:
    """Client ``c``'s exchange; a copy caught drifting is rebuilt from the base and the ledger and asked once more."""
    model = run.exp.model
    uplink.before_train(model)
    reply = exchange(run, rnd, c, model.position, uplink)
    if c in rnd.result.drifted:
        model.position = DIRTY  # not the global model any more: the next sync starts from w0
        reply = exchange(run, rnd, c, 0, HONEST)
        if c not in rnd.result.accepted:
            rnd.result.reject(c, f"still drifted after a resync from the ledger: {rnd.result.drifted[c]}")
    return reply


def exchange(run: Run, rnd: Round, c: int, since: int, uplink: Uplink) -> Any | None:
    """One task out, local training, the reply's frames back through :func:`accept`."""
    client, round = run.evaluator, rnd.result.round
    task = rnd.server.task(round, c, since)
    down = wire.encode(task)
    rnd.result.downlink[c] = rnd.result.downlink.get(c, 0) + len(down)
    release_freed_memory()  # what an evaluation or the last client left free in the heap
    reply = client.train(run.exp.model, run.exp.batches(round, c), wire.decode(down, client.Task))
    accepted = [accept(rnd, task, c, up) for up in uplink.frames(reply)]
    return next((r for r in accepted if r is not None), None)


def sync_to_latest(run: Run) -> None:
    """Bring the runner's copy of the model to the latest global model, through an encoded message."""
    server, client, model = run.server, run.evaluator, run.exp.model
    task = server.task(server.committed + 1, EVALUATOR, model.position)
    client.sync(model, wire.decode(wire.encode(task), client.Task))


def evaluate(exp: Experiment, generation: bool, events: Events) -> dict[str, float]:
    """Held-out loss, and (when asked) the generation metrics of the data set."""
    ev, module = exp.config.eval, exp.model.module
    held = exp.data.heldout
    if not held:  # a deployed server without data.eval_path evaluates nothing
        return {}
    if exp.data.classes:  # classification: cheap, so accuracy at every evaluation
        loss, acc = evaluation.classification_metrics(module, held[: ev.loss_examples], ev.batch_size, exp.pad_id)
        return {"eval_loss": loss, "accuracy": acc}
    out = {"eval_loss": evaluation.heldout_loss(module, held[: ev.loss_examples], ev.batch_size, exp.pad_id)}
    if generation:
        n = min(ev.generate_examples, len(held))
        events.phase("generating", n)
        preds = evaluation.generate(module, exp.tokenizer, held[:n], ev.max_new_tokens, ev.batch_size, events.advance)
        refs = exp.data.references[:n]
        out["rouge_l"] = evaluation.rouge_l(preds, refs, ev.rouge)
        if exp.config.data.dataset == "gsm8k":
            out["gsm8k_accuracy"] = evaluation.gsm8k_accuracy(preds, refs)
    return out


def begin(run: Run, resume: bool) -> Ledger:
    """Bind both algorithm objects to the model, open (or replay) the ledger, evaluate the base model on a fresh run."""
    exp, folder = run.exp, run.folder
    run.server.bind(exp.model)
    run.evaluator.bind(exp.model)
    if exp.privacy is not None:  # a run over its budget stops before anything is written or spent
        run.examples = exp.client_examples()
        exp.privacy.check_budget(exp.config.federation.rounds, run.examples)
    run.ledger = open_ledger(folder, exp, run.server, resume)
    folder.trim_metrics(run.ledger.rounds)
    if run.ledger.rounds == 0 and exp.config.eval.before and not any(r["round"] == 0 for r in folder.metrics()):
        folder.append_metrics({"round": 0, **evaluate(exp, generation=True, events=run.events)})
    return run.ledger


def finish_round(run: Run, update: Any, result: RoundResult, started: float,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Commit the update, evaluate when due, write the metrics row, then the ledger; returns the row.

    The ledger write is the round's commit point: a run killed before it has a
    metrics row past the ledger, which resume drops before redoing the round; a
    run killed after it has everything. ``started`` is the round's
    ``time.perf_counter()`` start; ``extra`` adds a runner's own columns to the row.
    """
    exp = run.exp
    run.server.commit(update)
    row = {**result.row(), **(extra or {})}
    if exp.privacy is not None:
        run.examples.update(result.examples)
        row.update(exp.privacy.spent(update.round, run.examples))
        del row["train_loss"]  # a mean of the clients' own losses, which nothing privatised
    final = update.round == exp.config.federation.rounds
    if update.round % exp.config.eval.every == 0 or final:
        sync_to_latest(run)
        row.update(evaluate(exp, generation=final, events=run.events))
    row["seconds"] = time.perf_counter() - started
    run.folder.append_metrics(row)
    assert run.ledger is not None, "begin() opens the ledger before any round"
    run.ledger.append(update)
    run.events.round_end(row)
    return row


def simulate(exp: Experiment, folder: RunFolder, resume: bool = False, stop_after: int | None = None,
             events: Events | None = None, uplink: Callable[[int], Uplink] | None = None) -> Ledger:
    """Run, or continue, the federated training of ``exp.config``; returns the ledger.

    ``stop_after`` ends the run after that round, as an interruption would.
    ``uplink`` gives each client's way of sending its reply (default: what
    ``[faults]`` installs, honest for every client when it names no adversary).
    """
    cfg = exp.config
    run = Run(exp, folder, exp.algorithm(), exp.algorithm(), events or Events())
    uplink = uplink or uplinks(cfg.faults, cfg.run.seed)
    ledger = begin(run, resume)
    last = cfg.federation.rounds if stop_after is None else min(stop_after, cfg.federation.rounds)
    for round in range(ledger.rounds + 1, last + 1):
        t0 = time.perf_counter()
        update, result = run_round(run, round, uplink)
        finish_round(run, update, result, t0)
    sync_to_latest(run)
    return ledger
