"""Hostile and broken clients: every attack is rejected by name, bounded, or detected and resynced.

Real runs (stories260K, Dolly) with ``[faults]``: client 0 misbehaves in every
round (all clients are sampled). A rejected reply must leave the round exactly
as if the client had not answered, so every rejection attack gives the same
ledger; a duplicate or a drifted copy that is resynced must give the clean
run's ledger bit for bit.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from conftest import run_simulation, small_config
from fedseed import wire
from fedseed.algorithms import METHODS
from fedseed.algorithms.ferret import FerretReply
from fedseed.algorithms.robust import Contribution, capped_weights, clip_norms, clip_values, combine
from fedseed.config import ConfigError, load_config
from fedseed.models import LocalModel, load_model

pytestmark = pytest.mark.slow

FEDKSEED = {"name": "fedkseed", "num_seeds": 64, "local_steps": 8, "lr": 5e-5, "eps": 1e-3}
REJECTED = {  # attack -> what the rejection says
    "nan": "non-finite value",
    "out-of-pool": "outside the pool",
    "stale-round": "`round` is 0, the task was for round 1|`round` is 1, the task was for round 2",
    "wrong-client": "`client` is 1, the task was sent to 0",
    "inflate-examples": "`num_examples` is 4294967295, but client 0 holds",
    "truncated": "truncated",
    "random-bytes": "not a fedseed message",
}


def faulty(tmp_path, name: str, attack: str | None, algorithm: dict | None = None, before: bool = False,
           **sections):
    """Four clients, all sampled, two rounds; client 0 runs ``attack`` (None: a clean run)."""
    faults = {"adversaries": 1, "attack": attack} if attack else {}
    cfg = small_config(tmp_path / name, algorithm or FEDKSEED, federation={"num_clients": 4, "clients_per_round": 4,
                       "rounds": 2}, eval={"every": 2, "loss_examples": 16, "generate_examples": 1,
                                           "max_new_tokens": 2, "before": before}, faults=faults, **sections)
    return run_simulation(cfg)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return faulty(tmp_path_factory.mktemp("clean"), "run", None, before=True)


@pytest.fixture(scope="module")
def rejected_frames(tmp_path_factory):
    """The update frames of a run whose client 0 is rejected every round (the NaN attack)."""
    return faulty(tmp_path_factory.mktemp("nan"), "run", "nan")[2].updates


@pytest.mark.parametrize("attack", sorted(REJECTED))
def test_malformed_and_dishonest_replies_are_rejected_by_name(tmp_path, attack, rejected_frames, clean, caplog):
    with caplog.at_level(logging.WARNING, logger="fedseed"):
        _, folder, ledger = faulty(tmp_path, attack, attack)
    for row in folder.metrics()[1:]:
        assert row["accepted"] == [1, 2, 3], row["rejected"]
        assert list(row["rejected"]) == ["0"]
        assert any(part in row["rejected"]["0"] for part in REJECTED[attack].split("|")), row["rejected"]["0"]
    assert ledger.updates == rejected_frames  # as if client 0 had not answered: nothing of it reached the model
    assert ledger.updates != clean[2].updates
    assert "rejected the reply of client 0" in caplog.text
    assert math.isfinite(folder.metrics()[-1]["eval_loss"])


def test_a_duplicate_reply_is_counted_once(tmp_path, clean):
    _, folder, ledger = faulty(tmp_path, "dup", "duplicate")
    for row in folder.metrics()[1:]:
        assert row["accepted"] == [0, 1, 2, 3]
        assert "duplicate reply of client 0" in row["rejected"]["0"]
    assert ledger.updates == clean[2].updates


def test_a_drifted_copy_is_detected_resynced_and_counted(tmp_path, clean):
    _, folder, ledger = faulty(tmp_path, "drift", "drift")
    for row in folder.metrics()[1:]:
        assert list(row["drifted"]) == ["0"] and "fingerprint" in row["drifted"]["0"]
        assert row["accepted"] == [0, 1, 2, 3] and not row["rejected"]
    assert ledger.updates == clean[2].updates  # the resynced client trained on the true global model


def test_without_fingerprints_a_drifted_copy_goes_unnoticed(tmp_path, clean):
    _, folder, ledger = faulty(tmp_path, "blind", "drift", robust={"fingerprint_samples": 0})
    assert all(not row["drifted"] for row in folder.metrics()[1:])
    assert ledger.updates != clean[2].updates  # what the check above prevents


def test_huge_scalars_are_bounded_by_default_and_wreck_the_plain_mean(tmp_path, clean):
    base, clean_loss = clean[1].metrics()[0]["eval_loss"], clean[1].metrics()[-1]["eval_loss"]
    defended = faulty(tmp_path, "huge", "huge")[1].metrics()[-1]["eval_loss"]
    plain = faulty(tmp_path, "plain", "huge", robust={"norm_clip": 0.0, "max_weight": 1.0})[1].metrics()[-1]["eval_loss"]
    assert clean_loss < base
    assert abs(defended - clean_loss) < 0.5 * (base - clean_loss) + 0.05, (base, clean_loss, defended)
    assert not math.isfinite(plain) or plain > base + 1.0, plain  # one client of four owns the plain mean


@pytest.mark.parametrize("method,attack,words", [
    ("ferret", "nan", "non-finite value"),
    ("ferret", "out-of-pool", "bases sum to 256 but 257 coords"),  # no seed ids: one coordinate too many
    ("fedkrso", "out-of-pool", "outside round 2's pool 0 .. 7"),  # the fixed pool, every round
    ("fedavg", "out-of-pool", "`delta` has 260033 values"),
])
def test_every_method_rejects_by_name(tmp_path, method, attack, words):
    algorithm = {"ferret": {"name": "ferret", "local_steps": 2, "lr": 1e-3, "num_bases": 256},
                 "fedkrso": {"name": "fedkrso", "local_steps": 2, "num_seeds": 8, "rank": 2},
                 "fedavg": {"name": "fedavg", "local_steps": 2}}[method]
    _, folder, _ = faulty(tmp_path, method, attack, algorithm)
    for row in folder.metrics()[1:]:
        assert row["accepted"] == [1, 2, 3] and words in row["rejected"]["0"], row["rejected"]


@pytest.mark.parametrize("method", ["ferret", "fedkrso"])
def test_drift_is_resynced_for_methods_that_keep_a_copy(tmp_path, method):
    algorithm = {"ferret": {"name": "ferret", "local_steps": 2, "lr": 1e-3, "num_bases": 256},
                 "fedkrso": {"name": "fedkrso", "local_steps": 2, "num_seeds": 8, "rank": 2}}[method]
    clean_updates = faulty(tmp_path, "clean", None, algorithm)[2].updates
    _, folder, ledger = faulty(tmp_path, "drift", "drift", algorithm)
    assert all(list(row["drifted"]) == ["0"] for row in folder.metrics()[1:])
    assert ledger.updates == clean_updates


def test_a_wrapping_bases_sum_is_rejected():
    # 2 x (2^63 - 1) + 6 wraps to 4 in int64: it must not pass for 4 coordinates (found by tests/test_wire_fuzz.py)
    reply = FerretReply(1, 0, 1, 1, 0, 0.5, 3, np.array([2**63 - 1, 2**63 - 1, 6]), np.zeros(4, np.float32))
    with pytest.raises(wire.WireError, match="bases sum to 18446744073709551620 but 4 coords"):
        wire.decode(wire.encode(reply), FerretReply)


def test_rules_a_method_cannot_use_are_config_errors(tmp_path):
    cfg = small_config(tmp_path, {"name": "ferret"}, robust={"rule": "median"})
    with pytest.raises(ConfigError, match="`robust.rule` = 'median' is not available for ferret"):
        load_config(cfg)
    for key, value, words in [("trim", 0.5, "robust.trim"), ("max_weight", 0.0, "robust.max_weight"),
                              ("norm_clip", -1.0, "robust.norm_clip")]:
        with pytest.raises(ConfigError, match=words):
            load_config(small_config(tmp_path, robust={key: value}))
    with pytest.raises(ConfigError, match="faults.attack"):
        load_config(small_config(tmp_path, faults={"attack": "meteor"}))


# -- the robust pipeline on hand-worked numbers ------------------------------------------


def test_capped_weights_spread_the_excess_in_proportion():
    assert np.allclose(capped_weights([1, 1, 8], 0.5), [0.25, 0.25, 0.5])
    assert np.allclose(capped_weights([1, 2, 97], 0.5), [1 / 6, 2 / 6, 0.5])
    assert np.allclose(capped_weights([1, 3], 0.4), [0.5, 0.5])  # a cap below 1/m is raised to 1/m
    assert np.allclose(capped_weights([2, 6], 1.0), [0.25, 0.75])  # off: the plain shares
    w = capped_weights([1, 1, 1, 1, 2**32 - 1], 0.3)
    assert np.isclose(w.sum(), 1) and w.max() <= 0.3 + 1e-12


def test_clipping_uses_the_rounds_own_median():
    clipped = clip_values([np.array([1.0, -1.0, 0.0]), np.array([2.0, 1e30])], 10.0)
    assert np.array_equal(clipped[1], [2.0, 15.0])  # median non-zero |v| = 1.5, bound 15; zeros do not count
    rows = [Contribution(np.array([0]), np.array([[3.0, 4.0]])) for _ in range(3)]
    rows.append(Contribution(np.array([0]), np.array([[3e6, 4e6]])))
    out = clip_norms(rows, 3.0)
    assert np.allclose(out[3].rows, [[9.0, 12.0]]) and np.array_equal(out[0].rows, rows[0].rows)


def test_combine_rules_on_a_hand_worked_round():
    # three clients; id 5 reported by all, id 9 only by client 2
    cs = [Contribution(np.array([5]), np.array([[1.0]])),
          Contribution(np.array([5]), np.array([[2.0]])),
          Contribution(np.array([5, 9]), np.array([[100.0], [7.0]]))]
    w = np.array([0.25, 0.25, 0.5])
    ids, mean = combine(cs, w, "mean", 0.2)
    assert ids.tolist() == [5, 9] and np.allclose(mean[:, 0], [0.25 + 0.5 + 50.0, 3.5])
    _, med = combine(cs, w, "median", 0.2)
    assert np.allclose(med[:, 0], [2.0, 0.5 * 7.0])  # median 2 x share 1; the lone id keeps its weighted value
    _, trimmed = combine(cs, w, "trimmed-mean", 0.34)
    assert np.allclose(trimmed[:, 0], [2.0, 3.5])  # floor(0.34 * 3) = 1 cut from each end


def test_median_stays_inside_the_honest_range_under_three_of_ten_attackers():
    rng = np.random.default_rng(0)
    honest = rng.normal(size=(7, 50))
    hostile = np.full((3, 50), 1e30)
    cs = [Contribution(np.array([0]), r[None, :]) for r in np.vstack([honest, hostile])]
    for rule in ("median", "trimmed-mean"):
        _, agg = combine(cs, np.full(10, 0.1), rule, 0.3)
        assert (agg[0] >= honest.min(axis=0) - 1e-12).all() and (agg[0] <= honest.max(axis=0) + 1e-12).all()


# -- fingerprints ----------------------------------------------------------------------


def test_fingerprints_agree_between_copies_and_catch_a_change(tmp_path):
    path = small_config(tmp_path)["model"]["name_or_path"]
    a, b = (LocalModel.wrap(load_model(path)[0]) for _ in range(2))
    assert a.fingerprint(7, 3, 1024) == b.fingerprint(7, 3, 1024) != 0
    assert a.fingerprint(7, 3, 1024) != a.fingerprint(7, 4, 1024)  # a new sample at every position
    assert a.fingerprint(7, 3, 0) == 0  # off
    name, p = b.trainable[0]
    b.trainable[0][1].data.view(-1)[:] = p.detach().view(-1) * (1 + 2**-20)  # a tiny drift of one tensor
    assert a.fingerprint(7, 3, 1024) != b.fingerprint(7, 3, 1024)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_rejects_another_client_s_reply_by_name(tmp_path, method):
    """Derived from the registry: a new method gets this without a line of fault code of its own."""
    attack = "wrong-client"
    algorithm = {"name": method, **METHODS[method][2].compare, "local_steps": 2}
    _, folder, ledger = faulty(tmp_path, method, attack, algorithm)
    rows = [r for r in folder.metrics() if r["round"] > 0]
    assert len(rows) == 2 and len(ledger.updates) == 2
    for row in rows:
        assert row["accepted"] == [1, 2, 3], row["rejected"]
        assert REJECTED[attack] in row["rejected"]["0"], row["rejected"]
