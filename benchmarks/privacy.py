"""Privacy against utility: held-out loss at epsilon 1, 4, 8 and without privacy.

Client level: FedKSeed and FedAvg on the quickstart's model and Dolly sample
spread over 200 clients (IID: a Dirichlet split of 4,000 examples leaves some of
200 clients nothing that fits), 20 sampled per round, sigma calibrated by the RDP
accountant so the run's rounds spend exactly the target. Example level: FedKSeed
on the quickstart itself (20 clients, 4 per round), each step's scalar clipped
per example and noised, every client calibrated to the target over its own data.

The clip bounds are set near the median of what clients report without
privacy (a FedKSeed client's per-seed sums: L2 norm about 150 after 50 steps; a
FedAvg delta: about 1.3; one example's scalar: about 20), measured once on
other rounds of the same data; a real deployment would take them from public
data or an adaptive clip, and this script says which it used. "inf" is the
same run with privacy off and the plain mean.

    python benchmarks/privacy.py                  # about 15 min on 2 idle CPU cores
    python benchmarks/privacy.py --rounds 2 --epsilons 8 --levels client   # a quick look

Prints a table and writes ``benchmarks/results/privacy-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from fedseed.locations import QUICKSTART_DATA, QUICKSTART_MODEL
from robustness import simulated, write  # the benchmarks' one runner and JSON writer

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "fedkseed": {"name": "fedkseed", "num_seeds": 1024, "local_steps": 50, "lr": 5e-5, "eps": 1e-3},
    "fedavg": {"name": "fedavg", "local_steps": 5, "lr": 1e-3},
}
CLIPS = {("client", "fedkseed"): 150.0, ("client", "fedavg"): 1.3, ("example", "fedkseed"): 20.0}


def config(out: Path, args: argparse.Namespace, level: str, method: str, eps: float) -> dict[str, Any]:
    client = level == "client"
    privacy = {} if math.isinf(eps) else {"mode": level, "target_epsilon": eps, "clip": CLIPS[(level, method)],
                                          "delta": args.delta}
    return {
        "run": {"output_dir": str(out), "seed": 42},
        "model": {"name_or_path": QUICKSTART_MODEL},
        "data": {"dataset": "dolly", "path": QUICKSTART_DATA, "holdout": "summarization", "max_length": 512,
                 "batch_size": 1, "partition": "iid" if client else "dirichlet"},
        "federation": {"num_clients": 200 if client else 20, "clients_per_round": 20 if client else 4,
                       "rounds": args.rounds},
        "algorithm": METHODS[method] if client else {**METHODS[method], "local_steps": 100},
        "robust": {"norm_clip": 0.0, "max_weight": 1.0},
        "eval": {"every": args.rounds, "loss_examples": 150, "generate_examples": 1, "max_new_tokens": 2,
                 "batch_size": 16},
        "privacy": privacy,
    }


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    exp, rows, seconds = simulated(cfg)
    final = rows[-1]
    plan = exp.privacy
    sigma = None
    if plan is not None and plan.client is not None:
        sigma = plan.client.sigma
    elif plan is not None and plan.example is not None:  # the clients' sigmas span a range: report the largest
        sigma = max(plan.example.sigma_for(c, n) for c, n in exp.client_examples().items())
    loss = final["eval_loss"]
    return {"base_loss": rows[0]["eval_loss"], "final_loss": loss if math.isfinite(loss) else None,
            "spent": final.get("epsilon", final.get("example_epsilon")), "sigma": sigma,
            "seconds": seconds}


def fmt(x: float | None, digits: int = 4) -> str:
    return "diverged" if x is None else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epsilons", default="1,4,8,inf")
    ap.add_argument("--levels", default="client,example")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "privacy-cpu.json"))
    args = ap.parse_args()
    cases = [(level, method) for level in args.levels.split(",")
             for method in (("fedkseed", "fedavg") if level == "client" else ("fedkseed",))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for level, method in cases:
            for eps in (float(e) for e in args.epsilons.split(",")):
                r = run(config(Path(tmp) / "run", args, level, method, eps))
                results.append({"level": level, "method": method, "target_epsilon": eps, **r})
                print(f"{level:>7} {method:>8} epsilon {eps:>4}: sigma {fmt(r['sigma'], 3) if r['sigma'] else '-'}, "
                      f"held-out loss {fmt(r['base_loss'])} -> {fmt(r['final_loss'])}, spent "
                      f"{fmt(r['spent'], 3) if r['spent'] is not None else '-'} ({r['seconds']:.0f} s)", flush=True)
    epsilons = list(dict.fromkeys(r["target_epsilon"] for r in results))
    print("\n| level | method | clip | " + " | ".join(f"epsilon {e:g}" for e in epsilons) + " |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in epsilons) + " |")
    for level, method in cases:
        cells = []
        for e in epsilons:
            r = next(r for r in results if (r["level"], r["method"], r["target_epsilon"]) == (level, method, e))
            cells.append(fmt(r["final_loss"]) + (f" (sigma {r['sigma']:.2f})" if r["sigma"] else ""))
        print(f"| {level} | {method} | {CLIPS[(level, method)]:g} | " + " | ".join(cells) + " |")
    print(f"\nbase model held-out loss {fmt(results[0]['base_loss'])}; delta {args.delta}; {args.rounds} rounds")
    write(Path(args.out), {"benchmark": "privacy", "args": vars(args), "clips": {f"{k[0]}/{k[1]}": v for k, v in
                                                                                   CLIPS.items()},
                           "results": [{**r, "target_epsilon": r["target_epsilon"] if math.isfinite(
                               r["target_epsilon"]) else "inf"} for r in results]})


if __name__ == "__main__":
    main()
