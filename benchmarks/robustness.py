"""Held-out loss of FedKSeed under 0-3 adversarial clients, with and without robust aggregation.

Ten clients, every one sampled in every round, clients 0 .. n-1 adversarial
(``[faults]``); the rest of the run is the quickstart's model, data and
hyperparameters at a smaller scale. Three server settings:

* ``off``      the paper's plain weighted mean (``robust.norm_clip = 0``, ``robust.max_weight = 1``);
* ``default``  fedseed's defaults (norm clip at 3x the round's median, no client above half the weight);
* ``median``   the defaults plus the per-seed median (``robust.rule = "median"``).

Attacks that break the wire format or the protocol (NaN, out-of-pool seeds, stale
rounds, ...) are rejected before aggregation and leave the model exactly as if the
client had not answered (tests/test_faults.py proves it); this table is about the
well-formed lies robust aggregation exists for: ``huge`` (every scalar times 1e30)
and ``sign-flip``.

    python benchmarks/robustness.py                 # about 25 min on 2 busy CPU cores
    python benchmarks/robustness.py --rounds 2 --steps 10 --attacks huge   # a quick look

It also times one aggregation under each setting against the plain mean on
replies of paper size (FedKSeed: K = 4096, 10 clients x 200 steps; dense: 10
clients x the 260K-parameter quickstart model), and the fingerprint a client
computes per reply. ``--timing-only`` runs just that (seconds).

Prints tables and writes ``benchmarks/results/robustness-cpu.json`` and
``robustness-timing-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from fedseed.locations import QUICKSTART_DATA, QUICKSTART_MODEL

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "off": {"norm_clip": 0.0, "max_weight": 1.0},
    "default": {},
    "median": {"rule": "median"},
}


def config(out: Path, args: argparse.Namespace, adversaries: int, attack: str, robust: dict[str, Any]) -> dict:
    return {
        "run": {"output_dir": str(out), "seed": 42},
        "model": {"name_or_path": QUICKSTART_MODEL},
        "data": {"dataset": "dolly", "path": QUICKSTART_DATA,
                 "holdout": "summarization", "max_length": 256, "max_train_examples": 2000},
        "federation": {"num_clients": 10, "clients_per_round": 10, "rounds": args.rounds},
        "algorithm": {"name": "fedkseed", "num_seeds": args.num_seeds, "local_steps": args.steps, "lr": 5e-5,
                      "eps": 1e-3},
        "eval": {"every": args.rounds, "loss_examples": 100, "generate_examples": 1, "max_new_tokens": 4,
                 "batch_size": 16},
        "robust": robust,
        "faults": {"adversaries": adversaries, "attack": attack},
    }


def simulated(cfg: dict) -> tuple[Any, list[dict[str, Any]], float]:
    """Run ``cfg`` in process: the experiment, its metrics rows and the seconds the rounds took."""
    from fedseed.config import load_config
    from fedseed.experiment import prepare
    from fedseed.runfolder import RunFolder
    from fedseed.runners.simulation import simulate

    config_ = load_config(cfg)
    exp = prepare(config_)
    folder = RunFolder(config_.run.output_dir)
    folder.create(config_, exp.data.partition.to_json(), overwrite=True)
    t0 = time.perf_counter()
    simulate(exp, folder)
    return exp, folder.metrics(), time.perf_counter() - t0


def run(cfg: dict) -> dict[str, Any]:
    _, rows, seconds = simulated(cfg)
    final = rows[-1]["eval_loss"]
    return {"base_loss": rows[0]["eval_loss"], "final_loss": final if math.isfinite(final) else None,
            "seconds": seconds, "rejected": sum(len(r.get("rejected", {})) for r in rows[1:])}


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def timing() -> list[dict[str, Any]]:
    """Seconds per aggregation, each setting against the plain mean, on synthetic replies of paper size."""
    import numpy as np

    from fedseed.algorithms.fedavg import FedAvg, FedAvgConfig
    from fedseed.algorithms.fedkseed import FedKSeed, FedKSeedConfig, SeedReply
    from fedseed.algorithms.dense import DenseReply
    from fedseed.algorithms.robust import RobustSection

    rng = np.random.default_rng(0)
    k, tau, m, numel = 4096, 200, 10, 260_032
    seed_replies = [SeedReply(1, c, 100, tau, 0, 1.0, 0, np.unique(rng.integers(0, k, tau)),
                              np.zeros(0, np.float32), 1) for c in range(m)]
    seed_replies = [SeedReply(1, r.client, 100, tau, 0, 1.0, 0, r.seed_ids,
                              rng.normal(size=r.seed_ids.size).astype(np.float32), 1) for r in seed_replies]
    dense_replies = [DenseReply(1, c, 100, 1, 0, 1.0, rng.normal(size=numel).astype(np.float32) * 1e-3, 1)
                     for c in range(m)]
    rows = []
    for setting, robust in SETTINGS.items():  # "off" first: the plain weighted mean of the papers
        row = {"setting": setting}
        fedkseed = FedKSeed(FedKSeedConfig(num_seeds=k, local_steps=tau), 0, RobustSection(**robust))
        fedavg = FedAvg(FedAvgConfig(), 0, RobustSection(**robust))
        fedavg.weights = np.zeros(numel, np.float32)
        for name, algo, replies in (("fedkseed", fedkseed, seed_replies), ("dense", fedavg, dense_replies)):
            row[f"{name}_seconds"] = best_of(lambda: algo.aggregate(1, replies))
        rows.append(row)
    plain = rows[0]
    for row in rows:
        for name in ("fedkseed", "dense"):
            row[f"{name}_vs_plain_mean"] = row[f"{name}_seconds"] / plain[f"{name}_seconds"]
    return rows


def fingerprint_seconds() -> float:
    from fedseed.models import LocalModel, load_model

    model = LocalModel.wrap(load_model(QUICKSTART_MODEL)[0])
    return best_of(lambda: model.fingerprint(42, 1, 1024), 20)


def fmt(x: float | None) -> str:
    return "diverged (NaN)" if x is None else f"{x:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="local steps (tau)")
    ap.add_argument("--num-seeds", type=int, default=1024, help="K")
    ap.add_argument("--attacks", default="huge,sign-flip")
    ap.add_argument("--adversaries", default="1,2,3")
    ap.add_argument("--timing-only", action="store_true", help="only the aggregation and fingerprint timings")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "robustness-cpu.json"))
    args = ap.parse_args()
    timings = timing()
    print("| setting | FedKSeed aggregate | x plain mean | dense aggregate | x plain mean |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for t in timings:
        print(f"| {t['setting']} | {t['fedkseed_seconds'] * 1e3:.2f} ms | {t['fedkseed_vs_plain_mean']:.2f} | "
              f"{t['dense_seconds'] * 1e3:.1f} ms | {t['dense_vs_plain_mean']:.2f} |")
    fingerprint = fingerprint_seconds()
    print(f"fingerprint of 1024 weights (stories260K): {fingerprint * 1e3:.2f} ms\n")
    write(Path(args.out).with_name("robustness-timing-cpu.json"),
          {"benchmark": "robustness-timing", "aggregation": timings, "fingerprint_seconds": fingerprint})
    if args.timing_only:
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(0, "huge")] + [(int(n), a) for a in args.attacks.split(",") for n in args.adversaries.split(",")]
        for adversaries, attack in cases:
            for setting, robust in SETTINGS.items():
                r = run(config(Path(tmp) / "run", args, adversaries, attack, robust))
                results.append({"adversaries": adversaries, "attack": attack if adversaries else "none",
                                "setting": setting, **r})
                print(f"{results[-1]['attack']:>10} x{adversaries} {setting:>8}: held-out loss "
                      f"{fmt(r['base_loss'])} -> {fmt(r['final_loss'])} ({r['seconds']:.0f} s)", flush=True)
    clean = {r["setting"]: r["final_loss"] for r in results if r["adversaries"] == 0}
    print("\n| attack | adversaries | " + " | ".join(f"{s} loss" for s in SETTINGS) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in SETTINGS) + " |")
    for (adv, attack) in dict.fromkeys((r["adversaries"], r["attack"]) for r in results):
        cells = [fmt(next(r["final_loss"] for r in results if (r["adversaries"], r["attack"], r["setting"]) ==
                          (adv, attack, s))) for s in SETTINGS]
        print(f"| {attack} | {adv} | " + " | ".join(cells) + " |")
    base = results[0]["base_loss"]
    print(f"\nbase model {fmt(base)}; clean-run cost of the defaults: {clean['default'] - clean['off']:+.4f} "
          f"(median: {clean['median'] - clean['off']:+.4f})")
    write(Path(args.out), {"benchmark": "robustness", "args": vars(args), "base_loss": base, "results": results})


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine()}
    path.write_text(json.dumps({**result, **stamp}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
