"""The run folder: everything a run leaves behind, and nothing else.

    config.toml      the resolved configuration (re-runnable as is)
    partition.json   which training examples each client holds
    ledger.bin       base model identity + every aggregated update (the checkpoint)
    metrics.jsonl    one JSON object per round (round 0 = the base model)
    report.md/json   the final report; *.png plots
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedseed.config import Config
from fedseed.event_file import EventFile
from fedseed.ledger import write_atomically


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A TOML document for nested dicts of scalars (all a config holds)."""
    lines = []
    for section, table in data.items():
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in scalars.items()]
        lines.append("")
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        if nested:
            lines.append(to_toml(nested, f"{prefix}{section}."))
    return "\n".join(lines)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


class RunFolder:
    """A run's folder: config.toml, partition.json, ledger.bin, metrics.jsonl (also as TensorBoard scalars), reports."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._events: EventFile | None = None  # opened with the first row this process writes

    @property
    def ledger_path(self) -> Path:
        return self.path / "ledger.bin"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    def create(self, config: Config, partition: dict[str, Any] | None, overwrite: bool = False) -> None:
        """A fresh run folder; ``partition`` is None where nobody partitions (a deployment: nodes bring their data)."""
        if self.ledger_path.exists() and not overwrite:
            raise FileExistsError(
                f"{self.path} already holds a run; continue it with `fedseed run --resume {self.path}`, "
                "choose another `run.output_dir`, or pass --overwrite"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in (self.metrics_path, self.ledger_path, *self.path.glob("events.out.tfevents.*")):
            stale.unlink(missing_ok=True)
        self.config_path.write_text(to_toml(config.to_dict()))
        if partition is not None:
            (self.path / "partition.json").write_text(json.dumps(partition))

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One row into metrics.jsonl (the record), and its numbers into this process's TensorBoard event file."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._events is None:
            self._events = EventFile(self.path)
        self._events.scalars(int(row["round"]), row)

    def metrics(self) -> list[dict[str, Any]]:
        """Every whole row; a line cut short by a crash mid-write is not a row."""
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def trim_metrics(self, rounds: int) -> None:
        """Forget rows past the ledger: a run killed after a round's row but before its ledger commit redoes that round."""
        rows = [r for r in self.metrics() if r["round"] <= rounds]
        write_atomically(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path
