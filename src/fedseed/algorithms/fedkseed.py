"""FedKSeed and FedKSeed-Pro: zeroth-order steps on a fixed pool of K seeds.

Every local step picks a seed index k from the pool, estimates the directional
derivative ``g = (L(w + eps z_k) - L(w - eps z_k)) / 2eps`` with two forwards and
moves ``w -= lr * g * z_k`` (:class:`~fedseed.algorithms.zeroth_order.Perturbation`:
the weights are never perturbed in place, and a step costs two passes over them).
The client reports only ``(k, g)``.

Because the pool is fixed and the learning rate constant, the global model is
linear in per-seed totals: ``w = w0 + sum_k C_k z_k``. The server keeps the K
totals ``C_k``; every party rebuilds from ``w0`` with at most K directions, however
many rounds it missed, and bit for bit the same as everyone else.

FedKSeed-Pro samples seeds non-uniformly: ``psi_k`` is the mean of
``|clip(g, -1000, 1000)|`` over the seed's history (which starts with a single 0),
min-max normalised, and the probabilities are ``softmax(psi)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedseed.algorithms.base import Algorithm, Batches, BaseReply, require
from fedseed.algorithms.zeroth_order import Perturbation, estimator
from fedseed.algorithms.robust import Contribution, RobustSection, clip_norms, clip_values, combine
from fedseed.directions import DISTRIBUTIONS, derive_seed
from fedseed.settings import ConfigError, check_choices, require_positive, setting
from fedseed.privacy import Plan
from fedseed.models import DIRTY, LocalModel
from fedseed.wire import F32Array, F64Array, U8, U32, U64, UIntArray, message, uint_width

POOL_TAG = 0x5EED
STEP_TAG = 0x57E9


@dataclass(frozen=True)
class FedKSeedConfig:
    """Hyperparameters of FedKSeed / FedKSeed-Pro (paper defaults where they exist)."""

    num_seeds: int = setting(4096, "K: the candidate seed pool")
    local_steps: int = setting(200, "tau: zeroth-order steps per client per round")
    lr: float = setting(3e-7, "local learning rate (0 measures gradients and moves nothing)")
    eps: float = setting(5e-4, "perturbation scale")
    distribution: str = setting("rademacher", "direction entries: rademacher (bitwise portable) or gaussian",
                                DISTRIBUTIONS)
    pro: bool = setting(False, "FedKSeed-Pro's non-uniform seed sampling (fixed by the method name)")
    clip: float = setting(1000.0, "FedKSeed-Pro: |g| clip of the seed history")

    def __post_init__(self) -> None:
        require_positive(self, "algorithm", "num_seeds", "local_steps", "eps", "clip")
        if not self.lr >= 0:
            raise ConfigError(f"`algorithm.lr` must be >= 0, got {self.lr!r}")
        check_choices(self, "algorithm")


@message(10)
@dataclass(frozen=True)
class SeedTask:
    """Server -> client: the global model as per-seed totals, and how to sample seeds."""

    round: U32
    client: U32
    seed_ids: UIntArray  # pool indices with a non-zero total, ascending
    coeffs: F32Array  # the total C_k of each
    probabilities: F32Array  # K sampling probabilities (Pro), empty for uniform

    def validate(self) -> None:
        if self.seed_ids.size != self.coeffs.size:
            raise ValueError(f"{self.seed_ids.size} seed_ids but {self.coeffs.size} coeffs")
        if self.seed_ids.size > 1 and not (np.diff(self.seed_ids) > 0).all():
            raise ValueError("seed_ids must be strictly increasing")
        probs = self.probabilities.astype(np.float64)  # a float32 sum of hostile values could overflow
        if probs.size and ((probs < 0).any() or abs(probs.sum() - 1) > 1e-3):
            raise ValueError("probabilities must be non-negative and sum to 1")


@message(11)
@dataclass(frozen=True)
class SeedReply(BaseReply):
    """Client -> server: the scalar of every local step, as pairs or as K per-seed sums (loss: mean of (L+ + L-) / 2)."""

    dense: U8  # 0: values[i] is the g of seed_ids[i]; 1: values[k] is the sum of g on seed k
    seed_ids: UIntArray
    values: F32Array
    fingerprint: U64 = 0

    def validate(self) -> None:
        if self.dense not in (0, 1):
            raise ValueError(f"dense must be 0 or 1, got {self.dense}")
        if self.dense and self.seed_ids.size:
            raise ValueError("a dense reply carries no seed_ids")
        if not self.dense and self.seed_ids.size != self.values.size:
            raise ValueError(f"{self.seed_ids.size} seed_ids but {self.values.size} values")
        super().validate()


@message(12)
@dataclass(frozen=True)
class SeedUpdate:
    """One round in the ledger: what each touched seed's total moved by."""

    round: U32
    seed_ids: UIntArray  # ascending
    coeffs: F64Array  # added to C_k (already includes -lr and the client weights)
    abs_g: F64Array  # sum over the round's steps of |clip(g)|: FedKSeed-Pro's history
    counts: UIntArray  # steps taken on each seed this round

    def validate(self) -> None:
        n = self.seed_ids.size
        if not (self.coeffs.size == self.abs_g.size == self.counts.size == n):
            raise ValueError("seed_ids, coeffs, abs_g and counts must have the same length")
        if n > 1 and not (np.diff(self.seed_ids) > 0).all():
            raise ValueError("seed_ids must be strictly increasing")


def per_seed_sums(seed_ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct seed ids, ascending, and the sum of the values given on each (float64)."""
    ids, inverse = np.unique(seed_ids, return_inverse=True)
    return ids, np.bincount(inverse, weights=values, minlength=ids.size)


def pro_probabilities(abs_g_sum: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro's sampling probabilities from each seed's history of |g|.

    The history of every seed starts with a single 0, so its mean is
    ``sum / (count + 1)``; the means are min-max normalised, then soft-maxed.
    """
    psi = abs_g_sum / (counts + 1.0)
    spread = psi.max() - psi.min()
    norm = (psi - psi.min()) / spread if spread > 0 else np.zeros_like(psi)
    e = np.exp(norm - norm.max())
    return e / e.sum()


class FedKSeed(Algorithm):
    """FedKSeed (``pro=False``) and FedKSeed-Pro (``pro=True``)."""

    # fedseed compare's setting on stories260K. Paper (1.3B/3B): K=4096, tau=200, lr=3e-7,
    # eps=5e-4; here K=1024 as in the FedKSeed README examples, lr and eps tuned, tau halved for time.
    compare: ClassVar[dict[str, Any]] = {"num_seeds": 1024, "local_steps": 100, "lr": 5e-5, "eps": 1e-3}

    Task, Reply, Update = SeedTask, SeedReply, SeedUpdate

    privacy_modes = ("client", "example")

    def __init__(self, config: FedKSeedConfig, seed: int, robust: RobustSection | None = None,
                 privacy: Plan | None = None):
        super().__init__(config, seed, robust, privacy)
        self.name = "fedkseed-pro" if config.pro else "fedkseed"
        k = config.num_seeds
        self.pool = np.array([derive_seed(seed, POOL_TAG, i) for i in range(k)], dtype=np.uint64)
        self.totals = np.zeros(k, dtype=np.float64)  # C_k, summed in round order
        self.abs_g = np.zeros(k, dtype=np.float64)
        self.counts = np.zeros(k, dtype=np.int64)

    # -- server ------------------------------------------------------------------
    def task(self, round: int, client: int, since: int = 0) -> SeedTask:
        ids = np.flatnonzero(self.totals)
        probs = pro_probabilities(self.abs_g, self.counts) if self.config.pro else np.zeros(0)
        return SeedTask(round, client, ids, self.totals[ids].astype(np.float32), probs.astype(np.float32))

    def check(self, reply: SeedReply, task: SeedTask) -> None:
        k = self.config.num_seeds
        self.check_reply(reply, task, self.config.local_steps)
        if reply.dense:
            require(not self.config.pro, "FedKSeed-Pro needs per-step pairs, got a dense reply")
            require(reply.values.size == k, f"dense `values` has {reply.values.size} entries, the pool has {k}")
        else:
            require(reply.values.size <= reply.steps, f"{reply.values.size} pairs for {reply.steps} steps")
            bad = reply.seed_ids[reply.seed_ids >= k]
            require(bad.size == 0, f"`seed_ids` holds {bad[:3].tolist()}, outside the pool of {k} seeds")

    def aggregate(self, round: int, replies: Sequence[SeedReply]) -> SeedUpdate:
        """Per-seed sums of g, through the robust pipeline (``fedseed.algorithms.robust``), times ``-lr``."""
        k, cfg, rob = self.config.num_seeds, self.config, self.robust
        ordered, weights = self.weighted(round, replies)
        noise = self.client_noise
        abs_g = np.zeros(k, dtype=np.float64)
        counts = np.zeros(k, dtype=np.int64)
        contributions = []
        for r, g in zip(ordered, clip_values([r.values for r in ordered], 0 if noise else rob.value_clip)):
            if r.dense:
                ids = np.flatnonzero(g)
                sums = g[ids]
            else:
                ids, sums = per_seed_sums(r.seed_ids, g)
                np.add.at(abs_g, r.seed_ids, np.abs(np.clip(g, -cfg.clip, cfg.clip)))
                np.add.at(counts, r.seed_ids, 1)
            contributions.append(Contribution(ids, sums[:, None]))
        if noise is None:
            seeds, rows = combine(clip_norms(contributions, rob.norm_clip), weights, rob.rule, rob.trim)
        else:  # every seed of the pool gets noise; Pro's statistics become functions of the noised totals alone
            seeds = np.arange(k)
            rows = noise.aggregate(round, [c.ids for c in contributions], [c.rows for c in contributions], seeds)
            abs_g, counts = np.abs(rows[:, 0]), np.ones(k, dtype=np.int64)
        coeffs = np.zeros(k, dtype=np.float64)
        coeffs[seeds] = -cfg.lr * rows[:, 0]
        ids = np.flatnonzero((coeffs != 0) | (counts > 0))
        return SeedUpdate(round, ids, coeffs[ids], abs_g[ids], counts[ids])

    def commit(self, update: SeedUpdate) -> None:
        self.expect_next(update)
        require(bool((update.seed_ids < self.config.num_seeds).all()), "update names a seed outside the pool")
        self.totals[update.seed_ids] += update.coeffs
        self.abs_g[update.seed_ids] += update.abs_g
        self.counts[update.seed_ids] += update.counts
        self.committed = update.round

    # -- client ------------------------------------------------------------------
    def sync(self, model: LocalModel, task: SeedTask) -> None:
        target = task.round - 1
        if model.position == target:
            return
        model.rebuild_(self.config.distribution, self.pool[task.seed_ids], task.coeffs)
        model.position = target

    @torch.no_grad()
    def train(self, model: LocalModel, batches: Batches, task: SeedTask) -> SeedReply:
        cfg = self.config
        self.sync(model, task)
        rng = np.random.default_rng([self.seed, task.round, task.client, STEP_TAG])
        probs = task.probabilities.astype(np.float64) if task.probabilities.size else None
        if probs is not None:
            probs /= probs.sum()
        fingerprint = self.fingerprint(model, task)
        model.position = DIRTY
        ids, gs, losses = [], [], []
        skipped = 0
        estimate = estimator(self.example_noise, task.round, task.client, batches.num_examples)
        with Perturbation(model, cfg.distribution) as zo:
            for _ in range(cfg.local_steps):
                k = int(rng.choice(cfg.num_seeds, p=probs))
                seed = int(self.pool[k])
                g, plus, minus = estimate(zo, next(batches), seed, cfg.eps)
                if not np.isfinite(g):  # nothing to undo: the weights were never perturbed
                    skipped += 1
                    continue
                zo.defer([seed], [-cfg.lr * g])
                ids.append(k)
                gs.append(g)
                losses.append((plus + minus) / 2)
        if self.example_noise is not None:
            losses = []  # the losses are not privatised: they stay on the client
        return self._reply(task, ids, gs, losses, skipped, batches.num_examples, fingerprint)

    def _reply(self, task: SeedTask, ids: list[int], gs: list[float], losses: list[float], skipped: int,
               num_examples: int, fingerprint: int) -> SeedReply:
        """Pairs, or K per-seed sums when that is fewer bytes (never for Pro, which needs pairs)."""
        k = self.config.num_seeds
        steps = len(ids) + skipped
        loss = float(np.mean(losses)) if losses else 0.0
        seed_ids, values = np.asarray(ids, dtype=np.int64), np.asarray(gs, dtype=np.float64)
        if not self.config.pro:
            uniq, sums = per_seed_sums(seed_ids, values)
            if 4 * k < uniq.size * (uint_width(k - 1) + 4):  # K sums take fewer bytes than the pairs
                dense = np.bincount(seed_ids, weights=values, minlength=k)
                return SeedReply(task.round, task.client, num_examples, steps, skipped, loss, 1,
                                 np.zeros(0, np.int64), dense.astype(np.float32), fingerprint)
            seed_ids, values = uniq, sums
        return SeedReply(task.round, task.client, num_examples, steps, skipped, loss, 0,
                         seed_ids, values.astype(np.float32), fingerprint)
