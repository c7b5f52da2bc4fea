"""``fedseed``: run, resume, evaluate and export federated fine-tuning runs.

Thin entry points: parse, resolve and log the config, build, run. Everything
else lives in the modules these call.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedseed.config import ConfigError, load_config
from fedseed.events import Events, training_summary


@contextmanager
def _log_to(console) -> Iterator[None]:
    """The runner's warnings (rejected replies, drifted copies, with their reasons) above the progress bars."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_time=False, show_path=False)
    logger = logging.getLogger("fedseed")
    logger.addHandler(handler)
    logger.propagate = False  # a library may have configured the root logger too: one line per warning
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


class RichEvents(Events):
    """Draws the runner's progress: a bar for rounds, one for the clients of the round, one line per round."""

    def __init__(self, console, progress, rounds: int, done: int):
        self.console, self.progress = console, progress
        self.rounds = progress.add_task("rounds", total=rounds, completed=done)
        self.clients = progress.add_task("clients", total=0, visible=False)
        self.gen = progress.add_task("generating", total=0, visible=False)

    def round_start(self, round: int, clients: list[int]) -> None:
        self.progress.update(self.clients, description=f"round {round} clients", total=len(clients), completed=0,
                             visible=True)

    def client_done(self, round: int, client: int) -> None:
        self.progress.advance(self.clients)

    def round_end(self, row: dict[str, Any]) -> None:
        from fedseed.report import human_bytes

        n = max(len(row["clients"]), 1)
        line = (f"round {row['round']:>3} | up {human_bytes(row['uplink_total'] / n)}/client "
                f"| down {human_bytes(row['downlink_total'] / n)}/client | {training_summary(row)}")
        if "eval_loss" in row:
            line += f" | held-out loss {row['eval_loss']:.4f}"
        if row.get("skipped_steps"):
            line += f" | skipped {row['skipped_steps']}"
        if row.get("rejected"):
            line += f" | rejected {sorted(row['rejected'])}"
        if row.get("drifted"):
            line += f" | resynced {sorted(row['drifted'])}"
        self.console.print(line + f" | {row['seconds']:.1f} s")
        self.progress.advance(self.rounds)
        self.progress.update(self.gen, visible=False)

    def phase(self, text: str, total: int = 0) -> None:
        self.progress.update(self.gen, description=text, total=total, completed=0, visible=True)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.gen, n)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedseed.experiment import prepare
    from fedseed.report import build_report, write_report
    from fedseed.runfolder import RunFolder
    from fedseed.runners.simulation import simulate

    console = Console()
    if args.resume:
        folder = RunFolder(args.resume)
        if not folder.config_path.is_file():
            raise ConfigError(f"{folder.path} holds no config.toml: not a fedseed run folder")
        cfg = load_config(folder.config_path, args.set)
    else:
        if args.config is None:
            raise ConfigError("give a CONFIG.toml to start a run, or --resume RUN_DIR to continue one")
        cfg = load_config(args.config, args.set)
        folder = RunFolder(cfg.run.output_dir)
    console.print(f"[bold]fedseed[/] {cfg.algorithm['name']} on {cfg.model.name_or_path} / {cfg.data.dataset}: "
                  f"{cfg.federation.rounds} rounds x {cfg.federation.clients_per_round} of "
                  f"{cfg.federation.num_clients} clients -> {folder.path}")
    t0 = time.perf_counter()
    exp = prepare(cfg)
    if not args.resume:
        folder.create(cfg, exp.data.partition.to_json() if exp.data.partition else None, overwrite=args.overwrite)
    done = len([r for r in folder.metrics() if r["round"] > 0])
    with _progress() as progress, _log_to(progress.console):
        ledger = simulate(exp, folder, resume=bool(args.resume), events=RichEvents(console, progress, cfg.federation.rounds, done))
    stats = exp.data.train_stats
    extra = {"truncation": stats.__dict__, "wall_seconds": time.perf_counter() - t0}
    rep = build_report(folder, ledger.header.algorithm, exp.model.numel, folder.ledger_path.stat().st_size, extra)
    console.print(write_report(folder, rep), markup=False)  # report text is plain: [privacy] is no style
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from fedseed.experiment import Experiment, prepare_data
    from fedseed.replay import rebuild
    from fedseed.runners.simulation import Events, evaluate

    rebuilt = rebuild(args.run_dir, args.set)
    exp = Experiment(rebuilt.config, rebuilt.model, rebuilt.tokenizer, prepare_data(rebuilt.config, rebuilt.tokenizer),
                     rebuilt.ledger.header.base_hash)
    result = {"round": rebuilt.algorithm.committed, **evaluate(exp, generation=not args.loss_only, events=Events())}
    print(json.dumps(result, indent=2))
    return 0


def _readable_as_umask_allows(folder: Path) -> None:
    """An exported model is for others to load: transformers writes its weights 0600 (a private
    temporary file renamed into place), so give every file the mode a plain ``open`` would have."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def cmd_export(args: argparse.Namespace) -> int:
    from fedseed.replay import rebuild

    rebuilt = rebuild(args.run_dir)
    out = Path(args.out_dir)
    module: Any = rebuilt.algorithm.export(rebuilt.model)
    module.save_pretrained(out, safe_serialization=True)
    tokenizer: Any = rebuilt.tokenizer
    tokenizer.save_pretrained(out)
    _readable_as_umask_allows(out)
    print(f"wrote round {rebuilt.algorithm.committed} of {args.run_dir} to {out} (safetensors); "
          f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedseed.compare import compare, to_markdown

    from fedseed.algorithms import METHODS

    console = Console()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(METHODS)
    result = compare(args.config, methods, args.set, console=console)
    console.print(to_markdown(result["methods"]), markup=False)
    console.print(f"plots: {', '.join(result['plots'])}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from fedseed.experiment import write_partition

    cfg = load_config(args.config, args.set)
    out = Path(args.out)
    files, eval_file = write_partition(cfg, out)
    print(f"wrote {len(files)} client files and the held-out set to {out}:")
    for c, f in enumerate(files):
        print(f"  client {c}: {f}    node-config: partition-id={c} data.path=\"{f}\"")
    print(f"  held-out: {eval_file}    server run-config: data.eval_path = \"{eval_file}\"")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Every key a config may set, its default and what it does, as TOML a config can start from."""
    import dataclasses

    from fedseed.algorithms import METHODS
    from fedseed.config import SECTIONS
    from fedseed.runners.flower_config import FlowerSettings
    from fedseed.runfolder import toml_value

    def table(name: str, cls: type, hidden: tuple[str, ...] = (), first: str = "") -> None:
        defaults = cls()
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"[{name}]" + (f"  # {doc[0]}" if doc and not doc[0].startswith(f"{cls.__name__}(") else ""))
        if first:
            print(first)
        for f in dataclasses.fields(cls):
            if f.name in hidden:
                continue
            default = getattr(defaults, f.name)
            choices = f.metadata.get("choices")
            note = f.metadata.get("help", "") + (f" ({' | '.join(choices)})" if choices else "")
            print(f"{f.name} = {toml_value(default)}  # {note}")
        print()

    if args.method not in METHODS:
        raise ConfigError(f"no method {args.method!r}; methods: {', '.join(METHODS)}")
    for section, cls in SECTIONS.items():
        table(section, cls)
    table("flower", FlowerSettings)
    cls, fixed, _ = METHODS[args.method]
    table("algorithm", cls, tuple(fixed), first=f'name = "{args.method}"  # {" | ".join(METHODS)}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedseed", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start a run from CONFIG.toml, or continue one with --resume RUN_DIR")
    run.add_argument("config", nargs="?", help="experiment TOML file (see configs/)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config value, e.g. --set algorithm.lr=1e-4 (repeatable)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its ledger")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in run.output_dir")
    run.set_defaults(fn=cmd_run)
    ev = sub.add_parser("eval", help="rebuild a run's model from its ledger and evaluate it on the held-out split")
    ev.add_argument("run_dir")
    ev.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override, e.g. --set eval.generate_examples=200")
    ev.add_argument("--loss-only", action="store_true", help="skip generation metrics")
    ev.set_defaults(fn=cmd_eval)
    ex = sub.add_parser("export", help="write a run's model as a Hugging Face folder (safetensors)")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.set_defaults(fn=cmd_export)
    cmp = sub.add_parser("compare", help="run several methods on the identical partition and evaluation split")
    cmp.add_argument("config", help="base experiment TOML; [methods.<name>] tables override the presets")
    cmp.add_argument("--methods", default=None, help="comma-separated method names (default: every method)")
    cmp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a base value")
    cmp.set_defaults(fn=cmd_compare)
    part = sub.add_parser("partition", help="write each client's share of CONFIG's data set as a file of its own "
                                            "(and the held-out set), to hand to the data owners of a deployment")
    part.add_argument("config", help="experiment TOML file: data, partition, federation.num_clients, run.seed")
    part.add_argument("--out", required=True, help="folder for client-000.*, client-001.*, ..., eval.*")
    part.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    part.set_defaults(fn=cmd_partition)
    st = sub.add_parser("settings", help="print every config key with its default and help, as a TOML config")
    st.add_argument("--method", default="fedkseed", help="whose [algorithm] keys to print (default fedkseed)")
    st.set_defaults(fn=cmd_settings)
    from fedseed.runners.flower_config import add_flower_config_command
    from fedseed.runners.fleet_gateway import add_gateway_command
    from fedseed.runners.worker import add_worker_command

    add_flower_config_command(sub)
    add_worker_command(sub)
    add_gateway_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from fedseed.memory import set_forward_threshold

    set_forward_threshold()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # data, model, ledger and wire errors all say what to fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with `fedseed run --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
