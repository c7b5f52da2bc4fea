"""A real Flower deployment on loopback against the in-process runner, on the same config.

Three SuperNodes, each with only its own data file (``fedseed partition``) and a
resident worker, a SuperLink, and a server that reads no training data (only the
held-out file). For each model: wall time per round against ``fedseed run`` of
the same config (same partition, same clients each round), the bytes per round
(fedseed's frames and Flower's messages), and each node's peak resident set
(worker, SuperNode and its ClientApps). The same deployment without workers
(every message loads the model itself, as Flower alone does) is the reference.

    python benchmarks/flower_bench.py                       # stories260K and a random-init ~260M Llama
    python benchmarks/flower_bench.py --models stories260K   # the small one only

Writes ``results/flower-cpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))


def free_port(count: int = 1) -> int:
    for _ in range(200):
        base = random.randint(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def config(model: str, out: Path, rounds: int, steps: int, max_length: int) -> dict[str, Any]:
    return {
        "run": {"output_dir": str(out), "seed": 7},
        "model": {"name_or_path": model},
        "data": {"dataset": "dolly", "path": "python:fedseed/assets/dolly-quickstart.jsonl.gz",
                 "holdout": "summarization", "max_length": max_length, "max_train_examples": 600},
        "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": rounds},
        "algorithm": {"name": "fedkseed", "num_seeds": 1024, "local_steps": steps, "lr": 5e-5, "eps": 1e-3},
        "eval": {"every": 1000, "before": False, "loss_examples": 8, "generate_examples": 1, "max_new_tokens": 4,
                 "batch_size": 4},
    }


def peak_kb(pid: int) -> int:
    try:
        return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return 0


def tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [pid], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def rounds_of(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["round"] > 0]


def in_process(cfg: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    from fedseed.runfolder import to_toml

    path = root / "inproc.toml"
    path.write_text(to_toml(cfg))
    subprocess.run([str(BIN / "fedseed"), "run", str(path), "--overwrite"], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return rounds_of(Path(cfg["run"]["output_dir"]))


def deployment(cfg: dict[str, Any], root: Path, worker: bool, env: dict[str, str] | None = None,
               round_timeout: float = 600.0) -> dict[str, Any]:
    """Start a SuperLink and one SuperNode per client (own data each), run, measure, stop everything."""
    from fedseed.config import load_config
    from fedseed.experiment import write_partition
    from fedseed.runfolder import to_toml

    parts = root / "parts"
    if not parts.exists():
        write_partition(load_config(cfg), parts)
    out = Path(cfg["run"]["output_dir"])
    served = {**cfg, "data": {**cfg["data"], "path": str(root / "no-training-data-here"),
                              "eval_path": str(next(parts.glob("eval*")))},
              "flower": {"round_timeout": round_timeout, "startup_timeout": 120.0}}
    (root / "run.toml").write_text(to_toml(served))
    port = free_port()
    nodes = cfg["federation"]["num_clients"]
    flower = out.with_name(out.name + "-flower")  # one per deployment: its flwr config names this run's port
    env = {**os.environ, **(env or {}), "FEDSEED_FLOWER_DIR": str(flower), "FLOWER_PORT": str(port),
           "FLOWER_NODE_PORT": str(free_port(nodes + 1)), "FLWR_HOME": str(flower / "flwr-home"),
           "PATH": f"{BIN}:{os.environ['PATH']}", "WORKER": "1" if worker else "0", "PARTS": str(parts)}
    scripts = REPO / "scripts"
    started = time.perf_counter()
    try:
        subprocess.run([str(scripts / "flower-start.sh"), str(nodes)], env=env, cwd=REPO, check=True,
                       capture_output=True)
        done = subprocess.run([str(BIN / "flwr"), "run", str(REPO / "flower"), "loopback", "--run-config",
                               str(root / "run.toml"), "--format", "json"], env=env, cwd=REPO, capture_output=True,
                              text=True)
        answer = json.loads(done.stdout or "{}")
        if "run-id" not in answer:
            raise RuntimeError(f"flwr run did not start the run: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        run = answer["run-id"]
        pids = {name: int((flower / "pids" / f"{name}.pid").read_text())
                for name in [f"supernode{i}" for i in range(nodes)] + ([f"worker{i}" for i in range(nodes)] if worker else [])}
        peaks: dict[int, int] = {}
        while True:
            for pid in [p for root_pid in pids.values() for p in tree(root_pid)]:
                peaks[pid] = max(peaks.get(pid, 0), peak_kb(pid))
            status = json.loads(subprocess.run([str(BIN / "flwr"), "ls", "loopback", "--run-id", str(run), "--format",
                                                "json"], env=env, cwd=REPO, capture_output=True, text=True).stdout)
            if status["runs"][0]["status"].startswith("finished"):
                break
            time.sleep(1.0)
        node_peaks = {}
        for i in range(nodes):
            owned = tree(pids[f"supernode{i}"]) + (tree(pids[f"worker{i}"]) if worker else [])
            node_peaks[i] = max(peaks.get(p, 0) for p in owned) * 1024
        return {"rounds": rounds_of(out), "status": status["runs"][0]["status"],
                "traffic": status["runs"][0].get("network-traffic"), "node_peak_bytes": node_peaks,
                "wall_seconds": time.perf_counter() - started}
    finally:
        subprocess.run([str(scripts / "flower-stop.sh")], env=env, cwd=REPO, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="stories260K,260M")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "results" / "flower-cpu.json"))
    args = p.parse_args()
    from client_scale import model_folder

    results = []
    for name in args.models.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"flower-bench-{name}-"))
        if name == "stories260K":
            model, steps, length = "python:fedseed/assets/stories260K", 50, 256
        else:
            model = str(model_folder(Path.home() / ".cache" / "fedseed" / "bench-models", name, "float32"))
            steps, length = 4, 512  # with a 512-token vocabulary the held-out summaries' prompts run past 128 tokens
        row: dict[str, Any] = {"model": name, "local_steps": steps, "max_length": length}
        row["in_process"] = in_process(config(model, root / "inproc", args.rounds, steps, length), root)
        for worker in (True, False):
            key = "deployment" if worker else "deployment_without_workers"
            row[key] = deployment(config(model, root / key, args.rounds, steps, length), root, worker)
        results.append(row)
        shutil.rmtree(root, ignore_errors=True)
        report(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "flower-loopback", "date": datetime.date.today().isoformat(),
                               "load_average": os.getloadavg(), "results": results}, indent=2))
    print(f"wrote {out}")


def report(row: dict[str, Any]) -> None:
    def per_round(rows: list[dict[str, Any]]) -> float:
        later = rows[1:] or rows  # round 1 also loads models and compiles kernels
        return sum(r["seconds"] for r in later) / len(later)

    base = per_round(row["in_process"])
    print(f"\n{row['model']}: in-process {base:.2f} s/round (rounds 2+)")
    for key in ("deployment", "deployment_without_workers"):
        d = row[key]
        t = per_round(d["rounds"])
        up = sum(r["uplink_total"] for r in d["rounds"]) / len(d["rounds"])
        fup = sum(r.get("flower_uplink_total", 0) for r in d["rounds"]) / len(d["rounds"])
        down = sum(r["downlink_total"] for r in d["rounds"]) / len(d["rounds"])
        fdown = sum(r.get("flower_downlink_total", 0) for r in d["rounds"]) / len(d["rounds"])
        peak = max(d["node_peak_bytes"].values()) / 2**20
        print(f"  {key:>28}: {t:6.2f} s/round = {t / base:5.2f}x in-process | up {up:.0f} B (Flower {fup:.0f}) "
              f"down {down:.0f} B (Flower {fdown:.0f}) per round | node peak {peak:.0f} MB | {d['status']}")


if __name__ == "__main__":
    main()
