"""The methods by name: the only place a name in ``[algorithm]`` becomes an object.

Adding a method is one module (its config dataclass, its message types, its
:class:`~fedseed.algorithms.base.Algorithm`) and one line in :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedseed.algorithms.base import Algorithm
from fedseed.algorithms.fedavg import FedAvg, FedAvgConfig
from fedseed.algorithms.fedit import FedIT, FedITConfig
from fedseed.algorithms.fedkrso import FedKRSO, FedKRSOConfig
from fedseed.algorithms.fedkseed import FedKSeed, FedKSeedConfig
from fedseed.algorithms.fedzo import FedZO, FedZOConfig
from fedseed.algorithms.ferret import Ferret, FerretConfig
from fedseed.algorithms.robust import RobustSection
from fedseed.privacy import Plan, PrivacySection
from fedseed.settings import ConfigError, build_section

# name -> (config class, fixed config values, algorithm class)
METHODS: dict[str, tuple[type, dict[str, Any], type[Algorithm]]] = {
    "fedkseed": (FedKSeedConfig, {"pro": False}, FedKSeed),
    "fedkseed-pro": (FedKSeedConfig, {"pro": True}, FedKSeed),
    "ferret": (FerretConfig, {}, Ferret),
    "fedkrso": (FedKRSOConfig, {}, FedKRSO),
    "fedavg": (FedAvgConfig, {}, FedAvg),
    "fedit": (FedITConfig, {}, FedIT),
    "fedzo": (FedZOConfig, {}, FedZO),
}


def algorithm_config(table: dict[str, Any], robust: RobustSection | None = None,
                     privacy: PrivacySection | None = None) -> Any:
    """Validate an ``[algorithm]`` table (and that ``[robust]`` and ``[privacy]`` suit the method); return its config."""
    name = table.get("name", "fedkseed")
    if name not in METHODS:
        raise ConfigError(f"`algorithm.name` must be one of {', '.join(METHODS)}; got {name!r}")
    cls, fixed, make = METHODS[name]
    if robust is not None and robust.rule not in make.rules:
        raise ConfigError(f"`robust.rule` = {robust.rule!r} is not available for {name} (its clients report "
                          f"coordinates in bases of their own, which no other client shares); use one of "
                          f"{', '.join(make.rules)} with `robust.norm_clip` / `robust.max_weight`")
    params = {k: v for k, v in table.items() if k != "name"}
    cfg = _method_config(name, cls, fixed, params)
    if privacy is not None and privacy.on:
        make.check_privacy(cfg, privacy.mode)
        if robust is not None and robust.rule != "mean":
            raise ConfigError(f"`privacy.mode` = {privacy.mode!r} needs `robust.rule` = \"mean\": the Gaussian "
                              f"mechanism bounds a sum, not a {robust.rule}")
    return cfg


def _method_config(name: str, cls: type, fixed: dict[str, Any], params: dict[str, Any]) -> Any:
    for key in fixed:
        if key in params and params[key] != fixed[key]:
            raise ConfigError(f"`algorithm.{key}` is fixed to {fixed[key]!r} for {name}")
    cfg_fields = {f.name for f in dataclasses.fields(cls)}
    hidden = {k for k in fixed if k in cfg_fields}
    try:
        cfg = build_section("algorithm", _visible(cls, hidden), params)
        return cls(**{**dataclasses.asdict(cfg), **fixed})
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def _visible(cls: type, hidden: set[str]) -> type:
    """The config class without the fields a method name fixes (so they read as unknown keys)."""
    if not hidden:
        return cls
    fields = [(f.name, f.type, f) for f in dataclasses.fields(cls) if f.name not in hidden]
    return dataclasses.make_dataclass(cls.__name__, fields, namespace={"__module__": cls.__module__})


def build_algorithm(table: dict[str, Any], seed: int, robust: RobustSection | None = None,
                    privacy: Plan | None = None) -> Algorithm:
    """The algorithm object for an ``[algorithm]`` table, a run seed, the server's defences and the run's privacy."""
    robust = robust or RobustSection()
    config = algorithm_config(table, robust, privacy.section if privacy else None)
    return METHODS[table.get("name", "fedkseed")][2](config, seed, robust, privacy)
