"""What the dense baselines (FedAvg, FedIT, FedZO) share: weights and deltas as one flat array.

The baselines differ only in how a client moves its weights during a round
(first-order steps on the whole model, first-order steps on LoRA adapters,
zeroth-order steps on the whole model). Everything around that is the same and
lives here, in :class:`DenseAlgorithm`:

* the downlink is the current global weights, every trainable tensor, as one
  float32 array in ``model.trainable`` order: what a FedAvg client really needs
  to hold the global model, whatever it held before;
* the uplink is the client's dense delta ``w_end - w_start`` in the same layout;
* the server averages deltas weighted by ``num_examples`` and keeps the global
  weights as ``w0 + delta_1 + delta_2 + ...``, added in float32 in round order,
  so a ledger replay reproduces the live weights bit for bit.

This module knows nothing of optimisers, adapters or directions.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedseed.algorithms.base import Algorithm, Batches, BaseReply, require
from fedseed.algorithms.robust import RobustSection, clip_norms, clip_values, combine, whole_rows
from fedseed.privacy import Plan
from fedseed.models import DIRTY, LocalModel
from fedseed import wire
from fedseed.wire import F32Array, U32, U64, message



@message(40)
@dataclass(frozen=True)
class DenseTask:
    """Server -> client: the whole current global model (its trainable tensors)."""

    round: U32
    client: U32
    weights: F32Array  # (numel,) every trainable tensor, flattened, in ``model.trainable`` order


@message(41)
@dataclass(frozen=True)
class DenseReply(BaseReply):
    """Client -> server: how local training moved the weights."""

    delta: F32Array  # (numel,) w_end - w_start, same layout as the task's weights
    fingerprint: U64 = 0


@message(42)
@dataclass(frozen=True)
class DenseUpdate:
    """One round in the ledger: the example-weighted mean of the clients' deltas."""

    round: U32
    delta: F32Array  # (numel,) added to the global weights in float32


def task_bytes(numel: int) -> int:
    """Encoded size of a :class:`DenseTask`: the whole model in float32."""
    return wire.frame_size(DenseTask, weights=numel)


def reply_bytes(numel: int) -> int:
    """Encoded size of a :class:`DenseReply`: the whole delta in float32."""
    return wire.frame_size(DenseReply, delta=numel)


def update_bytes(numel: int) -> int:
    """Encoded size of a :class:`DenseUpdate` (one ledger record's frame)."""
    return wire.frame_size(DenseUpdate, delta=numel)


def flatten(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """The tensors concatenated into one float32 array (a copy), shape (sum of numel,)."""
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors]).numpy()


def split_like(flat: np.ndarray, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` as float32 CPU views shaped like ``tensors`` (no copy)."""
    numel = sum(t.numel() for t in tensors)
    if flat.size != numel:
        raise ValueError(f"{flat.size} values for {numel} trainable elements")
    source = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    bounds = np.cumsum([0] + [t.numel() for t in tensors])
    return [source[a:b].view(t.shape) for a, b, t in zip(bounds[:-1], bounds[1:], tensors)]


@torch.no_grad()
def unflatten_(tensors: Sequence[torch.Tensor], flat: np.ndarray) -> None:
    """Copy ``flat`` back into the tensors, in order (cast to each tensor's dtype and device)."""
    for t, values in zip(tensors, split_like(flat, tensors)):
        t.copy_(values)


@dataclass
class LocalRun:
    """What a client's local steps measured (the weights themselves are read off the model)."""

    steps: int
    skipped: int
    losses: list[float]


class DenseAlgorithm(Algorithm):
    """Server and client hooks shared by the baselines; subclasses write :meth:`local_steps`.

    The server must be bound to a model (:meth:`bind`) before anything else, because
    its state is the global weights, which start at the model's ``w0``.
    """

    Task, Reply, Update = DenseTask, DenseReply, DenseUpdate

    def __init__(self, config: Any, seed: int, robust: RobustSection | None = None,
                 privacy: Plan | None = None):
        super().__init__(config, seed, robust, privacy)
        self.max_steps = config.local_steps
        self.weights: np.ndarray | None = None  # (numel,) float32 global weights, w0 + committed deltas

    def bind(self, model: LocalModel) -> None:
        """Capture ``w0``, the trainable tensors of the freshly loaded model, as the server's float32 weights."""
        if self.committed:
            raise RuntimeError(f"{self.name}: bind() must come before any commit (committed {self.committed})")
        if model.position != 0:
            raise RuntimeError(f"{self.name}: bind() needs the model as loaded, it is at position {model.position}")
        self.weights = flatten([p for _, p in model.trainable])

    def _global(self) -> np.ndarray:
        if self.weights is None:
            raise RuntimeError(f"{self.name}: call bind(model) before the server hooks")
        return self.weights

    # -- server ------------------------------------------------------------------
    def task(self, round: int, client: int, since: int = 0) -> DenseTask:
        """The full global weights; ``since`` is ignored: a dense downlink does not depend on it."""
        return DenseTask(round, client, self._global().copy())

    def check(self, reply: DenseReply, task: DenseTask) -> None:
        numel = self._global().size
        self.check_reply(reply, task, self.max_steps)
        require(reply.delta.size == numel, f"`delta` has {reply.delta.size} values, the model has {numel}")
        require(bool(np.isfinite(reply.delta).all()), "`delta` holds non-finite values")

    def aggregate(self, round: int, replies: Sequence[DenseReply]) -> DenseUpdate:
        rob, noise = self.robust, self.client_noise
        ordered, weights = self.weighted(round, replies)
        if noise is not None:  # the whole delta is one row under one id
            whole = np.zeros(1, dtype=np.int64)
            rows = noise.aggregate(round, [whole] * len(ordered), [r.delta[None, :] for r in ordered], whole)
            return DenseUpdate(round, rows[0].astype(np.float32))
        deltas = whole_rows(clip_values([r.delta for r in ordered], rob.value_clip))
        _, rows = combine(clip_norms(deltas, rob.norm_clip), weights, rob.rule, rob.trim)
        return DenseUpdate(round, rows[0].astype(np.float32))

    def commit(self, update: DenseUpdate) -> None:
        self.expect_next(update)
        weights = self._global()
        n = weights.size
        require(update.delta.size == n, f"update has {update.delta.size} values, the model has {n}")
        require(bool(np.isfinite(update.delta).all()), "update holds non-finite values")
        weights += update.delta.astype(np.float32, copy=False)  # float32, round order: identical on replay
        self.committed = update.round

    # -- client ------------------------------------------------------------------
    def sync(self, model: LocalModel, task: DenseTask) -> None:
        """Set the trainable tensors to the task's weights (a copy: cheaper than any check)."""
        if task.weights.size != model.numel:
            raise ValueError(
                f"{self.name}: the task carries {task.weights.size} weights but the model has {model.numel} "
                "trainable elements; was bind(model) called on this model?"
            )
        unflatten_([p for _, p in model.trainable], task.weights)
        model.position = task.round - 1

    def train(self, model: LocalModel, batches: Batches, task: DenseTask) -> DenseReply:
        self.sync(model, task)
        tensors = [p for _, p in model.trainable]
        start = flatten(tensors)  # not task.weights: in bf16 the synced copy is rounded
        fingerprint = self.fingerprint(model, task)
        model.position = DIRTY
        run = self.local_steps(model, batches, task)
        delta = flatten(tensors) - start
        if not np.isfinite(delta).all():
            raise FloatingPointError(f"{self.name}: local training diverged (non-finite weights); lower `algorithm.lr`")
        loss = float(np.mean(run.losses)) if run.losses else 0.0
        return DenseReply(task.round, task.client, batches.num_examples, run.steps, run.skipped, loss, delta,
                          fingerprint)

    @abstractmethod
    def local_steps(self, model: LocalModel, batches: Batches, task: DenseTask) -> LocalRun:
        """Move ``model``'s trainable tensors in place for one round of local training."""
