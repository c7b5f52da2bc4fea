"""The one interface every federated method implements.

An algorithm is pure: it gets a model, batches and a message, and returns a
message. It never opens a socket, reads a file or prints. Runners call the hooks
in this order each round::

    server:  task = algo.task(round, client, since)        -> encoded, sent
    client:  algo.sync(model, task); reply = algo.train(model, batches, task)
    server:  algo.check(reply, task)                        (reject before anything changes)
             update = algo.aggregate(round, replies)         -> appended to the ledger
             algo.commit(update)                             (the only state change)

Replaying a ledger is ``commit`` for every stored update, then ``sync``: that is how
the evaluator, a late client and ``fedseed export`` all get the same weights.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

import torch

from fedseed.algorithms.robust import RULES, RobustSection, capped_weights
from fedseed.models import LocalModel
from fedseed.privacy import ClientNoise, ExampleNoise, Plan
from fedseed.settings import ConfigError
from fedseed.wire import F32, U32

Batch = dict[str, torch.Tensor]
R = TypeVar("R", bound="BaseReply")


class Batches(Protocol):
    """An endless, seeded stream of a client's training batches."""

    num_examples: int  # the client's training examples: its weight in aggregation

    def __next__(self) -> Batch: ...
EVALUATOR = 0xFFFFFFFF  # the client id of the party that only syncs and evaluates


OPTIMIZERS = ("sgd", "adam", "adamw")  # the local optimisers of every first-order method


def make_optimizer(params: Sequence[torch.Tensor], name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A fresh optimiser each round, as a stateless client has: SGD (momentum 0), Adam or AdamW."""
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    return kinds[name](params, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class BaseReply:
    """What every method's reply starts with: who answers which round, and how its local training went.

    A method's reply subclasses this, adds what it reports and ends with
    ``fingerprint: U64 = 0`` (:meth:`Algorithm.fingerprint` of the copy synced for
    the task; 0: check off); the wire order is this class's fields, then its own.
    """

    round: U32
    client: U32
    num_examples: U32  # the client's training examples: its aggregation weight
    steps: U32  # local steps attempted; ``skipped`` of them met a non-finite loss or gradient
    skipped: U32
    loss: F32  # mean training loss over the kept steps

    def validate(self) -> None:
        if self.skipped > self.steps:
            raise ValueError(f"skipped {self.skipped} > steps {self.steps}")


class InvalidReply(ValueError):
    """A client reply failed validation; the server state is untouched."""


def require(ok: bool, message: str) -> None:
    """Protocol checks raise :class:`InvalidReply`, never ``assert`` (asserts vanish under -O)."""
    if not ok:
        raise InvalidReply(message)


class Algorithm(ABC):
    """A federated method: server aggregation, client update and how updates apply.

    Subclasses set the three wire message types and fill in the hooks.
    """

    name: str
    Task: ClassVar[type]
    Reply: ClassVar[type]
    Update: ClassVar[type]
    rules: ClassVar[tuple[str, ...]] = RULES  # the robust.rule values this method's updates can be combined by
    compare: ClassVar[dict[str, Any]] = {}  # [algorithm] values `fedseed compare` runs it with (tuned on stories260K)
    privacy_modes: ClassVar[tuple[str, ...]] = ("client",)  # the privacy.mode values besides off it implements

    def __init__(self, config: Any, seed: int, robust: RobustSection | None = None, privacy: Plan | None = None):
        """Everything a method needs, at construction: its config, the run seed, the server's defences and the
        run's differential privacy (``fedseed.privacy``; None: off)."""
        self.config = config
        self.seed = seed
        self.robust = robust if robust is not None else RobustSection()
        self.privacy = privacy
        self.committed = 0  # rounds folded in by ``commit``; the ledger position of the server state

    @classmethod
    def check_privacy(cls, config: Any, mode: str) -> None:
        """Raise :class:`ConfigError` unless this method, so configured, implements ``privacy.mode``."""
        if mode not in cls.privacy_modes:
            raise ConfigError(f"`privacy.mode` = {mode!r} is not available for {cls.name}: it is for the zeroth-order "
                              "methods, whose steps learn one scalar per batch (fedkseed, fedkseed-pro, fedzo); "
                              "use privacy.mode = \"client\"")

    @property
    def client_noise(self) -> ClientNoise | None:
        """The server's client-level mechanism, when the run has one: it replaces the robust pipeline."""
        return self.privacy.client if self.privacy is not None else None

    @property
    def example_noise(self) -> ExampleNoise | None:
        """The client's example-level mechanism, when the run has one."""
        return self.privacy.example if self.privacy is not None else None

    # -- server side -------------------------------------------------------------
    @abstractmethod
    def task(self, round: int, client: int, since: int) -> Any:
        """The downlink for ``client`` in ``round``; ``since`` is the ledger position its copy holds."""

    @abstractmethod
    def check(self, reply: Any, task: Any) -> None:
        """Raise :class:`InvalidReply` unless ``reply`` answers ``task`` and fits this server."""

    @abstractmethod
    def aggregate(self, round: int, replies: Sequence[Any]) -> Any:
        """Combine checked replies into one update (weighted by their example counts)."""

    @abstractmethod
    def commit(self, update: Any) -> None:
        """Fold an aggregated update into the server state (live rounds and replay alike)."""

    # -- client side -------------------------------------------------------------
    @abstractmethod
    def sync(self, model: LocalModel, task: Any) -> None:
        """Bring ``model`` to the global model the task was made from."""

    @abstractmethod
    def train(self, model: LocalModel, batches: Batches, task: Any) -> Any:
        """Local training from the synced model; return the reply."""

    # -- shared ------------------------------------------------------------------
    def check_reply(self, reply: BaseReply, task: Any, max_steps: int) -> None:
        """What every reply must satisfy before a method's own checks: it answers ``task``, its counts fit."""
        require(reply.round == task.round, f"`round` is {reply.round}, the task was for round {task.round}")
        require(reply.client == task.client, f"`client` is {reply.client}, the task was sent to {task.client}")
        require(reply.num_examples > 0, "`num_examples` must be > 0")
        require(reply.steps <= max_steps, f"`steps` {reply.steps} > local_steps {max_steps}")
        require(reply.skipped <= reply.steps, f"`skipped` {reply.skipped} > steps {reply.steps}")
        require(math.isfinite(reply.loss), f"`loss` is {reply.loss}, not finite")

    def weighted(self, round: int, replies: Sequence[R]) -> tuple[list[R], np.ndarray]:
        """The replies in client order (arrival order must not change the bits) and their capped example weights."""
        if not replies:
            raise InvalidReply(f"round {round}: no replies to aggregate")
        ordered = sorted(replies, key=lambda r: r.client)
        counts = [1 if self.robust.weighting == "equal" else r.num_examples for r in ordered]
        return ordered, capped_weights(counts, self.robust.max_weight)

    def expect_next(self, update: Any) -> None:
        """Updates are committed in round order, each exactly once."""
        if update.round != self.committed + 1:
            raise InvalidReply(f"update for round {update.round}, but round {self.committed + 1} is next")

    def fingerprint(self, model: LocalModel, task: Any) -> int:
        """What the reply reports of the copy just synced for ``task``: the server compares it with its own."""
        return model.fingerprint(self.seed, task.round - 1, self.robust.fingerprint_samples)

    def bind(self, model: LocalModel) -> None:
        """Prepare a freshly loaded model; runners call it once per model, before any other hook.

        Most methods need nothing. FedIT injects its adapters here; methods whose
        server keeps dense weights capture ``w0`` here.
        """

    def export(self, model: LocalModel) -> torch.nn.Module:
        """The plain ``transformers`` module to save (FedIT merges its adapters here)."""
        return model.module
