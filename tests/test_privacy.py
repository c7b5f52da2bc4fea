"""Differential privacy: the accountant against the library and the analytic Gaussian mechanism, the noise's
variance, clipping against a hostile client, budgets, replay, and privacy off leaving the ledger as it was."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from conftest import replayed_server, run_simulation, small_config, sync_over_wire, fresh_model, assert_same_weights
from fedseed import wire
from fedseed.algorithms import build_algorithm
from fedseed.algorithms.fedkseed import SeedReply
from fedseed.config import ConfigError, load_config
from fedseed.ledger import Ledger
from fedseed.privacy import ClientNoise, ExampleNoise, PrivacyBudgetExceeded, PrivacySection, calibrate, epsilon, plan

FEDKSEED = {"name": "fedkseed", "num_seeds": 64, "local_steps": 5, "lr": 1e-4, "eps": 1e-3}
CLIENT_DP = {"mode": "client", "noise_multiplier": 1.0, "clip": 1.0, "noise_seed": 5}


# -- the accountant -------------------------------------------------------------------------


def test_the_accountant_is_the_library_s_for_the_subsampled_gaussian():
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent, rdp

    library = rdp.RdpAccountant()  # its own default orders
    library.compose(SelfComposedDpEvent(PoissonSampledDpEvent(0.01, GaussianDpEvent(1.1)), 1000))
    ours = epsilon("rdp", 1.1, 0.01, 1000, 1e-5)
    assert ours == pytest.approx(library.get_epsilon(1e-5), rel=0.02)  # the orders searched differ slightly
    assert 0.5 < ours < 3  # DP-SGD's regime: a sane number, not 0 or inf


def test_one_gaussian_release_meets_the_analytic_gaussian_mechanism():
    """Balle & Wang (2018), Theorem 8: the exact delta of N(0, sigma^2) noise on a sensitivity-1 query at epsilon."""
    sigma, delta = 1.0, 1e-5
    eps = epsilon("pld", sigma, 1.0, 1, delta)

    def exact_delta(e: float) -> float:
        return norm.cdf(-e * sigma + 1 / (2 * sigma)) - math.exp(e) * norm.cdf(-e * sigma - 1 / (2 * sigma))

    assert exact_delta(eps) == pytest.approx(delta, rel=0.05)  # PLD's discretisation is pessimistic by a hair
    assert exact_delta(eps) <= delta * 1.0001


def test_a_calibrated_sigma_spends_the_target_and_no_more():
    sigma = calibrate("rdp", 4.0, 0.1, 50, 1e-5)
    assert epsilon("rdp", sigma, 0.1, 50, 1e-5) == pytest.approx(4.0, rel=1e-3)
    assert epsilon("rdp", sigma, 0.1, 50, 1e-5) <= 4.0 + 1e-3
    assert epsilon("rdp", sigma * 0.9, 0.1, 50, 1e-5) > 4.0


def test_an_unreachable_target_is_a_config_error():
    with pytest.raises(ConfigError, match="target_epsilon"):
        calibrate("rdp", 1e-6, 1.0, 10_000, 1e-5)


# -- the mechanisms -------------------------------------------------------------------------


def test_client_noise_has_the_configured_variance():
    noise = ClientNoise(clip=2.0, sigma=1.5, expected_clients=4, seed=11)
    space = np.arange(200_000)
    rows = noise.aggregate(3, [], [], space)[:, 0]
    expected = 1.5 * 2.0 / 4
    # the sample standard deviation of 200,000 normals is within 0.5% of sigma with overwhelming probability
    assert rows.std() == pytest.approx(expected, rel=0.005)
    assert abs(rows.mean()) < 5 * expected / math.sqrt(space.size)
    again = noise.aggregate(3, [], [], space)[:, 0]
    assert np.array_equal(rows, again)  # a seeded stream: the same round, the same noise
    assert not np.array_equal(rows, noise.aggregate(4, [], [], space)[:, 0])


def test_clipping_bounds_a_hostile_client_s_influence_to_clip_over_m():
    noise = ClientNoise(clip=1.0, sigma=0.0, expected_clients=3, seed=1)
    space = np.arange(10)
    honest = [np.array([1, 4]), np.array([2, 4])], [np.array([[0.3], [0.4]]), np.array([[0.1], [-0.2]])]
    base = noise.aggregate(1, *honest, space)
    for hostile in (1e6, -1e9, 3.0):
        ids, rows = honest[0] + [np.arange(10)], honest[1] + [np.full((10, 1), hostile)]
        moved = noise.aggregate(1, ids, rows, space) - base
        assert np.linalg.norm(moved) == pytest.approx(min(1.0, abs(hostile) * math.sqrt(10)) / 3)
    assert np.allclose(base[[1, 2, 4], 0], np.array([0.3, 0.1, 0.2]) / 3)  # inside the bound: untouched


def test_ids_outside_the_round_s_space_are_refused():
    noise = ClientNoise(clip=1.0, sigma=0.0, expected_clients=1, seed=1)
    with pytest.raises(ValueError, match="outside the round's space"):
        noise.aggregate(1, [np.array([2, 10])], [np.ones((2, 1))], np.arange(10))


def test_a_hostile_fedkseed_reply_moves_the_update_by_at_most_lr_clip_over_m():
    section = PrivacySection(mode="client", noise_multiplier=0.5, clip=1.0, noise_seed=3)
    schedule = [[0, 1, 2]]
    algo = build_algorithm(FEDKSEED, 7, privacy=plan(section, schedule, 3, 1, 5))
    ids = np.array([3, 9], dtype=np.int64)
    honest = [SeedReply(1, c, 10, 5, 0, 1.0, 0, ids, np.array([0.2, -0.1], np.float32), 0) for c in (0, 1)]
    clean = algo.aggregate(1, [*honest, SeedReply(1, 2, 10, 5, 0, 1.0, 0, ids, np.zeros(2, np.float32), 0)])
    attacked = algo.aggregate(1, [*honest, SeedReply(1, 2, 10, 5, 0, 1.0, 0, ids,
                                                     np.array([3e38, -3e38], np.float32), 0)])
    assert clean.seed_ids.size == 64  # noise on every seed of the pool, used or not
    moved = np.linalg.norm(attacked.coeffs - clean.coeffs)
    assert moved == pytest.approx(FEDKSEED["lr"] * 1.0 / 3)


def test_the_example_scalar_clips_each_example_then_noises_the_sum():
    section = PrivacySection(mode="example", noise_multiplier=2.0, clip=1.0)
    noise = ExampleNoise(section, batch_size=4, steps_per_round=10)
    values = np.array([0.5, -3.0, 10.0, 0.25])
    rng = np.random.default_rng(0)
    assert noise.scalar(values, 0.0, rng) == pytest.approx((0.5 - 1.0 + 1.0 + 0.25) / 4)
    draws = np.array([noise.scalar(values, 2.0, rng) for _ in range(20_000)])
    assert draws.mean() == pytest.approx(0.75 / 4, abs=0.02)
    assert draws.std() == pytest.approx(2.0 * 1.0 / 4, rel=0.02)


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("changes, words", [
    ({"privacy": {"mode": "client"}}, "exactly one of `privacy.noise_multiplier`"),
    ({"privacy": {"mode": "client", "noise_multiplier": 1.0, "target_epsilon": 2.0}}, "exactly one"),
    ({"privacy": {"mode": "client", "noise_multiplier": 1.0, "clip": 0.0}}, "`privacy.clip` must be > 0"),
    ({"privacy": {"mode": "client", "noise_multiplier": 1.0, "delta": 1.0}}, "`privacy.delta`"),
    ({"privacy": {"mode": "client", "noise_multiplier": 1.0}, "robust": {"rule": "median"}}, "robust.rule"),
    ({"privacy": {"mode": "example", "noise_multiplier": 1.0}, "algorithm": {"name": "fedavg"}}, "zeroth-order"),
    ({"privacy": {"mode": "client", "noise_multiplier": 1.0}, "algorithm": {"name": "ferret"}},
     "algorithm.seed_pool"),
    ({"privacy": {"mode": "laplace"}}, "privacy.mode"),
])
def test_privacy_settings_that_cannot_work_are_config_errors_by_name(tmp_path, changes, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
        load_config(small_config(tmp_path, **changes))


def test_a_run_over_its_budget_stops_before_anything_is_written(tmp_path):
    cfg = small_config(tmp_path / "run", FEDKSEED, privacy={**CLIENT_DP, "noise_multiplier": 0.6, "max_epsilon": 5.0},
                       federation={"rounds": 40})
    with pytest.raises(PrivacyBudgetExceeded, match=r"40 rounds would spend epsilon .* at most \d+ rounds fit") as e:
        run_simulation(cfg)
    assert not (tmp_path / "run" / "ledger.bin").exists()
    fits = int(str(e.value).split("at most ")[1].split()[0])
    assert epsilon("rdp", 0.6, 2 / 6, fits, 1e-5) <= 5.0 < epsilon("rdp", 0.6, 2 / 6, fits + 1, 1e-5)


# -- runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("private") / "run"
    return run_simulation(small_config(out, FEDKSEED, privacy=CLIENT_DP, federation={"rounds": 2}))


def test_a_private_run_reports_epsilon_every_round_and_no_training_loss(private_run):
    exp, folder, _ = private_run
    rows = [r for r in folder.metrics() if r["round"] > 0]
    spent = [epsilon("rdp", 1.0, 2 / 6, r, 1e-5) for r in (1, 2)]
    assert [r["epsilon"] for r in rows] == pytest.approx(spent)
    assert spent[0] < spent[1]
    assert all("train_loss" not in r for r in rows)


def test_the_ledger_header_names_the_privacy_but_not_the_noise_seed(private_run):
    _, folder, _ = private_run
    header = Ledger.open(folder.ledger_path).header.algorithm_config
    assert '"privacy"' in header and '"noise_multiplier":1.0' in header.replace(" ", "")
    assert "noise_seed" not in header


def test_a_private_ledger_replays_bitwise_and_resumes_to_the_same_bytes(private_run, tmp_path):
    exp, folder, ledger = private_run
    model = fresh_model()
    server = replayed_server(exp, model, ledger, 2)
    sync_over_wire(server, model, 3, 0)
    assert_same_weights(model, exp.model)  # the runner's copy is at the last global model
    cfg = small_config(tmp_path / "resumed", FEDKSEED, privacy=CLIENT_DP, federation={"rounds": 2})
    run_simulation(cfg, stop_after=1)
    _, resumed, _ = run_simulation(cfg, resume=True)
    assert Ledger.open(resumed.ledger_path).updates == Ledger.open(folder.ledger_path).updates


def test_without_a_noise_seed_the_noise_is_a_secret(tmp_path):
    secret = {**CLIENT_DP, "noise_seed": 0}
    frames = []
    for name in ("a", "b"):
        cfg = small_config(tmp_path / name, {**FEDKSEED, "local_steps": 1}, privacy=secret, federation={"rounds": 1},
                           eval={"before": False, "every": 100})
        _, folder, _ = run_simulation(cfg)
        frames.append(Ledger.open(folder.ledger_path).updates)
    assert frames[0] != frames[1]  # the same config, different noise: nobody can regenerate it from the config


def test_privacy_off_leaves_the_aggregate_as_it_was():
    """The update bytes of a FedKSeed aggregation on fixed replies, recorded before privacy existed."""
    rng = np.random.default_rng(3)
    replies = []
    for c in range(4):
        ids = np.sort(rng.choice(64, size=10, replace=False)).astype(np.int64)
        values = rng.standard_cauchy(10).astype(np.float32)
        replies.append(SeedReply(1, c, int(rng.integers(5, 50)), 10, 0, 1.5, 0, ids, values, 0))
    for name in ("fedkseed", "fedkseed-pro"):
        update = build_algorithm({"name": name, "num_seeds": 64, "local_steps": 10}, 7).aggregate(1, replies)
        digest = hashlib.sha256(wire.encode(update)[wire.HEADER_BYTES:]).hexdigest()  # the payload: any wire version
        assert digest == "9a03821ab5aa8859a507e42f63219374698f6ba37a513a6ca6bd000971e51670"  # as under version 1


def test_privacy_off_writes_the_ledger_header_it_always_did(fedkseed_run):
    _, folder, _ = fedkseed_run
    header = Ledger.open(folder.ledger_path).header.algorithm_config
    assert '"privacy"' not in header and '"robust"' in header


@pytest.mark.parametrize("algorithm", [
    {"name": "fedkseed-pro", "num_seeds": 64, "local_steps": 3, "lr": 1e-4},
    {"name": "ferret", "seed_pool": 20, "local_steps": 1, "grad_accum": 1, "lr": 1e-3, "clip_norm": 10.0},
    {"name": "fedkrso", "local_steps": 1},
    {"name": "fedavg", "local_steps": 1},
], ids=lambda a: a["name"])
def test_every_method_runs_private_with_noise_on_its_whole_space(tmp_path, algorithm):
    cfg = small_config(tmp_path / "run", algorithm, privacy={**CLIENT_DP, "noise_multiplier": 0.01, "clip": 0.1},
                       federation={"rounds": 1}, eval={"before": False, "loss_examples": 8})
    exp, folder, ledger = run_simulation(cfg)
    server = exp.algorithm()
    server.bind(fresh_model())
    (update,) = ledger.decoded(server.Update)
    if algorithm["name"] == "ferret":  # one contribution over every pool seed of every block
        assert update.seeds.size == 1 and set(update.bases.tolist()) == {20}
    elif algorithm["name"] == "fedkrso":
        assert update.seed_ids.size == server.config.num_seeds
    elif algorithm["name"] == "fedkseed-pro":
        assert update.seed_ids.size == 64 and (update.counts == 1).all()
    row = folder.metrics()[-1]
    assert row["epsilon"] == pytest.approx(epsilon("rdp", 0.01, 2 / 6, 1, 1e-5))
    assert math.isfinite(row["eval_loss"])


@pytest.mark.parametrize("method", ["fedkseed", "fedzo"])
def test_example_level_calibrates_each_client_to_the_target(tmp_path, method):
    algorithm = {**FEDKSEED, "name": method} if method == "fedkseed" else {"name": "fedzo", "local_steps": 3}
    if method == "fedzo":
        algorithm["num_directions"] = 2
    cfg = small_config(tmp_path / "run", algorithm, privacy={"mode": "example", "target_epsilon": 3.0, "clip": 5.0},
                       federation={"rounds": 2}, data={"batch_size": 2}, eval={"before": False, "loss_examples": 8})
    exp, folder, _ = run_simulation(cfg)
    noise = exp.privacy.example
    steps = algorithm["local_steps"] * algorithm.get("num_directions", 1)
    assert noise.steps_per_round == steps
    worst = folder.metrics()[-1]["example_epsilon"]
    assert worst == pytest.approx(3.0, rel=2e-3)  # some client took part in every round it was scheduled for
    client, examples = next(iter(exp.client_examples().items()))
    sigma = noise.sigma_for(client, examples)
    rounds = noise.rounds_of[client]
    assert epsilon("rdp", sigma, 2 / examples, steps * max(rounds, 1), 1e-5) == pytest.approx(3.0, rel=2e-3)


def test_the_cli_shows_epsilon_each_round_and_in_the_report(tmp_path, capsys):
    from fedseed.cli import main
    from fedseed.runfolder import to_toml

    path = tmp_path / "exp.toml"
    path.write_text(to_toml(small_config(tmp_path / "run", {**FEDKSEED, "local_steps": 2}, federation={"rounds": 1},
                                         eval={"before": False, "loss_examples": 8})))
    assert main(["run", str(path), "--set", "privacy.mode=client", "--set", "privacy.target_epsilon=2"]) == 0
    out = capsys.readouterr().out
    assert "epsilon 2.000" in out or "epsilon 1.99" in out  # the round line
    assert "epsilon" in (tmp_path / "run" / "report.md").read_text() and "config.toml [privacy]" in out
    assert json.loads((tmp_path / "run" / "report.json").read_text())["epsilon"] == pytest.approx(2.0, rel=1e-3)
