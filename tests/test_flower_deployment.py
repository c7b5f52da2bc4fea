"""fedseed on Flower's real engines: a SuperLink and SuperNodes as separate processes on 127.0.0.1, and `flwr run`.

The processes are started with the scripts docs/distributed.md shows
(scripts/flower-*.sh), on free ports, with FLWR_HOME in a temporary folder.
Every process a test starts is ended by the test, by PID, even when it fails:
the fixture runs scripts/flower-stop.sh and then kills, by PID, anything still
alive that the test ever saw under the processes it started.

The ledger of a deployment run is checked against the in-process computation
of the same rounds with the same participants. The nodes run torch with one
thread (OMP_NUM_THREADS=1, as the scripts start them), and so does that
reference: CPU float reductions depend on the thread count, and FedKSeed's
finite differences see the last bit.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from conftest import DOLLY, REPO, STORIES, torch_threads  # noqa: E402
from fedseed.ledger import Ledger  # noqa: E402
from fedseed.runfolder import RunFolder, to_toml  # noqa: E402

pytestmark = pytest.mark.slow
SCRIPTS = REPO / "scripts"
VENV_BIN = REPO / ".venv" / "bin"
FEDKSEED = {"name": "fedkseed", "num_seeds": 64, "local_steps": 10, "lr": 1e-4, "eps": 1e-3}


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free TCP ports on 127.0.0.1."""
    for _ in range(200):
        base = random.randint(20000, 60000 - count)
        try:
            socks = []
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


def children(pid: int) -> list[int]:
    """Every process under ``pid`` (read from /proc, by parent PID)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def is_flower(pid: int) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and any(name in args for name in ("flower-", "flwr-", "raylet", "gcs_server", "ray::"))


class Loopback:
    """The README's loopback deployment, in a temporary folder, on free ports."""

    def __init__(self, root: Path):
        self.dir = root / "flower"
        self.port = free_ports(1)
        self.node_port = free_ports(8)
        self.env = {**os.environ, "FEDSEED_FLOWER_DIR": str(self.dir), "FLOWER_PORT": str(self.port),
                    "FLOWER_NODE_PORT": str(self.node_port), "FLWR_HOME": str(self.dir / "flwr-home"),
                    "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "OMP_NUM_THREADS": "1"}
        self.seen: set[int] = set()  # every PID the test started or saw under one it started
        self.popens: list[subprocess.Popen] = []

    def script(self, name: str, *args: str, **env: str) -> str:
        done = subprocess.run([str(SCRIPTS / name), *args], env={**self.env, **env}, cwd=REPO, capture_output=True,
                              text=True, timeout=180)
        self.remember()
        assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def pid(self, name: str) -> int:
        return int((self.dir / "pids" / f"{name}.pid").read_text())

    def remember(self) -> None:
        for f in (self.dir / "pids").glob("*.pid"):
            root = int(f.read_text())
            self.seen |= {root, *children(root)}

    def flwr(self, *args: str) -> dict[str, Any]:
        done = subprocess.run([str(VENV_BIN / "flwr"), *args, "--format", "json"], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        return json.loads(done.stdout)

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        """A process of the test's own, its output in ``log`` (a pipe would stay open in its children)."""
        with open(log, "w") as out:
            proc = subprocess.Popen(args, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self.popens.append(proc)
        self.seen |= {proc.pid, *children(proc.pid)}
        return proc

    def kill_tree(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Signal a process and everything under it: SIGKILL, a machine that dies; SIGTERM, one that shuts down."""
        tree = [pid, *children(pid)]
        self.seen |= set(tree)
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:  # a ClientApp that ended meanwhile
                pass

    def end_all(self) -> None:
        self.remember()
        subprocess.run([str(SCRIPTS / "flower-stop.sh")], env=self.env, cwd=REPO, capture_output=True, timeout=120)
        for proc in self.popens:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(is_flower(p) for p in self.seen) and time.monotonic() < deadline:
            time.sleep(0.5)
        for p in self.seen:
            if is_flower(p):
                os.kill(p, signal.SIGKILL)
        assert not [p for p in self.seen if is_flower(p)]

    def launch(self, connection: str, run_config: Path, *extra: str) -> int:
        out = self.flwr("run", str(REPO / "flower"), connection, "--run-config", str(run_config), *extra)
        assert out.get("success"), out
        return int(out["run-id"])

    def wait(self, connection: str, run: int, until: Callable[[], bool] = lambda: False, every: float = 15,
             timeout: float = 400) -> dict[str, Any]:
        """Poll the run's status every ``every`` s until it finishes (returned) or ``until()`` holds (returns {})."""
        deadline = time.monotonic() + timeout
        asked = -math.inf
        while time.monotonic() < deadline:
            self.remember()
            if until():
                return {}
            if time.monotonic() - asked > every:  # each `flwr ls` is a Python process: not too often
                asked = time.monotonic()
                status = self.flwr("ls", connection, "--run-id", str(run))["runs"][0]
                if status["status"].startswith("finished"):
                    return status
            time.sleep(0.5)
        raise TimeoutError(f"run {run} did not finish in {timeout} s")


@pytest.fixture
def loopback(tmp_path) -> Iterator[Loopback]:
    lb = Loopback(tmp_path)
    try:
        yield lb
    finally:
        lb.end_all()


def write_run_config(path: Path, out: Path, clients: int, rounds: int, algorithm: dict[str, Any],
                     simulation: bool = False, privacy: dict[str, Any] | None = None,
                     **flower: Any) -> tuple[dict[str, Any], Path]:
    """A fedseed config, its partition (one file per node, as ``fedseed partition`` writes) and a run-config.

    Returns the in-process config (which partitions the whole data set itself) and the
    folder of per-node files. The run-config the server gets names no training data it
    could read (unless ``simulation``): each node brings its own file, the server has
    only the held-out set.
    """
    cfg = {
        "run": {"output_dir": str(out), "seed": 7},
        "model": {"name_or_path": str(STORIES)},
        "data": {"dataset": "dolly", "path": str(DOLLY), "holdout": "summarization", "max_length": 256,
                 "max_train_examples": 300},
        "federation": {"num_clients": clients, "clients_per_round": clients, "rounds": rounds},
        "algorithm": algorithm,
        "eval": {"every": 1000, "before": False, "loss_examples": 8, "generate_examples": 2, "max_new_tokens": 4},
        "privacy": privacy or {},
    }
    parts = path.parent / "parts"
    from fedseed.config import load_config
    from fedseed.experiment import write_partition

    _, eval_file = write_partition(load_config(cfg), parts)
    cfg["data"]["eval_path"] = str(eval_file)
    if simulation:  # Flower's Ray engine: no node has files of its own, each partitions the run's data set
        served = cfg
    else:
        served = {**cfg, "data": {**cfg["data"], "path": str(path.parent / "no-training-data-on-the-server")}}
    path.write_text(to_toml({**served, "flower": {"startup_timeout": 90.0, **flower}}))
    return cfg, parts


def expected(cfg: dict[str, Any], accepted: list[list[int]]) -> list[bytes]:
    from test_flower import expected_frames

    with torch_threads(1):  # as the nodes compute
        return expected_frames(cfg, accepted)


def rows(out: Path) -> list[dict[str, Any]]:
    return [r for r in RunFolder(out).metrics() if r["round"] > 0]


def serverapps(loopback: Loopback) -> list[int]:
    """The live ``flwr-serverapp`` processes under the SuperLink (Flower 1.41: SuperLink -> flower-superexec ->
    one flwr-serverapp per run), found by their command line."""
    found = []
    for pid in children(loopback.pid("superlink")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if is_flower(pid) and any(Path(a.decode()).name == "flwr-serverapp" for a in args[:2]):
            found.append(pid)  # python3 .venv/bin/flwr-serverapp --runtime-api-address ...
    return found


def test_deployment_survives_killed_nodes_workers_and_server(loopback, tmp_path):
    """Every node trains on its own file and the server has none. Mid-run a node leaves and rejoins, a worker dies and
    restarts, and the ServerApp process is SIGKILLed and relaunched; the ledger ends as the in-process one.

    A node that leaves (SIGTERM: it signs off) is unknown to the SuperLink at once, so its client is dropped after
    ``flower.grace``; one that is SIGKILLed stays listed for up to a minute and its task expires with the round
    (tests/test_flower.py covers that silent node)."""
    out = tmp_path / "run"
    rounds = 4
    cfg, parts = write_run_config(tmp_path / "run.toml", out, clients=3, rounds=rounds, algorithm=FEDKSEED,
                                  round_timeout=60.0, grace=2.0, pin_nodes=False,  # unauthenticated: new node ids
                                  resume=True)
    loopback.script("flower-start.sh", "3", PARTS=str(parts))
    run = loopback.launch("loopback", tmp_path / "run.toml")
    loopback.wait("loopback", run, until=lambda: len(rows(out)) >= 1)
    # Mid-run node 1's machine shuts down: its SuperNode signs off, and its ClientApps stop, so whatever it had
    # pulled of round 2 is never answered (the round was opened a moment ago; no ClientApp starts that fast) ...
    loopback.kill_tree(loopback.pid("supernode1"), signal.SIGTERM)
    loopback.kill_tree(loopback.pid("worker1"))  # ... and its worker is gone too
    loopback.kill_tree(loopback.pid("worker2"))  # node 2 only loses its worker: its ClientApps work alone
    ledger = RunFolder(out).ledger_path
    loopback.wait("loopback", run, until=lambda: ledger.is_file() and Ledger.open(ledger).rounds >= 2)
    # The ServerApp is its own process (the SuperLink's SuperExec starts one per run): SIGKILL it alone, as round 3
    # begins (tests/test_crash.py kills a server between every two writes of a commit).
    [server] = serverapps(loopback)
    loopback.kill_tree(server)
    held = Ledger.open(ledger)  # no repair: never torn
    assert 2 <= held.rounds < rounds, f"the kill landed at {held.rounds} ledger rounds"
    loopback.script("flower-node.sh", "1", PARTS=str(parts))  # back: new node id, same data file and cache
    socket2 = loopback.dir / "nodes" / "2" / "worker.sock"
    socket2.unlink(missing_ok=True)
    loopback.start([str(VENV_BIN / "fedseed"), "worker", "--socket", str(socket2)],
                   loopback.dir / "logs" / "worker2-restarted.log")
    relaunched = loopback.launch("loopback", tmp_path / "run.toml")  # flower.resume = true: continue the ledger
    loopback.wait("loopback", relaunched, until=lambda: len(rows(out)) >= rounds)
    status = loopback.wait("loopback", relaunched, every=1)
    assert status["status"] == "finished:completed", status["status-details"]
    table = rows(out)
    assert [r["round"] for r in table] == list(range(1, rounds + 1)), table  # no round recorded (or applied) twice
    assert table[0]["accepted"] == [0, 1, 2]
    assert table[1]["accepted"] == [0, 2] and "1" in table[1]["dropped"]  # the others carried on
    assert all(r["accepted"] == [0, 1, 2] for r in table[2:])  # it rejoined ...
    assert table[2]["nodes"]["1"] != table[0]["nodes"]["1"]  # ... as a new SuperNode
    served, restarted = ((loopback.dir / "logs" / f"{name}.log").read_text() for name in ("worker2", "worker2-restarted"))
    assert "round 1 client 2" in served and "round 2 client 2" not in served + restarted  # round 2 without a worker
    assert f"round {rounds} client 2" in restarted  # the restarted worker serves again
    final = Ledger.open(RunFolder(out).ledger_path)
    assert final.updates[: held.rounds] == held.updates  # what the killed server committed, kept as it was
    # ... and every node caught up: training from the synced model is bit for bit the in-process one
    assert final.updates == expected(cfg, [r["accepted"] for r in table])
    assert status["network-traffic"]["inbound-bytes"] > sum(r["uplink_total"] for r in table[held.rounds:])
    for r in table:
        print(f"round {r['round']}: {r['seconds']:.1f} s, accepted {r['accepted']}, up {r['uplink_total']} B "
              f"(Flower {r['flower_uplink_total']} B), down {r['downlink_total']} B (Flower {r['flower_downlink_total']} "
              f"B), roll calls {r['flower_roll_call_bytes']} B, dropped {r['dropped']}")
    print(f"killed the ServerApp (pid {server}) at {held.rounds} ledger rounds; SuperLink counted "
          f"{status['network-traffic']}")


def test_strangers_stay_out(loopback, tmp_path):
    """TLS, node authentication, the fleet gateway and pinned client ids, against three kinds of stranger."""
    loopback.script("flower-certs.sh", "3")
    certs = loopback.dir / "certs"
    out = tmp_path / "run"
    _, parts = write_run_config(tmp_path / "run.toml", out, clients=1, rounds=3,
                                algorithm={**FEDKSEED, "local_steps": 5})
    # the SuperLink on 127.0.0.1 only; nodes reach its Fleet API through the gateway on 127.0.0.2
    loopback.script("flower-start.sh", "1", TLS="1", GATEWAY="1", PARTS=str(parts))
    gateway = f"127.0.0.2:{int(loopback.env['FLOWER_PORT']) + 1}"
    node_args = ["flower-supernode", "--root-certificates", str(certs / "ca.crt"), "--superlink", gateway]
    # 1. an unregistered key is not admitted at all
    unregistered = loopback.start([*node_args, "--auth-supernode-private-key", str(certs / "supernode2"),
                                   "--port", str(loopback.node_port + 5), "--node-config", "partition-id=0"],
                                  tmp_path / "unregistered.log")
    run = loopback.launch("loopback-tls", tmp_path / "run.toml")
    loopback.seen |= set(children(unregistered.pid))
    unregistered.wait(timeout=120)
    refusal = (tmp_path / "unregistered.log").read_text()
    assert unregistered.returncode != 0 and "Failed to activate SuperNode" in refusal, refusal
    loopback.wait("loopback-tls", run, until=lambda: len(rows(out)) >= 1)
    # 2. a registered node claiming the client another node holds gets no task
    registered = loopback.flwr("supernode", "register", str(certs / "supernode1.pub"), "loopback-tls")
    assert registered.get("success"), registered
    claimant = loopback.start([*node_args, "--auth-supernode-private-key", str(certs / "supernode1"),
                               "--port", str(loopback.node_port + 6), "--node-config",
                               f"partition-id=0 data.path=\"{sorted(parts.glob('client-000*'))[0]}\" "
                               f"cache-dir=\"{tmp_path / 'claimant'}\""], tmp_path / "claimant.log")
    status = loopback.wait("loopback-tls", run, every=1)
    assert status["status"] == "finished:completed", status["status-details"]
    table = rows(out)
    assert [r["round"] for r in table] == [1, 2, 3] and all(r["accepted"] == [0] for r in table)
    owner = table[0]["nodes"]["0"]
    assert all(r["nodes"]["0"] == owner for r in table)
    refused = table[-1]["refused_nodes"]
    assert any(f"belongs to node {owner}" in why for why in refused.values()), (refused, claimant.pid)
    # 3. through the address the nodes use, nobody reaches the Control API: no runs listed, no key registered
    assert not loopback.flwr("ls", "gateway").get("success")
    assert not loopback.flwr("supernode", "register", str(certs / "supernode2.pub"), "gateway").get("success")
    assert loopback.flwr("ls", "loopback-tls")["success"]  # the operator, on the SuperLink's own host, can
    assert not loopback.flwr("ls", "loopback")["success"]  # and never without TLS
    assert Ledger.open(RunFolder(out).ledger_path).rounds == 3


def test_one_line_simulation_with_ray(loopback, tmp_path):
    pytest.importorskip("ray")
    http, control = free_ports(1), free_ports(1)
    loopback.env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http), FLWR_LOCAL_CONTROL_API_PORT=str(control))
    home = loopback.dir / "flwr-home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    out = tmp_path / "run"
    privacy = {"mode": "client", "noise_multiplier": 1.0, "clip": 1.0, "noise_seed": 5}  # on real Flower processes
    cfg, _ = write_run_config(tmp_path / "run.toml", out, clients=2, rounds=1, algorithm={**FEDKSEED, "local_steps": 5},
                              simulation=True, privacy=privacy)
    try:
        run = loopback.launch("local", tmp_path / "run.toml", "--federation-config", "num-supernodes=2")
        loopback.wait("local", run, until=lambda: len(rows(out)) >= 1)
        status = loopback.wait("local", run, every=1)
    finally:  # the CLI leaves its simulation SuperLink running, detached: find it by its port, end it by PID
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and is_flower(int(p.name)):
                args = (p / "cmdline").read_bytes().split(b"\0")
                if b"flower-superlink" in b" ".join(args) and str(http).encode() in args:
                    loopback.seen |= {int(p.name), *children(int(p.name))}
                    os.kill(int(p.name), signal.SIGTERM)
    assert status["status"] == "finished:completed", status["status-details"]
    assert Ledger.open(RunFolder(out).ledger_path).updates == expected(cfg, [[0, 1]])
    assert rows(out)[0]["epsilon"] > 0 and "train_loss" not in rows(out)[0]
