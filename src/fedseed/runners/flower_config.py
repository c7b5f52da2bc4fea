"""fedseed config as Flower run-config, and what a Flower node-config may say.

A fedseed config file *is* a Flower run-config file: Flower flattens TOML tables
into ``section.key`` keys, exactly the names fedseed's ``--set`` uses. So
``flwr run flower <connection> --run-config configs/x.toml`` carries the whole
experiment to the ServerApp and to every ClientApp, and each rebuilds the same
validated :class:`~fedseed.config.Config` with ``load_config``.

Flower accepts only override keys the app declares, so ``flower/pyproject.toml``
declares every key of every section and every method's ``algorithm`` field, each
as ``""``, which means "fedseed's own default": a key the config file leaves out
means exactly what it means to ``fedseed run``. :func:`run_config_template` is
that table; a test keeps the pyproject equal to it. The ``[flower]`` section holds
what only a deployment has (round timeout, fewest replies, ...).

Node-config (``flower-supernode --node-config``) says what differs per machine:
which client the node is (``partition-id``), its own training data (``data.path``:
a deployment's node reads only that), where it keeps what it writes
(``cache-dir``), the resident worker's socket (``worker``) and, optionally, a local
path to the model and the device. It can never change the experiment itself. This module imports nothing from Flower.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseed.config import SECTIONS, Config, ConfigError, build_section, load_config, parse_override
from fedseed.settings import setting
from fedseed.runfolder import to_toml

UNSET = ""  # a run-config value that means "fedseed's default"
NODE_LOCAL = ("model.name_or_path", "data.path", "run.device")  # node-config may point these at local copies


@dataclass(frozen=True)
class FlowerSettings:
    """The ``[flower]`` run-config section: how the ServerApp drives rounds over real nodes."""

    round_timeout: float = setting(600.0, "seconds to wait for a round's replies")
    min_replies: int = setting(1, "fewest accepted replies a round is aggregated from; "
                                  "fewer stops the run (the ledger keeps every earlier round)")
    startup_timeout: float = setting(120.0, "seconds to wait for flower.min_clients "
                                            "connected clients before the first round")
    min_clients: int = setting(0, "clients with a connected node a round needs to start "
                                  "(0 = federation.clients_per_round)")
    grace: float = setting(15.0, "seconds a sampled client whose node is gone is waited "
                                 "for before it is replaced (or dropped)")
    replace: bool = setting(True, "replace a sampled client whose node is gone by a "
                                  "connected client not sampled this round")
    pin_nodes: bool = setting(True, "a client id belongs to the SuperNode that first "
                                    "claimed it; another node claiming it is refused")
    resume: bool = setting(True, "continue the ledger in run.output_dir when it is this "
                                 "experiment's (same algorithm, hyperparameters, seed, base)")
    overwrite: bool = setting(False, "replace a ledger of another experiment in run.output_dir")

    def __post_init__(self) -> None:
        if not self.round_timeout > 0:
            raise ConfigError(f"`flower.round_timeout` must be > 0 seconds, got {self.round_timeout!r}")
        if self.min_replies < 1:
            raise ConfigError(f"`flower.min_replies` must be >= 1, got {self.min_replies!r}")
        if self.startup_timeout < 0:
            raise ConfigError(f"`flower.startup_timeout` must be >= 0 seconds, got {self.startup_timeout!r}")
        if self.min_clients < 0:
            raise ConfigError(f"`flower.min_clients` must be >= 0 (0 = federation.clients_per_round), got "
                              f"{self.min_clients!r}")
        if not self.grace >= 0:
            raise ConfigError(f"`flower.grace` must be >= 0 seconds, got {self.grace!r}")


@dataclass(frozen=True)
class NodeSettings:
    """What one SuperNode's ``--node-config`` says."""

    client: int  # the fedseed client id this node trains as (``partition-id``)
    cache_dir: Path  # where the node keeps what it writes: base copies, its synced copy without a worker
    overrides: dict[str, Any]  # ``section.key`` -> local value, only for NODE_LOCAL keys
    worker: Path  # the resident worker's socket (``fedseed worker``); absent: each message works alone

    @property
    def own_data(self) -> bool:
        """Whether the node trains on data of its own (a deployment) rather than a part of the run's (simulation)."""
        return "data.path" in self.overrides


def algorithm_keys() -> list[str]:
    """Every ``[algorithm]`` field of every method (without the ones a method name fixes), and ``name``."""
    from fedseed.algorithms import METHODS

    keys = {"name"}
    for cls, fixed, _ in METHODS.values():
        keys |= {f.name for f in dataclasses.fields(cls) if f.name not in fixed}
    return sorted(keys)


def run_config_template() -> dict[str, dict[str, Any]]:
    """The app's declared run-config: every fedseed key as ``""`` and the ``[flower]`` defaults."""
    table: dict[str, dict[str, Any]] = {
        name: {f.name: UNSET for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()
    }
    table["algorithm"] = {key: UNSET for key in algorithm_keys()}
    table["flower"] = dataclasses.asdict(FlowerSettings())
    return table


def template_toml() -> str:
    """:func:`run_config_template` as the ``[tool.flwr.app.config.*]`` tables of the app's pyproject.toml."""
    return to_toml({f"tool.flwr.app.config.{name}": table for name, table in run_config_template().items()})


def from_run_config(run_config: Mapping[str, Any], node_overrides: Mapping[str, Any] | None = None
                    ) -> tuple[Config, FlowerSettings]:
    """The validated experiment and Flower settings from a (flat) Flower run-config.

    ``""`` values are left to fedseed's defaults; ``node_overrides`` are a node's
    local paths (:class:`NodeSettings`), applied last.
    """
    sections: dict[str, dict[str, Any]] = {}
    for key, value in run_config.items():
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"run-config key `{key}` is not `section.key`")
        if value != UNSET or section == "flower":
            sections.setdefault(section, {})[name] = value
    settings = build_section("flower", FlowerSettings, sections.pop("flower", {}))
    for key, value in (node_overrides or {}).items():
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    cfg = load_config(sections)
    if cfg.faults.adversaries:
        raise ConfigError("`faults.adversaries` is for in-process runs (`fedseed run`); on Flower, real nodes "
                          "misbehave by themselves: set it to 0")
    return cfg, settings


def to_run_config(cfg: Config, settings: FlowerSettings) -> dict[str, dict[str, Any]]:
    """The experiment as a run-config file's tables: every section resolved, ``[algorithm]`` as written.

    The algorithm table stays as the user wrote it because the ledger header
    records it that way: a resolved table (defaults spelled out) would read as
    another experiment and refuse to resume the ledger.
    """
    return {**cfg.to_dict(), "flower": dataclasses.asdict(settings)}


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """Read a SuperNode's node-config; ``partition-id`` is required, ``cache-dir`` defaults to a temp folder."""
    client = node_config.get("partition-id")
    if isinstance(client, bool) or not isinstance(client, int) or client < 0:
        raise ConfigError(f"node-config `partition-id` must be the node's fedseed client id (an int >= 0), "
                          f"got {client!r}; start the SuperNode with --node-config 'partition-id=0 ...'")
    cache = node_config.get("cache-dir", str(Path(tempfile.gettempdir()) / "fedseed-flower-cache" / f"client-{client}"))
    if not isinstance(cache, str) or not cache:
        raise ConfigError(f"node-config `cache-dir` must be a quoted path, got {cache!r}")
    worker = node_config.get("worker", str(Path(cache) / "worker.sock"))
    if not isinstance(worker, str) or not worker:
        raise ConfigError(f"node-config `worker` must be the quoted path of `fedseed worker`'s socket, got {worker!r}")
    overrides = {}
    for key, value in node_config.items():
        if "." not in key:
            continue  # partition-id, cache-dir and Flower's own keys (num-partitions)
        if key == "data.eval_path":
            raise ConfigError("node-config `data.eval_path` is the server's evaluation data; a node names its own "
                              "training data as `data.path`")
        if key not in NODE_LOCAL:
            raise ConfigError(f"node-config `{key}` would change the experiment on one node only; node-config may "
                              f"set only {', '.join(NODE_LOCAL)} (local paths); put `{key}` in the run-config")
        overrides[key] = value
    return NodeSettings(client, Path(cache).expanduser(), overrides, Path(worker).expanduser())


def flower_run_config(config: str, overrides: list[str]) -> str:
    """``CONFIG.toml`` plus ``--set`` overrides (``flower.*`` included) as one run-config TOML document.

    Flower's ``--run-config`` takes a file *or* ``key=value`` pairs, never both;
    this merges them into one file.
    """
    flower: dict[str, Any] = {}
    rest = []
    for text in overrides:
        (section, key), value = parse_override(text)
        if section == "flower":
            flower[key] = value
        else:
            rest.append(text)
    cfg = load_config(config, rest)
    settings = build_section("flower", FlowerSettings, flower)
    return to_toml(to_run_config(cfg, settings))


def cmd_flower_config(args: argparse.Namespace) -> int:
    text = flower_run_config(args.config, args.set)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def add_flower_config_command(sub: argparse._SubParsersAction) -> None:
    """``fedseed flower-config CONFIG.toml [--set K=V] [-o FILE]``."""
    fc = sub.add_parser("flower-config", help="write CONFIG.toml (+ overrides) as one Flower run-config file "
                                              "for `flwr run flower <connection> --run-config FILE`")
    fc.add_argument("config", help="experiment TOML file (see configs/)")
    fc.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a value, [flower] settings included, e.g. --set flower.round_timeout=60")
    fc.add_argument("-o", "--out", help="write here instead of to stdout")
    fc.set_defaults(fn=cmd_flower_config)
