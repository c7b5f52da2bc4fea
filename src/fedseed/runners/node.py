"""What a deployed node holds and does: its own data, its model, and where its copy of the run is.

A node is one data owner: one SuperNode, training one fedseed client on the data
its node-config names (``data.path``: a file or folder any loader reads, or a Hub
id) and nothing else. :class:`Node` answers the server's two questions, "where is
your copy of this run?" (:meth:`Node.position`) and "train this round"
(:meth:`Node.train`), from the model, tokenizer, tokenised data and synced copy it
keeps in memory.

Flower 1.41 runs a fresh ClientApp process per message, so a Node living there
would load everything again every round. The resident worker
(:mod:`fedseed.runners.worker`) keeps one Node alive beside the SuperNode for the
whole run; without a worker the ClientApp builds a Node per message, and the
copy's position survives between messages in :class:`NodeCache` on disk. Both
paths answer the same: a node whose copy is not where the server thinks says so
("stale") and gets the task again for its real position.

A node-config without ``data.path`` is a simulation (Flower's Ray engine): the
node partitions the run-config's data set as the in-process runner does and keeps
its own part; a deployment names ``data.path`` on every node.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedseed.memory import release_freed_memory
from fedseed.runners.flower_config import NodeSettings, from_run_config
from fedseed.runners.flower_records import Answer, Instruction, RecordError

CACHE_FILE = "fedseed-copy.safetensors"


class NodeCache:
    """A node's synced copy on disk, for one run at a time (the worker-less path)."""

    def __init__(self, folder: Path):
        self.path = folder / CACHE_FILE

    def position(self, run: str) -> int:
        """Ledger position of the cached copy of ``run``; 0 (the base weights) when there is none."""
        from safetensors import safe_open

        try:
            with safe_open(self.path, "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # missing, torn or not a safetensors file: nothing cached
            return 0
        if meta.get("run") != run or not meta.get("position", "").isdigit():
            return 0
        return int(meta["position"])

    def restore(self, model: Any, run: str) -> None:
        """Load the cached copy of ``run`` into ``model.trainable`` and set ``model.position``."""
        import torch
        from safetensors import safe_open

        position = self.position(run)
        names = [name for name, _ in model.trainable]
        with safe_open(self.path, "pt") as f:
            if sorted(f.keys()) != sorted(names):
                raise ValueError(f"{self.path} holds other tensors than this model's trainable ones; delete it")
            with torch.no_grad():
                for name, p in model.trainable:
                    t = f.get_tensor(name)
                    if t.shape != p.shape or t.dtype != p.dtype:
                        raise ValueError(f"{self.path}: `{name}` is {tuple(t.shape)} {t.dtype}, the model's is "
                                         f"{tuple(p.shape)} {p.dtype}; delete it")
                    p.copy_(t)
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


class Node:
    """One client's side of a deployment; ``resident`` (the worker) keeps its copy in memory, else on disk."""

    def __init__(self, resident: bool):
        self.resident = resident
        self.exp: Any = None  # the Experiment of the run being served
        self.algo: Any = None  # its client-side algorithm, bound to the model once
        self.key: str | None = None  # what that experiment was built from
        self.run: str | None = None  # the run the in-memory copy belongs to

    def position(self, run: str, node: NodeSettings) -> int:
        """Where this node's copy of ``run`` is: the resident copy, or the disk cache."""
        if self.resident:
            return self.exp.model.position if self.exp is not None and self.run == run and \
                self.exp.model.position > 0 else 0
        return NodeCache(node.cache_dir).position(run)

    def experiment(self, cfg: Any, node: NodeSettings) -> tuple[Any, Any]:
        """The run's model, this node's data and the bound algorithm, built once per experiment."""
        from fedseed.experiment import Experiment, load, node_data, prepare_data
        from fedseed.ledger import canonical_json
        from fedseed.models import LocalModel, content_hash

        key = canonical_json({**cfg.to_dict(), "client": node.client, "own": node.own_data,
                              "eval": None, "federation": None if node.own_data else cfg.to_dict()["federation"]})
        if self.key != key:
            self.exp = self.algo = self.key = self.run = None  # drop the old model before loading the new one
            module, tokenizer = load(cfg)
            data = node_data(cfg, tokenizer, node.client) if node.own_data else prepare_data(cfg, tokenizer)
            model = LocalModel.wrap(module, cfg.model.name_or_path, cache_dir=node.cache_dir)
            self.exp = Experiment(cfg, model, tokenizer, data, content_hash(module))
            self.algo = self.exp.algorithm()
            self.algo.bind(self.exp.model)  # e.g. FedIT's adapters, once per model
            self.key = key
        return self.exp, self.algo

    def train(self, order: Instruction, run_config: Mapping[str, Any], node: NodeSettings) -> Answer:
        """Train this node's client on the instruction's task; the answer carries the encoded reply."""
        from fedseed import wire
        from fedseed.models import DIRTY, ModelError

        if order.client != node.client:
            raise RecordError(f"this node is client {node.client} (node-config partition-id), "
                              f"the instruction is for client {order.client}")
        cfg, _ = from_run_config(run_config, node.overrides)
        task: Any = wire.decode(order.frame, task_type(cfg))  # every field validated before anything touches a model
        if (task.round, task.client) != (order.round, order.client):
            raise RecordError(f"the task is for round {task.round} client {task.client}, its record says round "
                              f"{order.round} client {order.client}")
        held = self.position(order.run, node)
        if order.since and held != order.since:
            return Answer(order.round, order.client, held, b"", stale=True)
        exp, algo = self.experiment(cfg, node)
        if exp.base_hash != order.base:
            raise ModelError(f"this node's base model {cfg.model.name_or_path!r} has content hash "
                             f"{exp.base_hash[:16]}..., the server's has {order.base[:16]}...; point node-config "
                             "`model.name_or_path` at the same weights")
        if self.run != order.run:  # another run's copy, or none yet: the task starts from what `since` says
            exp.model.position = 0 if not self.resident or exp.model.position == 0 else DIRTY
            self.run = order.run
        if order.since and not self.resident:
            NodeCache(node.cache_dir).restore(exp.model, order.run)
        elif not order.since and exp.model.position > 0:
            exp.model.position = DIRTY  # the server asks for a rebuild from the base (since = 0)
        release_freed_memory()  # what the last round left free in the heap
        reply = algo.train(exp.model, exp.batches(order.round, order.client), task)
        if self.resident:
            position = max(exp.model.position, 0)
        else:
            position = NodeCache(node.cache_dir).store(exp.model, order.run)
        return Answer(order.round, order.client, position, wire.encode(reply), loss=float(reply.loss),
                      num_examples=int(reply.num_examples))


def task_type(cfg: Any) -> type:
    """The task message type of the config's method (known before any model is loaded)."""
    from fedseed.algorithms import METHODS

    return METHODS[cfg.algorithm.get("name", "fedkseed")][2].Task
