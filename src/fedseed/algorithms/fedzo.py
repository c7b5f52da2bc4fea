"""FedZO: zeroth-order local steps with a fresh direction every step, dense deltas up.

Each local step draws ``num_directions`` fresh seeds from
``(run seed, round, client, step, j)`` and, for each, estimates the directional
derivative ``g_j = (L(w + eps z_j) - L(w - eps z_j)) / 2eps`` with FedKSeed's
:class:`~fedseed.algorithms.zeroth_order.Perturbation` (the weights are never
perturbed in place); the step moves ``w -= lr / b * sum_j g_j z_j``.

Unlike FedKSeed the seeds are not from a fixed pool and nobody replays them:
the client uploads its dense delta and the server averages deltas as FedAvg
does. It is the zeroth-order baseline whose communication is not reduced, so it
separates what zeroth-order training costs in accuracy from what the seed
trick saves in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedseed.algorithms.base import Batches
from fedseed.algorithms.dense import DenseAlgorithm, DenseTask, LocalRun
from fedseed.algorithms.zeroth_order import Perturbation, estimator
from fedseed.directions import DISTRIBUTIONS, derive_seed
from fedseed.models import LocalModel
from fedseed.settings import check_choices, require_positive, setting

STEP_TAG = 0x2E05


@dataclass(frozen=True)
class FedZOConfig:
    """Hyperparameters of FedZO's local zeroth-order steps (FedKSeed's defaults where they overlap)."""

    local_steps: int = setting(200, "zeroth-order steps per client per round")
    lr: float = setting(3e-7, "local learning rate")
    eps: float = setting(5e-4, "perturbation scale")
    num_directions: int = setting(1, "b: two-point estimates averaged per step")
    distribution: str = setting("rademacher", "direction entries: rademacher or gaussian", DISTRIBUTIONS)

    def __post_init__(self) -> None:
        require_positive(self, "algorithm", "local_steps", "lr", "eps", "num_directions")
        check_choices(self, "algorithm")


class FedZO(DenseAlgorithm):
    """FedZO: the dense-delta protocol around zeroth-order local steps."""

    # fedseed compare's setting: FedKSeed's zeroth-order settings with fresh seeds and dense uploads.
    compare: ClassVar[dict[str, Any]] = {"local_steps": 100, "lr": 5e-5, "eps": 1e-3}

    name = "fedzo"
    privacy_modes = ("client", "example")

    def step_seeds(self, round: int, client: int, step: int) -> list[int]:
        """The fresh direction seeds of one local step."""
        return [derive_seed(self.seed, STEP_TAG, round, client, step, j) for j in range(self.config.num_directions)]

    def local_steps(self, model: LocalModel, batches: Batches, task: DenseTask) -> LocalRun:
        cfg = self.config
        losses: list[float] = []
        skipped = 0
        estimate = estimator(self.example_noise, task.round, task.client, batches.num_examples)
        with Perturbation(model, cfg.distribution) as zo:
            for step in range(cfg.local_steps):
                seeds = self.step_seeds(task.round, task.client, step)
                batch = next(batches)
                estimates = [estimate(zo, batch, seed, cfg.eps) for seed in seeds]
                g = np.array([e[0] for e in estimates])  # (b,)
                if not np.isfinite(g).all():
                    skipped += 1
                    continue
                zo.defer(seeds, -cfg.lr / len(seeds) * g)
                losses.append(float(np.mean([(plus + minus) / 2 for _, plus, minus in estimates])))
        if self.example_noise is not None:
            losses = []  # the losses are not privatised: they stay on the client
        return LocalRun(cfg.local_steps, skipped, losses)
