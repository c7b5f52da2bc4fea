"""Split training examples among federated clients: IID, Dirichlet label skew, by key.

A :class:`Partition` holds only indices into the training list, so it is small enough
to write into the run folder and reload, and a run can be replayed on the same split.
All randomness comes from ``numpy.random.default_rng(seed)`` created here from the
given seed: the same arguments always give the same Partition, on any machine.

This module does not load or tokenise data; it sees labels and counts only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedseed.data.errors import DataError
from fedseed.data.example import Example

MAX_DIRICHLET_TRIES = 100
"""Redraws allowed before :func:`partition_dirichlet` gives up on ``min_size``."""


@dataclass(frozen=True)
class Partition:
    """Which training examples each client holds.

    Parameters
    ----------
    clients : tuple of tuple of int
        ``clients[k]`` are the indices (sorted ascending) into the training example
        list held by client ``k``. Every index appears in exactly one client.
    method : str
        ``"iid"``, ``"dirichlet"`` or ``"by-key"``, recorded for the run folder.
    seed : int
        The seed the partition was drawn from.
    """

    clients: tuple[tuple[int, ...], ...]
    method: str
    seed: int

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.clients)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_json` reverses it exactly."""
        return {
            "method": self.method,
            "seed": self.seed,
            "clients": [list(indices) for indices in self.clients],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Partition:
        """Rebuild a Partition from :meth:`to_json` output, checking every field."""
        for name, kind in (("method", str), ("seed", int), ("clients", list)):
            if not isinstance(d.get(name), kind) or isinstance(d.get(name), bool):
                raise DataError(
                    f"partition JSON: field `{name}` must be a {kind.__name__}, "
                    f"got {d.get(name)!r:.60}"
                )
        clients = []
        for k, indices in enumerate(d["clients"]):
            if not isinstance(indices, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
            ):
                raise DataError(
                    f"partition JSON: `clients[{k}]` must be a list of non-negative integers"
                )
            clients.append(tuple(indices))
        _check_disjoint(clients)
        return cls(clients=tuple(clients), method=d["method"], seed=d["seed"])


def _check_disjoint(clients: Sequence[Sequence[int]]) -> None:
    """Reject a partition that gives one example to two clients (it would double-count it)."""
    seen: dict[int, int] = {}
    for k, indices in enumerate(clients):
        for i in indices:
            if i in seen:
                raise DataError(
                    f"partition: example {i} is assigned to both client {seen[i]} and client {k}"
                )
            seen[i] = k


def _check_clients(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"`num_clients` must be >= 1, got {num_clients}")
    if num_clients > n:
        raise DataError(
            f"`num_clients` = {num_clients} is more than the {n} training examples; "
            "every client needs at least one example: lower `num_clients`"
        )


def _finish(groups: Sequence[np.ndarray], method: str, seed: int) -> Partition:
    """Sort each client's indices so the Partition does not depend on draw order."""
    clients = tuple(tuple(int(i) for i in np.sort(g)) for g in groups)
    return Partition(clients=clients, method=method, seed=seed)


def partition_iid(n: int, num_clients: int, seed: int) -> Partition:
    """Shuffle ``range(n)`` and deal it into ``num_clients`` near-equal shares.

    Client sizes differ by at most one, so IID runs isolate the effect of data
    heterogeneity from that of unequal client sizes.
    """
    _check_clients(n, num_clients)
    order = np.random.default_rng(seed).permutation(n)
    return _finish(np.array_split(order, num_clients), "iid", seed)


def _dirichlet_draw(
    by_label: Sequence[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator, cap: float
) -> list[np.ndarray]:
    """One label-skewed split: each label's shuffled indices cut by Dir(alpha) shares.

    A client already holding ``cap`` examples or more gets no share of the next labels.
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, dtype=np.int64)
    for indices in by_label:
        shuffled = rng.permutation(indices)
        shares = rng.dirichlet(np.full(num_clients, alpha)) * (sizes < cap)
        shares /= shares.sum()  # some client is below the cap: together they hold fewer than all examples
        cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(np.int64)
        for k, piece in enumerate(np.split(shuffled, cuts)):
            parts[k].append(piece)
            sizes[k] += len(piece)
    return [np.concatenate(p) for p in parts]


def partition_dirichlet(
    labels: Sequence[str], num_clients: int, alpha: float, seed: int, min_size: int = 1, balance: bool = False
) -> Partition:
    """Label-skewed partition: per label, client shares are drawn from Dir(alpha).

    Parameters
    ----------
    labels : sequence of str
        One label per training example (e.g. ``Example.category``).
    num_clients : int
    alpha : float
        Dirichlet concentration: small values (0.1) give each client few labels,
        large values (100) approach IID.
    seed : int
        Seeds the only generator used, so the result is reproducible.
    min_size : int, default 1
        Smallest client allowed. A draw that leaves a client smaller is redrawn from
        the same generator (so still deterministic), up to
        :data:`MAX_DIRICHLET_TRIES` times.
    balance : bool, default False
        Labels are dealt in sorted order; a client that already holds ``n /
        num_clients`` examples or more gets no share of the later labels (its share
        is zeroed and the others renormalised). This is the FedKSeed code's cap
        (``partition_idx_labeldir``, with ``min_size = 10``): without it a few
        clients of a skewed split hold most of the data.

    Returns
    -------
    Partition
        ``method`` is ``"dirichlet"``.
    """
    n = len(labels)
    _check_clients(n, num_clients)
    if not (math.isfinite(alpha) and alpha > 0):
        raise DataError(f"`alpha` must be a finite number > 0, got {alpha}")
    if min_size < 0 or min_size * num_clients > n:
        raise DataError(
            f"`min_size` = {min_size} is impossible for {num_clients} clients and {n} "
            f"examples (needs 0 <= min_size <= {n // num_clients})"
        )
    label_array = np.asarray(labels, dtype=object)
    # Sorted labels, not set order, so the draw sequence is the same in every process.
    by_label = [np.flatnonzero(label_array == label) for label in sorted(set(labels))]
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(MAX_DIRICHLET_TRIES):
        groups = _dirichlet_draw(by_label, num_clients, alpha, rng, n / num_clients if balance else math.inf)
        smallest = min(len(g) for g in groups)
        if smallest >= min_size:
            return _finish(groups, "dirichlet", seed)
    raise DataError(
        f"partition_dirichlet: after {MAX_DIRICHLET_TRIES} draws some client still had "
        f"fewer than `min_size` = {min_size} examples (last draw's smallest: {smallest}) "
        f"with {num_clients} clients, {n} examples, `alpha` = {alpha}; raise `alpha`, "
        "lower `num_clients` or lower `min_size`"
    )


def partition_by_key(keys: Sequence[str], seed: int) -> Partition:
    """One client per distinct key (for NI: one client per task).

    Clients are ordered by sorted key, so client ``k`` is the same task in every run.
    ``seed`` draws nothing; it is recorded so every Partition says how it was made.
    """
    if not keys:
        raise DataError("`keys` is empty; partition_by_key needs at least one example")
    key_array = np.asarray(keys, dtype=object)
    groups = [np.flatnonzero(key_array == key) for key in sorted(set(keys))]
    return _finish(groups, "by-key", seed)


def holdout_split(
    examples: Sequence[Example], holdout: str
) -> tuple[list[Example], list[Example]]:
    """Split off every example of category ``holdout`` as the evaluation set.

    Holding out a whole category (e.g. Dolly "summarization") tests generalisation
    to an unseen task, as in the FedKSeed evaluation.

    Returns
    -------
    train, heldout : list of Example
        Order within each list follows ``examples``.
    """
    present = sorted({ex.category for ex in examples})
    if holdout not in present:
        raise DataError(f"`holdout` = {holdout!r} is not a category here; categories present: {present}")
    train = [ex for ex in examples if ex.category != holdout]
    heldout = [ex for ex in examples if ex.category == holdout]
    return train, heldout
