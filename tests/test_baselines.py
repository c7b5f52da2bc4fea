"""The dense baselines (FedAvg, FedIT, FedZO) end to end on the real stories260K and Dolly.

Each method runs through the real in-process runner (``simulate``: separate server
and client objects, every message encoded and decoded), and the run folder it
leaves is rebuilt from the ledger alone (``replay.rebuild``). One ``prepare`` is
shared: each method gets its own fresh copy of the base module.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torch_threads
from conftest import DOLLY as DOLLY_SAMPLE, STORIES
from fedseed import wire
from fedseed.algorithms import InvalidReply, algorithm_config, build_algorithm
from fedseed.algorithms.dense import DenseReply, DenseUpdate, reply_bytes, task_bytes, update_bytes
from fedseed.algorithms.fedit import lora_layers
from fedseed.config import ConfigError, load_config
from fedseed.eval import heldout_loss
from fedseed.experiment import Experiment, prepare
from fedseed.ledger import Ledger
from fedseed.models import LocalModel
from fedseed.replay import rebuild
from fedseed.runfolder import RunFolder
from fedseed.runners.simulation import simulate

MODEL, DOLLY = STORIES, DOLLY_SAMPLE
SEED = 42
ROUNDS = 2
EVAL_EXAMPLES = 32
NUMEL = 260_032  # stories260K's parameters (embeddings tied to the head)
LORA_NUMEL = 5 * 8 * ((64 + 64) + (64 + 32))  # 5 layers, rank 8: q_proj 64->64, v_proj 64->32, A and B each

METHODS = {
    "fedavg": {"name": "fedavg", "local_steps": 3, "lr": 1e-3},
    "fedit": {"name": "fedit", "local_steps": 3, "lr": 1e-2},
    "fedzo": {"name": "fedzo", "local_steps": 15, "lr": 5e-5, "eps": 1e-3},
}
TRAINABLE = {"fedavg": NUMEL, "fedit": LORA_NUMEL, "fedzo": NUMEL}


def config(output_dir: Path, algorithm: dict) -> object:
    return load_config({
        "run": {"output_dir": str(output_dir), "seed": SEED},
        "model": {"name_or_path": str(MODEL)},
        "data": {"path": str(DOLLY), "holdout": "summarization", "max_length": 384, "max_train_examples": 300},
        "federation": {"num_clients": 4, "clients_per_round": 2, "rounds": ROUNDS},
        "eval": {"every": ROUNDS, "loss_examples": EVAL_EXAMPLES, "batch_size": 16, "before": False,
                 "generate_examples": 2, "max_new_tokens": 4},
        "algorithm": algorithm,
    })


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 260K-parameter model gains nothing from intra-op threads, and on a busy 2-core machine
    two spinning OpenMP threads make each forward ~20x slower; restored afterwards."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Experiment, torch.nn.Module]:
    """Data and model prepared once, and an untouched copy of the base module."""
    exp = prepare(config(tmp_path_factory.mktemp("base"), METHODS["fedavg"]))
    return exp, copy.deepcopy(exp.model.module)


@pytest.fixture(scope="module")
def loss_before(base) -> float:
    """The base model's held-out loss, as the runner measures it (every method starts here: FedIT's B is 0)."""
    exp, pristine = base
    return heldout_loss(pristine, exp.data.heldout[:EVAL_EXAMPLES], 16, exp.pad_id)


def fresh(base: tuple[Experiment, torch.nn.Module], algorithm: dict, output_dir: Path) -> Experiment:
    """The shared data with this method's config and a fresh copy of the base model."""
    exp, pristine = base
    model = LocalModel.wrap(copy.deepcopy(pristine))
    return dataclasses.replace(exp, config=config(output_dir, algorithm), model=model)


@dataclasses.dataclass
class Run:
    method: str
    exp: Experiment
    folder: RunFolder
    ledger: Ledger
    rows: list[dict]


@pytest.fixture(scope="module", params=list(METHODS))
def run(request, base, tmp_path_factory) -> Run:
    method = request.param
    out = tmp_path_factory.mktemp(method)
    exp = fresh(base, METHODS[method], out)
    folder = RunFolder(out)
    folder.create(exp.config, exp.data.partition.to_json())
    ledger = simulate(exp, folder)
    return Run(method, exp, folder, ledger, folder.metrics())


def test_lowers_heldout_loss(run: Run, loss_before: float) -> None:
    after = run.rows[-1]["eval_loss"]
    assert [r["round"] for r in run.rows] == list(range(1, ROUNDS + 1))
    assert loss_before - after > {"fedavg": 0.3, "fedit": 0.3, "fedzo": 0.03}[run.method], (loss_before, after)
    assert all(r["skipped_steps"] == 0 and math.isfinite(r["train_loss"]) for r in run.rows)


def test_trainable_set(run: Run) -> None:
    assert run.exp.model.numel == TRAINABLE[run.method]
    lora = [n for n, _ in run.exp.model.trainable if "lora_" in n]
    assert len(lora) == (20 if run.method == "fedit" else 0)


def test_bytes_per_round_match_the_formula(run: Run) -> None:
    n = TRAINABLE[run.method]
    assert task_bytes(n) == 4 + 4 + 4 + 4 + 4 * n  # header, round, client, count, weights
    assert reply_bytes(n) == 4 + 6 * 4 + 4 + 4 * n + 8  # header, six scalars, count, delta, fingerprint
    for row in run.rows:
        assert set(row["uplink_bytes"].values()) == {reply_bytes(n)}
        assert set(row["downlink_bytes"].values()) == {task_bytes(n)}
        assert row["uplink_total"] == 2 * reply_bytes(n)
    assert [len(frame) for frame in run.ledger.updates] == [update_bytes(n)] * ROUNDS
    if run.method != "fedit":
        assert 4 * NUMEL < reply_bytes(n) < 4 * NUMEL + 64  # FedAvg's uplink: the whole model in float32


def test_ledger_replay_equals_live_model(run: Run) -> None:
    rebuilt = rebuild(run.folder.path)
    live, replayed = run.exp.model.module.state_dict(), rebuilt.model.module.state_dict()
    assert live.keys() == replayed.keys()
    assert all(torch.equal(live[k], replayed[k]) for k in live)
    assert rebuilt.algorithm.committed == ROUNDS
    assert rebuilt.model.numel == TRAINABLE[run.method]


@pytest.mark.parametrize("run", ["fedit"], indirect=True)
def test_fedit_export_merges_adapters(run: Run, base) -> None:
    algo = build_algorithm(METHODS["fedit"], SEED)
    merged = algo.export(run.exp.model)
    assert not lora_layers(merged) and lora_layers(run.exp.model.module)  # a copy: the live model keeps its adapters
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in base[1].named_parameters()]
    ids = torch.tensor([run.exp.data.heldout[0].input_ids])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, run.exp.model.module(input_ids=ids).logits, atol=1e-4)


def test_fedit_bind_is_deterministic_and_starts_at_the_base_model(base, tmp_path) -> None:
    exp, pristine = base
    models = [LocalModel.wrap(copy.deepcopy(pristine)) for _ in range(2)]
    for m in models:
        torch.rand(8)  # parties' global generators differ: the adapters must not depend on them
        state = torch.get_rng_state()
        for algo in (build_algorithm(METHODS["fedit"], SEED), build_algorithm(METHODS["fedit"], SEED)):
            algo.bind(m)  # twice per model, as the runner binds its server and its client
        assert torch.equal(torch.get_rng_state(), state)  # and binding leaves the caller's generator alone
    a, b = ([p for _, p in m.trainable] for m in models)
    assert len(a) == 20 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(p.requires_grad == ("lora_" in n) for n, p in models[0].module.named_parameters())
    ids = torch.tensor([exp.data.heldout[0].input_ids])
    with torch.no_grad():  # B starts at zero: the adapted model computes the base model's function
        assert torch.equal(models[0].module(input_ids=ids).logits, pristine(input_ids=ids).logits)
    other = build_algorithm({**METHODS["fedit"], "rank": 4}, SEED)
    with pytest.raises(ValueError, match="rank 8"):
        other.bind(models[0])
    missing = build_algorithm({**METHODS["fedit"], "target_modules": "qkv"}, SEED)
    with pytest.raises(ValueError, match="`algorithm.target_modules` = 'qkv'"):
        missing.bind(LocalModel.wrap(copy.deepcopy(pristine)))


def test_rejected_replies_leave_the_server_unchanged(base, tmp_path) -> None:
    exp = fresh(base, {"name": "fedavg", "local_steps": 1, "lr": 1e-3}, tmp_path)
    server, client = exp.algorithm(), exp.algorithm()
    server.bind(exp.model)
    client.bind(exp.model)
    task = server.task(1, 3, exp.model.position)
    assert len(wire.encode(task)) == task_bytes(NUMEL)
    good = wire.decode(wire.encode(client.train(exp.model, exp.batches(1, 3), task)), DenseReply)
    weights = server.weights.copy()
    bad = {
        "size": dataclasses.replace(good, delta=good.delta[:-1]),
        "round": dataclasses.replace(good, round=2),
        "client": dataclasses.replace(good, client=1),
        "NaN": dataclasses.replace(good, delta=np.where(np.arange(NUMEL) == 7, np.nan, good.delta).astype(np.float32)),
        "steps": dataclasses.replace(good, steps=2),
    }
    messages = {"size": "`delta` has 260031", "round": "`round` is 2", "client": "`client` is 1",
                "NaN": "non-finite", "steps": "`steps` 2"}
    for why, reply in bad.items():
        with pytest.raises(InvalidReply, match=messages[why]):
            server.check(reply, task)
    with pytest.raises(wire.WireError, match="non-finite"):
        wire.encode(bad["NaN"])
    frame = bytearray(wire.encode(good))
    end = wire.layout(good)["delta"][2]
    frame[end - 4 : end] = np.float32(np.nan).tobytes()  # the last delta value, forged on the wire
    with pytest.raises(wire.WireError, match="DenseReply.delta: non-finite value at index 260031"):
        wire.decode(bytes(frame), DenseReply)
    for update in (DenseUpdate(2, good.delta), DenseUpdate(1, good.delta[:-1])):
        with pytest.raises(InvalidReply):
            server.commit(update)
    assert server.committed == 0 and np.array_equal(server.weights, weights)
    server.check(good, task)
    server.commit(server.aggregate(1, [good]))
    assert server.committed == 1 and np.array_equal(server.weights, weights + good.delta)


def test_fedzo_step_is_the_two_point_estimate_along_fresh_directions(base, tmp_path) -> None:
    """One step with b = 2 directions: ``delta = -lr / b * sum_j g_j z_j``, and the same seed gives the same bytes."""
    lr, eps = 1e-4, 1e-3
    table = {"name": "fedzo", "local_steps": 1, "lr": lr, "eps": eps, "num_directions": 2}
    exp = fresh(base, table, tmp_path)
    server, client = exp.algorithm(), exp.algorithm()
    server.bind(exp.model)
    replies = [wire.encode(client.train(exp.model, exp.batches(1, 0), server.task(1, 0, exp.model.position)))
               for _ in range(2)]
    assert replies[0] == replies[1]
    delta = wire.decode(replies[0], DenseReply).delta.astype(np.float64)  # (numel,)
    seeds = client.step_seeds(1, 0, 0)
    reference = LocalModel.wrap(copy.deepcopy(base[1]))  # g_j measured independently, each from w0
    space, batch = reference.directions("rademacher"), next(exp.batches(1, 0))
    g = []
    with torch.no_grad():
        for seed in seeds:
            reference.rebuild_("rademacher", [seed], [eps])
            plus = float(reference.loss(batch))
            reference.rebuild_("rademacher", [seed], [-eps])
            g.append((plus - float(reference.loss(batch))) / (2 * eps))
    z = np.stack([np.concatenate([t.reshape(-1).numpy() for t in space.materialize(s)]) for s in seeds], axis=1)
    coeffs, *_ = np.linalg.lstsq(z, delta, rcond=None)  # (2,): delta's coordinates along z_1, z_2
    np.testing.assert_allclose(coeffs, -lr / 2 * np.array(g), rtol=1e-2)
    assert np.abs(delta - z @ coeffs).max() < 1e-6  # nothing outside the span: the weights are never perturbed in place


@pytest.mark.parametrize(("table", "field"), [
    ({"name": "fedavg", "lr": -1.0}, "algorithm.lr"),
    ({"name": "fedavg", "optimizer": "lion"}, "algorithm.optimizer"),
    ({"name": "fedavg", "max_grad_norm": -1.0}, "algorithm.max_grad_norm"),
    ({"name": "fedit", "rank": 0}, "algorithm.rank"),
    ({"name": "fedit", "target_modules": " , "}, "algorithm.target_modules"),
    ({"name": "fedzo", "num_directions": 0}, "algorithm.num_directions"),
    ({"name": "fedzo", "distribution": "uniform"}, "algorithm.distribution"),
    ({"name": "fedzo", "rank": 8}, "algorithm.rank"),
])
def test_config_errors_name_the_field(table: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"`{field}`"):
        algorithm_config(table)


def test_first_order_rounds_draw_no_dropout_and_repeat_bit_for_bit(tmp_path) -> None:
    """A model with heavy dropout: two local rounds from the same weights on the same batches are identical.

    In train mode each round would draw its own dropout masks from torch's global
    generator and the two deltas would differ.
    """
    from transformers import BertConfig, BertForSequenceClassification

    from fedseed.algorithms.fedavg import FedAvgConfig, first_order_steps

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5,
                        num_labels=2)
    module = BertForSequenceClassification(config).eval()
    model = LocalModel.wrap(module, cache_dir=tmp_path)
    batch = {"input_ids": torch.randint(0, 64, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    cfg = FedAvgConfig(local_steps=3, lr=1e-2, optimizer="sgd")
    rounds = []
    for _ in range(2):
        model.reset_()
        run = first_order_steps(model, iter(lambda: batch, None), cfg)
        rounds.append([p.detach().clone() for _, p in model.trainable])
        assert run.skipped == 0 and not module.training
    model.reset_()
    assert all(torch.equal(a, b) for a, b in zip(*rounds))
    assert not all(torch.equal(a, w0) for a, (_, w0) in zip(rounds[0], model.trainable))  # the rounds did train
