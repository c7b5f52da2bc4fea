"""FedAvg: full first-order fine-tuning, dense weights down and dense deltas up.

The reference point the seed methods are measured against: every client takes
``local_steps`` optimiser steps (SGD or AdamW, fresh optimiser state each round,
as a stateless client would) on every trainable tensor and uploads the whole
delta, ``4 * numel`` bytes; the server sends the whole model back down. The
message types and the server side are :class:`~fedseed.algorithms.dense.DenseAlgorithm`'s.

The local loop (:func:`first_order_steps`) is also FedIT's: FedIT is this loop
on LoRA adapters instead of the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedseed.algorithms.base import OPTIMIZERS, Batches, make_optimizer
from fedseed.algorithms.dense import DenseAlgorithm, DenseTask, LocalRun
from fedseed.memory import backward_memory
from fedseed.models import LocalModel
from fedseed.settings import ConfigError, check_choices, require_positive, setting

@dataclass(frozen=True)
class FedAvgConfig:
    """Hyperparameters of the first-order local training (FedAvg, and FedIT on adapters)."""

    local_steps: int = setting(10, "optimiser steps per client per round")
    lr: float = setting(1e-5, "local learning rate")
    optimizer: str = setting("adamw", "local optimiser (fresh each round)", OPTIMIZERS)
    weight_decay: float = setting(0.0, "decoupled weight decay (torch's AdamW default 0.01 would hide in here)")
    grad_accum: int = setting(1, "batches per optimiser step")
    max_grad_norm: float = setting(0.0, "clip the gradient norm to this; 0 = no clipping")

    def __post_init__(self) -> None:
        require_positive(self, "algorithm", "local_steps", "lr", "grad_accum")
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"`algorithm.{name}` must be >= 0, got {getattr(self, name)!r}")
        check_choices(self, "algorithm")


def _accumulate(model: LocalModel, batches: Batches, grad_accum: int) -> float:
    """Backward over ``grad_accum`` batches; the mean loss, or NaN (no further backward) if one is not finite."""
    total = 0.0
    for _ in range(grad_accum):
        loss = model.loss(next(batches))
        if not torch.isfinite(loss):
            return math.nan
        (loss / grad_accum).backward()
        total += float(loss.detach())
    return total / grad_accum


def first_order_steps(model: LocalModel, batches: Batches, cfg: FedAvgConfig) -> LocalRun:
    """``cfg.local_steps`` optimiser steps on ``model.trainable``, the model staying in eval mode.

    Every fedseed method trains without dropout: dropout would draw from torch's
    global generator, so a client's round would depend on what else the process
    drew before it, and replays, resumes and the Flower runner would not agree bit
    for bit. (Ferret and FedKRSO stay in eval mode for the same reason; the
    zeroth-order methods must, since a step compares two forwards of one function.)
    A step whose loss or gradient norm is not finite is skipped (counted, no
    update), so one bad batch cannot poison the weights.
    """
    params = [p for _, p in model.trainable]
    optimizer = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    # With no clipping, max_norm=inf still returns the norm and scales by exactly 1.0.
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    losses: list[float] = []
    skipped = 0
    try:
        with torch.enable_grad(), backward_memory():
            for _ in range(cfg.local_steps):
                optimizer.zero_grad(set_to_none=True)
                loss = _accumulate(model, batches, cfg.grad_accum)
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if math.isfinite(loss) else None
                if norm is None or not torch.isfinite(norm):
                    skipped += 1
                    continue
                optimizer.step()
                losses.append(loss)
    finally:
        optimizer.zero_grad(set_to_none=True)  # free the gradients: evaluation and ZO methods need no grads
    return LocalRun(cfg.local_steps, skipped, losses)


class FedAvg(DenseAlgorithm):
    """FedAvg on every trainable tensor of the model."""

    # fedseed compare's setting: no paper value at this scale; AdamW steps and lr tuned here.
    compare: ClassVar[dict[str, Any]] = {"local_steps": 10, "lr": 1e-3, "optimizer": "adamw"}

    name = "fedavg"

    def local_steps(self, model: LocalModel, batches: Batches, task: DenseTask) -> LocalRun:
        return first_order_steps(model, batches, self.config)
