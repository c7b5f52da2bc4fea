"""A client at scale: memory against plain inference, step time against two forwards, rebuild time per seed.

Three benchmarks. Memory is always against plain inference of the same model;
``client`` also runs a reference written the way the official FedKSeed code does
it (the model in its own dtype, ``copy.deepcopy`` of the server model per client,
``torch.manual_seed(seed)`` + ``torch.normal`` per parameter for every
perturbation, restore and update) in the same run:

* ``memory``: ``fedseed run`` (a real federated run through the CLI, 2 rounds, so
  the second client rebuilds from ``w0``), and the same run as a loopback Flower
  deployment (a SuperNode and a resident worker per client, each with its own data
  file; the node's peak), on random-init Llamas of two sizes, for each method and
  dtype. Peak resident set of the process (``ru_maxrss``,
  what ``/usr/bin/time -v`` reports) minus the peak of a plain ``transformers``
  process that loads the same folder and runs one forward of ``--seq`` tokens;
  the slope of that difference between the two sizes per weight byte is the
  figure (fixed costs such as imports and numba's compiler cancel).
* ``precision``: the quickstart in float32, bfloat16 and float16; how far the 16-bit
  runs' held-out loss ends from the float32 run's.
* ``client``: one client round in a fresh process per (size, dtype): a sync that
  rebuilds from ``w0`` with ``--seeds`` per-seed totals, then ``--steps``
  zeroth-order steps on ``--seq``-token batches; its peak resident set against
  inference, the step time against two plain forwards of the same model (each step
  timed beside its own pair of forwards; medians), the rebuild time per seed. The
  step's two passes over the weights (its kernel calls, timed inside the step) are
  set beside torch copying every weight into its scratch view twice: the memory
  traffic no two-pass scheme avoids, so a reader can tell a slow kernel from a
  machine whose memory is slow next to its arithmetic.

Results: a table on stdout and ``results/client-scale-<device>.json`` (device
name, date, load average, versions).

    python benchmarks/client_scale.py                               # CPU: memory at 130M/260M, client at 260M/1.1B
    python benchmarks/client_scale.py --only client --sizes 1.1B --dtypes bfloat16
    python benchmarks/client_scale.py --device cuda --sizes 1.1B,3B,7B --only client
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
# Random-init Llama shapes; vocab 512 is the stories260K tokenizer's, except where a real vocabulary's size matters.
SHAPES = {
    "130M": dict(num_hidden_layers=10, hidden_size=1024, intermediate_size=2816, num_attention_heads=16),
    "260M": dict(num_hidden_layers=20, hidden_size=1024, intermediate_size=2816, num_attention_heads=16),
    "1.1B": dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B's shape
    "3B": dict(num_hidden_layers=26, hidden_size=3200, intermediate_size=8640, num_attention_heads=32,
               vocab_size=32000),  # OpenLLaMA-3B's shape
    "7B": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               vocab_size=32000),  # Llama-2-7B's shape
}
METHODS = {  # small rounds: enough to exercise sync, local steps and the reply on a big model
    "fedkseed": {"num_seeds": 1024, "local_steps": 4, "lr": 1e-6, "eps": 1e-3},
    "fedkseed-pro": {"num_seeds": 1024, "local_steps": 4, "lr": 1e-6, "eps": 1e-3},
    "fedkrso": {"num_seeds": 8, "rank": 4, "interval": 2, "local_steps": 4, "lr": 1e-4},
    "ferret": {"num_bases": 1024, "local_steps": 2, "grad_accum": 1, "lr": 1e-5},
    "fedzo": {"local_steps": 4, "lr": 1e-6, "eps": 1e-3},
}
OVERRIDES: dict[str, Any] = {}  # --set key=value: a method setting changed for every method that has it


# -- model folders -------------------------------------------------------------------
def model_folder(root: Path, size: str, dtype: str) -> Path:
    """A random-init Llama of ``size`` saved in ``dtype`` (built once), with the stories260K tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedseed.locations import QUICKSTART_MODEL, resolve

    out = root / f"llama-{size}-{dtype}"
    if (out / "config.json").is_file():
        return out
    shape = {"vocab_size": 512, "max_position_embeddings": 2048, "tie_word_embeddings": False, **SHAPES[size]}
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(getattr(torch, dtype))
    partial = out.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(Path(resolve(QUICKSTART_MODEL)) / f, partial / f)
    partial.rename(out)
    return out


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# -- processes and their peak resident set -------------------------------------------
def peak_of(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``cmd`` (a Python child that ends by printing ``peak=<VmHWM bytes>``); its peak and its stdout.

    ``VmHWM`` is the peak resident set, the number ``/usr/bin/time -v`` reports as
    its maximum resident set size.
    """
    proc = subprocess.run(cmd, capture_output=True, env={**os.environ, **(env or {})}, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} ... failed:\n{proc.stderr[-3000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("peak="):
            return int(line[5:]), proc.stdout
    raise RuntimeError(f"no peak line in the child's output: {proc.stdout[-500:]}")


PEAK_LINE = 'print("peak=" + str(1024 * int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])))'


def inference_peak(folder: Path, dtype: str, seq: int, device: str) -> int:
    """Plain ``transformers``: load, one forward of ``seq`` tokens (the memory every target is measured against)."""
    script = f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.{dtype}).to({device!r}).eval()
ids = torch.randint(0, 512, (1, {seq}), device={device!r})
with torch.no_grad():
    m(input_ids=ids, labels=ids)
{PEAK_LINE}
"""
    return peak_of([sys.executable, "-c", script])[0]


def run_config(folder: Path, dtype: str, method: str, out: Path, seq: int, device: str) -> dict[str, Any]:
    """2 clients, one per round, 2 rounds: round 2's client rebuilds its copy from ``w0`` and round 1's update."""
    settings = {**METHODS[method], **{k: v for k, v in OVERRIDES.items() if k in METHODS[method]}}
    return {
        "run": {"output_dir": str(out), "seed": 1, "device": device},
        "model": {"name_or_path": str(folder), "dtype": dtype},
        "data": {"dataset": "dolly", "path": "python:fedseed/assets/dolly-quickstart.jsonl.gz",
                 "holdout": "summarization", "max_length": seq, "max_train_examples": 200},
        "federation": {"num_clients": 2, "clients_per_round": 1, "rounds": 2},
        "algorithm": {"name": method, **settings},
        "eval": {"every": 2, "before": False, "loss_examples": 2, "generate_examples": 1, "max_new_tokens": 4,
                 "batch_size": 1},
    }


def fedseed_run_peak(folder: Path, dtype: str, method: str, seq: int, device: str, cache: Path) -> int:
    """Peak resident set of ``fedseed run`` on ``folder`` (a real 2-round run through the CLI)."""
    from fedseed.runfolder import to_toml

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "run.toml"
        cfg.write_text(to_toml(run_config(folder, dtype, method, Path(tmp) / "run", seq, device)))
        script = f"""
import sys
from fedseed.cli import main
code = main(["run", {str(cfg)!r}, "--overwrite"])
{PEAK_LINE}
sys.exit(code)
"""
        return peak_of([sys.executable, "-c", script], env={"FEDSEED_CACHE": str(cache)})[0]


def flower_node_peak(folder: Path, dtype: str, method: str, seq: int, device: str, cache: Path) -> int:
    """Peak resident set of a Flower node (its worker, SuperNode and ClientApps) in a loopback deployment of the
    same run: one node per client, each with only its own data file, the server with none."""
    from flower_bench import deployment

    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(folder, dtype, method, Path(tmp) / "run", seq, device)
        # an hour a round: a float16 backward on 2 CPU cores (FedKRSO at 260M) takes longer than the default 600 s
        done = deployment(cfg, Path(tmp), worker=True, env={"FEDSEED_CACHE": str(cache)}, round_timeout=3600.0)
        if done["status"] != "finished:completed" or len(done["rounds"]) != 2:
            raise RuntimeError(f"the deployment of {method} on {folder.name} ended {done['status']} after "
                               f"{len(done['rounds'])} rounds; see its logs")
        return max(done["node_peak_bytes"].values())


RUNNERS = {"fedseed run": fedseed_run_peak, "Flower node": flower_node_peak}


def bench_memory(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    small, large = args.memory_sizes.split(",")
    rows = []
    for dtype in args.memory_dtypes.split(","):
        folders = {size: model_folder(root, size, dtype) for size in (small, large)}
        base = {size: inference_peak(f, dtype, args.seq, args.device) for size, f in folders.items()}
        gained = weight_bytes(folders[large]) - weight_bytes(folders[small])
        for runner in args.runners.split(","):
            measure = RUNNERS[runner]
            for method in args.methods.split(","):
                if args.warm_up:  # the first run of a method compiles numba's kernels into its cache (and writes
                    # any base copy): costs the slope cancels anyway, kept out of the peaks all the same
                    fedseed_run_peak(folders[small], dtype, method, args.seq, args.device, root / "cache")
                peaks = {size: measure(f, dtype, method, args.seq, args.device, root / "cache")
                         for size, f in folders.items()}
                extra = {size: peaks[size] - base[size] for size in folders}
                row = {"dtype": dtype, "runner": runner, "method": method, "sizes": [small, large],
                       "inference_peak": base, "fedseed_peak": peaks, "extra": extra,
                       "weight_bytes": {s: weight_bytes(f) for s, f in folders.items()},
                       "extra_per_weight_byte": (extra[large] - extra[small]) / gained}
                rows.append(row)
                print(f"memory {dtype:>8} {runner:>11} {method:>12}: extra over inference "
                      f"{extra[small] / 2**20:7.0f} MB at {small}, {extra[large] / 2**20:7.0f} MB at {large} -> "
                      f"{row['extra_per_weight_byte']:.3f} per weight byte", flush=True)
    return rows


# -- one client round in a fresh process ---------------------------------------------
CLIENT = r"""
import copy, json, sys, time
import numpy as np, torch
from fedseed.models import LocalModel, load_model
from fedseed.algorithms.fedkseed import FedKSeed, FedKSeedConfig, SeedTask
from fedseed.algorithms.zeroth_order import Perturbation
from fedseed.directions import DirectionSpace
from fedseed.memory import set_forward_threshold
a = json.loads(sys.argv[1])
if a["impl"] == "fedseed":
    set_forward_threshold()  # as fedseed's entry points do
torch.manual_seed(0)
dev = a["device"]
ids = torch.randint(0, 512, (1, a["seq"]), device=dev)
batch = {"input_ids": ids, "labels": ids}
def sync_device():
    if dev == "cuda":
        torch.cuda.synchronize()
def timed(fn, n=1):
    sync_device(); t = time.perf_counter()
    for _ in range(n): fn()
    sync_device(); return (time.perf_counter() - t) / n
def interleaved(forward, step):
    # Medians of two plain forwards and of one step, timed back to back `steps` times. Timed apart,
    # two forwards of the same model varied by 30% between runs on a quiet machine; side by side,
    # both see the same state.
    forward(); step()  # warm-up: first-call costs (allocator, kernels) are not a step's
    pairs = [(2 * timed(forward), timed(step)) for _ in range(a["steps"])]
    return float(np.median([f for f, _ in pairs])), float(np.median([s for _, s in pairs]))
module, _ = load_model(a["folder"], dtype=a["dtype"], device=dev)
rng = np.random.default_rng(0)
seeds = rng.integers(1, 2**62, a["seeds"]).tolist()
coeffs = (rng.standard_normal(a["seeds"]) * 1e-5).tolist()
out = {}
if a["impl"] == "fedseed":
    model = LocalModel.wrap(module, a["folder"])
    out["rebuild_per_seed"] = timed(lambda: model.rebuild_("rademacher", seeds, coeffs)) / len(seeds)
    kernel, passes = [0.0], []
    inner = DirectionSpace.perturb_into
    def timed_passes(self, *args, **kwargs):  # a step's two passes over the weights, timed inside the step
        sync_device(); t = time.perf_counter(); inner(self, *args, **kwargs); sync_device()
        kernel[0] += time.perf_counter() - t
    DirectionSpace.perturb_into = timed_passes
    with Perturbation(model, "rademacher") as zo, torch.no_grad():
        def step(k=[0]):
            k[0] += 1
            kernel[0] = 0.0
            plus, minus = zo.two_point(batch, 1000 + k[0], 1e-3)
            zo.defer([1000 + k[0]], [-1e-6 * (plus - minus) / 2e-3])
            passes.append(kernel[0])
        out["two_forwards"], out["zo_step"] = interleaved(lambda: float(module(**batch).loss), step)
    out["passes"] = float(np.median(passes[1:]))
    def copies():  # every weight read and written to its scratch view by torch, twice: two passes at copy speed
        for _ in range(2):
            for point in zo.points:
                for p, view in zip(point.params, point.views):
                    view.copy_(p)
    out["copy_floor"] = float(np.median([timed(copies) for _ in range(3)]))
    out["scratch_bytes"] = zo.scratch_bytes
else:  # the official code's way: a deepcopy of the server model per client, torch.manual_seed + normal per tensor
    server = module
    client = copy.deepcopy(server)
    params = [p for p in client.parameters() if p.requires_grad]
    def add(seed, c):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(0.0, 1.0, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=c)
    def rebuild():
        for p, q in zip(params, server.parameters()):
            p.data.copy_(q.data)
        for s, c in zip(seeds, coeffs):
            add(s, c)
    out["rebuild_per_seed"] = timed(rebuild) / len(seeds)
    with torch.no_grad():
        def step(k=[0]):
            k[0] += 1
            s = 1000 + k[0]
            add(s, 1e-3); plus = float(client(**batch).loss)
            add(s, -2e-3); minus = float(client(**batch).loss)
            add(s, 1e-3); add(s, -1e-6 * (plus - minus) / 2e-3)
        out["two_forwards"], out["zo_step"] = interleaved(lambda: float(client(**batch).loss), step)
if dev == "cuda":
    out["device_peak"] = torch.cuda.max_memory_allocated()
print(json.dumps(out))
""" + PEAK_LINE


def bench_client(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    rows = []
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            folder = model_folder(root, size, dtype)
            base = inference_peak(folder, dtype, args.seq, args.device)
            row: dict[str, Any] = {"size": size, "dtype": dtype, "weight_bytes": weight_bytes(folder),
                                   "inference_peak": base}
            for impl in ("fedseed", "reference"):
                spec = {"folder": str(folder), "dtype": dtype, "device": args.device, "seq": args.seq,
                        "seeds": args.seeds if impl == "fedseed" else min(args.seeds, args.reference_seeds),
                        "steps": args.steps, "impl": impl}
                peak, text = peak_of([sys.executable, "-c", CLIENT, json.dumps(spec)],
                                     env={"FEDSEED_CACHE": str(root / "cache")})
                measured = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
                row[impl] = {**measured, "peak": peak, "extra": peak - base,
                             "step_over_two_forwards": measured["zo_step"] / measured["two_forwards"]}
            f, r = row["fedseed"], row["reference"]
            print(f"client {size:>5} {dtype:>8}: peak {f['peak'] / 2**30:6.2f} GB (+{f['extra'] / 2**30:5.2f} over "
                  f"inference {base / 2**30:5.2f}; reference +{r['extra'] / 2**30:5.2f}) | step/2 fwd "
                  f"{f['step_over_two_forwards']:.2f} (reference {r['step_over_two_forwards']:.2f}; passes {f['passes']:.2f} s, "
                  f"two torch copies {f['copy_floor']:.2f} s) | rebuild "
                  f"{f['rebuild_per_seed'] * 1e3:.1f} ms/seed (reference {r['rebuild_per_seed'] * 1e3:.1f})", flush=True)
            rows.append(row)
    return rows


def bench_precision(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """The quickstart in float32, bfloat16 and float16: does a 16-bit run's held-out loss track the float32 run's?"""
    rows, curves = [], {}
    for dtype in ("float32", "bfloat16", "float16"):
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, "-m", "fedseed.cli", "run", str(HERE.parent / "configs" / "quickstart.toml"),
                 "--overwrite", "--set", f"model.dtype={dtype}", "--set", f"run.output_dir={tmp}/run",
                 "--set", "eval.generate_examples=4"],
                capture_output=True, text=True, env={**os.environ, "FEDSEED_CACHE": str(root / "cache")})
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            curves[dtype] = [r["eval_loss"] for r in metrics]
    for dtype in ("bfloat16", "float16"):
        gap = [abs(a - b) for a, b in zip(curves[dtype], curves["float32"])]
        fell = curves["float32"][0] - curves["float32"][-1]
        rows.append({"dtype": dtype, "eval_loss": curves[dtype], "float32_eval_loss": curves["float32"],
                     "max_gap": max(gap), "final_gap": gap[-1], "float32_improvement": fell})
        print(f"precision {dtype:>8}: held-out loss {curves[dtype][0]:.4f} -> {curves[dtype][-1]:.4f} "
              f"(float32 {curves['float32'][0]:.4f} -> {curves['float32'][-1]:.4f}); largest gap {max(gap):.4f}, "
              f"final gap {gap[-1]:.4f} = {gap[-1] / fell:.1%} of float32's improvement", flush=True)
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="memory,client,precision", help="memory, client, precision (comma-separated)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="260M,1.1B", help="client benchmark sizes")
    p.add_argument("--dtypes", default="float32,bfloat16", help="client benchmark dtypes")
    p.add_argument("--memory-sizes", default="130M,260M", help="the two sizes the memory slope is taken between")
    p.add_argument("--memory-dtypes", default="float32,bfloat16,float16")
    p.add_argument("--methods", default=",".join(METHODS), help="methods of the memory benchmark")
    p.add_argument("--runners", default=",".join(RUNNERS), help="what the memory benchmark runs: "
                   "'fedseed run' (in-process) and/or 'Flower node' (a loopback deployment's node)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a setting of METHODS for every method that has it, e.g. local_steps=2 (memory)")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="skip the memory benchmark's unmeasured first run of each method (when its caches are warm)")
    p.add_argument("--seq", type=int, default=256, help="tokens per batch (and of the inference forward)")
    p.add_argument("--seeds", type=int, default=64, help="per-seed totals the client's sync rebuilds from")
    p.add_argument("--reference-seeds", type=int, default=16, help="seeds the reference's rebuild is timed on")
    p.add_argument("--steps", type=int, default=4, help="steps timed, each beside two plain forwards (medians)")
    p.add_argument("--models", default=str(Path.home() / ".cache" / "fedseed" / "bench-models"),
                   help="where the random-init model folders are built (once)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    for item in args.set:
        key, _, value = item.partition("=")
        OVERRIDES[key] = json.loads(value)
    root = Path(args.models)
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "client-scale", "device": device_name(args.device), "date": datetime.date.today().isoformat(),
        "load_average": os.getloadavg(), "python": platform.python_version(), "args": vars(args),
    }
    started = time.perf_counter()
    if "memory" in args.only:
        result["memory"] = bench_memory(args, root)
    if "client" in args.only:
        result["client"] = bench_client(args, root)
    if "precision" in args.only:
        result["precision"] = bench_precision(args, root)
    result["seconds"] = time.perf_counter() - started
    import torch
    import transformers

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    out = Path(args.out or RESULTS / f"client-scale-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
