"""The in-process runner (the embedded default): clients one after another, one model in memory.

It only moves messages. Every task and reply is really encoded, counted and
decoded, exactly as it would cross a network, and the server side and client
side are separate algorithm objects, so nothing reaches a client except through
a message. The round loop is written once; it knows nothing of the algorithm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fedseed import eval as evaluation
from fedseed import wire
from fedseed.algorithms import EVALUATOR, Algorithm, InvalidReply
from fedseed.experiment import Experiment, sample_clients
from fedseed.ledger import FORMAT, Ledger, LedgerError, LedgerHeader, canonical_json
from fedseed.runfolder import RunFolder


class Events:
    """Progress hooks; the runner calls them, the CLI draws them. The default draws nothing."""

    def round_start(self, round: int, clients: list[int]) -> None: ...
    def client_done(self, round: int, client: int) -> None: ...
    def round_end(self, row: dict[str, Any]) -> None: ...
    def phase(self, text: str, total: int = 0) -> None: ...
    def advance(self, n: int = 1) -> None: ...


@dataclass
class RoundResult:
    """What one round moved and measured."""

    round: int
    clients: list[int]
    uplink: dict[int, int] = field(default_factory=dict)  # encoded reply bytes per client
    downlink: dict[int, int] = field(default_factory=dict)  # encoded task bytes per client
    train_loss: float = 0.0
    skipped_steps: int = 0
    rejected: dict[int, str] = field(default_factory=dict)

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
            "rejected": {str(c): why for c, why in self.rejected.items()},
        }


def ledger_header(exp: Experiment, algo: Algorithm) -> LedgerHeader:
    cfg = exp.config
    params = {k: v for k, v in cfg.algorithm.items() if k != "name"}
    return LedgerHeader(FORMAT, algo.name, canonical_json(params), cfg.run.seed, cfg.model.name_or_path, exp.base_hash)


def open_ledger(folder: RunFolder, exp: Experiment, server: Algorithm, resume: bool) -> Ledger:
    """A new ledger, or the run's existing one replayed into ``server`` after checking it is this run's."""
    header = ledger_header(exp, server)
    if not resume:
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


def accept(server: Algorithm, task: Any, c: int, up: bytes, result: RoundResult) -> Any | None:
    """Decode and check client ``c``'s encoded reply; a rejected one is recorded with its reason, and None returned."""
    result.uplink[c] = len(up)
    try:
        reply = wire.decode(up, server.Reply)
        server.check(reply, task)
    except (wire.WireError, InvalidReply) as e:
        result.rejected[c] = str(e)
        return None
    result.skipped_steps += reply.skipped
    return reply


def close_round(server: Algorithm, round: int, replies: list[Any], result: RoundResult) -> Any:
    """The round's update from its accepted replies (arrival order does not matter)."""
    if not replies:
        raise InvalidReply(f"round {round}: every reply was rejected: {result.rejected}")
    result.train_loss = sum(r.loss for r in replies) / len(replies)
    return server.aggregate(round, replies)


def run_round(exp: Experiment, server: Algorithm, client: Algorithm, round: int, events: Events) -> tuple[Any, RoundResult]:
    """Tasks out, local training, replies back and checked, aggregation. Changes no server state."""
    fed = exp.config.federation
    result = RoundResult(round, sample_clients(exp.config.run.seed, round, fed.num_clients, fed.clients_per_round))
    events.round_start(round, result.clients)
    replies = []
    for c in result.clients:
        task = server.task(round, c, exp.model.position)
        down = wire.encode(task)
        result.downlink[c] = len(down)
        up = wire.encode(client.train(exp.model, exp.batches(round, c), wire.decode(down, client.Task)))
        reply = accept(server, task, c, up, result)
        if reply is not None:
            replies.append(reply)
            events.client_done(round, c)
    return close_round(server, round, replies, result), result


def sync_to_latest(exp: Experiment, server: Algorithm, client: Algorithm) -> None:
    """Bring the in-memory model to the latest global model, through an encoded message."""
    task = server.task(server.committed + 1, EVALUATOR, exp.model.position)
    client.sync(exp.model, wire.decode(wire.encode(task), client.Task))


def evaluate(exp: Experiment, generation: bool, events: Events) -> dict[str, float]:
    """Held-out loss, and (when asked) the generation metrics of the data set."""
    ev, module = exp.config.eval, exp.model.module
    held = exp.data.heldout
    if exp.data.classes:  # classification: cheap, so accuracy at every evaluation
        loss, acc = evaluation.classification_metrics(module, held[: ev.loss_examples], ev.batch_size, exp.pad_id)
        return {"eval_loss": loss, "accuracy": acc}
    out = {"eval_loss": evaluation.heldout_loss(module, held[: ev.loss_examples], ev.batch_size, exp.pad_id)}
    if generation:
        n = min(ev.generate_examples, len(held))
        events.phase("generating", n)
        preds = evaluation.generate(module, exp.tokenizer, held[:n], ev.max_new_tokens, ev.batch_size, events.advance)
        refs = exp.data.references[:n]
        out["rouge_l"] = evaluation.rouge_l(preds, refs)
        if exp.config.data.dataset == "gsm8k":
            out["gsm8k_accuracy"] = evaluation.gsm8k_accuracy(preds, refs)
    return out


def begin(exp: Experiment, folder: RunFolder, server: Algorithm, client: Algorithm, resume: bool,
          events: Events) -> Ledger:
    """Bind both algorithm objects to the model, open (or replay) the ledger, evaluate the base model on a fresh run."""
    server.bind(exp.model)
    client.bind(exp.model)
    ledger = open_ledger(folder, exp, server, resume)
    folder.trim_metrics(ledger.rounds)
    if ledger.rounds == 0 and exp.config.eval.before:
        folder.append_metrics({"round": 0, **evaluate(exp, generation=True, events=events)})
    return ledger


def finish_round(exp: Experiment, folder: RunFolder, ledger: Ledger, server: Algorithm, client: Algorithm, update: Any,
                 result: RoundResult, started: float, events: Events, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append the update to the ledger, commit it, evaluate when due, write the metrics row; returns the row.

    ``started`` is the round's ``time.perf_counter()`` start; ``extra`` adds a runner's own columns to the row.
    """
    ledger.append(update)
    server.commit(update)
    row = {**result.row(), **(extra or {})}
    final = update.round == exp.config.federation.rounds
    if update.round % exp.config.eval.every == 0 or final:
        sync_to_latest(exp, server, client)
        row.update(evaluate(exp, generation=final, events=events))
    row["seconds"] = time.perf_counter() - started
    folder.append_metrics(row)
    events.round_end(row)
    return row


def simulate(exp: Experiment, folder: RunFolder, resume: bool = False, stop_after: int | None = None,
             events: Events | None = None) -> Ledger:
    """Run, or continue, the federated training of ``exp.config``; returns the ledger.

    ``stop_after`` ends the run after that round, as an interruption would.
    """
    events = events or Events()
    cfg = exp.config
    server, client = exp.algorithm(), exp.algorithm()
    ledger = begin(exp, folder, server, client, resume, events)
    last = cfg.federation.rounds if stop_after is None else min(stop_after, cfg.federation.rounds)
    for round in range(ledger.rounds + 1, last + 1):
        t0 = time.perf_counter()
        update, result = run_round(exp, server, client, round, events)
        finish_round(exp, folder, ledger, server, client, update, result, t0, events)
    sync_to_latest(exp, server, client)
    return ledger
