"""Turning a validated config into the pieces a runner moves messages between.

Both runners (in-process simulation and Flower) build their clients' data, the
model and the algorithm here, so the same config gives the same partition, the
same batches and the same seeds wherever it runs. Randomness is derived from
``(run seed, round, client, purpose)``, never from a stream that advances, which
is what makes an interrupted run resume to the identical model.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseed import privacy
from fedseed.algorithms import Algorithm, algorithm_config, build_algorithm
from fedseed.config import Config, ConfigError
from fedseed.data import (
    ClassifiedExample,
    Example,
    Partition,
    TokenizedExample,
    TruncationStats,
    collate,
    collate_classification,
    holdout_split,
    load_examples,
    partition_by_key,
    partition_dirichlet,
    partition_iid,
    tokenize_classification,
    tokenize_examples,
)
from fedseed.data.loaders import SST2_LABEL_WORDS
from fedseed.data.subsample import fedkseed_natural_instructions
from fedseed.data.writers import write_examples
from fedseed.models import LocalModel, content_hash, load_model

BATCH_TAG = 0xBA7C
SAMPLE_TAG = 0x5A3D
SUBSET_TAG = 0x5B5E
EVAL_TAG = 0xE7A1


class BatchStream:
    """A client's endless stream of training batches, reshuffled every epoch from its own seed."""

    def __init__(self, examples: list, batch_size: int, pad_id: int, seed: list[int]):
        if not examples:
            raise ValueError("a client with no training examples cannot train")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.collate = collate_classification if isinstance(examples[0], ClassifiedExample) else collate
        self.num_examples = len(examples)
        self._rng = np.random.default_rng(seed)
        self._order: list[int] = []

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self):
        picked = []
        while len(picked) < min(self.batch_size, self.num_examples):
            if not self._order:
                self._order = self._rng.permutation(self.num_examples).tolist()
            picked.append(self.examples[self._order.pop()])
        return self.collate(picked, self.pad_id)


def sample_clients(seed: int, round: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of one round, sorted; a pure function of (seed, round)."""
    rng = np.random.default_rng([seed, round, SAMPLE_TAG])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


@dataclass
class Data:
    """Examples after loading, holding out, partitioning and tokenising: what one party holds."""

    partition: Partition | None  # None on a deployed node or server: nobody partitions
    clients: dict[int, list[TokenizedExample]]  # client -> its training examples (a node holds only its own)
    heldout: list[Any]  # TokenizedExample (ClassifiedExample for classification), shuffled once with the run seed; evaluation takes prefixes (empty: none)
    references: list[str]  # target text of each held-out example
    train_stats: TruncationStats
    heldout_stats: TruncationStats
    classes: list[str]  # class names for classification tasks, empty for generation tasks


def split_examples(cfg: Config) -> tuple[list[Example], list[Example]]:
    """The training examples (the held-out category removed, capped at ``max_train_examples``) and the held-out ones.

    The held-out examples come from ``data.eval_path`` when it is set (all of it, or
    its ``holdout`` category), else from ``data.path``: its ``holdout`` category or
    the data set's test split.
    """
    d = cfg.data
    if d.eval_path:
        train = _without_holdout(load_examples(d.dataset, d.path, "train"), d.holdout)
    elif d.holdout:
        train, heldout = holdout_split(load_examples(d.dataset, d.path, "train"), d.holdout)
    elif d.dataset in ("dolly", "codealpaca"):
        raise ConfigError(f"`data.holdout` must name a category to hold out for {d.dataset} (it has no test split), "
                          "or `data.eval_path` a file of held-out examples")
    else:
        train = load_examples(d.dataset, d.path, "train")
    if d.subsample == "fedkseed-ni":
        train = fedkseed_natural_instructions(train, "train", cfg.run.seed)
    if d.max_train_examples and len(train) > d.max_train_examples:
        keep = np.random.default_rng([cfg.run.seed, SUBSET_TAG]).choice(len(train), d.max_train_examples, replace=False)
        train = [train[i] for i in sorted(keep)]
    return train, (heldout_examples(cfg) if d.eval_path or not d.holdout else heldout)


def heldout_examples(cfg: Config) -> list[Example]:
    """What the evaluating party evaluates on: ``data.eval_path`` (its ``holdout`` category, if set) or the test split."""
    d = cfg.data
    if d.eval_path:
        examples = load_examples(d.dataset, d.eval_path, "test")
        if d.holdout:
            return [ex for ex in examples if ex.category == d.holdout]
    elif d.holdout:
        return holdout_split(load_examples(d.dataset, d.path, "train"), d.holdout)[1]
    else:
        examples = load_examples(d.dataset, d.path, "test")
    return fedkseed_natural_instructions(examples, "test", cfg.run.seed) if d.subsample == "fedkseed-ni" else examples


def _without_holdout(examples: list[Example], holdout: str) -> list[Example]:
    return [ex for ex in examples if ex.category != holdout] if holdout else examples


def partition_examples(cfg: Config, train: list[Example]) -> Partition:
    """Which training examples each client holds (in-process runs, and ``fedseed partition``)."""
    d, fed, seed = cfg.data, cfg.federation, cfg.run.seed
    if d.partition == "by-task":
        part = partition_by_key([ex.category for ex in train], seed)
        if len(part.clients) != fed.num_clients:
            raise ConfigError(
                f"`federation.num_clients` is {fed.num_clients} but the by-task partition gives "
                f"{len(part.clients)} clients (one per task); set num_clients = {len(part.clients)}"
            )
        return part
    if d.partition == "dirichlet":
        return partition_dirichlet([ex.category for ex in train], fed.num_clients, d.alpha, seed,
                                   d.min_client_examples, d.balance)
    return partition_iid(len(train), fed.num_clients, seed)


def classes_of(cfg: Config, train: list[Example]) -> list[str]:
    """Class names of a classification task: the data set's own labels, so every party numbers them alike."""
    if cfg.model.resolved_task(cfg.data.dataset) != "classification":
        return []
    if cfg.data.dataset == "sst2":
        return sorted(SST2_LABEL_WORDS.values())
    return sorted({ex.output for ex in train})


def _tokenize(cfg: Config, tokenizer, examples: list[Example], classes: list[str]):
    if classes:
        return tokenize_classification(examples, tokenizer, cfg.data.max_length, classes)
    return tokenize_examples(examples, tokenizer, cfg.data.max_length, cfg.data.prompt)


def _client_tokens(cfg: Config, tokenizer, client: int, examples: list[Example], classes: list[str]):
    tokens, stats = _tokenize(cfg, tokenizer, examples, classes)  # tokenised per client: drops stay inside it
    if not tokens:
        raise ConfigError(f"client {client} has no example that fits `data.max_length` = {cfg.data.max_length}; "
                          "raise it")
    return tokens, stats


def _heldout_tokens(cfg: Config, tokenizer, heldout: list[Example], classes: list[str]):
    order = np.random.default_rng([cfg.run.seed, EVAL_TAG]).permutation(len(heldout))
    held, stats = _tokenize(cfg, tokenizer, [heldout[i] for i in order], classes)
    if heldout and not held:
        raise ConfigError(f"no held-out example fits `data.max_length` = {cfg.data.max_length}; raise it")
    references = [classes[ex.label] for ex in held] if classes else [_reference(tokenizer, ex) for ex in held]
    return held, references, stats


def prepare_data(cfg: Config, tokenizer) -> Data:
    """In-process runs: one data set, partitioned over every client, and the held-out set."""
    train, heldout = split_examples(cfg)
    classes = classes_of(cfg, train)
    partition = partition_examples(cfg, train)
    clients, stats = {}, []
    for c, idx in enumerate(partition.clients):
        clients[c], st = _client_tokens(cfg, tokenizer, c, [train[i] for i in idx], classes)
        stats.append(st)
    held, references, heldout_stats = _heldout_tokens(cfg, tokenizer, heldout, classes)
    return Data(partition, clients, held, references, _sum_stats(stats), heldout_stats, classes)


def node_data(cfg: Config, tokenizer, client: int) -> Data:
    """A deployed node: every example of its own ``data.path`` is client ``client``'s, and nothing else."""
    train = _without_holdout(load_examples(cfg.data.dataset, cfg.data.path, "train"), cfg.data.holdout)
    classes = classes_of(cfg, train)
    tokens, stats = _client_tokens(cfg, tokenizer, client, train, classes)
    empty = TruncationStats(0, 0, 0, 0)
    return Data(None, {client: tokens}, [], [], stats, empty, classes)


def server_data(cfg: Config, tokenizer) -> Data:
    """A deployed server: only the held-out examples of ``data.eval_path`` (none when it is empty), no training data."""
    classes = classes_of(cfg, [])
    heldout = heldout_examples(cfg) if cfg.data.eval_path else []
    held, references, stats = _heldout_tokens(cfg, tokenizer, heldout, classes)
    return Data(None, {}, held, references, TruncationStats(0, 0, 0, 0), stats, classes)


def _reference(tokenizer, ex: TokenizedExample) -> str:
    """The target text as the model sees it (after truncation), for Rouge-L and accuracy.

    Decoded, special tokens skipped and not stripped, as the official code decodes its label ids.
    """
    response = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100]
    return tokenizer.decode(response, skip_special_tokens=True)


def _sum_stats(stats: list[TruncationStats]) -> TruncationStats:
    return TruncationStats(*(sum(getattr(s, f) for s in stats) for f in ("total", "kept", "truncated", "dropped")))


@dataclass
class Experiment:
    """Everything a runner needs: the model copy, the data and the algorithm."""

    config: Config
    model: LocalModel
    tokenizer: Any  # a transformers tokenizer
    data: Data
    base_hash: str

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def algorithm(self) -> Algorithm:
        """A fresh algorithm object (server and clients each build their own)."""
        return build_algorithm(self.config.algorithm, self.config.run.seed, self.config.robust, self.privacy)

    @functools.cached_property
    def privacy(self) -> privacy.Plan | None:
        """The run's differential privacy, resolved once (calibrating sigma takes the accountant a moment)."""
        cfg, fed = self.config, self.config.federation
        if not cfg.privacy.on:
            return None
        schedule = [sample_clients(cfg.run.seed, r, fed.num_clients, fed.clients_per_round)
                    for r in range(1, fed.rounds + 1)]
        method = algorithm_config(cfg.algorithm)
        steps = method.local_steps * getattr(method, "num_directions", 1)  # FedZO: b releases per batch
        return privacy.plan(cfg.privacy, schedule, fed.num_clients, cfg.data.batch_size, steps)

    def client_examples(self) -> dict[int, int]:
        """Training examples per client, where this party knows them (in process: all; a node: its own)."""
        return {c: len(examples) for c, examples in self.data.clients.items()}

    def batches(self, round: int, client: int) -> BatchStream:
        return BatchStream(self.data.clients[client], self.config.data.batch_size, self.pad_id,
                           [self.config.run.seed, round, client, BATCH_TAG])


def load(cfg: Config, num_labels: int = 2):
    """The config's model and tokenizer (classification heads seeded by the run seed)."""
    return load_model(cfg.model.name_or_path, task=cfg.model.resolved_task(cfg.data.dataset), dtype=cfg.model.dtype,
                      device=cfg.run.device, trust_remote_code=cfg.model.trust_remote_code, num_labels=num_labels,
                      seed=cfg.run.seed)


def prepare(cfg: Config) -> Experiment:
    module, tokenizer = load(cfg)
    base_hash = content_hash(module)
    return Experiment(cfg, LocalModel.wrap(module, cfg.model.name_or_path), tokenizer, prepare_data(cfg, tokenizer),
                      base_hash)


def prepare_server(cfg: Config) -> Experiment:
    """A deployed server: the model and its own evaluation set (``data.eval_path``), no client's training data."""
    module, tokenizer = load(cfg)
    model = LocalModel.wrap(module, cfg.model.name_or_path)
    return Experiment(cfg, model, tokenizer, server_data(cfg, tokenizer), content_hash(module))


def write_partition(cfg: Config, out: Path) -> tuple[list[Path], Path]:
    """Each client's share of the data set, one file (or folder) per client in the data set's own layout, and the
    held-out examples: what ``fedseed partition`` hands to the data owners and to the server."""
    train, heldout = split_examples(cfg)
    partition = partition_examples(cfg, train)
    files = [write_examples(cfg.data.dataset, [train[i] for i in idx], out / f"client-{c:03d}")
             for c, idx in enumerate(partition.clients)]
    eval_file = write_examples(cfg.data.dataset, heldout, out / "eval", split="test")
    (out / "partition.json").write_text(json.dumps(partition.to_json()))
    return files, eval_file
