"""Rebuilding a run's model from its ledger: ``eval``, ``export`` and late joiners all go through here.

The ledger names the base model and its content hash; the updates are replayed
into a fresh algorithm object with ``commit`` and applied with ``sync``, the same
two hooks a live round uses, so a rebuilt model equals the live one bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedseed import wire
from fedseed.algorithms import EVALUATOR, Algorithm, build_algorithm
from fedseed.config import Config, load_config
from fedseed.ledger import Ledger
from fedseed.experiment import load
from fedseed.models import LocalModel, content_hash
from fedseed.runfolder import RunFolder


@dataclass
class Rebuilt:
    config: Config
    model: LocalModel
    tokenizer: object
    algorithm: Algorithm
    ledger: Ledger


def replay(algo: Algorithm, ledger: Ledger, model: LocalModel) -> None:
    """Commit every stored update into ``algo`` and bring ``model`` to the result."""
    for update in ledger.decoded(algo.Update):
        algo.commit(update)
    task = algo.task(algo.committed + 1, EVALUATOR, model.position)
    algo.sync(model, wire.decode(wire.encode(task), algo.Task))


def rebuild(run_dir: str | Path, overrides: Sequence[str] = ()) -> Rebuilt:
    """Load the run's base model, check it is the one the ledger was built on, replay the ledger."""
    folder = RunFolder(run_dir)
    ledger = Ledger.open(folder.ledger_path)
    cfg = load_config(folder.config_path, list(overrides))
    module, tokenizer = load(cfg)
    ledger.check_base(cfg.model.name_or_path, content_hash(module))
    model = LocalModel.wrap(module, cfg.model.name_or_path)
    algo = build_algorithm(cfg.algorithm, cfg.run.seed, cfg.robust)
    algo.bind(model)
    replay(algo, ledger, model)
    return Rebuilt(cfg, model, tokenizer, algo, ledger)
