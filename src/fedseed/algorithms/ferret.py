"""Ferret: first-order local steps, the update projected onto fresh seeded random bases.

Each sampled client takes ``local_steps`` first-order steps (SGD or Adam, each over
``grad_accum`` batches) from the global model and measures its local update
``Delta = w_after - w_start``. It then cuts the trainable tensors into blocks of
consecutive tensors and, for block ``l`` with ``K_l`` random bases
``V_l = [v_1 .. v_{K_l}]`` (``d_l x K_l``), sends the coordinates

    gamma_l = (rho K_l)^-1  V_l^T Delta_l           rho = E[v_i^2] of one basis entry

without inverting anything. Since the entries of ``v`` are independent with mean 0
and second moment ``rho``, ``E[V_l V_l^T] = rho K_l I``, so the reconstruction
``V_l gamma_l = (rho K_l)^-1 V_l V_l^T Delta_l`` is an unbiased estimate of
``Delta_l``; its relative error falls like ``sqrt(d_l / K_l)``. ``K_l`` is
proportional to the block's update norm (at least 2), out of a total of
``num_bases``.

The bases come from one fresh seed per client per round, so Ferret is not linear
in a fixed pool: the global model is the base plus every round's reconstructions,
and a party that missed rounds replays them in order. The server keeps the
committed updates in memory; a task carries the rounds its client lacks.

The official code (``allen4747/Ferret``) differs in three ways, all available
(``seed_pool``, ``scale``, ``clip_norm``; docs/ferret.md): every basis is one of a
fixed pool of K seeds shared by all clients and rounds, block ``l`` taking a
random subset of ``max(int(||Delta_l|| / max_l ||Delta_l|| * K), 2)`` of them; its
truncated-normal basis makes the reconstruction ``Delta / 3`` in expectation, which
its server learning rate compensates; and the server clips each (pool seed,
block) reconstruction of the aggregate to an L2 norm of 10. A client's subsets
follow from its seed, so the wire carries the same fields either way; the
server folds the clip into each client's coordinates before it commits them.

Local training does not leave the model changed: ``train`` measures the update
against a copy of the synced weights written to disk (which it needs for
``Delta`` anyway) and copies them back, so the copy stays at its ledger position
and the next task carries only the rounds committed since.

Memory: with SGD (the official setting) a tensor is stepped inside the backward
the moment its gradient is complete, and the gradient dropped, so a client holds
no gradient the size of the weights; with Adam it holds the gradient and both
moments, as any Adam does.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from pathlib import Path

import numpy as np
import torch

from fedseed.algorithms.base import OPTIMIZERS, Algorithm, Batches, BaseReply, make_optimizer, require
from fedseed.algorithms.robust import RobustSection, clip_norms, clip_values, whole_rows
from fedseed.base_weights import BaseWeights, consecutive_groups, snapshot
from fedseed.directions import DISTRIBUTIONS, DirectionSpace, derive_seed
from fedseed.privacy import Plan
from fedseed.memory import backward_memory
from fedseed.models import DIRTY, LocalModel, checkpointed_layers
from fedseed.settings import ConfigError, check_choices, require_positive, setting
from fedseed.wire import F32Array, F64Array, U32, U64, UIntArray, message

SEED_TAG = 0xFE77  # the per-client-per-round seed
POOL_TAG = 0xF001  # the official mode's fixed pool of seeds
SCALES = ("unbiased", "official")
BLOCK_FRACTION = 0.9  # official code: a block holds up to 0.9 x the median tensor size
QUANTA = 2**24  # the generator's Gaussian draws u1, u2 on a grid of 2^24 points


@dataclass(frozen=True)
class FerretConfig:
    """Hyperparameters of Ferret (paper values where the paper gives them)."""

    num_bases: int = setting(1024, "K: bases per client per round, summed over blocks (tuned on stories260K)")
    local_steps: int = setting(10, "T: optimizer steps per round (official script: 40 batches, 4 per step)")
    grad_accum: int = setting(4, "batches per optimizer step (official script: n_accum 4)")
    lr: float = setting(1e-4, "local learning rate (paper)")
    optimizer: str = setting("sgd", "local optimiser: sgd (official script, momentum 0; holds no gradient buffer), "
                                    "adam or adamw", OPTIMIZERS)
    server_lr: float = setting(3.0, "global step on the mean reconstruction (paper: 3 on Dolly, 10 on NI)")
    block_size: int = setting(0, "elements per block; 0 = 0.9 x the median tensor size (official rule)")
    distribution: str = setting("gaussian", "basis entries: gaussian or rademacher", DISTRIBUTIONS)
    seed_pool: int = setting(0, "official code: every basis comes from one fixed pool of this many seeds (script: "
                                "200), each block a random subset sized by its update norm; 0 = a fresh seed per "
                                "client per round, num_bases split over the blocks")
    scale: str = setting("unbiased", "unbiased: E[V gamma] = Delta; official: 1/3 of that, as the official "
                                     "truncated-normal basis gives (its server_lr of 10 makes up for it)", SCALES)
    clip_norm: float = setting(0.0, "official code: each (pool seed, block) reconstruction of the round's aggregate "
                                    "clipped to this L2 norm (code: 10); needs seed_pool; 0 = off")

    def __post_init__(self) -> None:
        require_positive(self, "algorithm", "num_bases", "local_steps", "grad_accum", "lr", "server_lr")
        for name in ("block_size", "seed_pool", "clip_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`algorithm.{name}` must be >= 0 (0 = off), got {getattr(self, name)!r}")
        if self.seed_pool == 1:
            raise ConfigError("`algorithm.seed_pool` must be 0 (fresh seeds) or at least 2: every block takes 2 bases")
        if self.clip_norm and not self.seed_pool:
            raise ConfigError("`algorithm.clip_norm` clips per pool seed and block: set `algorithm.seed_pool` "
                              "(the official script uses 200) or set clip_norm = 0")
        check_choices(self, "algorithm")


# -- wire messages -------------------------------------------------------------------


def _check_coordinates(bases: np.ndarray, coords: np.ndarray, contributions: int) -> None:
    """``bases`` holds ``K_l`` for every (contribution, block); ``coords`` all their gammas."""
    if contributions == 0:
        if bases.size or coords.size:
            raise ValueError("bases and coords must be empty when no contribution is carried")
        return
    if bases.size % contributions:
        raise ValueError(f"{bases.size} bases entries do not split over {contributions} contributions")
    if (bases < 2).any():
        raise ValueError("every block needs at least 2 bases")
    total = sum(bases.tolist())  # exact: a hostile int64 sum could wrap around to look right
    if total != coords.size:
        raise ValueError(f"bases sum to {total} but {coords.size} coords are given")


@message(20)
@dataclass(frozen=True)
class FerretTask:
    """Server -> client: the committed rounds ``since + 1 .. round - 1``, one after another.

    Each carried round is a list of client contributions (seed, weight, ``K_l`` per
    block, coordinates); ``counts`` says how many contributions each round has.
    """

    round: U32
    client: U32
    since: U32  # the ledger position the carried rounds start from (0: from the base weights)
    counts: UIntArray  # (round - 1 - since,) contributions per carried round
    seeds: UIntArray  # (N,) each contribution's seed
    weights: F64Array  # (N,) server_lr * n_i / n_round: what the reconstruction is scaled by
    bases: UIntArray  # (N * L,) K_l of each contribution's blocks
    coords: F32Array  # (sum of bases,) gammas, contribution by contribution, block by block

    def validate(self) -> None:
        if self.since + self.counts.size != self.round - 1:
            raise ValueError(f"{self.counts.size} rounds carried from {self.since} do not reach round {self.round - 1}")
        if sum(self.counts.tolist()) != self.seeds.size or self.seeds.size != self.weights.size:
            raise ValueError("counts, seeds and weights disagree on the number of contributions")
        _check_coordinates(self.bases, self.coords, self.seeds.size)


@message(21)
@dataclass(frozen=True)
class FerretReply(BaseReply):
    """Client -> server: one seed, the bases per block, and the coordinates of the local update."""

    seed: U64  # the fresh seed of this client and round (< 2^63)
    bases: UIntArray  # (L,) K_l per block, summing to num_bases
    coords: F32Array  # (num_bases,) gamma_l of every block, in block order
    fingerprint: U64 = 0

    def validate(self) -> None:
        super().validate()
        _check_coordinates(self.bases, self.coords, 1)


@message(22)
@dataclass(frozen=True)
class FerretUpdate:
    """One round in the ledger: every accepted client's (seed, weight, K_l, coordinates)."""

    round: U32
    seeds: UIntArray  # (n,) in client order
    weights: F64Array  # (n,) server_lr * n_i / n_round
    bases: UIntArray  # (n * L,)
    coords: F32Array  # (sum of bases,)

    def validate(self) -> None:
        if self.seeds.size == 0 or self.seeds.size != self.weights.size:
            raise ValueError(f"{self.seeds.size} seeds but {self.weights.size} weights")
        _check_coordinates(self.bases, self.coords, self.seeds.size)


# -- blocks, seeds and bases ---------------------------------------------------------


def partition_blocks(sizes: Sequence[int], block_size: int) -> list[list[int]]:
    """Runs of consecutive tensors of about ``block_size`` elements (indices into ``sizes``).

    A tensor joins the current block unless that would push it past ``block_size``;
    a tensor larger than ``block_size`` is a block of its own. ``block_size = 0``
    is the official code's rule, ``0.9 x`` the median tensor size, so the blocks
    follow the model: every large matrix alone, the small norms grouped.
    """
    return consecutive_groups(sizes, block_size or int(BLOCK_FRACTION * float(np.median(sizes))))


def second_moment(distribution: str) -> float:
    """``rho = E[v_i^2]`` of one basis entry, exact for the generator's quantised draws.

    Rademacher entries are +-1: ``rho = 1``. Gaussian entries are the generator's
    Box-Muller ``sqrt(-2 ln u1) cos(2 pi u2)`` with ``u1 = j / N`` (``j = 1..N``) and
    ``u2 = j / N`` (``j = 0..N-1``), ``N = 2^24``: ``E[cos^2] = 1/2`` exactly on that
    grid, so ``rho = E[-ln u1] = ln N - ln(N!) / N`` (about ``1 - 5.5e-7``).
    """
    if distribution == "rademacher":
        return 1.0
    return math.log(QUANTA) - math.lgamma(QUANTA + 1) / QUANTA


def client_seed(run_seed: int, round: int, client: int) -> int:
    """The fresh seed of one client in one round (63 bits: the wire's uint[] stops at 2^63)."""
    return derive_seed(run_seed, round, client, SEED_TAG) >> 1


def basis_seeds(seed: int, count: int) -> np.ndarray:
    """Seeds of bases ``0 .. count-1``; every block uses a prefix (their tensors differ, so do the bases)."""
    return np.array([derive_seed(seed, k) for k in range(count)], dtype=np.uint64)


def pool_seeds(run_seed: int, size: int) -> np.ndarray:
    """The official mode's pool: ``size`` seeds fixed for the whole run."""
    return np.array([derive_seed(run_seed, k, POOL_TAG) for k in range(size)], dtype=np.uint64)


def pool_order(seed: int, block: int, size: int) -> np.ndarray:
    """A client's ranking of the pool for one block: the block's ``n`` bases are the first ``n``.

    The official code draws ``random.sample(range(K), n)`` per block; this is the
    same uniform subset, drawn from the client's seed so the server can name it.
    """
    keys = np.array([derive_seed(seed, block, k) for k in range(size)], dtype=np.uint64)
    return np.argsort(keys, kind="stable")


def official_bases(norms: np.ndarray, pool: int) -> np.ndarray:
    """``max(int(||Delta_l|| / max_l ||Delta_l|| * K), 2)``: the largest block takes the whole pool."""
    finite = np.isfinite(norms)
    top = float(norms[finite].max()) if finite.any() else 0.0
    if top <= 0:
        return np.full(norms.size, 2, dtype=np.int64)
    share = np.where(finite, norms / top, 0.0)  # a NaN block takes 2, as in the official code
    return np.maximum((share * pool).astype(np.int64), 2)


def allocate_bases(norms: np.ndarray, total: int) -> np.ndarray:
    """``K_l``: 2 per block, the rest in proportion to the block's update norm, summing to ``total``.

    The proportional shares are floored and the leftover bases go to the largest
    remainders (ties to the earlier block), so every party computes the same
    integers. A zero update spreads the bases evenly.
    """
    num = norms.size
    extra = total - 2 * num
    weights = norms if norms.sum() > 0 else np.ones(num)
    share = extra * weights / weights.sum()
    counts = np.floor(share).astype(np.int64)
    leftover = extra - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:leftover]] += 1
    return counts + 2


def coordinates(delta: Sequence[tuple[str, torch.Tensor]], bases: np.ndarray, distribution: str,
                scale: float = 1.0) -> np.ndarray:
    """``gamma = scale (rho K)^-1 V^T delta`` for one block and its K basis seeds (float64, shape (K,)).

    ``delta`` is the block's update as ``(parameter name, tensor)`` pairs: the names
    fix the bases, so the update must carry its parameters' names.
    """
    projected = DirectionSpace(delta, distribution).project(bases)  # (K,)
    return projected * (scale / (second_moment(distribution) * bases.size))


def max_entry(distribution: str) -> float:
    """The largest ``|v_i|`` the generator can give: Box-Muller's radius at ``u1 = 2^-24``, or 1."""
    return math.sqrt(2 * math.log(QUANTA)) if distribution == "gaussian" else 1.0


# -- the algorithm -------------------------------------------------------------------


class Ferret(Algorithm):
    """Ferret: first-order local updates sent as coordinates on per-block random bases."""

    # fedseed compare's setting. Paper: local lr 1e-4 with SGD, server lr 3 (Dolly), 40 batches in
    # steps of 4; here lr 3e-3 (1e-4 barely moves a 260K model in a few rounds), K=1024 tuned.
    compare: ClassVar[dict[str, Any]] = {"num_bases": 1024, "local_steps": 10, "grad_accum": 4, "lr": 3e-3,
                                         "server_lr": 3.0}

    name = "ferret"
    rules = ("mean",)  # each client's coordinates live in bases of its own: no per-coordinate median
    Task, Reply, Update = FerretTask, FerretReply, FerretUpdate

    def __init__(self, config: FerretConfig, seed: int, robust: RobustSection | None = None,
                 privacy: Plan | None = None):
        super().__init__(config, seed, robust, privacy)
        self.history: list[FerretUpdate] = []  # committed updates, round 1 first: what late clients replay
        self.blocks: list[list[int]] | None = None  # set by bind: indices into model.trainable
        self.pool = pool_seeds(seed, config.seed_pool) if config.seed_pool else None
        self.scale = 1 / 3 if config.scale == "official" else 1.0
        self._layout: list[list[tuple[str, tuple[int, ...]]]] = []  # per block: (name, shape), for basis norms
        self._basis_norms: dict[tuple[int, int], float] = {}  # ||v|| of (pool index, block), computed when needed

    def bind(self, model: LocalModel) -> None:
        """Fix the model's block layout (the server checks replies against it)."""
        self.blocks = self._blocks(model)
        self._layout = [[(model.trainable[j][0], tuple(model.trainable[j][1].shape)) for j in b] for b in self.blocks]

    def _allocate(self, norms: np.ndarray) -> np.ndarray:
        """``K_l`` of every block: a share of ``num_bases``, or the official count out of the pool."""
        if self.pool is None:
            return allocate_bases(norms, self.config.num_bases)
        return official_bases(norms, self.pool.size)

    def _bases(self, seed: int, counts: Sequence[int]) -> list[np.ndarray]:
        """The basis seeds of every block of one contribution: a prefix of its own, or its subset of the pool."""
        if self.pool is None:
            own = basis_seeds(seed, max(counts))
            return [own[:k] for k in counts]
        return [self.pool[indices] for indices in self._pool_indices(seed, counts)]

    def _pool_indices(self, seed: int, counts: Sequence[int]) -> list[np.ndarray]:
        """Which pool entries each block of one contribution uses: the first ``K_l`` of its ranking."""
        assert self.pool is not None
        return [pool_order(seed, l, self.pool.size)[:k] for l, k in enumerate(counts)]

    def _blocks(self, model: LocalModel) -> list[list[int]]:
        blocks = partition_blocks([p.numel() for _, p in model.trainable], self.config.block_size)
        if self.config.num_bases < 2 * len(blocks) and not self.config.seed_pool:
            raise ValueError(
                f"`algorithm.num_bases` = {self.config.num_bases} leaves fewer than 2 bases for some of the "
                f"model's {len(blocks)} blocks; set it to at least {2 * len(blocks)} or raise `algorithm.block_size`"
            )
        return blocks

    def _num_blocks(self) -> int:
        if self.blocks is None:
            raise RuntimeError("ferret: call bind(model) before the server hooks")
        return len(self.blocks)

    # -- server ------------------------------------------------------------------
    def task(self, round: int, client: int, since: int = 0) -> FerretTask:
        """The rounds ``since + 1 .. round - 1``; an unknown position (DIRTY, ahead) replays from the base."""
        if round - 1 > self.committed:
            raise ValueError(f"ferret: round {round} needs round {round - 1} committed, not {self.committed}")
        since = since if 0 <= since <= round - 1 else 0
        carried = self.history[since : round - 1]
        if not carried:
            empty = np.zeros(0, dtype=np.int64)
            return FerretTask(round, client, since, empty, empty, np.zeros(0), empty, np.zeros(0, np.float32))
        return FerretTask(
            round, client, since,
            np.array([u.seeds.size for u in carried], dtype=np.int64),
            np.concatenate([u.seeds for u in carried]),
            np.concatenate([u.weights for u in carried]),
            np.concatenate([u.bases for u in carried]),
            np.concatenate([u.coords for u in carried]),
        )

    def check(self, reply: FerretReply, task: FerretTask) -> None:
        cfg, num_blocks = self.config, self._num_blocks()
        self.check_reply(reply, task, cfg.local_steps)
        expected = client_seed(self.seed, reply.round, reply.client)
        require(reply.seed == expected, f"`seed` is {reply.seed}, this client's seed for the round is {expected}")
        require(reply.bases.size == num_blocks, f"`bases` has {reply.bases.size} blocks, the model has {num_blocks}")
        require(bool((reply.bases >= 2).all()), "`bases` gives some block fewer than 2 bases")
        total = sum(reply.bases.tolist())  # exact, as in validate
        if self.pool is None:
            require(total == cfg.num_bases, f"`bases` sum to {total}, not num_bases {cfg.num_bases}")
        else:
            require(bool((reply.bases <= self.pool.size).all()), f"`bases` gives some block more than the pool's "
                                                                  f"{self.pool.size} seeds")
        require(reply.coords.size == total, f"`coords` has {reply.coords.size} values, the bases need {total}")
        require(bool(np.isfinite(reply.coords).all()), "`coords` holds non-finite values")

    def aggregate(self, round: int, replies: Sequence[FerretReply]) -> FerretUpdate:
        """Every client's coordinates, clipped, with its (capped) weight: each client has bases of its own."""
        rob = self.robust
        ordered, weights = self.weighted(round, replies)
        if self.client_noise is not None:
            return self._private(round, ordered)
        rows = whole_rows(clip_values([r.coords for r in ordered], rob.value_clip))
        coords = [c.rows[0] for c in clip_norms(rows, rob.norm_clip)]
        if self.config.clip_norm:
            coords = self._clip_pool(ordered, weights, coords)
        return FerretUpdate(
            round,
            np.array([r.seed for r in ordered], dtype=np.int64),
            self.config.server_lr * weights,
            np.concatenate([r.bases for r in ordered]),
            np.concatenate(coords).astype(np.float32),
        )

    def _clip_pool(self, ordered: Sequence[FerretReply], weights: np.ndarray,
                   coords: list[np.ndarray]) -> list[np.ndarray]:
        """The official clip: each (pool seed, block) reconstruction ``C v`` of the aggregate to ``clip_norm``.

        ``C = sum_i w_i gamma_i`` on that seed and block; its factor
        ``min(1, clip / (|C| ||v|| + 1e-8))`` scales every client's coordinate
        there, so the committed contributions sum to the clipped aggregate.
        """
        assert self.pool is not None and self.blocks is not None
        total = np.zeros((self.pool.size, len(self.blocks)))
        slots = [self._slots(r) for r in ordered]
        for w, c, (seeds, blocks) in zip(weights, coords, slots):
            np.add.at(total, (seeds, blocks), w * c)
        factor = self._clip_factors(total)
        return [c * factor[seeds, blocks] for c, (seeds, blocks) in zip(coords, slots)]

    def _slots(self, reply: FerretReply) -> tuple[np.ndarray, np.ndarray]:
        """The (pool seed, block) of each of a pool-mode reply's coordinates."""
        counts = reply.bases.tolist()
        return np.concatenate(self._pool_indices(reply.seed, counts)), np.repeat(np.arange(len(counts)), counts)

    def _clip_factors(self, total: np.ndarray) -> np.ndarray:
        """Per (pool seed, block) of an aggregate ``C``: ``min(1, clip / (|C| ||v|| + 1e-8))`` (1 with clip off)."""
        factor = np.ones_like(total)
        if not self.config.clip_norm:
            return factor
        # ||v|| <= max_entry sqrt(d): only where that bound could pass the clip is the exact norm needed
        reach = np.abs(total) * max_entry(self.config.distribution) * np.sqrt(self._block_sizes())
        for k, l in zip(*np.nonzero(reach > self.config.clip_norm)):
            factor[k, l] = min(1.0, self.config.clip_norm / (abs(total[k, l]) * self._basis_norm(k, l) + 1e-8))
        return factor

    def _private(self, round: int, ordered: Sequence[FerretReply]) -> FerretUpdate:
        """Client-level privacy: the noised mean over every (pool seed, block), committed as one contribution.

        A client's coordinates land on distinct (seed, block) slots, so clipping
        its coordinate vector clips its share of the aggregate by the same norm.
        The round's one contribution takes every pool seed on every block, in the
        order of seed 0's ranking; the official clip applies after the noise.
        """
        assert self.pool is not None and self.blocks is not None and self.client_noise is not None
        size, num_blocks = self.pool.size, len(self.blocks)
        ids, rows = [], []
        for r in ordered:
            seeds, blocks = self._slots(r)
            keys = seeds * num_blocks + blocks
            order = np.argsort(keys)
            ids.append(keys[order])
            rows.append(r.coords.astype(np.float64)[order][:, None])
        total = self.client_noise.aggregate(round, ids, rows, np.arange(size * num_blocks)).reshape(size, num_blocks)
        total *= self._clip_factors(total)
        counts = [size] * num_blocks
        coords = [total[indices, l] for l, indices in enumerate(self._pool_indices(0, counts))]
        return FerretUpdate(round, np.zeros(1, dtype=np.int64), np.array([self.config.server_lr]),
                            np.array(counts, dtype=np.int64), np.concatenate(coords).astype(np.float32))

    @classmethod
    def check_privacy(cls, config: FerretConfig, mode: str) -> None:
        super().check_privacy(config, mode)
        if not config.seed_pool:
            raise ConfigError("`privacy.mode` = \"client\" needs a space all clients share, and Ferret's fresh "
                              "per-client bases are not one: set `algorithm.seed_pool` (e.g. 200, the official "
                              "script's) so every basis comes from one pool")

    def _block_sizes(self) -> np.ndarray:
        return np.array([sum(math.prod(shape) for _, shape in block) for block in self._layout], dtype=np.float64)

    def _basis_norm(self, k: int, l: int) -> float:
        """``||v||`` of pool seed ``k`` on block ``l``, a tensor at a time (cached: it never changes)."""
        assert self.pool is not None
        if (k, l) not in self._basis_norms:
            square = 0.0
            for name, shape in self._layout[l]:
                (v,) = DirectionSpace([(name, torch.empty(shape))], self.config.distribution).materialize(
                    int(self.pool[k]))
                square += float(v.double().square().sum())
            self._basis_norms[(k, l)] = math.sqrt(square)
        return self._basis_norms[(k, l)]

    def commit(self, update: FerretUpdate) -> None:
        self.expect_next(update)
        num_blocks = self._num_blocks()
        require(update.bases.size == update.seeds.size * num_blocks,
                f"update has {update.bases.size} bases entries for {update.seeds.size} clients x {num_blocks} blocks")
        self.history.append(update)
        self.committed = update.round

    # -- client ------------------------------------------------------------------
    def sync(self, model: LocalModel, task: FerretTask) -> None:
        """Replay the carried rounds onto a copy at ``task.since`` (``since = 0``: from the base)."""
        blocks = self._blocks(model)
        if task.since == 0 and model.position != 0:
            model.reset_()
        elif model.position != task.since:
            raise ValueError(
                f"ferret: the model is at ledger position {model.position}, but the task replays rounds after "
                f"{task.since}; ask the server for task(round, client, since={model.position}) or since=0"
            )
        if task.seeds.size and task.bases.size != task.seeds.size * len(blocks):
            raise ValueError(f"ferret: the task's bases are not {len(blocks)} blocks per contribution; "
                             "was it made for another model or block_size?")
        spaces = [DirectionSpace([model.trainable[i] for i in block], self.config.distribution) for block in blocks]
        first = 0
        for count in task.counts.tolist():
            rows = slice(first, first + count)
            offset = int(task.bases[: first * len(blocks)].sum())
            bases = task.bases[first * len(blocks) : (first + count) * len(blocks)].reshape(count, len(blocks))
            self._apply_round_(spaces, task.seeds[rows], task.weights[rows], bases, task.coords[offset:])
            first += count
        model.position = task.round - 1

    def _apply_round_(self, spaces: list[DirectionSpace], seeds: np.ndarray, weights: np.ndarray, bases: np.ndarray,
                      coords: np.ndarray) -> None:
        """Add one round's ``sum_i weight_i V_i,l gamma_i,l`` to every block, one fused pass per block.

        ``bases`` is (clients, L); ``coords`` starts at the round's first coordinate.
        Contributions go in the update's (client) order, so every party adds the same
        float32 sums.
        """
        per_block_seeds: list[list[np.ndarray]] = [[] for _ in spaces]
        per_block_coeffs: list[list[np.ndarray]] = [[] for _ in spaces]
        offset = 0
        for seed, weight, counts in zip(seeds.tolist(), weights.tolist(), bases):
            for l, own in enumerate(self._bases(seed, counts.tolist())):
                gamma = coords[offset : offset + own.size].astype(np.float64)
                per_block_seeds[l].append(own)
                per_block_coeffs[l].append(weight * gamma)
                offset += own.size
        for space, block_seeds, block_coeffs in zip(spaces, per_block_seeds, per_block_coeffs):
            space.add_(np.concatenate(block_seeds), np.concatenate(block_coeffs))

    def train(self, model: LocalModel, batches: Batches, task: FerretTask) -> FerretReply:
        cfg = self.config
        self.sync(model, task)
        fingerprint = self.fingerprint(model, task)
        blocks = self._blocks(model)
        model.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=model.cache_dir) as folder:
            start = snapshot(model.trainable, Path(folder))  # on disk: restored bit for bit below
            model.position = DIRTY
            with torch.enable_grad(), backward_memory(), checkpointed_layers(model.module):
                steps, skipped, losses = _local_steps(model, batches, cfg)
            seed = client_seed(self.seed, task.round, task.client)
            bases = self._allocate(_block_norms(model, start, blocks))  # (L,)
            coords = _block_coordinates(model, start, blocks, self._bases(seed, bases.tolist()), cfg.distribution,
                                        self.scale)
            _restore_from(model, start)
        model.position = task.round - 1
        flat = np.concatenate(coords).astype(np.float32)
        if not np.isfinite(flat).all():
            raise FloatingPointError("ferret: the update's coordinates overflow float32; lower `algorithm.lr`")
        loss = float(np.mean(losses)) if losses else 0.0
        return FerretReply(task.round, task.client, batches.num_examples, steps, skipped, loss, seed, bases, flat,
                           fingerprint)


# -- client helpers ------------------------------------------------------------------


def _local_steps(model: LocalModel, batches: Batches, cfg: FerretConfig) -> tuple[int, int, list[float]]:
    """``local_steps`` optimizer steps of ``grad_accum`` batches each; returns (steps, skipped, losses)."""
    return (_fused_sgd_steps if cfg.optimizer == "sgd" else _buffered_steps)(model, batches, cfg)


def _fused_sgd_steps(model: LocalModel, batches: Batches, cfg: FerretConfig) -> tuple[int, int, list[float]]:
    """SGD with no gradient buffer: each tensor steps the moment its gradient is complete, and drops it.

    A client's memory is then that of inference plus one layer's activations
    (checkpointed) and one tensor's gradient, instead of a gradient per weight.
    The step's ``grad_accum`` batches go through one forward, stacked
    (:meth:`LocalModel.joint_loss`: the same mean loss as accumulating them, so
    the same step up to float summation order). A step with a non-finite loss is
    skipped; a tensor whose gradient is not finite keeps its value for the step,
    and the step counts as skipped.
    """
    broken: list[str] = []

    @torch.no_grad()
    def step(name: str, p: torch.Tensor) -> None:
        grad, p.grad = p.grad, None
        if grad is not None and _all_finite(grad):
            p.add_(grad, alpha=-cfg.lr)
        else:
            broken.append(name)

    handles = [p.register_post_accumulate_grad_hook(lambda p, name=name: step(name, p)) for name, p in model.trainable]
    skipped, losses = 0, []
    try:
        for _ in range(cfg.local_steps):
            loss, parts = model.joint_loss([next(batches) for _ in range(cfg.grad_accum)])
            if not bool(torch.isfinite(loss)):
                skipped += 1
                continue
            broken.clear()
            loss.backward()
            if broken:
                skipped += 1
            else:
                losses.extend(parts)
    finally:
        for handle in handles:
            handle.remove()
    return cfg.local_steps, skipped, losses


def _buffered_steps(model: LocalModel, batches: Batches, cfg: FerretConfig) -> tuple[int, int, list[float]]:
    """Optimizer steps over accumulated gradients (Adam needs the whole gradient, and keeps two moments).

    A step whose batches give a non-finite loss or gradient is skipped (no update)
    and counted, never silently folded in.
    """
    params = [p for _, p in model.trainable]
    opt = make_optimizer(params, cfg.optimizer, cfg.lr)
    skipped, losses = 0, []
    for _ in range(cfg.local_steps):
        opt.zero_grad(set_to_none=True)
        kept = []
        for _ in range(cfg.grad_accum):
            loss = model.loss(next(batches))
            if not torch.isfinite(loss):
                break
            (loss / cfg.grad_accum).backward()
            kept.append(float(loss.detach()))
        finite = len(kept) == cfg.grad_accum and all(
            p.grad is None or _all_finite(p.grad) for p in params
        )
        if finite:
            opt.step()
            losses.extend(kept)
        else:
            skipped += 1
    opt.zero_grad(set_to_none=True)
    return cfg.local_steps, skipped, losses


CHUNK = 1 << 22  # elements checked, or of an update formed for its norm, at a time (32 MB in float64)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite, ``CHUNK`` elements at a time.

    ``torch.isfinite`` of a whole 16-bit gradient builds its absolute value and two
    boolean masks, three temporaries of the gradient's size: for the 1.1B model's
    output matrix 300 MB, which was most of a local step's peak above inference.
    """
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + CHUNK]).all()) for i in range(0, flat.numel(), CHUNK))


def _sum_of_squares(after: torch.Tensor, before: torch.Tensor) -> float:
    """``sum((after - before)^2)``, the difference taken in float32 as stored and squared in float64, a chunk at a
    time: neither the update nor a float64 copy of a whole tensor is ever formed."""
    a, b = after.detach().reshape(-1), before.reshape(-1)
    total = 0.0
    for i in range(0, a.numel(), CHUNK):
        d = a[i : i + CHUNK].to(torch.float32) - b[i : i + CHUNK].to(torch.float32)
        total += float(d.double().square().sum())
    return total


def _block_norms(model: LocalModel, start: BaseWeights, blocks: list[list[int]]) -> np.ndarray:
    """``||Delta_l||`` of every block (L,), the start read back from disk a group at a time.

    Runs before any projection, so a non-finite weight stops the round here.
    """
    squares = np.zeros(len(blocks))
    for l, block in enumerate(blocks):
        for group in start.groups(block):
            with start.read(group) as saved:
                squares[l] += sum(_sum_of_squares(model.trainable[j][1], w) for j, w in zip(group, saved))
    if not np.isfinite(squares).all():
        raise FloatingPointError("ferret: local training diverged (non-finite weights); lower `algorithm.lr`")
    return np.sqrt(squares)


def _block_coordinates(model: LocalModel, start: BaseWeights, blocks: list[list[int]], bases: list[np.ndarray],
                       distribution: str, scale: float) -> list[np.ndarray]:
    """``gamma_l`` of every block on its basis seeds, as ``V^T w_after - V^T w_start``.

    The projection is linear, so the update is never formed: the kernels read the
    weights and the start (memory-mapped from disk, a group at a time) as they are
    stored, and the two float64 projections are subtracted. The subtraction costs
    float64 the digits by which the weights outsize the update (4 to 6 of its 16);
    the reply keeps 7 (float32).
    """
    out = []
    for block, block_bases in zip(blocks, bases):
        gamma = coordinates([model.trainable[j] for j in block], block_bases, distribution, scale)
        for group in start.groups(block):
            with start.read(group) as saved:
                gamma -= coordinates([(model.trainable[j][0], w) for j, w in zip(group, saved)], block_bases,
                                     distribution, scale)
        out.append(gamma)
    return out


@torch.no_grad()
def _restore_from(model: LocalModel, start: BaseWeights) -> None:
    for group in start.groups():
        with start.read(group) as saved:
            for j, s in zip(group, saved):
                model.trainable[j][1].copy_(s)
