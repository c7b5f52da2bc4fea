"""FedKRSO on the real stories260K and Dolly: learning, subspace updates, memory, bytes, ledger replay.

One short federated run (5 clients, 2 per round, 3 rounds) is shared by the
tests that need a trained ledger.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_weights, fresh_model, method_config, method_run, replayed_server, sync_over_wire
from fedseed import wire
from fedseed.algorithms import EVALUATOR, InvalidReply
from fedseed.algorithms.fedkrso import (
    FedKRSO,
    FedKRSOConfig,
    Subspace,
    SubspaceReply,
    chunk_size,
    matrices,
    projection,
)
from fedseed.config import ConfigError
from fedseed.experiment import Experiment
from fedseed.ledger import Ledger
from fedseed.runfolder import RunFolder

ROUNDS = 3  # conftest.method_config's
ALGORITHM = {"name": "fedkrso", "num_seeds": 4, "rank": 4, "interval": 3, "local_steps": 6, "lr": 2e-3}
ROWS = 3512  # stories260K: embedding 512 + 5 layers x (64 + 32 + 32 + 64 + 172 + 172 + 64)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Experiment, RunFolder, Ledger]:
    return method_run(tmp_path_factory.mktemp("fedkrso"), ALGORITHM)


# -- end to end --------------------------------------------------------------------------


def test_heldout_loss_falls_over_rounds(run):
    _, folder, _ = run
    rows = folder.metrics()
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.5  # base 4.69; about 3.8 after 3 rounds
    assert all(r["skipped_steps"] == 0 for r in rows[1:])


def test_bytes_are_the_encoded_lengths_and_match_the_formula(run):
    exp, folder, ledger = run
    per_seed = 1 + 4 * chunk_size(matrices(exp.model), ALGORITHM["rank"])  # id (u8) + S float32
    assert per_seed == 1 + 4 * ALGORITHM["rank"] * ROWS
    touched: set[int] = set()
    for row, update, frame in zip(folder.metrics()[1:], ledger.decoded(FedKRSO.Update), ledger.updates):
        used = []
        for c in row["clients"]:
            u, rest = divmod(row["uplink_bytes"][str(c)] - 45, per_seed)  # reply = 45 + u (1 + 4S), fingerprint included
            assert rest == 0 and 1 <= u <= 2  # 6 steps / interval 3 = at most 2 subspaces
            used.append(u)
        assert max(used) <= update.seed_ids.size <= sum(used)
        assert len(frame) == 17 + update.seed_ids.size * per_seed  # the ledger record: 17 + U (1 + 4S)
        # first client: the copy was synced at the last evaluation, so the task is empty (25 bytes);
        # second: the first one trained the shared copy, so it gets the t touched seeds' totals
        first, second = (row["downlink_bytes"][str(c)] for c in row["clients"])
        assert (first, second) == (25, 25 + len(touched) * per_seed)
        touched |= set(update.seed_ids.tolist())


def test_ledger_replay_rebuilds_the_live_model_bit_for_bit(run):
    exp, folder, _ = run
    model = fresh_model()
    algo = replayed_server(exp, model, Ledger.open(folder.ledger_path), ROUNDS)
    sync_over_wire(algo, model, ROUNDS + 1, model.position)
    assert model.position == ROUNDS == exp.model.position
    assert_same_weights(model, exp.model)
    with model.base.read(range(len(model.trainable))) as w0:
        assert not all(torch.equal(p, w) for (_, p), w in zip(model.trainable, w0))


def test_rebuild_and_fold_form_b_p_a_band_of_rows_at_a_time(run, monkeypatch):
    """``W += B P`` is formed a band of rows at a time, never as a float32 matrix the size of ``W``.

    Every party forms the same bands (they depend only on the matrix's shape), so
    replay stays bit for bit; against one whole product a band may round its last
    bit differently (the BLAS picks its kernel by shape), so that is compared to
    rounding.
    """
    import fedseed.algorithms.fedkrso as fedkrso

    exp, _, ledger = run
    assert [(r.start, r.stop) for r in fedkrso.row_chunks(10, 1 << 20)] == [(0, 4), (4, 8), (8, 10)]
    assert len(list(fedkrso.row_chunks(512, 64))) == 1  # stories260K's matrices fit one band
    band = 4 * 64 * 7  # 7 rows of 64 columns: ragged bands on every matrix
    monkeypatch.setattr(fedkrso, "ROW_CHUNK_BYTES", band)
    banded, again = fresh_model(), fresh_model()
    for model in (banded, again):
        sync_over_wire(replayed_server(exp, model, ledger, ROUNDS), model, ROUNDS + 1, model.position)
    assert_same_weights(banded, again)  # the same bands, the same bits
    for (name, p), (_, q) in zip(banded.trainable, exp.model.trainable):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    config = FedKRSOConfig(**{k: v for k, v in ALGORITHM.items() if k != "name"})
    folded = []
    for model, size in ((banded, band), (fresh_model(), 1 << 30)):
        monkeypatch.setattr(fedkrso, "ROW_CHUNK_BYTES", size)
        if size != band:
            sync_over_wire(replayed_server(exp, model, ledger, ROUNDS), model, ROUNDS + 1, model.position)
        subspace = Subspace(matrices(model), 12345, config)
        with torch.no_grad():
            for b in subspace.accumulators:
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel())) * 1e-2)
        before = [p.detach().clone() for _, p in model.trainable]
        subspace.fold_()
        assert any(not torch.equal(p, w) for (_, p), w in zip(model.trainable, before))
        folded.append(model)
    for (name, p), (_, q) in zip(folded[0].trainable, folded[1].trainable):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def test_a_client_that_missed_rounds_catches_up(run):
    exp, _, ledger = run
    model = fresh_model()
    sync_over_wire(replayed_server(exp, model, ledger, 1), model, 2, 0)  # took part in round 2 only, then left
    assert model.position == 1
    algo = replayed_server(exp, model, ledger, ROUNDS)
    sync_over_wire(algo, model, ROUNDS + 1, model.position)
    assert_same_weights(model, exp.model)
    model.position = -1
    with pytest.raises(ValueError, match="since=-1"):
        algo.sync(model, algo.task(ROUNDS + 1, EVALUATOR, ROUNDS))  # an empty task made for a synced copy


def test_each_round_moves_every_matrix_inside_the_span_of_its_projections(run):
    exp, _, ledger = run
    before, after = fresh_model(), fresh_model()
    sync_over_wire(replayed_server(exp, before, ledger, ROUNDS - 1), before, ROUNDS, 0)
    algo = replayed_server(exp, after, ledger, ROUNDS)
    sync_over_wire(algo, after, ROUNDS + 1, 0)
    used = ledger.decoded(FedKRSO.Update)[ROUNDS - 1].seed_ids.tolist()
    unused = sorted(set(range(ALGORITHM["num_seeds"])) - set(used))
    assert unused, "the control needs a seed this round did not use"
    mats = {m.index for m in matrices(after)}
    for i, ((name, w1), (_, w0)) in enumerate(zip(after.trainable, before.trainable)):
        step = (w1 - w0).detach().double()  # (m, n)
        if i not in mats:
            assert not step.any(), name  # norms are not trained
            continue
        assert step.norm() > 0, name
        assert row_space_residual(step, [algo.seed_of(k) for k in used], name) < 1e-3, name  # float32 rounding only
        assert row_space_residual(step, [algo.seed_of(k) for k in unused], name) > 0.5, name


def row_space_residual(step: torch.Tensor, seeds: list[int], name: str) -> float:
    """How much of ``step`` (m x n) lies outside the span of the rows of the seeds' projections."""
    rows = torch.cat([projection(s, name, ALGORITHM["rank"], step.shape[1]) for s in seeds]).double()
    q, _ = torch.linalg.qr(rows.T)  # (n, |seeds| r): orthonormal basis of the rows of the P_k
    return float((step - step @ q @ q.T).norm() / step.norm())


def test_subspace_gradient_is_the_projected_full_gradient(run):
    exp, _, _ = run
    model = fresh_model()
    batch = next(exp.batches(1, 1))
    model.loss(batch).backward()
    full = {m.name: m.weight.grad.clone() for m in matrices(model)}
    subspace = Subspace(matrices(model), 99, FedKRSOConfig(rank=4))
    with torch.enable_grad(), subspace.attached():
        grads = torch.autograd.grad(model.loss(batch), subspace.accumulators)
    for mat, g, p in zip(subspace.mats, grads, subspace.projections):
        expected = full[mat.name] @ p.T  # (m, n) @ (n, r)
        assert torch.allclose(g, expected, rtol=1e-3, atol=1e-6), mat.name


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())


def test_a_client_step_keeps_optimizer_state_only_for_the_accumulators(run):
    exp, _, _ = run
    model = fresh_model()
    batch = next(exp.batches(1, 1))

    def subspace_step() -> torch.optim.Optimizer:
        subspace = Subspace(matrices(model), 123, FedKRSOConfig(rank=4, optimizer="adam"))
        assert subspace.step(model, batch) is not None
        assert all(m.weight.grad is None for m in subspace.mats)  # no full gradient was formed
        return subspace.optimizer

    def full_adam_step() -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam([p for _, p in model.trainable], lr=1e-3)
        model.loss(batch).backward()
        optimizer.step()
        return optimizer

    krso, adam = subspace_step(), full_adam_step()
    assert state_bytes(krso) == 2 * 4 * ROWS * 4  # exp_avg + exp_avg_sq, (m, r) float32 per matrix
    assert state_bytes(adam) == 2 * model.numel * 4
    assert state_bytes(krso) < state_bytes(adam) / 10


def test_non_finite_losses_are_skipped_and_counted(run):
    exp, _, _ = run
    algo = exp.algorithm()
    model = fresh_model()
    algo.bind(model)
    task = algo.task(1, 0, 0)

    class Unlabelled:  # every token masked: the mean loss is 0/0
        num_examples = 3

        def __next__(self):
            batch = next(exp.batches(1, 0))
            return {**batch, "labels": torch.full_like(batch["labels"], -100)}

    reply = algo.train(model, Unlabelled(), task)
    assert (reply.steps, reply.skipped, reply.loss) == (6, 6, 0.0)
    assert not reply.values.any()
    per_seed = 1 + 4 * ALGORITHM["rank"] * ROWS
    assert len(wire.encode(reply)) == 45 + reply.seed_ids.size * per_seed
    algo.check(wire.decode(wire.encode(reply), SubspaceReply), task)


# -- validation --------------------------------------------------------------------------


def test_check_rejects_replies_that_do_not_fit(run):
    exp, _, _ = run
    algo = FedKRSO(FedKRSOConfig(**{k: v for k, v in ALGORITHM.items() if k != "name"}), seed=7)
    algo.bind(exp.model)
    task = algo.task(1, 3, 0)
    chunk = 4 * ROWS
    good = SubspaceReply(1, 3, 10, 6, 0, 2.0, np.array([0, 2]), np.zeros(2 * chunk, np.float32))
    algo.check(good, task)
    for change, field in [
        (dict(round=2), "`round`"),
        (dict(client=4), "`client`"),
        (dict(steps=7), "`steps`"),
        (dict(seed_ids=np.array([0, 4])), "outside round 1.s pool"),
        (dict(seed_ids=np.array([0, 1, 2]), values=np.zeros(3 * chunk, np.float32)), "at most 2"),
        (dict(values=np.zeros(2 * chunk - 2, np.float32)), "`values` has"),
        (dict(values=np.full(2 * chunk, np.nan, np.float32)), "non-finite"),
    ]:
        with pytest.raises(InvalidReply, match=field):
            algo.check(dataclasses.replace(good, **change), task)
    with pytest.raises(wire.WireError, match="increasing"):
        wire.decode(wire.encode(dataclasses.replace(good, seed_ids=np.array([2, 0]))), SubspaceReply)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="algorithm.rank"):
        method_config(Path("/tmp/unused"), {**ALGORITHM, "rank": 0})
    with pytest.raises(ConfigError, match="algorithm.optimizer"):
        method_config(Path("/tmp/unused"), {**ALGORITHM, "optimizer": "lion"})
    with pytest.raises(ConfigError, match="algorithm.num_bases"):
        method_config(Path("/tmp/unused"), {**ALGORITHM, "num_bases": 8})


def test_fresh_pools_lift_the_rank_bound_and_still_replay_bit_for_bit(tmp_path):
    """redraw = 1: every round draws K new seeds, so a matrix's total update passes rank K r."""
    cfg = {**ALGORITHM, "num_seeds": 2, "redraw": 1}
    exp, _, ledger = method_run(tmp_path, cfg)
    updates = ledger.decoded(FedKRSO.Update)
    for u in updates:  # round t draws ids 2 (t - 1) and 2 (t - 1) + 1
        assert set(u.seed_ids.tolist()) <= {2 * (u.round - 1), 2 * (u.round - 1) + 1}
    model = fresh_model()
    sync_over_wire(replayed_server(exp, model, ledger, 1), model, 2, 0)
    sync_over_wire(replayed_server(exp, model, ledger, ROUNDS), model, ROUNDS + 1, model.position)
    assert_same_weights(model, exp.model)
    name, w = next((n, p) for n, p in model.trainable if "q_proj" in n)  # 64 x 64
    with model.base.read([i for i, (n, _) in enumerate(model.trainable) if n == name]) as (w0,):
        singular = torch.linalg.svdvals((w - w0).double())
    rank = int((singular > 1e-4 * singular[0]).sum())
    bound = cfg["num_seeds"] * cfg["rank"]
    assert bound < rank <= len({k for u in updates for k in u.seed_ids.tolist()}) * cfg["rank"]
    algo = replayed_server(exp, fresh_model(), ledger, 1)
    with pytest.raises(InvalidReply, match="outside round 2's pool"):
        reply = SubspaceReply(2, 0, 10, 6, 0, 1.0, np.array([0]), np.zeros(chunk_size(matrices(model), 4), np.float32))
        algo.check(reply, algo.task(2, 0, 0))
