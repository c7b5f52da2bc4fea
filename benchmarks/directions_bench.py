"""Benchmarks of fedseed.directions against directions made the way the published code makes them.

The reference is FedKSeed/MeZO's code path: ``torch.manual_seed(seed)`` then, for
each parameter, ``z = torch.normal(0, 1, size=p.size(), device=p.device, dtype=p.dtype)``
and ``p.add_(z, alpha=c)`` (the published code writes ``p.data = p.data + c * z``,
which allocates more; the in-place form used here is the faster, leaner variant, so
the comparison flatters the reference). Model sync replays the seeds one by one.

Sub-benchmarks (``--only``, default all):

* ``perturb``   (a) one ``w += c D(seed)`` over the whole model, as a fraction of a plain copy's bandwidth;
* ``sync``      (b) ``w = w0 + sum_k C_k D(seed_k)`` for K = 1024 and 4096 seeds;
* ``zo``        (c) one FedKSeed step as a client takes it (two forwards, two passes) / two plain forwards;
* ``memory``    (d) peak memory of a ZO step / peak memory of a forward (fresh process per measurement on CPU);
* ``ferret``    (e) Ferret's projection ``V^T Delta`` per block and reconstruction ``V gamma``;
* ``precision`` bfloat16 storage: fraction of ZO updates lost when rounding to nearest, and how
  far bfloat16 runs end from the float32 run: perturbed in place (rounded to nearest, or
  stochastically), and fedseed's way (perturbed copies, stochastically rounded updates).

Each prints a table and writes ``benchmarks/results/<benchmark>-<device>.json`` with
the device name, date and library versions. Defaults fit a 2-core CPU in about five
minutes; where a reference would take minutes, fewer seeds are measured and the
time is scaled to K (stated in the ``measured_seeds`` column).

    python benchmarks/directions_bench.py                                   # CPU: stories260K, 100M
    python benchmarks/directions_bench.py --device cuda --sizes 125M,1.3B,3B
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tempfile

import numpy as np
import torch

from fedseed.algorithms.zeroth_order import Perturbation
from fedseed.directions import DirectionSpace, derive_seed
from fedseed.directions.precision import lost_fraction
from fedseed.locations import QUICKSTART_DATA, QUICKSTART_MODEL, resolve

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STORIES = Path(resolve(QUICKSTART_MODEL))
DOLLY = Path(resolve(QUICKSTART_DATA))
# Random-init Llama shapes (numbers of parameters as built, untied unless said).
CONFIGS = {
    "100M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12),
    "125M": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12,
                 tie_word_embeddings=True),
    "1.3B": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16),
    "3B": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32),
}
EPS, LR = 5e-4, 3e-7  # FedKSeed's perturbation scale and learning rate
SEQ = 256  # default tokens per ZO batch (batch size 1, as in FedKSeed); --seq changes it


# -- environment -----------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment(device: str) -> dict:
    import numba

    env = dict(device=device, device_name=device_name(device), date=datetime.datetime.now().isoformat(timespec="seconds"),
               torch=torch.__version__, numba=numba.__version__, numba_threads=numba.get_num_threads(),
               torch_threads=torch.get_num_threads(), python=platform.python_version())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if hasattr(os, "getloadavg"):
        env["load_average_at_start"] = os.getloadavg()[0]
    return env


# -- models ----------------------------------------------------------------------------
def build_model(size: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """stories260K (real weights) or a random-init Llama of the given size, in eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if size == "stories260K":
        model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=dtype)
    else:
        config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **CONFIGS[size])
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    return model.to(device).eval().requires_grad_(False)


def named_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters()]


def token_batch(model: torch.nn.Module, device: str, length: int) -> dict[str, torch.Tensor]:
    """One sequence: real Dolly text for stories260K (its tokenizer), random ids for random-init models."""
    vocab = model.config.vocab_size
    if vocab == 512 and DOLLY.exists():
        from transformers import AutoTokenizer

        from fedseed.data import collate, load_dolly, tokenize_examples

        tok = AutoTokenizer.from_pretrained(STORIES)
        examples, _ = tokenize_examples(load_dolly(DOLLY)[:64], tok, length)
        batch = collate([max(examples, key=lambda e: len(e.input_ids))], tok.eos_token_id)
    else:
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: v.to(device) for k, v in batch.items()}


# -- timing ----------------------------------------------------------------------------
def timed(fn: Callable[[], object], device: str, reps: int = 3, warmup: int = 1, best: bool = False) -> float:
    """Median (or with ``best``, minimum) seconds of ``reps`` calls after ``warmup`` calls (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def seeds_within(per_seed: float, wanted: int, budget: float, floor: int = 1) -> int:
    """How many seeds to measure so that the measurement takes about ``budget`` seconds."""
    return int(min(wanted, max(floor, budget // max(per_seed, 1e-9))))


# -- the reference (published code) ----------------------------------------------------
def reference_perturb(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """MeZO/FedKSeed: reseed the global generator, then one torch.normal per parameter."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.add_(z, alpha=scale)


def reference_sync(params: list[torch.Tensor], base: list[torch.Tensor], seeds, coeffs) -> None:
    """Step-by-step replay: copy w0, then one reseeded pass over the model per seed."""
    for p, b in zip(params, base):
        p.copy_(b)
    for s, c in zip(seeds, coeffs):
        reference_perturb(params, int(s) % 2**63, float(c))


def perturbation(model: torch.nn.Module, dist: str, precision: str = "stochastic") -> Perturbation:
    """fedseed's zeroth-order steps on ``model`` as a client takes them (enter it before stepping).

    Each module sees ``w + eps z`` in a scratch copy during its own forward; the
    update is deferred into the next step's first pass: two passes per step, and
    nothing to restore, so 16-bit weights change only by the updates.
    """
    from fedseed.models import LocalModel

    model.requires_grad_(True)  # the trainable set; every forward here runs under no_grad
    return Perturbation(LocalModel.wrap(model, None, Path(tempfile.mkdtemp(prefix="fedseed-bench-"))), dist, precision)


def fedseed_step(zo: Perturbation, batch: dict[str, torch.Tensor], seed: int, lr: float = LR) -> float:
    """One FedKSeed step the client's way; returns g."""
    plus, minus = zo.two_point(batch, seed, EPS)
    g = (plus - minus) / (2 * EPS)
    zo.defer([seed], [-lr * g])
    return g


def zo_step(perturb: Callable[[int, float], None], loss: Callable[[], float], seed: int, lr: float = LR) -> float:
    """One FedKSeed step in place, the published way: +eps, loss, -2 eps, loss, +eps - lr g. Returns g."""
    perturb(seed, EPS)
    plus = loss()
    perturb(seed, -2 * EPS)
    minus = loss()
    g = (plus - minus) / (2 * EPS)
    perturb(seed, EPS - lr * g)
    return g


# -- tables ----------------------------------------------------------------------------
def show(title: str, rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for r in rows:
            table.add_row(*[fmt(r.get(c, "")) for c in columns])
        Console(width=200).print(table)
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(fmt(r.get(c, "")) for c in columns))


def save(name: str, env: dict, rows: list[dict], notes: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = dict(env, load_average_at_end=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    path = RESULTS / f"{name}-{env['device']}.json"
    path.write_text(json.dumps(dict(benchmark=name, environment=env, notes=notes, rows=rows), indent=2) + "\n")
    print(f"wrote {path.relative_to(HERE.parent)}")


# -- (a) perturb -----------------------------------------------------------------------
def copy_time(params: list[torch.Tensor], device: str, reps: int = 7) -> float:
    """The best time we can measure for copying every parameter's bytes once: the plain-copy bandwidth.

    Two ways, keeping the faster: ``copy_`` of each parameter into a twin, taking each
    tensor's best of ``reps`` (one scheduling hiccup does not spoil the sum), and one
    ``copy_`` between two buffers of the model's total size, best of ``reps``. Both
    err on the side of a fast copy, which makes our fraction of it conservative.
    """
    twins = [torch.empty_like(p) for p in params]
    per_tensor = sum(timed(lambda: c.copy_(p), device, reps=reps, best=True) for c, p in zip(twins, params))
    del twins
    total = sum(p.numel() for p in params)
    src = torch.empty(total, dtype=params[0].dtype, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    whole = timed(lambda: dst.copy_(src), device, reps=reps, best=True)
    return min(per_tensor, whole)



def bench_perturb(args, env) -> None:
    rows = []
    for size in args.sizes:
        model = build_model(size, args.device, args.dtype)
        named = named_params(model)
        params = [p for _, p in named]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        t_copy = copy_time(params, args.device)
        copy_bw = 2 * nbytes / t_copy  # a copy reads and writes every byte once
        t_ref = timed(lambda: reference_perturb(params, 1, EPS), args.device, best=True)
        for dist in ("rademacher", "gaussian"):
            space = DirectionSpace(named, dist, precision=args.precision)
            seeds = iter(range(10**6))
            t = timed(lambda: space.add_([next(seeds)], [EPS]), args.device, reps=7, best=True)
            bw = 2 * nbytes / t
            rows.append(dict(size=size, params=sum(p.numel() for p in params), dtype=str(args.dtype).split(".")[-1],
                             distribution=dist, ours_s=t, reference_s=t_ref, speedup=t_ref / t, copy_s=t_copy,
                             bandwidth_GBps=bw / 1e9, copy_bandwidth_GBps=copy_bw / 1e9, fraction_of_copy=bw / copy_bw))
        del model, named, params
    show("(a) perturb w += c D(seed): ours vs reference (torch.manual_seed + torch.normal per parameter)", rows,
         ["size", "params", "dtype", "distribution", "ours_s", "reference_s", "speedup", "bandwidth_GBps",
          "copy_bandwidth_GBps", "fraction_of_copy"])
    save("perturb", env, rows, "bandwidth = bytes read + written / time; copy = the faster of Tensor.copy_ per "
         "parameter into a twin (sum of per-tensor best of 7) and one copy_ of a buffer of the same size (best of 7); "
         "ours best of 7 calls, reference best of 3")


# -- (b) sync --------------------------------------------------------------------------
def bench_sync(args, env) -> None:
    rows = []
    for size in args.sizes:
        model = build_model(size, args.device, args.dtype)
        named = named_params(model)
        params = [p for _, p in named]
        base = [p.detach().float().clone() for p in params]
        rng = np.random.default_rng(0)
        one_ref = timed(lambda: reference_perturb(params, 1, 1e-6), args.device, reps=1)
        for k in args.seeds:
            pool = np.array([derive_seed(7, i) for i in range(k)], dtype=np.uint64)
            coeffs = rng.normal(0, 1e-5, k).astype(np.float32)
            k_ref = seeds_within(one_ref, k, args.budget)  # the reference draws Gaussians whatever we use
            t_ref = timed(lambda: reference_sync(params, base, pool[:k_ref], coeffs[:k_ref]), args.device,
                          reps=1, warmup=0) * k / k_ref
            for dist in ("rademacher", "gaussian"):
                space = DirectionSpace(named, dist, precision=args.precision)
                one = timed(lambda: space.add_([1, 2], [1e-6, 1e-6], base=base), args.device, reps=1) / 2
                k_ours = seeds_within(one, k, args.budget, floor=min(k, 16))
                t = timed(lambda: space.add_(pool[:k_ours], coeffs[:k_ours], base=base), args.device, reps=1,
                          warmup=0) * k / k_ours
                rows.append(dict(size=size, distribution=dist, K=k, ours_s=t, ours_measured_seeds=k_ours,
                                 reference_s=t_ref, reference_measured_seeds=k_ref, speedup=t_ref / t))
        del model, named, params, base
    show("(b) model sync w = w0 + sum_k C_k D(seed_k): ours (one fused pass) vs reference (replay seed by seed)", rows,
         ["size", "distribution", "K", "ours_s", "ours_measured_seeds", "reference_s", "reference_measured_seeds",
          "speedup"])
    save("sync", env, rows, "times for fewer measured seeds than K are scaled by K / measured (fixed costs included); "
         "the reference draws Gaussians (torch.normal) in both rows")


# -- (c) ZO step -----------------------------------------------------------------------
def bench_zo(args, env) -> None:
    """Each step is timed whole beside two plain forwards of the same batch, so drifting machine load cancels out."""
    rows = []
    for size in args.sizes:
        model = build_model(size, args.device, args.dtype)
        params = [p for _, p in named_params(model)]
        batch = token_batch(model, args.device, args.seq)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

        def loss() -> float:
            with torch.no_grad():
                return float(model(**batch).loss)

        def ratio(step: Callable[[int], object], reps: int) -> tuple[float, float]:
            """Median over steps of (step time, step time / the time of two plain forwards just before it)."""
            steps, ratios = [], []
            for i in range(reps + 1):
                sync()
                start = time.perf_counter()
                loss(), loss()
                sync()
                forwards = time.perf_counter() - start
                start = time.perf_counter()
                step(1000 + i)
                sync()
                if i:  # the first step warms up
                    steps.append(time.perf_counter() - start)
                    ratios.append(steps[-1] / forwards)
            return statistics.median(steps), statistics.median(ratios)

        reps = args.zo_steps
        t_ref, r_ref = ratio(lambda seed: zo_step(lambda s, c: reference_perturb(params, s, c), loss, seed), reps)
        for dist in ("rademacher", "gaussian"):
            with perturbation(model, dist) as zo:
                t, r = ratio(lambda seed: fedseed_step(zo, batch, seed), reps)
            model.requires_grad_(False)
            rows.append(dict(size=size, distribution=dist, tokens=batch["input_ids"].shape[1], ours_step_s=t,
                             ours_step_over_two_forwards=r, reference_step_s=t_ref,
                             reference_step_over_two_forwards=r_ref))
        del model, params
    show("(c) one FedKSeed ZO step / two plain forwards: fedseed's (perturbed copies, deferred update: two passes) "
         "and the reference (in place: three passes)", rows,
         ["size", "distribution", "tokens", "ours_step_s", "ours_step_over_two_forwards", "reference_step_s",
          "reference_step_over_two_forwards"])
    save("zo", env, rows, f"batch 1 x {args.seq} tokens; eps {EPS}, lr {LR}; median over {args.zo_steps} steps of "
         "(step time / time of two plain forwards of the same batch taken just before the step)")


# -- (d) memory ------------------------------------------------------------------------
def _hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_memory(size: str, what: str, device: str, dtype: torch.dtype, precision: str, seq: int) -> dict:
    """Peak memory of one ``what`` in {forward, ours, reference} from the state after loading (this process)."""
    model = build_model(size, device, dtype)
    named = named_params(model)
    params = [p for _, p in named]
    batch = token_batch(model, device, seq)
    zo = perturbation(model, "rademacher", precision).__enter__() if what == "ours" else None
    DirectionSpace([("warm", torch.zeros(8, device=device))], "rademacher").add_([1], [1.0])  # load kernels

    def loss() -> float:
        with torch.no_grad():
            return float(model(**batch).loss)

    with torch.no_grad():  # warm the model code on one token (allocates almost nothing)
        model(input_ids=batch["input_ids"][:, :1])
    run = {"forward": loss,
           "ours": lambda: (fedseed_step(zo, batch, 3), zo.flush()),  # type: ignore[arg-type]
           "reference": lambda: zo_step(lambda s, c: reference_perturb(params, s, c), loss, 3)}[what]
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return dict(before=before, peak=torch.cuda.max_memory_allocated())
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
    before = _rss_bytes()
    run()
    return dict(before=before, peak=_hwm_bytes())


def bench_memory(args, env) -> None:
    rows = []
    for size in args.sizes:
        peaks = {}
        for what in ("forward", "ours", "reference"):
            if args.device == "cuda":
                peaks[what] = measure_memory(size, what, args.device, args.dtype, args.precision, args.seq)
                torch.cuda.empty_cache()
                continue
            cmd = [sys.executable, __file__, "_memory", size, what, "--dtype", str(args.dtype).split(".")[-1],
                   "--precision", args.precision, "--seq", str(args.seq)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peaks[what] = json.loads(out.stdout.strip().splitlines()[-1])
        fwd = peaks["forward"]
        rows.append(dict(size=size, resident_before_MB=fwd["before"] / 2**20, forward_peak_MB=fwd["peak"] / 2**20,
                         ours_step_peak_MB=peaks["ours"]["peak"] / 2**20,
                         reference_step_peak_MB=peaks["reference"]["peak"] / 2**20,
                         ours_over_forward=peaks["ours"]["peak"] / fwd["peak"],
                         reference_over_forward=peaks["reference"]["peak"] / fwd["peak"],
                         ours_extra_over_forward_MB=(peaks["ours"]["peak"] - fwd["peak"]) / 2**20))
    show("(d) peak memory of one ZO step / peak memory of one forward (weights + activations)", rows,
         ["size", "resident_before_MB", "forward_peak_MB", "ours_step_peak_MB", "reference_step_peak_MB",
          "ours_over_forward", "reference_over_forward", "ours_extra_over_forward_MB"])
    method = ("CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, one process" if args.device == "cuda"
              else "CPU: a fresh process per measurement loads the model, warms the kernels, resets the peak resident "
                   "set (/proc/self/clear_refs = 5) and reads VmHWM after the measured call")
    save("memory", env, rows, method)


# -- (e) Ferret ------------------------------------------------------------------------
def ferret_blocks(named, total_k: int) -> list[tuple[list[tuple[str, torch.Tensor]], int]]:
    """One block per parameter tensor, K_l proportional to its size (at least 1)."""
    n = sum(p.numel() for _, p in named)
    return [([(name, p)], max(1, round(total_k * p.numel() / n))) for name, p in named]


def bench_ferret(args, env) -> None:
    rows = []
    for size in args.sizes:
        model = build_model(size, args.device, torch.float32)
        named = named_params(model)
        gen = torch.Generator(device=args.device).manual_seed(0)
        delta = [(n, 1e-3 * torch.randn(p.shape, generator=gen, device=args.device)) for n, p in named]
        total_k = args.ferret_k if args.device == "cuda" or size == "stories260K" else args.ferret_k_cpu_large
        blocks = ferret_blocks(delta, total_k)
        seeds = [[derive_seed(11, j, k) for k in range(kl)] for j, (_, kl) in enumerate(blocks)]
        spaces = [DirectionSpace(b, "gaussian") for b, _ in blocks]
        model_spaces = [DirectionSpace([named[j]], "gaussian") for j in range(len(blocks))]

        def ours():
            gammas = [space.project(s) / len(s) for space, s in zip(spaces, seeds)]  # (K_l,) each
            for space, s, g in zip(model_spaces, seeds, gammas):
                space.add_(s, g)

        def reference():
            for (block, _), s, (_, p) in zip(blocks, seeds, named):
                (_, d), = block
                gammas = []
                for seed in s:
                    torch.manual_seed(seed % 2**63)
                    v = torch.randn(d.shape, device=d.device)
                    gammas.append(float((v * d).sum()) / len(s))
                for seed, g in zip(s, gammas):
                    torch.manual_seed(seed % 2**63)
                    p.add_(torch.randn(p.shape, device=p.device), alpha=g)

        t = timed(ours, args.device, reps=3 if args.device == "cuda" or size == "stories260K" else 1)
        t_ref = timed(reference, args.device, reps=1, warmup=0)
        rows.append(dict(size=size, blocks=len(blocks), total_K=sum(k for _, k in blocks),
                         generated_elements=sum(p.numel() * k for (b, k) in blocks for _, p in b),
                         ours_s=t, reference_s=t_ref, speedup=t_ref / t))
        del model, named, delta, spaces, model_spaces
    show("(e) Ferret projection V^T Delta + reconstruction V gamma (Gaussian bases, one block per tensor)", rows,
         ["size", "blocks", "total_K", "generated_elements", "ours_s", "reference_s", "speedup"])
    save("ferret", env, rows, "K_l proportional to block size; each element of each basis generated twice")


# -- precision -------------------------------------------------------------------------
def bench_precision(args, env) -> None:
    """stories260K on real Dolly text: a float32 FedKSeed run against bfloat16 runs in each storage mode.

    Per learning rate: the float32 run computes its g from its own forwards; each
    bfloat16 mode then (1) replays exactly those (seed, g) steps, perturbations
    included, which isolates what storage loses, and (2) trains with g from its
    own bfloat16 forwards, which is what a user would run.
    """
    from transformers import AutoTokenizer

    from fedseed.data import collate, load_dolly, tokenize_examples

    steps = args.precision_steps
    model = build_model("stories260K", "cpu", torch.float32)
    named = named_params(model)
    with torch.no_grad():  # every run starts from the same bfloat16-representable weights
        for _, p in named:
            p.copy_(p.bfloat16().float())
    w0 = [p.detach().clone() for _, p in named]
    tok = AutoTokenizer.from_pretrained(STORIES)
    examples, _ = tokenize_examples(load_dolly(DOLLY)[:600], tok, 128)
    held = collate(examples[-32:], tok.eos_token_id)
    train = [collate([examples[i % (len(examples) - 32)]], tok.eos_token_id) for i in range(steps)]

    def evaluate(dtype: torch.dtype) -> float:
        with torch.no_grad():
            return float(model.to(dtype)(**held).loss)

    def run(dtype: torch.dtype, mode: str, lr: float, replay: list[tuple[int, float]] | None):
        """``steps`` ZO steps from w0; returns the (seed, g) pairs, the stored weights and the lost fraction.

        ``mode``: "nearest" or "stochastic" perturb and update the weights in place
        with that rounding (the published way); "fedseed" perturbs scratch copies and
        rounds only the updates, stochastically (what a fedseed client does).
        """
        model.float()
        with torch.no_grad():
            for (_, p), w in zip(named, w0):
                p.copy_(w)
        model.to(dtype)
        zo = perturbation(model, "rademacher").__enter__() if mode == "fedseed" else None
        space = zo.space if zo else DirectionSpace(named_params(model), "rademacher", precision=mode)
        pairs, lost = [], []
        for i in range(steps):
            if replay is None:
                seed = derive_seed(5, i)
                if zo:
                    g = fedseed_step(zo, train[i], seed, lr)
                else:

                    def loss() -> float:
                        with torch.no_grad():
                            return float(model(**train[i]).loss)

                    g = zo_step(lambda s, c: space.add_([s], [c]), loss, seed, lr)
            else:
                seed, g = replay[i]
                if i % 10 == 0:  # would lr g z, added to the current weights, survive rounding to nearest?
                    z = space.materialize(seed)
                    lost.append(np.mean([lost_fraction(p.detach().float(), -lr * g * d, dtype)
                                         for (_, p), d in zip(named_params(model), z)]))
                for c in ([-lr * g] if zo else (EPS, -2 * EPS, EPS - lr * g)):
                    space.add_([seed], [c])
            pairs.append((seed, g))
        if zo:
            zo.__exit__(None, None, None)  # applies the last deferred update
            model.requires_grad_(False)
        stored = torch.cat([p.detach().float().reshape(-1) for _, p in named_params(model)])
        return pairs, stored, (float(np.mean(lost)) if lost else 0.0)

    start = torch.cat([w.reshape(-1) for w in w0])
    rows = []
    for lr in sorted(args.precision_lrs):
        pairs32, w32, _ = run(torch.float32, "nearest", lr, None)
        loss32, loss32_in_bf16 = evaluate(torch.float32), evaluate(torch.bfloat16)
        best16 = w32.bfloat16().float()  # the closest bfloat16 can get to the float32 run
        rows.append(dict(lr=lr, run="float32", eval_loss=loss32, eval_loss_in_bfloat16=loss32_in_bf16,
                         update_norm=float((w32 - start).norm())))
        trains = lr == max(args.precision_lrs)  # the loss only moves visibly at the larger rate
        for mode in ("nearest", "stochastic", "fedseed"):
            _, replayed, lost = run(torch.bfloat16, mode, lr, pairs32)
            error = float((replayed - best16).norm() / (best16 - start).norm())
            row = dict(lr=lr, run=f"bfloat16 {mode}", update_error_vs_float32=error, lost_update_fraction=lost)
            if trains:
                _, own, _ = run(torch.bfloat16, mode, lr, None)
                row["tracking_error"] = float((own - best16).norm() / (best16 - start).norm())
                row["eval_loss"] = evaluate(torch.bfloat16)
            rows.append(row)
        model.float()
    with torch.no_grad():
        for (_, p), w in zip(named, w0):
            p.copy_(w)
    rows.append(dict(lr=0.0, run="start (w0)", eval_loss=evaluate(torch.float32), eval_loss_in_bfloat16=evaluate(torch.bfloat16)))
    show(f"precision: stories260K on Dolly, {steps} FedKSeed steps (eps {EPS}), bfloat16 storage vs float32", rows,
         ["lr", "run", "update_error_vs_float32", "lost_update_fraction", "tracking_error", "eval_loss",
          "eval_loss_in_bfloat16"])
    save("precision", env, rows,
         "modes: nearest / stochastic perturb and update the weights in place with that rounding; fedseed perturbs "
         "scratch copies (the weights see only the updates, stochastically rounded); "
         "update_error_vs_float32: the float32 run's (seed, g) steps replayed in bfloat16, "
         "||w16 - bf16(w32)|| / ||bf16(w32) - w0|| (0: as close as bfloat16 can be); lost_update_fraction: share of "
         "the elements of lr g z that leave a bfloat16 weight unchanged under rounding to nearest (every 10th step "
         "of the replay); tracking_error and eval_loss (largest lr only): a bfloat16 run whose g comes from its own "
         "bfloat16 forwards, ||w16 - bf16(w32)|| / ||bf16(w32) - w0|| and held-out loss (32 examples) in the run's "
         "dtype; eval_loss_in_bfloat16: the float32 run's weights evaluated in bfloat16")


BENCHES = {"perturb": bench_perturb, "sync": bench_sync, "zo": bench_zo, "memory": bench_memory,
           "ferret": bench_ferret, "precision": bench_precision}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_memory":  # internal: one memory measurement in a fresh process
        p = argparse.ArgumentParser()
        p.add_argument("cmd"), p.add_argument("size"), p.add_argument("what")
        p.add_argument("--dtype", default="float32"), p.add_argument("--precision", default="stochastic")
        p.add_argument("--seq", type=int, default=SEQ)
        a = p.parse_args(argv)
        print(json.dumps(measure_memory(a.size, a.what, "cpu", getattr(torch, a.dtype), a.precision, a.seq)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model lives")
    p.add_argument("--sizes", default=None, help="comma-separated: stories260K, 100M, 125M, 1.3B, 3B "
                   "(default: stories260K,100M on CPU; 125M,1.3B,3B on CUDA)")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {list(BENCHES)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--precision", default="stochastic", choices=["nearest", "stochastic"],
                   help="how results are rounded into 16-bit weights (zeroth-order updates: stochastic)")
    p.add_argument("--seeds", default="1024,4096", help="K values of the sync benchmark")
    p.add_argument("--seq", type=int, default=SEQ, help="tokens of the ZO / memory benchmarks' batch (batch size 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds one sync measurement may take before fewer seeds are measured and scaled "
                        "(default 1.5 on CPU, 30 on CUDA)")
    p.add_argument("--ferret-k", type=int, default=1024, help="total Ferret bases K over all blocks")
    p.add_argument("--ferret-k-cpu-large", type=int, default=32, help="total K for models above stories260K on CPU")
    p.add_argument("--zo-steps", type=int, default=4, help="measured ZO steps per configuration (after one warm-up)")
    p.add_argument("--precision-steps", type=int, default=60, help="ZO steps of the precision benchmark")
    p.add_argument("--precision-lrs", default="3e-7,2e-5",
                   help="learning rates of the precision benchmark (FedKSeed's, and one large enough to move the loss)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is visible")
    args.sizes = (args.sizes or ("stories260K,100M" if args.device == "cpu" else "125M,1.3B,3B")).split(",")
    args.seeds = [int(k) for k in args.seeds.split(",")]
    args.precision_lrs = [float(x) for x in args.precision_lrs.split(",")]
    args.dtype = getattr(torch, args.dtype)
    args.budget = args.budget or (1.5 if args.device == "cpu" else 30.0)
    env = environment(args.device)
    print(json.dumps(env))
    for name in args.only.split(","):
        start = time.perf_counter()
        BENCHES[name](args, env)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]")


if __name__ == "__main__":
    main()
