"""Robust aggregation: how a server keeps a few hostile or broken clients from steering the model.

Once decoded and checked, every method's round has the same shape: client ``i``,
with aggregation weight ``w_i``, reports rows of values keyed by ids (FedKSeed:
one scalar per seed; FedKRSO: one accumulator per seed; the dense baselines: one
row, the whole delta; Ferret: one row of coordinates in its own bases). The plain
mean ``sum_i w_i x_i`` lets one client move the model as far as it likes. The
defences, in the order a server applies them:

1. value clipping: every reported scalar or coordinate into ``value_clip`` times
   the round's median non-zero ``|value|``;
2. norm clipping: each client's whole contribution scaled down to at most
   ``norm_clip`` times the round's median contribution norm;
3. weight capping: no client's share (its examples, or equal shares with
   ``weighting = "equal"``) above ``max_weight``; the excess goes to the others in
   proportion to their own shares;
4. combining per id: the weighted mean, or, among the clients that reported an
   id, the coordinate-wise median or trimmed mean scaled by those clients' total
   weight. Where every client reports an id the three rules share one scale; an
   id only one client reported is taken as it is, so the median only helps where
   clients overlap (dense updates, or a seed pool small next to clients x steps).

The bounds are multiples of the round's own median, so they need no tuning per
model or learning rate and hold while fewer than half the clients are hostile.
Everything is float64 and in client order: the same replies give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedseed.settings import setting

RULES = ("mean", "median", "trimmed-mean")  # how clients' values on one seed/coordinate combine
WEIGHTINGS = ("examples", "equal")  # a client's share before capping: its declared examples, or 1 / replies


@dataclass
class RobustSection:
    """``[robust]``: the server's defences against hostile or broken clients (this module says how each works)."""

    rule: str = setting("mean", "how clients' values on one seed/coordinate combine", RULES)
    trim: float = setting(0.2, "trimmed-mean: fraction of the reporting clients cut from each end, per coordinate")
    norm_clip: float = setting(3.0, "scale a client's update down to this multiple of the round's median norm "
                                    "(0 = off)")
    value_clip: float = setting(0.0, "clip every scalar/coordinate to this multiple of the round's median |value| "
                                     "(0 = off)")
    max_weight: float = setting(0.5, "cap on one client's share of a round (1 = off; never below 1 / replies)")
    weighting: str = setting("examples", "a client's share: its examples (FedAvg, the FedKSeed code) or equal "
                                         "(the Ferret script's --equal_weight)", WEIGHTINGS)
    fingerprint_samples: int = setting(1024, "weights hashed to detect a client whose copy drifted (0 = off)")


@dataclass(frozen=True)
class Contribution:
    """One client's reported rows, keyed by ascending ids."""

    ids: np.ndarray  # (u,) ascending, unique
    rows: np.ndarray  # (u, width) float64


def whole_rows(arrays: Sequence[np.ndarray]) -> list[Contribution]:
    """Each client's values as one row under one id: a dense delta, or coordinates no other client shares."""
    whole = np.zeros(1, dtype=np.int64)
    return [Contribution(whole, np.asarray(a, dtype=np.float64)[None, :]) for a in arrays]


def capped_weights(counts: Sequence[int], cap: float) -> np.ndarray:
    """Shares proportional to ``counts``, none above ``cap`` (raised to ``1 / len(counts)`` when lower)."""
    raw = np.asarray(counts, dtype=np.float64)
    weights = raw / raw.sum()
    cap = max(cap, 1.0 / raw.size)
    capped = np.zeros(raw.size, dtype=bool)
    while (weights > cap).any():
        capped |= weights > cap
        free = ~capped
        left = 1.0 - cap * capped.sum()
        weights = np.where(capped, cap, raw * left / raw[free].sum() if free.any() else 0.0)
    return weights


def clip_values(arrays: Sequence[np.ndarray], factor: float) -> list[np.ndarray]:
    """Every value into ``factor`` times the median non-zero ``|value|`` of all ``arrays`` (0: unchanged)."""
    if factor <= 0:
        return [np.asarray(a, dtype=np.float64) for a in arrays]
    magnitudes = np.abs(np.concatenate([np.ravel(a) for a in arrays])) if arrays else np.zeros(0)
    nonzero = magnitudes[magnitudes > 0]
    if nonzero.size == 0:
        return [np.asarray(a, dtype=np.float64) for a in arrays]
    bound = factor * float(np.median(nonzero))
    return [np.clip(np.asarray(a, dtype=np.float64), -bound, bound) for a in arrays]


def clip_norms(contributions: Sequence[Contribution], factor: float) -> list[Contribution]:
    """Each contribution scaled to at most ``factor`` times the median contribution norm (0: unchanged)."""
    if factor <= 0 or not contributions:
        return list(contributions)
    norms = np.array([np.linalg.norm(c.rows) for c in contributions])
    bound = factor * float(np.median(norms))
    return [Contribution(c.ids, c.rows * (bound / norm)) if norm > bound else c
            for c, norm in zip(contributions, norms)]


def combine(contributions: Sequence[Contribution], weights: np.ndarray, rule: str,
            trim: float) -> tuple[np.ndarray, np.ndarray]:
    """The aggregate rows of every id any client reported: (ids (U,), rows (U, width))."""
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; choose one of {', '.join(RULES)}")
    union = np.unique(np.concatenate([c.ids for c in contributions]))
    width = contributions[0].rows.shape[1]
    if rule == "mean":
        acc = np.zeros((union.size, width))
        scaled = np.empty_like(acc)  # one buffer for every client's w x rows: a dense delta is model-sized
        for c, w in zip(contributions, weights):
            if c.ids.size == union.size:  # every id (a dense delta): no gather and scatter of the whole row
                acc += np.multiply(c.rows, w, out=scaled)
            else:
                acc[np.searchsorted(union, c.ids)] += w * c.rows
        return union, acc
    stacked = np.full((len(contributions), union.size, width), np.nan)  # (m, U, width); nan: not reported
    for i, c in enumerate(contributions):
        stacked[i, np.searchsorted(union, c.ids)] = c.rows
    reported = ~np.isnan(stacked[:, :, 0])  # (m, U)
    share = (weights[:, None] * reported).sum(axis=0)  # (U,) weight of the clients behind each id
    location = np.nanmedian(stacked, axis=0) if rule == "median" else _trimmed_mean(stacked, reported, trim)
    return union, share[:, None] * location


def _trimmed_mean(stacked: np.ndarray, reported: np.ndarray, trim: float) -> np.ndarray:
    """Per (id, column): the mean of the reported values after cutting ``floor(trim n)`` from each end."""
    ordered = np.sort(stacked, axis=0)  # nan (not reported) sorts last
    n = reported.sum(axis=0)  # (U,)
    cut = np.floor(trim * n).astype(np.int64)
    cut = np.where(n - 2 * cut < 1, (n - 1) // 2, cut)  # keep at least one value
    sums = np.concatenate([np.zeros((1, *ordered.shape[1:])), np.cumsum(np.nan_to_num(ordered), axis=0)])
    hi = np.broadcast_to((n - cut)[None, :, None], (1, *ordered.shape[1:]))
    lo = np.broadcast_to(cut[None, :, None], (1, *ordered.shape[1:]))
    kept = np.take_along_axis(sums, hi, axis=0)[0] - np.take_along_axis(sums, lo, axis=0)[0]
    return kept / (n - 2 * cut)[:, None]
