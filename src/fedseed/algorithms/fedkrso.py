"""FedKRSO: local training inside random low-rank subspaces drawn from K server seeds.

For every weight matrix ``W`` (``m x n``) the seed ``k`` of a pool of K defines a
projection ``P_k`` (``r x n``, entries ``N(0, 1/r)``, so ``E[P^T P] = I``). A client
trains in one subspace at a time: for ``interval`` steps it holds ``W`` fixed and
trains the accumulator ``B`` (``m x r``, starting at 0) of ``W + B P_k``. The
gradient with respect to ``B`` is ``grad_W P_k^T``; it is computed through forward
hooks, ``y = x W^T + (x P_k^T) B^T``, so autograd never forms ``grad_W``, and the
optimizer state is ``m x r`` per matrix, never the size of ``W``. At the end of the
interval ``W += B P_k`` and ``B`` is added to the client's accumulator for seed
``k``. The client sends, for each seed it used, the summed ``B_k`` of every matrix.

The server averages the ``B_k`` (weighted by examples) and the global model is
linear in them, ``W = W0 + sum_k T_k P_k`` with ``T_k`` the running total of seed
``k``'s averaged accumulators. So catch-up is bounded like FedKSeed's: a task
carries the totals of the touched seeds and every party rebuilds each matrix from
``W0`` with at most K projections, whatever rounds it missed, bit for bit the same.

Which tensors train: every trainable 2-D weight of an ``nn.Linear`` or
``nn.Embedding`` (an embedding row lookup ``(W + B P)[ids] = W[ids] + B[ids] P``;
a tied output layer shares its embedding's ``B`` and ``P``). Everything else --
norm weights, biases, 2-D tensors used by other layer types -- stays at ``W0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedseed.algorithms.base import OPTIMIZERS, Algorithm, Batches, BaseReply, make_optimizer, require
from fedseed.algorithms.robust import Contribution, RobustSection, clip_norms, clip_values, combine
from fedseed.directions import derive_seed, random_matrix
from fedseed.models import DIRTY, LocalModel, checkpointed_layers
from fedseed.settings import check_choices, require_positive, setting
from fedseed.wire import F32Array, U32, U64, UIntArray, message

POOL_TAG = 0xC750
STEP_TAG = 0xC751


@dataclass(frozen=True)
class FedKRSOConfig:
    """Hyperparameters of FedKRSO (tuned on stories260K; the paper fixes only ``E[P^T P] = I``)."""

    num_seeds: int = setting(8, "K: the server's pool of subspace seeds")
    rank: int = setting(4, "r: rows of every projection P (columns of every accumulator B)")
    interval: int = setting(10, "local steps spent in one subspace before drawing the next seed")
    local_steps: int = setting(20, "steps per client per round")
    lr: float = setting(2e-3, "local learning rate of the accumulators")
    optimizer: str = setting("adam", "local optimiser of the accumulators (state is m x r per matrix either way)",
                             OPTIMIZERS)

    def __post_init__(self) -> None:
        require_positive(self, "algorithm", "num_seeds", "rank", "interval", "local_steps", "lr")
        check_choices(self, "algorithm")

    @property
    def intervals(self) -> int:
        """Subspaces per client per round: the most seeds one reply can name."""
        return -(-self.local_steps // self.interval)


# -- wire messages -------------------------------------------------------------------


def _check_per_seed(seed_ids: np.ndarray, values: np.ndarray) -> None:
    """``values`` is one equal-sized chunk per seed id; ids strictly increasing."""
    if seed_ids.size > 1 and not (np.diff(seed_ids) > 0).all():
        raise ValueError("seed_ids must be strictly increasing")
    if seed_ids.size == 0 and values.size:
        raise ValueError(f"{values.size} values but no seed_ids")
    if seed_ids.size and values.size % seed_ids.size:
        raise ValueError(f"{values.size} values do not split into {seed_ids.size} per-seed chunks")


@message(30)
@dataclass(frozen=True)
class SubspaceTask:
    """Server -> client: the global model as per-seed accumulator totals ``T_k``.

    Empty when the client's copy already holds round ``round - 1`` (``since`` says so).
    """

    round: U32
    client: U32
    since: U32  # the ledger position the task was made for
    seed_ids: UIntArray  # (t,) touched pool indices, ascending
    totals: F32Array  # (t * S,) per seed: T_k of every matrix, (m, r) row-major, in layout order

    def validate(self) -> None:
        _check_per_seed(self.seed_ids, self.totals)


@message(31)
@dataclass(frozen=True)
class SubspaceReply(BaseReply):
    """Client -> server: for each seed used, the summed accumulators ``B_k`` of every matrix."""

    seed_ids: UIntArray  # (u,) pool indices used, ascending
    values: F32Array  # (u * S,) per seed: B_k of every matrix, (m, r) row-major, in layout order
    fingerprint: U64 = 0

    def validate(self) -> None:
        super().validate()
        if self.seed_ids.size == 0:
            raise ValueError("a reply names at least one seed")
        _check_per_seed(self.seed_ids, self.values)


@message(32)
@dataclass(frozen=True)
class SubspaceUpdate:
    """One round in the ledger: the example-weighted mean accumulator of every seed used."""

    round: U32
    seed_ids: UIntArray  # (U,) ascending
    values: F32Array  # (U * S,) added to the totals T_k

    def validate(self) -> None:
        if self.seed_ids.size == 0:
            raise ValueError("an update names at least one seed")
        _check_per_seed(self.seed_ids, self.values)


# -- matrices, projections and one subspace ------------------------------------------


@dataclass(frozen=True, eq=False)  # identity, not tensor comparison
class Matrix:
    """A trainable weight matrix and the layers that read it."""

    index: int  # position in model.trainable
    name: str
    weight: nn.Parameter  # (m, n)
    layers: tuple[nn.Module, ...]  # nn.Linear / nn.Embedding modules whose weight it is

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def cols(self) -> int:
        return self.weight.shape[1]


def matrices(model: LocalModel) -> list[Matrix]:
    """The trainable 2-D weights of Linear and Embedding layers, in ``model.trainable`` order."""
    layers: dict[int, list[nn.Module]] = {}
    for module in model.module.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            layers.setdefault(id(module.weight), []).append(module)
    return [
        Matrix(i, name, p, tuple(layers[id(p)]))
        for i, (name, p) in enumerate(model.trainable)
        if p.dim() == 2 and id(p) in layers
    ]


def chunk_size(mats: Sequence[Matrix], rank: int) -> int:
    """``S = r * sum_j m_j``: floats per seed in a reply, an update or a task."""
    return rank * sum(m.rows for m in mats)


def projection(seed: int, name: str, rank: int, cols: int) -> torch.Tensor:
    """``P`` (r x n) with entries ``N(0, 1/r)``: ``E[P^T P] = I`` (up to the generator's ``rho = 1 - 5.5e-7``)."""
    return random_matrix(seed, name, (rank, cols), "gaussian") / math.sqrt(rank)


def _linear_hook(b: torch.Tensor, p: torch.Tensor) -> Callable:
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        low = F.linear(args[0].to(p.dtype), p)  # (..., r) = x P^T
        return out.add_(F.linear(low, b).to(out.dtype))  # (..., m) += (x P^T) B^T; linear saves no output

    return hook


def _embedding_hook(b: torch.Tensor, p: torch.Tensor) -> Callable:
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(args[0], b, padding_idx=getattr(module, "padding_idx", None))  # (..., r) = B[ids]
        return out.add_((rows @ p).to(out.dtype))  # (..., n) += B[ids] P; embedding saves no output

    return hook


class Subspace:
    """One interval of local training: every matrix trained as ``W + B P`` through ``B`` alone.

    Holds the projections ``P`` (r x n) of one seed, the accumulators ``B`` (m x r,
    starting at 0) and an optimizer over the accumulators only.
    """

    def __init__(self, mats: Sequence[Matrix], seed: int, config: FedKRSOConfig):
        self.mats = list(mats)
        self.projections = [projection(seed, m.name, config.rank, m.cols).to(m.weight.device) for m in mats]
        self.accumulators = [
            torch.zeros(m.rows, config.rank, device=m.weight.device, requires_grad=True) for m in mats
        ]
        self.optimizer = make_optimizer(self.accumulators, config.optimizer, config.lr)

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Forward hooks that add ``B P`` to every matrix's layers, removed on exit."""
        handles = []
        for mat, b, p in zip(self.mats, self.accumulators, self.projections):
            for layer in mat.layers:
                hook = _embedding_hook(b, p) if isinstance(layer, nn.Embedding) else _linear_hook(b, p)
                handles.append(layer.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def step(self, model: LocalModel, batch: dict[str, torch.Tensor]) -> float | None:
        """One optimizer step on the accumulators; the loss, or None when it or a gradient is not finite."""
        with torch.enable_grad(), self.attached(), checkpointed_layers(model.module):
            loss = model.loss(batch)
            if not torch.isfinite(loss):
                return None
            grads = torch.autograd.grad(loss, self.accumulators)  # (m, r) each; grad_W is never formed
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return None
        for b, g in zip(self.accumulators, grads):
            b.grad = g
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def fold_(self) -> list[torch.Tensor]:
        """``W += B P`` for every matrix; returns the accumulators (m x r, detached)."""
        for mat, b, p in zip(self.mats, self.accumulators, self.projections):
            mat.weight.add_((b @ p).to(mat.weight.dtype))  # (m, r) @ (r, n)
        return [b.detach() for b in self.accumulators]


# -- the algorithm -------------------------------------------------------------------


class FedKRSO(Algorithm):
    """FedKRSO: subspace-accumulator training over a fixed pool of K projection seeds."""

    # fedseed compare's setting: the paper fixes only E[P^T P] = I; K, r, interval and lr tuned here.
    compare: ClassVar[dict[str, Any]] = {"num_seeds": 8, "rank": 4, "interval": 10, "local_steps": 20, "lr": 2e-3}

    name = "fedkrso"
    Task, Reply, Update = SubspaceTask, SubspaceReply, SubspaceUpdate

    def __init__(self, config: FedKRSOConfig, seed: int, robust: RobustSection | None = None):
        super().__init__(config, seed, robust)
        self.pool = [derive_seed(seed, POOL_TAG, k) for k in range(config.num_seeds)]
        self.totals: dict[int, np.ndarray] = {}  # seed index -> (S,) float64 T_k, summed in round order
        self.chunk: int | None = None  # S, set by bind

    def bind(self, model: LocalModel) -> None:
        """Fix ``S``, the per-seed size of the model's accumulators (the server checks replies against it)."""
        self.chunk = self._chunk(model)

    def _chunk(self, model: LocalModel) -> int:
        mats = matrices(model)
        if not mats:
            raise ValueError("fedkrso: the model has no trainable 2-D weight of a Linear or Embedding layer")
        return chunk_size(mats, self.config.rank)

    def _bound_chunk(self) -> int:
        if self.chunk is None:
            raise RuntimeError("fedkrso: call bind(model) before the server hooks")
        return self.chunk

    # -- server ------------------------------------------------------------------
    def task(self, round: int, client: int, since: int = 0) -> SubspaceTask:
        """The touched seeds' totals; nothing when the client's copy is already at ``round - 1``."""
        ids = sorted(self.totals) if since != round - 1 else []
        totals = np.concatenate([self.totals[k] for k in ids]) if ids else np.zeros(0)
        return SubspaceTask(round, client, max(since, 0), np.array(ids, dtype=np.int64), totals.astype(np.float32))

    def check(self, reply: SubspaceReply, task: SubspaceTask) -> None:
        cfg, chunk = self.config, self._bound_chunk()
        self.check_reply(reply, task, cfg.local_steps)
        most = min(cfg.num_seeds, cfg.intervals)
        used = reply.seed_ids.size
        require(used <= most, f"`seed_ids` names {used} seeds, at most {most} fit a round")
        bad = reply.seed_ids[reply.seed_ids >= cfg.num_seeds]
        require(bad.size == 0, f"`seed_ids` holds {bad[:3].tolist()}, outside the pool of {cfg.num_seeds} seeds")
        expected = reply.seed_ids.size * chunk
        require(reply.values.size == expected,
                f"`values` has {reply.values.size} floats, {reply.seed_ids.size} seeds x {chunk} expected")
        require(bool(np.isfinite(reply.values).all()), "`values` holds non-finite values")

    def aggregate(self, round: int, replies: Sequence[SubspaceReply]) -> SubspaceUpdate:
        """Per seed, the accumulators of the clients that used it, through the robust pipeline."""
        chunk, rob = self._bound_chunk(), self.robust
        ordered, weights = self.weighted(round, replies)
        values = clip_values([r.values for r in ordered], rob.value_clip)
        contributions = [Contribution(r.seed_ids, v.reshape(r.seed_ids.size, chunk)) for r, v in zip(ordered, values)]
        ids, rows = combine(clip_norms(contributions, rob.norm_clip), weights, rob.rule, rob.trim)
        return SubspaceUpdate(round, ids, rows.reshape(-1).astype(np.float32))  # (U * S,)

    def commit(self, update: SubspaceUpdate) -> None:
        self.expect_next(update)
        chunk = self._bound_chunk()
        require(bool((update.seed_ids < self.config.num_seeds).all()), "update names a seed outside the pool")
        require(update.values.size == update.seed_ids.size * chunk,
                f"update has {update.values.size} floats, {update.seed_ids.size} seeds x {chunk} expected")
        for k, b in zip(update.seed_ids.tolist(), update.values.reshape(-1, chunk)):
            self.totals.setdefault(k, np.zeros(chunk))
            self.totals[k] += b
        self.committed = update.round

    # -- client ------------------------------------------------------------------
    @torch.no_grad()
    def sync(self, model: LocalModel, task: SubspaceTask) -> None:
        """Rebuild every trainable tensor as ``W0 + sum_k T_k P_k`` (matrices) or ``W0`` (the rest)."""
        target = task.round - 1
        if model.position == target:
            return
        if task.since == target and target > 0:  # at round 0 the empty task *is* the global model
            raise ValueError(
                f"fedkrso: the task carries nothing because it was made for a copy at round {target}, "
                f"but this model is at position {model.position}; ask for a task with since={model.position}"
            )
        mats, chunk = matrices(model), self._chunk(model)
        if task.totals.size != task.seed_ids.size * chunk:
            raise ValueError(f"fedkrso: the task has {task.totals.size} floats, {task.seed_ids.size} seeds x {chunk} "
                             "for this model; was it made for another model or rank?")
        model.reset_()
        if not task.seed_ids.size:
            model.position = target
            return
        per_seed = torch.from_numpy(task.totals).view(task.seed_ids.size, chunk)  # (t, S)
        start = 0
        for mat in mats:
            size = mat.rows * self.config.rank
            t = per_seed[:, start : start + size].reshape(-1, mat.rows, self.config.rank)  # (t, m, r)
            start += size
            stacked_t = t.permute(1, 0, 2).reshape(mat.rows, -1).to(mat.weight.device)  # (m, t r)
            stacked_p = torch.cat([
                projection(self.pool[k], mat.name, self.config.rank, mat.cols) for k in task.seed_ids.tolist()
            ]).to(mat.weight.device)  # (t r, n)
            mat.weight.add_(stacked_t @ stacked_p)  # (m, n), in float32, rounded once into the weight's dtype
        model.position = target

    def train(self, model: LocalModel, batches: Batches, task: SubspaceTask) -> SubspaceReply:
        cfg = self.config
        self.sync(model, task)
        fingerprint = self.fingerprint(model, task)
        mats = matrices(model)
        rng = np.random.default_rng([self.seed, task.round, task.client, STEP_TAG])
        used: dict[int, list[torch.Tensor]] = {}  # seed index -> summed B_k, (m, r) per matrix
        skipped, losses = 0, []
        model.position = DIRTY
        for first in range(0, cfg.local_steps, cfg.interval):
            k = int(rng.integers(cfg.num_seeds))
            subspace = Subspace(mats, self.pool[k], cfg)
            for _ in range(min(cfg.interval, cfg.local_steps - first)):
                loss = subspace.step(model, next(batches))
                if loss is None:
                    skipped += 1
                else:
                    losses.append(loss)
            folded = subspace.fold_()
            used[k] = [a + b for a, b in zip(used[k], folded)] if k in used else folded
        ids = sorted(used)
        values = torch.cat([b.reshape(-1).cpu() for k in ids for b in used[k]]).numpy()
        if not np.isfinite(values).all():
            raise FloatingPointError("fedkrso: the accumulators overflow; lower `algorithm.lr`")
        loss = float(np.mean(losses)) if losses else 0.0
        return SubspaceReply(task.round, task.client, batches.num_examples, cfg.local_steps, skipped, loss,
                             np.array(ids, dtype=np.int64), values.astype(np.float32), fingerprint)
