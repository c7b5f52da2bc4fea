"""Experiment configuration: one TOML file, sections by concern, ``--set a.b=v`` overrides.

Every key is a field of a dataclass below with its help text; an unknown key, a
wrong type or a value outside its allowed set is an error that names the key and
says what is allowed. The ``[algorithm]`` table is checked against the chosen
method's own config class (``fedseed.algorithms``), so a FedKSeed key given to
Ferret is an error too.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseed.algorithms.robust import RobustSection
from fedseed.faults import FaultsSection
from fedseed.locations import QUICKSTART_DATA, QUICKSTART_MODEL
from fedseed.privacy import PrivacySection
from fedseed.settings import ConfigError, build_section, setting

__all__ = ["SECTIONS", "Config", "ConfigError", "build_section", "load_config", "parse_override", "read_toml"]


@dataclass
class RunSection:
    output_dir: str = setting("runs/quickstart", "run folder: config, partition, ledger, metrics, report")
    seed: int = setting(42, "run seed: fixes the seed pool, partition, sampling and every client's randomness")
    device: str = setting("cpu", "where the model lives", ("cpu", "cuda"))


@dataclass
class ModelSection:
    name_or_path: str = setting(QUICKSTART_MODEL, "local model folder, python:<package>/<folder>, or Hugging Face Hub id")
    dtype: str = setting("float32", "weight dtype", ("float32", "bfloat16", "float16"))
    trust_remote_code: bool = setting(False, "allow model code from the Hub (off: only transformers' own classes)")
    task: str = setting("auto", "model head; auto = classification for sst2, causal-lm otherwise",
                   ("auto", "causal-lm", "classification"))

    def resolved_task(self, dataset: str) -> str:
        if self.task != "auto":
            return self.task
        return "classification" if dataset == "sst2" else "causal-lm"


@dataclass
class DataSection:
    dataset: str = setting("dolly", "data set", ("dolly", "natural-instructions", "codealpaca", "gsm8k", "sst2"))
    path: str = setting(QUICKSTART_DATA, "file or folder of the data set, python:<package>/<path>, or hub:<repo id>")
    partition: str = setting("dirichlet", "how examples are spread over clients", ("dirichlet", "by-task", "iid"))
    alpha: float = setting(0.5, "Dirichlet concentration (smaller = more skewed)")
    balance: bool = setting(False, "Dirichlet: a client holding N / num_clients examples gets no share of further labels "
                              "(the FedKSeed code's cap)")
    min_client_examples: int = setting(1, "Dirichlet: redraw the split until every client holds at least this many "
                                     "(the FedKSeed code: 10)")
    holdout: str = setting("", "category held out for evaluation (Dolly); empty = the data set's test split")
    eval_path: str = setting("", "file or folder of the held-out examples (all of it, or its holdout category); empty = "
                            "carve them from data.path. A deployed server reads only this")
    max_length: int = setting(256, "tokens per example; longer responses are truncated, longer prompts dropped")
    prompt: str = setting("alpaca", "prompt template: alpaca (fedseed's), or the FedKSeed code's for Dolly / Natural "
                               "Instructions (tokenised as the official code does)",
                     ("alpaca", "fedkseed-dolly", "fedkseed-ni"))
    subsample: str = setting("none", "what is kept of the data before partitioning: none, or fedkseed-ni (the FedKSeed "
                                "code's Natural Instructions filter and 20% / 2% samples)", ("none", "fedkseed-ni"))
    max_train_examples: int = setting(0, "cap on training examples after partitioning (0 = all)")
    batch_size: int = setting(1, "examples per local step")


@dataclass
class FederationSection:
    num_clients: int = setting(20, "clients the training data is split over (by-task: one per task)")
    clients_per_round: int = setting(4, "clients sampled each round")
    rounds: int = setting(5, "communication rounds")


@dataclass
class EvalSection:
    every: int = setting(1, "rounds between held-out loss evaluations")
    loss_examples: int = setting(200, "held-out examples for the loss")
    generate_examples: int = setting(50, "held-out examples for Rouge-L / accuracy by greedy generation")
    max_new_tokens: int = setting(64, "greedy generation length")
    batch_size: int = setting(16, "evaluation batch size")
    rouge: str = setting("official", "Rouge-L implementation: official = the rouge 1.0.1 package's rouge-l F, what the "
                                "FedKSeed and Ferret code report; rouge-score = Google's, with stemming",
                       ("official", "rouge-score"))
    before: bool = setting(True, "also evaluate the base model (round 0) for before/after numbers")


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "model": ModelSection,
    "data": DataSection,
    "federation": FederationSection,
    "eval": EvalSection,
    "robust": RobustSection,
    "faults": FaultsSection,
    "privacy": PrivacySection,
}


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    federation: FederationSection = field(default_factory=FederationSection)
    eval: EvalSection = field(default_factory=EvalSection)
    robust: RobustSection = field(default_factory=RobustSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    algorithm: dict[str, Any] = field(default_factory=lambda: {"name": "fedkseed"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value``; the value is read as TOML (``3``, ``1e-5``, ``true``), else as a string.

    TOML reads the bare words ``nan`` and ``inf`` as floats; no fedseed setting
    takes a non-finite number, so they stay words (``faults.attack=nan``).
    """
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"--set key must be section.key (e.g. algorithm.lr), got {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, float) and not math.isfinite(value):
        value = raw.strip()
    return path, value


def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file as a dict, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def load_config(source: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Read a TOML file (or an already-parsed dict), apply overrides, validate everything."""
    if isinstance(source, dict):
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in source.items()}
    else:
        raw = read_toml(source)
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    valid = [*SECTIONS, "algorithm"]
    for name in raw:
        if name not in valid:
            raise ConfigError(f"unknown section [{name}]; valid sections: {', '.join(valid)}")
    cfg = Config(**{n: build_section(n, cls, raw.get(n, {})) for n, cls in SECTIONS.items()})
    cfg.algorithm = dict(raw.get("algorithm", {"name": "fedkseed"}))
    from fedseed.algorithms import algorithm_config  # validates [algorithm] against the method

    algorithm_config(cfg.algorithm, cfg.robust, cfg.privacy)
    _check_ranges(cfg)
    return cfg


def _check_ranges(cfg: Config) -> None:
    fed, ev, data = cfg.federation, cfg.eval, cfg.data
    for key, value in [("federation.num_clients", fed.num_clients), ("federation.rounds", fed.rounds),
                       ("federation.clients_per_round", fed.clients_per_round), ("eval.every", ev.every),
                       ("data.max_length", data.max_length), ("data.batch_size", data.batch_size),
                       ("eval.batch_size", ev.batch_size), ("data.min_client_examples", data.min_client_examples)]:
        if value < 1:
            raise ConfigError(f"`{key}` must be >= 1, got {value}")
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError(
            f"`federation.clients_per_round` ({fed.clients_per_round}) exceeds `federation.num_clients` ({fed.num_clients})"
        )
    if data.alpha <= 0:
        raise ConfigError(f"`data.alpha` must be > 0, got {data.alpha}")
    if data.subsample == "fedkseed-ni" and data.dataset != "natural-instructions":
        raise ConfigError(f"`data.subsample` = \"fedkseed-ni\" is for natural-instructions, not {data.dataset}; "
                          "use \"none\"")
    rob, faults = cfg.robust, cfg.faults
    if not 0 <= rob.trim < 0.5:
        raise ConfigError(f"`robust.trim` must be in [0, 0.5), got {rob.trim}")
    if not 0 < rob.max_weight <= 1:
        raise ConfigError(f"`robust.max_weight` must be in (0, 1], got {rob.max_weight}")
    for key in ("norm_clip", "value_clip", "fingerprint_samples"):
        if getattr(rob, key) < 0:
            raise ConfigError(f"`robust.{key}` must be >= 0 (0 turns it off), got {getattr(rob, key)}")
    if not 0 <= faults.adversaries <= fed.num_clients:
        raise ConfigError(f"`faults.adversaries` must be in 0..federation.num_clients ({fed.num_clients}), "
                          f"got {faults.adversaries}")
    cfg.privacy.check()
