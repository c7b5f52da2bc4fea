"""A server killed at any instant: the ledger on disk is a prefix of the clean run's, and resume completes it.

The acceptance criterion: a server killed at any point resumes to a ledger that
is a prefix of what an uninterrupted run writes, and never applies (or records)
a round twice. Three views of it:

* a real ``fedseed run`` process, SIGKILLed after seeded random delays and
  resumed with ``fedseed run --resume`` until one resume finishes;
* the same run in process, stopped by a raised :class:`Crash` before or after
  each single write of a round's commit sequence (metrics row, ledger copy,
  fsync, rename, folder fsync), and resumed in process;
* a Flower deployment whose ServerApp process is SIGKILLed mid-run and
  launched again with ``flower.resume = true`` (in
  tests/test_flower_deployment.py, which has the deployment running anyway).

Runs are deterministic, so "the clean run" is an in-process run of the same
config, ledger bytes compared exactly. Every process is pinned to one torch
thread, as the reference is: CPU float reductions depend on the thread count.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, run_simulation, small_config, torch_threads
from fedseed.ledger import Ledger, LedgerError
from fedseed.runfolder import RunFolder, to_toml

pytestmark = pytest.mark.slow  # each test kills and restarts real processes

FEDSEED = REPO / ".venv" / "bin" / "fedseed"
QUICK_EVAL = {"every": 1000, "loss_examples": 8, "generate_examples": 2, "max_new_tokens": 4}


def crash_config(out: Path, rounds: int, local_steps: int, before: bool) -> dict[str, Any]:
    """A FedKSeed run of well under a second per round, evaluated at the end (and before, with ``before``)."""
    algorithm = {"name": "fedkseed", "num_seeds": 64, "local_steps": local_steps, "lr": 1e-4, "eps": 1e-3}
    return small_config(out, algorithm, federation={"rounds": rounds}, eval={**QUICK_EVAL, "before": before})


def reference(cfg: dict[str, Any], out: Path) -> tuple[bytes, Ledger, list[dict[str, Any]]]:
    """The uninterrupted in-process run of ``cfg`` (in ``out``): ledger bytes, ledger, metrics rows."""
    with torch_threads(1):
        _, folder, ledger = run_simulation({**cfg, "run": {**cfg["run"], "output_dir": str(out)}})
    return folder.ledger_path.read_bytes(), ledger, folder.metrics()


def assert_prefix(folder: RunFolder, clean: bytes, clean_ledger: Ledger) -> int:
    """The ledger on disk opens without repair and is the clean one cut after a whole round; returns its rounds."""
    ledger = Ledger.open(folder.ledger_path)  # no repair: a torn ledger raises here
    data = folder.ledger_path.read_bytes()
    assert ledger.header == clean_ledger.header
    assert ledger.updates == clean_ledger.updates[: ledger.rounds], "round frames differ from the clean run's"
    assert clean.startswith(data), f"{len(data)} ledger bytes are not a prefix of the clean run's {len(clean)}"
    return ledger.rounds


def metric_rounds(folder: RunFolder) -> list[int]:
    return [r["round"] for r in folder.metrics()]


# -- a real `fedseed run` process, killed at random ---------------------------------------


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime): changes when the file is rewritten or replaced."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


class Cli:
    """``fedseed run`` processes of the test's own, each in its own process group, ended by the test."""

    def __init__(self, log: Path):
        self.log = log
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(self, *args: str) -> subprocess.Popen:
        with open(self.log, "a") as out:
            out.write(f"\n$ fedseed run {' '.join(args)}\n")
            out.flush()
            proc = subprocess.Popen([str(FEDSEED), "run", *args], env=self.env, cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the process group: a server that dies, no handler or ``finally`` runs."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def end_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)

    def wait_until(self, proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"fedseed run exited with {proc.returncode}:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"fedseed run not ready in {timeout} s:\n{self.log.read_text()}"
            time.sleep(0.02)


@pytest.fixture
def cli(tmp_path) -> Iterator[Cli]:
    runner = Cli(tmp_path / "fedseed.log")
    try:
        yield runner
    finally:
        runner.end_all()


def test_in_process_server_killed_at_random_points_resumes_to_the_clean_ledger(cli, tmp_path):
    """The in-process runner as a real ``fedseed run`` process: SIGKILLed three times at seeded random instants."""
    rounds, kills_wanted = 5, 3
    out = tmp_path / "run"
    cfg = crash_config(out, rounds, local_steps=20, before=False)
    clean, clean_ledger, clean_rows = reference(cfg, tmp_path / "clean")
    round_seconds = [r["seconds"] for r in clean_rows]  # where a process spends its time once started
    (tmp_path / "exp.toml").write_text(to_toml(cfg))
    folder = RunFolder(out)
    rng = random.Random(20240611)
    kills: list[tuple[float, int]] = []  # (seconds after start-up, ledger rounds at the kill)
    args = [str(tmp_path / "exp.toml"), "--overwrite"]
    for k in range(kills_wanted):
        at_launch = Ledger.open(folder.ledger_path).rounds if folder.ledger_path.is_file() else 0
        before = file_stamp(folder.metrics_path)
        proc = cli.start(*args)
        # start-up (imports, model and data: 5-10 s here, more under load) ends when the runner, having opened
        # or replayed the ledger, writes metrics.jsonl afresh (trim_metrics): count the delay from there
        cli.wait_until(proc, lambda: file_stamp(folder.metrics_path) != before)
        delay = rng.uniform(0.0, sum(round_seconds[at_launch:]) / (kills_wanted - k))  # spread over the run
        try:
            proc.wait(timeout=delay)
            break  # it finished first: that was the last attempt
        except subprocess.TimeoutExpired:
            cli.kill(proc)
        if proc.returncode == 0:
            break  # it finished between the timeout and the signal
        kills.append((delay, assert_prefix(folder, clean, clean_ledger)))
        args = ["--resume", str(out)]
    else:
        proc = cli.start(*args)
        proc.wait(timeout=300)
    assert proc.returncode == 0, cli.log.read_text()
    print(f"clean round seconds {[round(s, 2) for s in round_seconds]}; kills (delay after start-up s, ledger "
          f"rounds): {[(round(d, 2), n) for d, n in kills]}")
    assert len({n for _, n in kills if n < rounds}) >= 2, f"kills did not land in different rounds: {kills}"
    assert folder.ledger_path.read_bytes() == clean
    rows = folder.metrics()
    assert [r["round"] for r in rows] == list(range(1, rounds + 1)), f"metrics rounds {metric_rounds(folder)}"
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in clean_rows]


# -- a crash between any two writes of a round ---------------------------------------------


class Crash(BaseException):
    """The process dies here: a BaseException, so no ``except Exception`` in fedseed handles it."""


@dataclass(frozen=True)
class Point:
    """Where the process dies: at the call ``op`` of round ``round``'s writes, instead of it or just after it."""

    op: str  # "row": metrics row, "copy": ledger to ledger.tmp, "fsync": ledger.tmp, "rename", "fsync dir"
    round: int
    after: bool

    @property
    def commits(self) -> bool:
        """Whether the ledger holds the round once the process dies here: the rename is the commit point."""
        return self.op == "fsync dir" or (self.op == "rename" and self.after)

    def __str__(self) -> str:
        return f"{'after' if self.after else 'before'} {self.op} of round {self.round}"


class Crasher:
    """Wraps the real write calls of a run folder so that the one at the armed :class:`Point` raises :class:`Crash`.

    The round a ledger write belongs to is that of the metrics row written just
    before it (``finish_round`` writes the row, then the ledger); the ledger's
    creation comes before any row (round -1).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: RunFolder):
        ledger = folder.ledger_path.resolve()
        tmp = ledger.with_name(ledger.name + ".tmp")
        self.point: Point | None = None
        self.round = -1
        self.hit = False
        real_row, real_copy, real_fsync, real_replace = RunFolder.append_metrics, shutil.copyfile, os.fsync, os.replace

        def append_metrics(run: RunFolder, row: dict[str, Any]) -> None:
            self.round = row["round"]
            self.call("row", real_row, run, row)

        def copyfile(src, dst, *args, **kwargs):
            if Path(src).resolve() == ledger:
                return self.call("copy", real_copy, src, dst, *args, **kwargs)
            return real_copy(src, dst, *args, **kwargs)

        def fsync(fd: int) -> None:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
            op = {tmp: "fsync", ledger.parent: "fsync dir"}.get(target)
            return self.call(op, real_fsync, fd) if op else real_fsync(fd)

        def replace(src, dst, *args, **kwargs):
            if Path(dst).resolve() == ledger:
                return self.call("rename", real_replace, src, dst, *args, **kwargs)
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(RunFolder, "append_metrics", append_metrics)
        monkeypatch.setattr(shutil, "copyfile", copyfile)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def arm(self, point: Point | None) -> None:
        """A new process: nothing written yet, dying at ``point``."""
        self.point, self.round, self.hit = point, -1, False

    def call(self, op: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.point is None or self.hit or (op, self.round) != (self.point.op, self.point.round):
            return fn(*args, **kwargs)
        self.hit = True
        if self.point.after:
            fn(*args, **kwargs)
        raise Crash(str(self.point))


WRITES = [Point(op, 2, after) for op in ("row", "copy", "fsync", "rename") for after in (False, True)]
CRASHES = [
    Point("row", 0, False), Point("row", 0, True),  # the base model's evaluation row (eval.before)
    Point("row", 1, False), Point("rename", 1, False), Point("rename", 1, True),
    *WRITES,  # every write of round 2, up to and including the rename that commits it
    Point("row", 3, True), Point("fsync dir", 3, False),
    Point("row", 4, True), Point("fsync dir", 4, True),  # the last round, evaluated with generation
]


def test_crash_between_any_two_writes_of_a_round(monkeypatch, tmp_path):
    rounds = 4
    cfg = crash_config(tmp_path / "run", rounds, local_steps=3, before=True)
    clean, clean_ledger, clean_rows = reference(cfg, tmp_path / "clean")
    folder = RunFolder(tmp_path / "run")
    crasher = Crasher(monkeypatch, folder)
    history: list[tuple[str, int, list[int]]] = []  # (crash point, ledger rounds, metrics rounds) after each crash
    with torch_threads(1):
        for k, point in enumerate(CRASHES):
            crasher.arm(point)
            with pytest.raises(Crash):
                run_simulation(cfg, resume=k > 0)
            held = assert_prefix(folder, clean, clean_ledger)
            history.append((str(point), held, metric_rounds(folder)))
            assert held == (point.round if point.commits else max(point.round - 1, 0)), history[-1]
        crasher.arm(None)
        run_simulation(cfg, resume=True)
    assert folder.ledger_path.read_bytes() == clean
    twice = [k for k, (_, _, seen) in enumerate(history) if len(seen) != len(set(seen))]
    assert not twice, (f"the resume after the crash {history[max(twice[0] - 1, 0)][0]} recorded a metrics row twice "
                       f"(rows {history[twice[0]][2]}); after each crash (point, ledger rounds, metrics rounds): "
                       f"{history}")
    assert metric_rounds(folder) == list(range(rounds + 1))
    assert [r["train_loss"] for r in folder.metrics()[1:]] == [r["train_loss"] for r in clean_rows[1:]]


def test_run_killed_before_its_ledger_exists_resumes_from_round_zero(monkeypatch, tmp_path):
    """Killed after the run folder is made but before the ledger's first rename: nothing was committed."""
    cfg = crash_config(tmp_path / "run", 2, local_steps=3, before=False)
    clean, _, _ = reference(cfg, tmp_path / "clean")
    folder = RunFolder(tmp_path / "run")
    crasher = Crasher(monkeypatch, folder)
    with torch_threads(1):
        crasher.arm(Point("rename", -1, False))
        with pytest.raises(Crash):
            run_simulation(cfg)
        assert folder.config_path.is_file() and not folder.ledger_path.exists()
        crasher.arm(None)
        try:
            run_simulation(cfg, resume=True)
        except LedgerError as e:
            pytest.fail(f"resume of a run killed before its first ledger write: {e}")
    assert folder.ledger_path.read_bytes() == clean
    assert metric_rounds(folder) == [1, 2]
