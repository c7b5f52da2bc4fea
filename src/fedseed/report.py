"""The run report: what a run achieved and exactly what it cost on the wire.

Built only from the run folder (metrics.jsonl, ledger) and the model's size, so
``fedseed run`` and a later reader get the same numbers. The dense comparison is
what FedAvg would move for the same model and the same sampled clients: every
sampled client downloads and uploads all trainable weights in float32.
"""

from __future__ import annotations

import json
from typing import Any

from fedseed.runfolder import RunFolder

DENSE_BYTES_PER_PARAM = 4  # float32


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def build_report(folder: RunFolder, algorithm: str, numel: int, ledger_bytes: int, extra: dict[str, Any]) -> dict[str, Any]:
    rows = folder.metrics()
    rounds = [r for r in rows if r["round"] > 0]
    before: dict[str, Any] = next((r for r in rows if r["round"] == 0), {})
    after: dict[str, Any] = next((r for r in reversed(rounds) if "eval_loss" in r), {})
    up = sum(r["uplink_total"] for r in rounds)
    down = sum(r["downlink_total"] for r in rounds)
    transfers = sum(len(r["clients"]) for r in rounds)
    dense = DENSE_BYTES_PER_PARAM * numel * transfers  # one way
    metrics = {k: {"before": before.get(k), "after": after.get(k)}
               for k in ("eval_loss", "rouge_l", "gsm8k_accuracy", "accuracy") if k in before or k in after}
    return {
        "algorithm": algorithm,
        "rounds": len(rounds),
        "trainable_parameters": numel,
        "metrics": metrics,
        "bytes": {
            "uplink_total": up,
            "downlink_total": down,
            "uplink_per_client_round": up / max(transfers, 1),
            "downlink_per_client_round": down / max(transfers, 1),
            "fedavg_equivalent_each_way": dense,
            "fedavg_over_ours": (2 * dense) / max(up + down, 1),
            "ledger_bytes": ledger_bytes,
        },
        "skipped_steps": sum(r.get("skipped_steps", 0) for r in rounds),
        "rejected_replies": sum(len(r.get("rejected", {})) for r in rounds),
        "resynced_copies": sum(len(r.get("drifted", {})) for r in rounds),
        "seconds": sum(r.get("seconds", 0.0) for r in rounds),
        **_privacy(rounds),
        **extra,
    }


def _privacy(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The epsilon the last round reports (client level, or the largest of any client at example level)."""
    last = rounds[-1] if rounds else {}
    return {key: last[key] for key in ("epsilon", "example_epsilon") if key in last}


def to_markdown(rep: dict[str, Any]) -> str:
    b = rep["bytes"]
    lines = [
        f"# fedseed run report: {rep['algorithm']}",
        "",
        f"{rep['rounds']} rounds, {rep['trainable_parameters']:,} trainable parameters, "
        f"{rep['seconds']:.1f} s of training rounds.",
        "",
        "| metric | before | after |",
        "| --- | ---: | ---: |",
    ]
    for name, v in rep["metrics"].items():
        fmt = (lambda x: "-" if x is None else f"{x:.4f}") if name == "eval_loss" else (lambda x: "-" if x is None else f"{x:.2f}")
        lines.append(f"| {name} | {fmt(v['before'])} | {fmt(v['after'])} |")
    lines += [
        "",
        "| wire | fedseed | FedAvg, same model and clients (fp32 weights) |",
        "| --- | ---: | ---: |",
        f"| uplink, total | {human_bytes(b['uplink_total'])} ({b['uplink_total']:,} B) | {human_bytes(b['fedavg_equivalent_each_way'])} |",
        f"| downlink, total | {human_bytes(b['downlink_total'])} ({b['downlink_total']:,} B) | {human_bytes(b['fedavg_equivalent_each_way'])} |",
        f"| uplink per client per round | {human_bytes(b['uplink_per_client_round'])} | {human_bytes(4 * rep['trainable_parameters'])} |",
        f"| downlink per client per round | {human_bytes(b['downlink_per_client_round'])} | {human_bytes(4 * rep['trainable_parameters'])} |",
        "",
        f"FedAvg would move {b['fedavg_over_ours']:,.0f}x more bytes. The ledger (the whole checkpoint) is "
        f"{human_bytes(b['ledger_bytes'])}.",
        "",
        f"Steps skipped for a non-finite loss: {rep['skipped_steps']}; replies rejected: {rep['rejected_replies']}; "
        f"client copies resynced after a fingerprint mismatch: {rep['resynced_copies']}.",
    ]
    if "epsilon" in rep:
        lines.append(f"Client-level differential privacy: epsilon {rep['epsilon']:.3f} spent over the run "
                     f"(delta and accountant in config.toml [privacy]).")
    if "example_epsilon" in rep:
        lines.append(f"Example-level differential privacy: epsilon {rep['example_epsilon']:.3f} for the client "
                     f"that spent the most (delta and accountant in config.toml [privacy]).")
    if "truncation" in rep:
        t = rep["truncation"]
        lines.append(f"Training examples: {t['kept']:,} kept of {t['total']:,} ({t['truncated']:,} truncated, "
                     f"{t['dropped']:,} dropped for max_length).")
    return "\n".join(lines) + "\n"


def plot(folder: RunFolder, rep: dict[str, Any]) -> list[str]:
    """Held-out loss and cumulative bytes per round, as PNG files in the run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = folder.metrics()
    names = []
    evals = [(r["round"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if evals:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(*zip(*evals), marker="o")
        ax.set(xlabel="round", ylabel="held-out loss", title=rep["algorithm"])
        fig.tight_layout()
        fig.savefig(folder.path / "loss.png", dpi=120)
        plt.close(fig)
        names.append("loss.png")
    rounds = [r for r in rows if r["round"] > 0]
    if rounds:
        cum, dense, total, dense_total = [], [], 0, 0
        per_client = 2 * DENSE_BYTES_PER_PARAM * rep["trainable_parameters"]
        for r in rounds:
            total += r["uplink_total"] + r["downlink_total"]
            dense_total += per_client * len(r["clients"])
            cum.append(total)
            dense.append(dense_total)
        xs = [r["round"] for r in rounds]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.semilogy(xs, cum, marker="o", label=f"{rep['algorithm']} (measured)")
        ax.semilogy(xs, dense, linestyle="--", label="FedAvg, fp32 weights")
        ax.set(xlabel="round", ylabel="cumulative bytes (up + down)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder.path / "bytes.png", dpi=120)
        plt.close(fig)
        names.append("bytes.png")
    return names


def write_report(folder: RunFolder, rep: dict[str, Any]) -> str:
    rep["plots"] = plot(folder, rep)
    folder.write_text("report.json", json.dumps(rep, indent=2, sort_keys=True))
    text = to_markdown(rep)
    folder.write_text("report.md", text)
    return text
