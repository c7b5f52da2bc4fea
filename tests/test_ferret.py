"""Ferret on the real stories260K and Dolly: learning, unbiased reconstruction, bytes, ledger replay.

One short federated run (5 clients, 2 per round, 3 rounds) is shared by the
tests that need a trained ledger; the reconstruction statistics run on random
updates with fixed seeds.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_weights, fresh_model, method_config, method_run, replayed_server, sync_over_wire
from fedseed import wire
from fedseed.algorithms import ferret
from fedseed.algorithms import EVALUATOR, InvalidReply
from fedseed.algorithms.ferret import (
    Ferret,
    FerretConfig,
    FerretReply,
    allocate_bases,
    basis_seeds,
    client_seed,
    coordinates,
    official_bases,
    partition_blocks,
    pool_order,
    second_moment,
)
from fedseed.algorithms.robust import RobustSection
from fedseed.config import ConfigError
from fedseed.directions import DirectionSpace
from fedseed.directions.generator import gaussian_values
from fedseed.experiment import Experiment
from fedseed.ledger import Ledger
from fedseed.runfolder import RunFolder

ROUNDS = 3  # conftest.method_config's
ALGORITHM = {"name": "ferret", "num_bases": 1024, "local_steps": 3, "grad_accum": 2, "lr": 3e-3, "server_lr": 3.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Experiment, RunFolder, Ledger]:
    return method_run(tmp_path_factory.mktemp("ferret"), ALGORITHM)


# -- end to end --------------------------------------------------------------------------


def test_heldout_loss_falls_over_rounds(run):
    _, folder, _ = run
    rows = folder.metrics()
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.3  # base 4.69; about 3.9 after 3 rounds
    assert all(r["skipped_steps"] == 0 for r in rows[1:])


def test_bytes_are_the_encoded_lengths_and_match_the_formula(run):
    exp, folder, ledger = run
    k, num_blocks = ALGORITHM["num_bases"], 41  # stories260K: 40 blocks in 5 layers + the embedding
    assert len(partition_blocks([p.numel() for _, p in exp.model.trainable], 0)) == num_blocks
    updates = ledger.decoded(Ferret.Update)
    for row, update, frame in zip(folder.metrics()[1:], updates, ledger.updates):
        clients = row["clients"]
        bases = update.bases.reshape(len(clients), num_blocks)
        for c, per_block in zip(clients, bases):
            # reply = header 4 + six 4-byte scalars + seed 8 + uint[] (5 + L w) + f32[] (4 + 4K) + fingerprint 8
            assert row["uplink_bytes"][str(c)] == 53 + num_blocks * wire.uint_width(int(per_block.max())) + 4 * k
            # the live copy is synced at every evaluation, so each task carries no round: 39 bytes
            assert row["downlink_bytes"][str(c)] == 39
        n, w = len(clients), wire.uint_width(int(update.bases.max()))
        assert len(frame) == 26 + 16 * n + n * num_blocks * w + 4 * n * k  # the ledger record's frame
    # a client that has nothing but the base model gets every round replayed
    algo = replayed_server(exp, exp.model, ledger, ROUNDS)
    total = sum(u.seeds.size for u in updates)
    w = wire.uint_width(max(int(u.bases.max()) for u in updates))
    expected = 39 + ROUNDS * 1 + 16 * total + total * num_blocks * w + 4 * total * k
    assert len(wire.encode(algo.task(ROUNDS + 1, EVALUATOR, 0))) == expected


def test_ledger_replay_rebuilds_the_live_model_bit_for_bit(run):
    exp, folder, _ = run
    model = fresh_model()
    algo = replayed_server(exp, model, Ledger.open(folder.ledger_path), ROUNDS)
    sync_over_wire(algo, model, ROUNDS + 1, model.position)
    assert model.position == ROUNDS == exp.model.position
    assert_same_weights(model, exp.model)
    with model.base.read(range(len(model.trainable))) as w0:
        assert not all(torch.equal(p, w) for (_, p), w in zip(model.trainable, w0))


def test_a_client_that_missed_rounds_replays_them_and_catches_up(run):
    exp, _, ledger = run
    model = fresh_model()
    algo = replayed_server(exp, model, ledger, ROUNDS)
    sync_over_wire(algo, model, 2, 0)  # took part in round 2 only, then left
    assert model.position == 1
    with pytest.raises(ValueError, match="position 1"):
        algo.sync(model, algo.task(ROUNDS + 1, EVALUATOR, 2))  # a task made for another copy
    task = algo.task(ROUNDS + 1, EVALUATOR, model.position)
    assert task.counts.size == ROUNDS - 1  # rounds 2 .. ROUNDS
    algo.sync(model, wire.decode(wire.encode(task), Ferret.Task))
    assert_same_weights(model, exp.model)


def test_a_dirty_copy_is_rebuilt_from_the_base(run):
    exp, _, ledger = run
    model = fresh_model()
    algo = replayed_server(exp, model, ledger, ROUNDS)
    with torch.no_grad():
        model.trainable[3][1].add_(1.0)
    model.position = -1  # changed locally, as after a crash mid-training
    sync_over_wire(algo, model, ROUNDS + 1, model.position)
    assert_same_weights(model, exp.model)


def test_training_restores_the_synced_weights_and_skips_non_finite_losses(run):
    exp, _, ledger = run
    model = fresh_model()
    algo = replayed_server(exp, model, ledger, ROUNDS)
    task = algo.task(ROUNDS + 1, 0, 0)
    algo.sync(model, task)
    before = [p.detach().clone() for _, p in model.trainable]

    class Unlabelled:  # every token masked: the mean loss is 0/0
        num_examples = 3

        def __next__(self):
            batch = next(exp.batches(1, 0))
            return {**batch, "labels": torch.full_like(batch["labels"], -100)}

    reply = algo.train(model, Unlabelled(), task)
    assert (reply.steps, reply.skipped, reply.loss) == (3, 3, 0.0)
    assert not reply.coords.any()  # nothing moved, nothing to send
    assert model.position == ROUNDS
    assert all(torch.equal(p, b) for (_, p), b in zip(model.trainable, before))
    algo.check(wire.decode(wire.encode(reply), FerretReply), task)


# -- the projection ----------------------------------------------------------------------


def random_update(d: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    first = d // 3
    a, b = torch.randn(first, generator=g), torch.randn(d - first, generator=g)
    return [("block.a.weight", a), ("block.b.weight", b)]


def reconstruct(delta: list[tuple[str, torch.Tensor]], seed: int, count: int, distribution: str) -> torch.Tensor:
    """``V gamma`` through the same two calls a sync makes."""
    gamma = coordinates(delta, basis_seeds(seed, count), distribution)
    out = [(n, torch.zeros_like(t)) for n, t in delta]
    DirectionSpace(out, distribution).add_(basis_seeds(seed, count), gamma)
    return torch.cat([t for _, t in out]).double()


@pytest.mark.parametrize("distribution, excess", [("gaussian", 1), ("rademacher", -1)])
def test_reconstruction_is_unbiased(distribution, excess):
    d, k, trials = 300, 32, 1500
    delta = random_update(d)
    target = torch.cat([t for _, t in delta]).double()
    mean = sum(reconstruct(delta, 1000 + s, k, distribution) for s in range(trials)) / trials
    # E||V gamma - Delta||^2 = (d + 1) / K ||Delta||^2 (Gaussian), (d - 1) / K (Rademacher);
    # the mean of T independent ones has 1 / T of that: about 0.079 here.
    predicted = math.sqrt((d + excess) / (k * trials))
    error = float((mean - target).norm() / target.norm())
    assert 0.75 * predicted < error < 1.25 * predicted


def test_relative_error_shrinks_as_the_bases_grow():
    d = 600
    delta = random_update(d)
    target = torch.cat([t for _, t in delta]).double()
    errors = []
    for k in (16, 64, 256, 1024):
        e = [float((reconstruct(delta, 5000 + s, k, "gaussian") - target).norm() / target.norm()) for s in range(40)]
        errors.append(float(np.sqrt(np.mean(np.square(e)))))
        assert abs(errors[-1] / math.sqrt((d + 1) / k) - 1) < 0.2
    assert errors == sorted(errors, reverse=True)


def test_rho_is_the_second_moment_of_the_generators_gaussian():
    grid, squares, cosines = 1 << 24, 0.0, 0.0
    for part in np.array_split(np.arange(grid, dtype=np.uint64), 8):  # every point of the 2^24 grid
        radial = gaussian_values(part << np.uint64(40)).astype(np.float64)  # u2 = 0: v = sqrt(-2 ln u1)
        squares += float(np.sum(radial**2))
        cosines += float(np.sum(np.cos(2 * np.pi * part.astype(np.float64) / grid) ** 2))
    assert abs(second_moment("gaussian") - (squares / grid) * (cosines / grid)) < 1e-7
    assert 1 - second_moment("gaussian") > 5e-7  # the quantised grid really is below 1
    assert second_moment("rademacher") == 1.0


def test_bases_follow_the_block_norms_and_fill_the_budget():
    counts = allocate_bases(np.array([0.0, 1.0, 3.0, 0.5]), 100)
    assert counts.sum() == 100 and counts.min() >= 2
    assert counts[0] == 2 and counts[2] > counts[1] > counts[3]
    assert np.array_equal(allocate_bases(np.zeros(4), 10), [3, 3, 2, 2])


def test_blocks_are_runs_of_consecutive_tensors():
    assert partition_blocks([10, 10, 30, 5, 5, 5], 20) == [[0, 1], [2], [3, 4, 5]]
    assert partition_blocks([100, 4, 4, 100], 0) == [[0], [1, 2], [3]]  # 0.9 x median 52 = 46


# -- validation --------------------------------------------------------------------------


def test_check_rejects_replies_that_do_not_fit(run):
    exp, _, _ = run
    algo = Ferret(FerretConfig(num_bases=256), seed=7)
    algo.bind(exp.model)
    task = algo.task(1, 3, 0)
    bases = allocate_bases(np.ones(41), 256)
    good = FerretReply(1, 3, 10, 5, 0, 2.0, client_seed(7, 1, 3), bases, np.zeros(256, np.float32))
    algo.check(good, task)
    for change, field in [
        (dict(round=2), "`round`"),
        (dict(client=4), "`client`"),
        (dict(seed=client_seed(7, 1, 4)), "`seed`"),
        (dict(steps=99), "`steps`"),
        (dict(bases=bases[:-1], coords=np.zeros(256 - int(bases[-1]), np.float32)), "`bases` has 40 blocks"),
        (dict(bases=bases + 1, coords=np.zeros(256 + 41, np.float32)), "`bases` sum"),
        (dict(coords=np.full(256, np.inf, np.float32)), "`coords`"),
    ]:
        with pytest.raises(InvalidReply, match=field):
            algo.check(dataclasses.replace(good, **change), task)
    with pytest.raises(wire.WireError, match="coords"):
        wire.decode(wire.encode(dataclasses.replace(good, coords=np.zeros(255, np.float32))), FerretReply)


def test_config_errors_name_the_field(run):
    exp, _, _ = run
    with pytest.raises(ConfigError, match="algorithm.optimizer"):
        method_config(Path("/tmp/unused"), {**ALGORITHM, "optimizer": "lion"})
    with pytest.raises(ConfigError, match="algorithm.eps"):
        method_config(Path("/tmp/unused"), {**ALGORITHM, "eps": 1e-3})
    with pytest.raises(ValueError, match="algorithm.num_bases"):
        Ferret(FerretConfig(num_bases=64), seed=0).bind(exp.model)  # 41 blocks need 82


# -- local training without a gradient buffer ------------------------------------------


def test_joint_loss_is_the_mean_of_the_batch_losses_with_the_same_gradient(run):
    """One stacked forward (what lets Ferret drop each gradient at once) against accumulating batch by batch."""
    exp, _, _ = run
    model = fresh_model()
    stream = exp.batches(1, 0)
    batches = [next(stream) for _ in range(3)]
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # different lengths: the stack pads
    params = [p for _, p in model.trainable]
    with torch.enable_grad():
        for b in batches:
            (model.loss(b) / len(batches)).backward()
        accumulated = [p.grad.clone() for p in params]
        model.module.zero_grad(set_to_none=True)
        joint, parts = model.joint_loss(batches)
        joint.backward()
    with torch.no_grad():
        separate = [float(model.loss(b)) for b in batches]
    assert parts == pytest.approx(separate, rel=1e-5)
    assert float(joint.detach()) == pytest.approx(np.mean(separate), rel=1e-5)
    for name_p, g, p in zip(model.trainable, accumulated, params):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name_p[0])


def test_fused_sgd_steps_are_the_buffered_sgd_steps(run):
    """Ferret's SGD stepping each tensor inside the backward ends where accumulate-then-step ends."""
    from fedseed.algorithms.ferret import _buffered_steps, _fused_sgd_steps

    exp, _, _ = run
    cfg = FerretConfig(local_steps=3, grad_accum=2, lr=3e-3)
    ends = []
    for steps in (_fused_sgd_steps, _buffered_steps):
        model = fresh_model()
        with torch.enable_grad():
            out = steps(model, exp.batches(1, 0), cfg)
        assert out[:2] == (3, 0) and len(out[2]) == 6
        assert all(p.grad is None for _, p in model.trainable)  # nothing of the gradient is left behind
        ends.append([p.detach().clone() for _, p in model.trainable])
    start = [p for _, p in fresh_model().trainable]
    for fused, buffered, w0 in zip(*ends, start):
        assert not torch.equal(fused, w0)
        torch.testing.assert_close(fused - w0, buffered - w0, rtol=1e-3, atol=1e-7)


# -- the official code's mode: a fixed pool, its scale and its clip --------------------------

OFFICIAL = {**ALGORITHM, "seed_pool": 64, "scale": "official", "clip_norm": 10.0, "server_lr": 9.0}


def test_official_allocation_gives_the_largest_block_the_whole_pool():
    # FerretFramework.project_update: max(int(norm / max_norm * K), 2)
    assert official_bases(np.array([0.0, 1.0, 4.0, 2.0, 0.01]), 200).tolist() == [2, 50, 200, 100, 2]
    assert official_bases(np.zeros(3), 200).tolist() == [2, 2, 2]
    assert official_bases(np.array([np.nan, 1.0]), 10).tolist() == [2, 10]  # a NaN block takes 2


def test_pool_subsets_are_distinct_uniform_and_differ_by_block():
    orders = [pool_order(123, block, 200) for block in range(3)]
    assert all(sorted(o.tolist()) == list(range(200)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    firsts = np.array([pool_order(seed, 0, 10)[0] for seed in range(4000)])
    assert np.bincount(firsts, minlength=10).min() > 320  # 400 expected for each of 10 (uniform)


def test_official_truncated_normal_basis_reconstructs_a_third():
    """The official basis: torch.nn.init.trunc_normal_(mean 0, std 1, a=-1/sqrt(d), b=1/sqrt(d)) (Ferret's
    FerretFramework.project_update); its coordinate (d / n) <Delta, b> times b averages d E[b^2] Delta = Delta / 3."""
    d = 4096
    torch.manual_seed(0)
    b = torch.nn.init.trunc_normal_(torch.empty(200, d, dtype=torch.float64), 0.0, 1.0, -d**-0.5, d**-0.5)
    assert float(d * b.square().mean()) == pytest.approx(1 / 3, rel=0.01)
    # ours with scale = "official" has the same expectation
    delta = random_update(300)
    target = torch.cat([t for _, t in delta]).double()
    mean = torch.zeros_like(target)
    for trial in range(600):
        bases = basis_seeds(7000 + trial, 32)
        gamma = coordinates(delta, bases, "gaussian", 1 / 3)
        out = [(n, torch.zeros_like(t)) for n, t in delta]
        DirectionSpace(out, "gaussian").add_(bases, gamma)
        mean += torch.cat([t for _, t in out]).double() / 600
    assert float((mean - target / 3).norm() / (target / 3).norm()) < 0.15


def test_official_clip_bounds_each_pool_seed_and_block_of_the_aggregate(run):
    exp, _, _ = run
    equal = RobustSection(norm_clip=0, max_weight=1, weighting="equal")
    algo = Ferret(FerretConfig(**{k: v for k, v in OFFICIAL.items() if k != "name"}), seed=7, robust=equal)
    algo.bind(exp.model)
    replies = []
    for client in (1, 3):
        bases = official_bases(np.linspace(1, 2, len(algo.blocks)), 64)
        coords = np.full(int(bases.sum()), 1e-6, np.float32)
        if client == 1:
            coords[0] = 1e3  # block 0, the client's first pool seed there: far past the clip
        replies.append(FerretReply(1, client, 10 * client, 3, 0, 1.0, client_seed(7, 1, client), bases, coords))
    for r in replies:
        algo.check(r, algo.task(1, r.client, 0))
    update = algo.aggregate(1, replies)
    assert np.allclose(update.weights, 9.0 * 0.5)  # equal weighting, then server_lr
    seed1, seed3 = (pool_order(client_seed(7, 1, c), 0, 64) for c in (1, 3))
    k = int(seed1[0])
    block = [exp.model.trainable[j] for j in algo.blocks[0]]
    norm = math.sqrt(sum(float(v.double().square().sum())
                         for v in DirectionSpace(block, "gaussian").materialize(int(algo.pool[k]))))
    both = update.coords[: replies[0].bases[0]].astype(np.float64)  # client 1's block 0
    other = update.coords[int(replies[0].bases.sum()) : int(replies[0].bases.sum()) + replies[1].bases[0]]
    shared = np.nonzero(seed3[: replies[1].bases[0]] == k)[0]  # client 3 may have drawn the same pool seed
    total = 0.5 * both[0] + 0.5 * float(other[shared].sum())
    assert abs(total) * norm == pytest.approx(10.0, rel=1e-5)  # clipped to the bound exactly
    assert np.allclose(both[1:], 1e-6) and np.allclose(update.coords[-5:], 1e-6)  # the rest untouched


def test_official_mode_trains_and_replays_bit_for_bit(tmp_path):
    exp, folder, ledger = method_run(tmp_path, OFFICIAL)
    rows = folder.metrics()
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.1
    updates = ledger.decoded(Ferret.Update)
    assert all(u.bases.max() == 64 and u.bases.min() >= 2 for u in updates)  # the largest block takes the pool
    model = fresh_model()
    algo = replayed_server(exp, model, ledger, ROUNDS)
    sync_over_wire(algo, model, 2, 0)
    sync_over_wire(algo, model, ROUNDS + 1, model.position)  # a late client: round 1, then the rest
    assert_same_weights(model, exp.model)


def test_a_gradient_is_checked_for_finiteness_a_chunk_at_a_time_to_its_last_element():
    g = torch.zeros(ferret.CHUNK + 5, dtype=torch.bfloat16)
    assert ferret._all_finite(g)
    for where, value in [(-1, float("inf")), (0, float("nan")), (ferret.CHUNK, float("-inf"))]:
        bad = g.clone()
        bad[where] = value
        assert not ferret._all_finite(bad.view(1, -1)), (where, value)


def test_norms_and_coordinates_never_form_the_update_and_stop_a_diverged_round(tmp_path, monkeypatch):
    """Norms from float64 squares a chunk at a time, coordinates as ``V^T w - V^T w_start``: both equal the formed
    update's, the weights are untouched, and a non-finite weight stops the round by name."""
    from fedseed.base_weights import snapshot

    model = fresh_model()
    start = snapshot(model.trainable, tmp_path)
    with torch.no_grad():
        for j, (_, p) in enumerate(model.trainable):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(j)) * 1e-3)
    moved = [p.detach().clone() for _, p in model.trainable]
    blocks = [[j] for j in range(len(model.trainable))]
    monkeypatch.setattr(ferret, "CHUNK", 1000)  # ragged chunks on every tensor
    norms = ferret._block_norms(model, start, blocks)
    assert all(torch.equal(p, m) for (_, p), m in zip(model.trainable, moved))
    with start.read(range(len(model.trainable))) as w0:
        direct = [float(torch.linalg.vector_norm((p.detach() - w.to(p.dtype)).double()))
                  for (_, p), w in zip(model.trainable, w0)]
    np.testing.assert_allclose(norms, direct, rtol=1e-12)
    bases = [basis_seeds(99 + j, 3) for j in range(len(blocks))]
    gammas = ferret._block_coordinates(model, start, blocks, bases, "gaussian", 1.0)  # V^T w - V^T w_start
    assert all(torch.equal(p, m) for (_, p), m in zip(model.trainable, moved))
    with start.read(range(len(model.trainable))) as w0:
        for (name, p), w, seeds, gamma in zip(model.trainable, w0, bases, gammas):  # V^T (w - w_start), formed
            formed = coordinates([(name, p.detach() - w)], seeds, "gaussian")  # its elements rounded to float32
            np.testing.assert_allclose(gamma, formed, rtol=1e-7, atol=1e-7 * np.abs(formed).max())
    with torch.no_grad():
        model.trainable[3][1].view(-1)[7] = float("nan")
    with pytest.raises(FloatingPointError, match="diverged.*algorithm.lr"):
        ferret._block_norms(model, start, blocks)
