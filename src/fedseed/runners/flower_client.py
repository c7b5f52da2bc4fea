"""The node side of a Flower run: one instruction in, one answer out.

For each ``train`` instruction this module reads and validates the Flower record,
then hands it to the node's resident worker (:mod:`fedseed.runners.worker`) when
one listens on the node-config's ``worker`` socket, or does the work itself with
a fresh :class:`~fedseed.runners.node.Node` (model loaded for this message, the
copy's position kept in the node's cache folder) when none does. Either way the
answer is the encoded reply, with its loss and example count beside it as a
Flower ``MetricRecord``. A roll call (``query``) says which client the node is and
where its copy is, without loading a model.

:func:`train_handler` is the same thing for a Flower user's own ClientApp::

    app = ClientApp()
    app.train()(fedseed.runners.flower_client.train_handler)
"""

from __future__ import annotations

import json

from flwr.app import Context, Message

from fedseed.runners.flower_config import NodeSettings, node_settings
from fedseed.runners.flower_records import (
    Answer,
    Instruction,
    Presence,
    RecordError,
    answer_message,
    presence_message,
    read_instruction,
    read_roll_call,
)
from fedseed.runners.worker import TRAIN, WHERE, WorkerError, WorkRequest, ask


def _request(kind: int, context: Context, order: Instruction | None = None, run: str = "") -> WorkRequest:
    o = order or Instruction(1, 0, 0, run, "", b"")
    return WorkRequest(kind, json.dumps(dict(context.run_config)), json.dumps(dict(context.node_config)),
                       o.round, o.client, o.since, o.run, o.base, o.frame)


def _train(order: Instruction, context: Context, node: NodeSettings) -> Answer:
    from fedseed.runners.node import Node

    reply = ask(node.worker, _request(TRAIN, context, order))
    if reply is None:  # no worker: this process does the work
        return Node(resident=False).train(order, dict(context.run_config), node)
    if reply.error:
        raise WorkerError(f"the node's worker ({node.worker}) failed: {reply.error}")
    return Answer(order.round, order.client, reply.position, reply.frame, stale=bool(reply.stale), loss=reply.loss,
                  num_examples=reply.num_examples)


def train_handler(msg: Message, context: Context) -> Message:
    """Train this node's client on the instruction's task; answer with the encoded reply."""
    node = node_settings(context.node_config)
    order = read_instruction(msg)
    if order.client != node.client:
        raise RecordError(f"this node is client {node.client} (node-config partition-id), "
                          f"the instruction is for client {order.client}")
    return answer_message(_train(order, context, node), msg)


def roll_call_handler(msg: Message, context: Context) -> Message:
    """Say which client this node is and where its copy of the run is (no model is loaded)."""
    from fedseed.runners.node import Node

    node = node_settings(context.node_config)
    run = read_roll_call(msg)
    reply = ask(node.worker, _request(WHERE, context, run=run))
    position = reply.position if reply is not None and not reply.error else Node(resident=False).position(run, node)
    return presence_message(Presence(node.client, position), msg)
