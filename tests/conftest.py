"""Shared fixtures: the real tiny model and Dolly sample fedseed ships, ../shared where it exists, one small run."""

from __future__ import annotations

import dataclasses

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fedseed.locations import QUICKSTART_DATA, QUICKSTART_MODEL, resolve

# Base-weight copies fedseed writes (16-bit models, seeded heads, snapshots) go to a throwaway folder, not ~/.cache.
os.environ.setdefault("FEDSEED_CACHE", str(Path(tempfile.gettempdir()) / "fedseed-test-cache"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # reference data beside our own checkouts; a bare clone has none
STORIES = Path(resolve(QUICKSTART_MODEL))  # shipped with fedseed: tests run from a bare clone
DOLLY = Path(resolve(QUICKSTART_DATA))  # 4,000 Dolly training examples + 303 held-out summarization ones

# What a test needs from ../shared, and where a user gets it (the repository cannot carry these).
SOURCES = {
    "data/dolly": "databricks-dolly-15k.jsonl from the Hub data set databricks/databricks-dolly-15k",
    "data/natural-instructions": "git clone https://github.com/allenai/natural-instructions (tasks/ and splits/)",
    "data/gsm8k": "train.jsonl and test.jsonl from https://github.com/openai/grade-school-math (grade_school_math/data)",
    "data/sst2": "train.tsv / dev.tsv / test.tsv of GLUE SST-2 (Hub data set stanfordnlp/sst2)",
    "data/codealpaca": "code_alpaca_2k.json from https://github.com/sahil280114/codealpaca (data/)",
}


def shared(relative: str) -> Path:
    """``../shared/<relative>``, or skip the test saying what to fetch and where to put it."""
    path = SHARED / relative
    if not path.exists():
        source = next((what for prefix, what in SOURCES.items() if relative.startswith(prefix)), relative)
        pytest.skip(f"needs {path}: fetch {source} and put it there")
    return path


def small_config(output_dir: Path, algorithm: dict[str, Any] | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """A few-second FedKSeed run on stories260K + Dolly; sections override key by key."""
    cfg: dict[str, Any] = {
        "run": {"output_dir": str(output_dir), "seed": 7},
        "model": {"name_or_path": str(STORIES)},
        "data": {"dataset": "dolly", "path": str(DOLLY), "holdout": "summarization", "max_length": 512,
                 "max_train_examples": 300},
        "federation": {"num_clients": 6, "clients_per_round": 2, "rounds": 3},
        "algorithm": algorithm or {"name": "fedkseed", "num_seeds": 256, "local_steps": 30, "lr": 5e-5, "eps": 1e-3},
        "eval": {"loss_examples": 24, "generate_examples": 4, "max_new_tokens": 8, "batch_size": 8},
    }
    for name, table in sections.items():
        cfg[name] = {**cfg.get(name, {}), **table}
    return cfg


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch with ``n`` intra-op threads, restored after: CPU float sums depend on the thread count."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_simulation(cfg: dict[str, Any], **kwargs):
    """Prepare and run ``cfg`` in process; returns (experiment, run folder, ledger)."""
    from fedseed.config import load_config
    from fedseed.experiment import prepare
    from fedseed.runfolder import RunFolder
    from fedseed.runners.simulation import simulate

    config = load_config(cfg)
    exp = prepare(config)
    folder = RunFolder(config.run.output_dir)
    if not kwargs.get("resume"):
        folder.create(config, exp.data.partition.to_json(), overwrite=True)
    ledger = simulate(exp, folder, **kwargs)
    return exp, folder, ledger


def method_config(output_dir: Path, algorithm: dict[str, Any]):
    """The validated 3-round, 5-client run the Ferret and FedKRSO tests share (2 clients a round)."""
    from fedseed.config import load_config

    return load_config({
        "run": {"output_dir": str(output_dir), "seed": 7},
        "model": {"name_or_path": str(STORIES)},
        "data": {"path": str(DOLLY), "holdout": "summarization", "max_length": 384, "max_train_examples": 300},
        "federation": {"num_clients": 5, "clients_per_round": 2, "rounds": 3},
        "algorithm": algorithm,
        "eval": {"loss_examples": 16, "generate_examples": 1, "max_new_tokens": 2},
    })


def method_run(output_dir: Path, algorithm: dict[str, Any]):
    """:func:`method_config` run in process: (experiment, run folder, ledger)."""
    return run_simulation(dataclasses.asdict(method_config(output_dir, algorithm)))


def fresh_model():
    """stories260K as loaded, wrapped: a party that has seen nothing yet."""
    from fedseed.models import LocalModel, load_model

    module, _ = load_model(str(STORIES))
    return LocalModel.wrap(module)


def replayed_server(exp, model, ledger, rounds: int):
    """A server algorithm bound to ``model`` with the ledger's first ``rounds`` updates committed."""
    algo = exp.algorithm()
    algo.bind(model)
    for update in ledger.decoded(algo.Update)[:rounds]:
        algo.commit(update)
    return algo


def sync_over_wire(algo, model, round: int, since: int) -> None:
    """Sync ``model`` to the global model through an encoded task, as a late client would."""
    from fedseed import wire
    from fedseed.algorithms import EVALUATOR

    task = algo.task(round, EVALUATOR, since)
    algo.sync(model, wire.decode(wire.encode(task), algo.Task))


def assert_same_weights(a, b) -> None:
    import torch

    for (name, p), (_, q) in zip(a.trainable, b.trainable):
        assert torch.equal(p, q), name


@pytest.fixture(scope="session")
def fedkseed_run(tmp_path_factory):
    """One small FedKSeed run shared by the tests that only read its results."""
    out = tmp_path_factory.mktemp("fedkseed") / "run"
    return run_simulation(small_config(out))
