"""Config errors name the key and what is allowed; bad model paths say how to fix them."""

from __future__ import annotations

import pytest

from conftest import REPO, small_config
from fedseed.config import ConfigError, load_config, parse_override
from fedseed.models import ModelError, load_model


def test_every_shipped_config_is_valid():
    configs = sorted((REPO / "configs").glob("*.toml"))
    assert any(c.name == "quickstart.toml" for c in configs)
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"data": {"bogus": 1}}, "unknown key `data.bogus`; valid keys in [data]: alpha, balance, batch_size"),
        ({"colour": {}}, "unknown section [colour]"),
        ({"run": {"device": "tpu"}}, "`run.device` must be one of cpu, cuda; got 'tpu'"),
        ({"algorithm": {"name": "fedsgd"}}, "`algorithm.name` must be one of fedkseed"),
        ({"algorithm": {"name": "fedkseed", "tau": 5}}, "unknown key `algorithm.tau`"),
        ({"algorithm": {"name": "fedkseed", "lr": "fast"}}, "`algorithm.lr` must be float"),
        ({"algorithm": {"name": "fedkseed", "eps": 0.0}}, "`algorithm.eps` must be > 0"),
        ({"algorithm": {"name": "fedkseed", "distribution": "uniform"}}, "`algorithm.distribution` must be one of"),
        ({"federation": {"num_clients": 2, "clients_per_round": 3}}, "exceeds `federation.num_clients`"),
        ({"federation": {"rounds": 0}}, "`federation.rounds` must be >= 1"),
        ({"data": {"max_length": True}}, "`data.max_length` must be int"),
        ({"data": {"subsample": "fedkseed-ni"}}, "`data.subsample` = \"fedkseed-ni\" is for natural-instructions"),
        ({"data": {"min_client_examples": 0}}, "`data.min_client_examples` must be >= 1"),
        ({"data": {"prompt": "vicuna"}}, "`data.prompt` must be one of alpaca, fedkseed-dolly, fedkseed-ni"),
        ({"eval": {"rouge": "rouge-2"}}, "`eval.rouge` must be one of official, rouge-score"),
    ],
)
def test_bad_configs_name_the_key(cfg, words):
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert words in str(e.value)


def test_overrides_parse_toml_values(tmp_path):
    cfg = load_config(small_config(tmp_path), ["algorithm.lr=3e-4", "federation.rounds=9", "run.device=cpu",
                                               "eval.before=false"])
    assert cfg.algorithm["lr"] == 3e-4 and cfg.federation.rounds == 9 and cfg.eval.before is False
    assert load_config(small_config(tmp_path), ["faults.attack=nan"]).faults.attack == "nan"  # a word, not a float
    with pytest.raises(ConfigError, match="`algorithm.lr` must be float, got str 'inf'"):
        load_config(small_config(tmp_path), ["algorithm.lr=inf"])
    with pytest.raises(ConfigError, match="section.key"):
        parse_override("rounds=3")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "broken.toml").write_text("[run\nseed = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


def test_missing_model_folder_says_how_to_fix(tmp_path):
    with pytest.raises(ModelError, match="not found or has no config.json; set `model.name_or_path`"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="`model.dtype`"):
        load_model(str(tmp_path), dtype="float8")


def test_malformed_data_line_is_named(tmp_path):
    from fedseed.data import DataError
    from fedseed.experiment import prepare

    bad = tmp_path / "dolly.jsonl"
    bad.write_text('{"instruction": "a", "context": "", "response": "b", "category": "qa"}\n{"instruction": \n')
    cfg = small_config(tmp_path / "run", data={"path": str(bad), "holdout": "qa"})
    with pytest.raises(DataError, match=r"dolly.jsonl:2"):
        prepare(load_config(cfg))
