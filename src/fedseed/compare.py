"""``fedseed compare``: every method on the identical partition and evaluation split.

One base config fixes the model, data, partition, federation and evaluation; each
method brings only its ``[algorithm]`` table, from ``[methods.<name>]`` in the
config or else from the method's own ``compare`` setting, and may amend the base's
``[robust]`` with ``[methods.<name>.robust]`` (the official Ferret script weighs
clients equally where the FedKSeed code weighs them by examples). Each method runs in its own run folder
under ``<output_dir>/<name>``; the table (Markdown + JSON) and plots land in
``<output_dir>``.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedseed import wire
from fedseed.algorithms import METHODS
from fedseed.config import ConfigError, load_config, read_toml
from fedseed.memory import peak_extra_bytes, resident_bytes
from fedseed.report import build_report, human_bytes

def method_table(name: str, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} in --methods; known: {', '.join(METHODS)}")
    return {"name": name, **METHODS[name][2].compare, **overrides.get(name, {})}


def method_config(base: dict[str, Any], name: str, tables: dict[str, dict[str, Any]], overrides: Sequence[str] = ()):
    """One method's validated config: the base, its ``[algorithm]`` table, and its ``[robust]`` amendments."""
    table = method_table(name, tables)
    robust = {**base.get("robust", {}), **table.pop("robust", {})}
    return load_config({**base, "algorithm": table, "robust": robust}, list(overrides))


def read_compare_config(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The base config as a dict and the per-method ``[methods.<name>]`` tables."""
    raw = read_toml(path)
    methods = raw.pop("methods", {})
    raw.pop("algorithm", None)  # each method brings its own
    return raw, methods


def _probe(config: dict[str, Any], out) -> None:
    """Child process: one client's sync + local training of round 1, under the memory probe."""
    from fedseed.experiment import prepare, sample_clients

    try:
        exp = prepare(load_config(config))
        cfg = exp.config
        server, client = exp.algorithm(), exp.algorithm()
        server.bind(exp.model)
        client.bind(exp.model)
        c = sample_clients(cfg.run.seed, 1, cfg.federation.num_clients, cfg.federation.clients_per_round)[0]
        task = wire.decode(wire.encode(server.task(1, c, exp.model.position)), client.Task)
        _, extra = peak_extra_bytes(lambda: client.train(exp.model, exp.batches(1, c), task), cfg.run.device)
        out.put(resident_bytes(exp.model.module) + extra)
    except Exception as e:  # the parent waits on the queue: it must hear of a failure, not time out an hour later
        out.put(f"{type(e).__name__}: {e}")


def client_peak_bytes(config: dict[str, Any]) -> int:
    """Resident weights + the peak a client's local training allocates on top of them.

    Measured in a fresh process: the CPU probe (torch's profiler) leaves the
    process it ran in several times slower, which must not touch the timed runs.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_probe, args=(config, out))
    proc.start()
    while True:
        try:
            peak = out.get(timeout=5)
            break
        except queue.Empty:
            if not proc.is_alive():  # killed (out of memory, a signal) before it could report
                raise ConfigError(f"measuring a client's memory failed: its process exited with code "
                                  f"{proc.exitcode}") from None
    proc.join()
    if isinstance(peak, str):
        raise ConfigError(f"measuring a client's memory failed: {peak}")
    return peak


def compare(config_path: str | Path, methods: list[str], overrides: Sequence[str] = (), console=None) -> dict[str, Any]:
    from fedseed.experiment import prepare
    from fedseed.runfolder import RunFolder
    from fedseed.runners.simulation import simulate

    base, tables = read_compare_config(config_path)
    # the base alone has no method: `algorithm.*` overrides are checked against each method's table below
    out = Path(load_config(base, [o for o in overrides if not o.startswith("algorithm.")]).run.output_dir)
    rows = []
    for name in methods:
        table = method_table(name, tables)
        cfg = method_config(base, name, tables, [*overrides, f"run.output_dir={json.dumps(str(out / name))}"])
        peak = client_peak_bytes(cfg.to_dict())
        t0 = time.perf_counter()
        exp = prepare(cfg)
        folder = RunFolder(cfg.run.output_dir)
        folder.create(cfg, exp.data.partition.to_json() if exp.data.partition else None, overwrite=True)
        ledger = simulate(exp, folder)
        rep = build_report(folder, ledger.header.algorithm, exp.model.numel, folder.ledger_path.stat().st_size, {})
        rows.append(_row(name, table, rep, folder.metrics(), time.perf_counter() - t0, peak))
        if console:
            console.print(f"{name}: {rows[-1]['metric_name']} {rows[-1]['metric']:.4g}, "
                          f"{human_bytes(rows[-1]['uplink_bytes'] + rows[-1]['downlink_bytes'])} total")
    result = {"config": str(config_path), "methods": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    (out / "comparison.md").write_text(to_markdown(rows))
    result["plots"] = plot(out, rows)
    return result


def _row(name: str, table: dict[str, Any], rep: dict[str, Any], metrics: list[dict[str, Any]], seconds: float,
         peak: int) -> dict[str, Any]:
    m = rep["metrics"]
    metric_name = next((k for k in ("accuracy", "gsm8k_accuracy", "rouge_l") if k in m), "eval_loss")
    return {
        "method": name,
        "hyperparameters": table,
        "metric_name": metric_name,
        "metric": m[metric_name]["after"],
        "metric_before": m[metric_name]["before"],
        "eval_loss": m["eval_loss"]["after"],
        "eval_loss_before": m["eval_loss"]["before"],
        "rounds": rep["rounds"],
        "uplink_bytes": rep["bytes"]["uplink_total"],
        "downlink_bytes": rep["bytes"]["downlink_total"],
        "wall_seconds": seconds,
        "client_peak_bytes": peak,
        "curve": [{"round": r["round"], "eval_loss": r.get("eval_loss"), metric_name: r.get(metric_name),
                   "bytes": r.get("uplink_total", 0) + r.get("downlink_total", 0)} for r in metrics],
    }


def to_markdown(rows: list[dict[str, Any]]) -> str:
    name = rows[0]["metric_name"] if rows else "metric"
    lines = [f"| method | {name} (before -> after) | held-out loss (before -> after) | rounds | uplink | downlink "
             "| wall time | client peak memory |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_num(r['metric_before'])} -> {_num(r['metric'])} | {_num(r['eval_loss_before'])} -> "
            f"{_num(r['eval_loss'])} | {r['rounds']} | {human_bytes(r['uplink_bytes'])} | "
            f"{human_bytes(r['downlink_bytes'])} | {r['wall_seconds']:.0f} s | {human_bytes(r['client_peak_bytes'])} |")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(out: Path, rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    keys = list(dict.fromkeys([rows[0]["metric_name"], "eval_loss"])) if rows else []
    for key in keys:
        fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(10, 4))
        for r in rows:
            cumulative, points = 0, []
            for p in r["curve"]:
                cumulative += p["bytes"]
                if p.get(key) is not None:
                    points.append((p["round"], max(cumulative, 1), p[key]))
            if points:
                rounds, sent, values = zip(*points)
                by_round.plot(rounds, values, marker="o", label=r["method"])
                by_bytes.semilogx(sent, values, marker="o", label=r["method"])
        by_round.set(xlabel="round", ylabel=key)
        by_bytes.set(xlabel="cumulative bytes, up + down (log)", ylabel=key)
        by_round.legend(fontsize=8)
        fig.tight_layout()
        name = f"{key}_vs_round_and_bytes.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names
