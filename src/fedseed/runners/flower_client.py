"""The node side of a Flower run: one instruction in, one answer out, the node's copy cached on disk between.

Flower starts a fresh ClientApp process for every message, so nothing of a node
lives in memory from one round to the next. For each instruction this module
reads and validates the Flower record, decodes the task with the wire codec
(which validates every field) and checks that both agree, all before any model
is loaded; then loads the base model from the node's own path, restores the
cached copy when the task continues from it, trains with the algorithm's own
``train``, caches the copy again when it sits at a ledger position, and answers
with the encoded reply.

The cache is one safetensors file in the node's ``cache-dir``: the trainable
tensors of a copy synced to a ledger position, tagged with the run and the
position. Methods that rebuild from ``w0`` every round (FedKSeed: at most K
directions) leave nothing to cache; methods that replay rounds (Ferret) catch up
from the cached position instead of from the base. The weights themselves never
cross the network for the seed methods: a node only ever loads its local base.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedseed.runners.flower_config import node_settings
from fedseed.runners.flower_records import (
    Answer,
    Presence,
    RecordError,
    answer_message,
    presence_message,
    read_instruction,
    read_roll_call,
)

CACHE_FILE = "fedseed-copy.safetensors"


class NodeCache:
    """A node's synced copy on disk, for one run at a time."""

    def __init__(self, folder: Path):
        self.path = folder / CACHE_FILE

    def _metadata(self) -> dict[str, str]:
        """The safetensors header's ``__metadata__``, read without loading a tensor (or torch)."""
        try:
            with open(self.path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                return json.loads(f.read(size)).get("__metadata__", {})
        except (OSError, ValueError, struct.error):
            return {}

    def position(self, run: str) -> int:
        """Ledger position of the cached copy of ``run``; 0 (the base weights) when there is none."""
        meta = self._metadata()
        if meta.get("run") != run or not meta.get("position", "").isdigit():
            return 0
        return int(meta["position"])

    def restore(self, model: Any, run: str) -> None:
        """Load the cached copy of ``run`` into ``model.trainable`` and set ``model.position``."""
        import torch
        from safetensors.torch import load_file

        position = self.position(run)
        tensors = load_file(self.path)
        names = [name for name, _ in model.trainable]
        if sorted(tensors) != sorted(names):
            raise ValueError(f"{self.path} holds other tensors than this model's trainable ones; delete it")
        with torch.no_grad():
            for name, p in model.trainable:
                if tensors[name].shape != p.shape or tensors[name].dtype != p.dtype:
                    raise ValueError(f"{self.path}: `{name}` is {tuple(tensors[name].shape)} {tensors[name].dtype}, "
                                     f"the model's is {tuple(p.shape)} {p.dtype}; delete it")
                p.copy_(tensors[name])
        model.position = position

    def store(self, model: Any, run: str) -> int:
        """Cache ``model`` when it holds a ledger position past the base; returns the position the node now has."""
        from safetensors.torch import save_file

        if model.position < 1:  # base weights (nothing to keep) or changed locally (DIRTY: not a global model)
            self.path.unlink(missing_ok=True)
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        tensors = {name: p.detach().cpu().contiguous() for name, p in model.trainable}
        save_file(tensors, partial, metadata={"run": run, "position": str(model.position)})
        os.replace(partial, self.path)  # a crash mid-write leaves the previous copy, never a torn one
        return model.position


_DATA: dict[str, Any] = {}  # the last prepared data of this process (a Ray actor serves many messages)


def _experiment(cfg: Any) -> Any:
    """The base model from the node's own path, and the data prepared exactly as the in-process runner does."""
    from fedseed.experiment import Experiment, load, prepare_data
    from fedseed.ledger import canonical_json
    from fedseed.models import LocalModel, content_hash

    module, tokenizer = load(cfg)
    key = canonical_json({"data": cfg.to_dict()["data"], "model": cfg.to_dict()["model"], "seed": cfg.run.seed,
                          "clients": cfg.federation.num_clients})  # all prepare_data reads
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = prepare_data(cfg, tokenizer)
    return Experiment(cfg, LocalModel.wrap(module, cfg.model.name_or_path), tokenizer, _DATA[key], content_hash(module))


def handle_train(msg: Message, context: Context) -> Message:
    """Train this node's client on the instruction's task; answer with the encoded reply."""
    from fedseed import wire
    from fedseed.algorithms import build_algorithm
    from fedseed.models import ModelError
    from fedseed.runners.flower_config import from_run_config

    node = node_settings(context.node_config)
    order = read_instruction(msg)
    if order.client != node.client:
        raise RecordError(f"this node is client {node.client} (node-config partition-id), "
                          f"the instruction is for client {order.client}")
    cfg, _ = from_run_config(context.run_config, node.overrides)
    algo = build_algorithm(cfg.algorithm, cfg.run.seed, cfg.robust)
    task = wire.decode(order.frame, algo.Task)  # every field validated before anything touches a model
    if (task.round, task.client) != (order.round, order.client):
        raise RecordError(f"the task is for round {task.round} client {task.client}, its record says round "
                          f"{order.round} client {order.client}")
    cache = NodeCache(node.cache_dir)
    held = cache.position(order.run)
    if order.since and held != order.since:
        return answer_message(Answer(order.round, order.client, held, b"", stale=True), msg)
    exp = _experiment(cfg)
    if exp.base_hash != order.base:
        raise ModelError(f"this node's base model {cfg.model.name_or_path!r} has content hash {exp.base_hash[:16]}..., "
                         f"the server's has {order.base[:16]}...; point node-config `model.name_or_path` at the "
                         "same weights")
    algo.bind(exp.model)
    if order.since:
        cache.restore(exp.model, order.run)
    reply = algo.train(exp.model, exp.batches(order.round, order.client), task)
    position = cache.store(exp.model, order.run)
    return answer_message(Answer(order.round, order.client, position, wire.encode(reply)), msg)


def handle_roll_call(msg: Message, context: Context) -> Message:
    """Say which client this node is and where its cached copy of the run is (no model is loaded)."""
    node = node_settings(context.node_config)
    run = read_roll_call(msg)
    return presence_message(Presence(node.client, NodeCache(node.cache_dir).position(run)), msg)
