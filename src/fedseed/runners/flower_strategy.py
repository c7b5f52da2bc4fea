"""Any fedseed method as a Flower :class:`~flwr.serverapp.strategy.Strategy`, for a Flower user's own ServerApp.

::

    from flwr.serverapp import ServerApp
    from fedseed.runners.flower_strategy import FedSeedStrategy

    app = ServerApp()

    @app.main()
    def main(grid, context):
        FedSeedStrategy(context.run_config).start(grid)

with :func:`fedseed.runners.flower_client.train_handler` mounted as the ClientApp's
``train`` handler (and :func:`~fedseed.runners.flower_client.roll_call_handler` as
its ``query`` handler). The run-config is a fedseed config, as for ``flwr run flower``.

:meth:`FedSeedStrategy.start` runs fedseed's own round loop: roll calls, resends to
a node whose copy is stale, resyncs of a drifted copy, a grace period for a node
that vanished, none of which fit Flower's generic loop (``send_and_receive``, then
aggregate). The four hooks implement that generic loop too, so Flower's own
``Strategy.start`` works with this class: ``configure_train`` makes the round's
instructions, ``aggregate_train`` checks, aggregates and commits the replies (a
stale or drifted reply is then rejected for its round, with the reason). The
global model is the ledger, not an ``ArrayRecord``: ``arrays`` are ignored, and
what is returned is ``None`` with the round's metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result

from fedseed import wire
from fedseed.runners.flower_records import Instruction, RecordError, flower_bytes, instruction_message, read_answer
from fedseed.runners.flower_server import FlowerRound, Session
from fedseed.runners.simulation import Events, accept

METRICS = ("train_loss", "uplink_total", "downlink_total", "skipped_steps", "epsilon", "example_epsilon")


def _metrics(row: dict[str, Any]) -> MetricRecord:
    out: dict[str, Any] = {key: float(row[key]) for key in METRICS if key in row}
    out["accepted"] = float(len(row.get("accepted", [])))
    return MetricRecord(out)


class FedSeedStrategy(Strategy):
    """The fedseed experiment of ``run_config`` (a fedseed config as Flower run-config) as a Flower strategy."""

    def __init__(self, run_config: Mapping[str, Any], events: Events | None = None):
        self.run_config = dict(run_config)
        self.events = events
        self.session: Session | None = None
        self.round: tuple[FlowerRound, dict[int, Any], float] | None = None  # the open round, its tasks, its start

    def _session(self) -> Session:
        if self.session is None:
            self.session = Session(self.run_config, self.events)
        return self.session

    def summary(self) -> None:
        cfg = self._session().exp.config
        print(f"FedSeedStrategy: {cfg.algorithm.get('name', 'fedkseed')}, {cfg.federation.rounds} rounds of "
              f"{cfg.federation.clients_per_round} of {cfg.federation.num_clients} clients", flush=True)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Any = None) -> Result:
        """fedseed's round loop for every round the ledger does not hold yet (the arguments are Flower's, unused:
        rounds, timeouts and evaluation come from the run-config)."""
        session = self._session()
        result = Result()
        for round in session.rounds():
            row = session.train(grid, round)
            result.train_metrics_clientapp[round] = _metrics(row)
            evaluated: dict[str, Any] = {k: float(v) for k, v in row.items() if k in ("eval_loss", "rouge_l", "accuracy")}
            if evaluated:
                result.evaluate_metrics_serverapp[round] = MetricRecord(evaluated)
        print(session.report(), flush=True)
        return result

    # -- Flower's generic loop -----------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        session = self._session()
        session.roster.call(grid)
        rnd = session.open_round(grid, server_round)
        tasks: dict[int, Any] = {}
        messages = []
        for c in rnd.result.clients:
            node = session.roster.clients.get(c)
            if node is None:
                continue
            task = session.server.task(server_round, c, node.position)
            frame = wire.encode(task)
            order = Instruction(server_round, c, node.position, session.roster.run, session.exp.base_hash, frame)
            msg = instruction_message(order, node.node_id, session.settings.round_timeout)
            tasks[c] = task
            rnd.result.downlink[c] = len(frame)
            rnd.flower_down[c] = flower_bytes(msg)
            rnd.nodes[c] = node.node_id
            messages.append(msg)
        self.round = (rnd, tasks, time.perf_counter())
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.round is None or self.round[0].round != server_round:
            raise RecordError(f"aggregate_train for round {server_round}, but configure_train did not open it")
        rnd, tasks, started = self.round
        session = self._session()
        for msg in replies:
            if msg.has_error():
                continue  # its client is dropped below, with what is known of why
            try:
                answer = read_answer(msg)
            except RecordError:  # not a fedseed answer: its client is dropped below
                continue
            c = answer.client
            if c not in tasks or answer.round != server_round:
                continue
            rnd.flower_up[c] = flower_bytes(msg)
            if answer.stale:
                rnd.result.reject(c, f"its copy is at position {answer.position}, not where the task was made for "
                                     "(fedseed's own start() resends it)")
                continue
            reply = accept(rnd.checks, tasks[c], c, answer.frame)
            if reply is not None:
                rnd.replies[c] = reply
        update, result, extra = rnd.close()
        self.round = None
        return None, _metrics(session.close_round(update, result, started, extra))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Nothing: fedseed evaluates on the server, on its own held-out set (``data.eval_path``)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
