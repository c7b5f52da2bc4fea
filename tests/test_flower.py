"""fedseed's Flower app in one process: the real ServerApp and ClientApp, every message through Flower's serde.

A small in-process Grid (below) hands each instruction to the ClientApp and each
answer back, both through Flower's own protobuf round trip, with one Context per
node as a SuperNode keeps it. That is enough to prove what the apps do: the same
ledger as the in-process runner, bit for bit; dropped nodes, rejoining nodes and
stale caches; duplicated and replayed replies rejected by name; a stopped server
resumed from its ledger; every field validated before a model is touched. The
Flower engines themselves (SuperLink + SuperNodes, Ray simulation) are driven in
tests/test_flower_deployment.py.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.config import flatten_dict, fuse_dicts  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from conftest import REPO, run_simulation, small_config, torch_threads  # noqa: E402
from fedseed import wire  # noqa: E402
from fedseed.algorithms import build_algorithm  # noqa: E402
from fedseed.config import ConfigError, load_config  # noqa: E402
from fedseed.data.writers import write_examples  # noqa: E402
from fedseed.experiment import heldout_examples, prepare  # noqa: E402
from fedseed.ledger import Ledger  # noqa: E402
from fedseed.runfolder import RunFolder  # noqa: E402
from fedseed.runners import flower_app  # noqa: E402
from fedseed.runners.node import CACHE_FILE, NodeCache  # noqa: E402
from fedseed.runners.flower_config import (  # noqa: E402
    flower_run_config,
    from_run_config,
    node_settings,
    run_config_template,
    to_run_config,
)
from fedseed.runners.flower_records import (  # noqa: E402
    Instruction,
    RecordError,
    instruction_message,
    read_answer,
    read_instruction,
)
from fedseed.runners.flower_server import RoundFailed  # noqa: E402

NODE_BASE = 1000  # node ids of the in-process nodes: NODE_BASE + client
FEDKSEED = {"name": "fedkseed", "num_seeds": 64, "local_steps": 10, "lr": 1e-4, "eps": 1e-3}
FERRET = {"name": "ferret", "num_bases": 1024, "local_steps": 2, "grad_accum": 1, "lr": 3e-3, "server_lr": 3.0}

Tamper = Callable[[Message, Message], list[Message]]  # (instruction, answer) -> what the server receives


def _roundtrip(msg: Message, message_id: str) -> Message:
    """``msg`` as the other side sees it: through Flower's protobuf serde, with its message id set."""
    out = message_from_proto(message_to_proto(msg))
    out.metadata.__dict__["_message_id"] = message_id
    return out


class LoopbackGrid(Grid):
    """Flower's Grid in one process: a push runs the node's ClientApp, a pull returns its answer.

    ``silent[node_id]`` holds rounds in which that node is listed but never answers
    (a dead node the SuperLink has not noticed yet); ``tamper`` may rewrite answers.
    """

    def __init__(self, contexts: dict[int, Context]):
        self.contexts = contexts
        self.silent: dict[int, set[int]] = {}
        self.tamper: Tamper | None = None
        self.answers: dict[str, Message] = {}
        self.sent: list[Message] = []
        self._run = Run.create_empty(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            if nid not in self.contexts:
                ids.append("")
                continue
            mid = uuid.uuid4().hex
            ids.append(mid)
            self.sent.append(msg)
            rnd = msg.content["fedseed"].get("round") if msg.metadata.message_type == "train" else None
            if rnd in self.silent.get(nid, set()):
                continue
            ins = _roundtrip(msg, mid)
            try:
                answer = flower_app.client(ins, self.contexts[nid])
            except Exception as e:  # what flwr-clientapp sends back when the app raises
                answer = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e)}:<'{e}'>"),
                                 reply_to=ins)
            for k, out in enumerate(self.tamper(ins, answer) if self.tamper else [answer]):
                self.answers[f"{mid}/{k}"] = _roundtrip(out, uuid.uuid4().hex)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        ready = [k for k in self.answers if k.split("/")[0] in wanted]
        return [self.answers.pop(k) for k in ready]

    def send_and_receive(self, messages, *, timeout=None):
        """What Flower's generic strategy loop uses: push everything, return every answer."""
        ids = [mid for mid in self.push_messages(list(messages)) if mid]
        return self.pull_messages(ids)


def nodes(num_clients: int, root: Path, run_config: dict[str, Any]) -> dict[int, Context]:
    return {NODE_BASE + c: Context(run_id=1, node_id=NODE_BASE + c, state=RecordDict(), run_config=dict(run_config),
                                   node_config={"partition-id": c, "num-partitions": num_clients,
                                                "cache-dir": str(root / f"node{c}")})
            for c in range(num_clients)}


def run_config(cfg: dict[str, Any], **flower: Any) -> dict[str, Any]:
    """What Flower hands the apps for ``--run-config CONFIG.toml``: the app's declared keys, fused with the file."""
    declared = flatten_dict(tomllib.loads((REPO / "flower" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    return fuse_dicts(declared, flatten_dict({**cfg, "flower": {"round_timeout": 30.0, **cfg.get("flower", {}), **flower}}))


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's Message() needs the identity of the running task (set by Flower's own processes)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread, as the loopback nodes run.

    Several parties share this process and 2 busy cores, where OpenMP's spinning
    threads make a run several times slower; both sides of every comparison compute alike.
    """
    with torch_threads(1):
        yield


def flower_run(cfg: dict[str, Any], root: Path, grid: LoopbackGrid | None = None, **flower: Any) -> LoopbackGrid:
    """Run ``cfg`` through the ServerApp over a LoopbackGrid (one node per client)."""
    rc = run_config(cfg, **flower)
    grid = grid or LoopbackGrid(nodes(cfg["federation"]["num_clients"], root, rc))
    flower_app.server(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc))
    return grid


def config(out: Path, algorithm: dict[str, Any], rounds: int = 2, per_round: int = 2, evaluate: bool = False
           ) -> dict[str, Any]:
    """Three clients; held-out evaluation only after the last round unless ``evaluate``.

    The server evaluates on its own file of held-out examples (``data.eval_path``,
    what ``fedseed partition`` writes): it reads no client's training data.
    """
    every = {} if evaluate else {"every": 1000, "before": False}
    cfg = small_config(out, algorithm, federation={"num_clients": 3, "clients_per_round": per_round, "rounds": rounds},
                       eval={"loss_examples": 8, "generate_examples": 2, "max_new_tokens": 4, **every})
    heldout = write_examples("dolly", heldout_examples(load_config(cfg)), out.parent / f"{out.name}-eval")
    return {**cfg, "data": {**cfg["data"], "eval_path": str(heldout)}}


def ledger_frames(out: Path) -> list[bytes]:
    return Ledger.open(RunFolder(out).ledger_path).updates


def expected_frames(cfg: dict[str, Any], accepted: list[list[int]]) -> list[bytes]:
    """The ledger an in-process run makes when only ``accepted[r - 1]`` contribute to round r."""
    exp = prepare(load_config(cfg))
    server, client = exp.algorithm(), exp.algorithm()
    server.bind(exp.model)
    client.bind(exp.model)
    frames = []
    for rnd, clients in enumerate(accepted, start=1):
        replies = []
        for c in clients:
            task = wire.decode(wire.encode(server.task(rnd, c, exp.model.position)), client.Task)
            replies.append(client.train(exp.model, exp.batches(rnd, c), task))
        update = server.aggregate(rnd, replies)
        server.commit(update)
        frames.append(wire.encode(update))
    return frames


# -- equivalence ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [
    FEDKSEED,
    {**FEDKSEED, "name": "fedkseed-pro"},
    FERRET,
    {"name": "fedavg", "local_steps": 2, "lr": 1e-3},
], ids=lambda a: a["name"])
@pytest.mark.slow
def test_flower_gives_the_in_process_ledger_bit_for_bit(algorithm, tmp_path):
    cfg = config(tmp_path / "flower", algorithm, rounds=3 if algorithm["name"] == "ferret" else 2, evaluate=True)
    grid = flower_run(cfg, tmp_path)
    _, reference, _ = run_simulation({**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "inproc")}})
    assert RunFolder(tmp_path / "flower").ledger_path.read_bytes() == reference.ledger_path.read_bytes()
    rows = [r for r in RunFolder(tmp_path / "flower").metrics() if r["round"] > 0]
    ref_rows = [r for r in reference.metrics() if r["round"] > 0]
    for row, ref in zip(rows, ref_rows, strict=True):
        assert row["clients"] == ref["clients"] and row["accepted"] == ref["clients"] and row["dropped"] == {}
        assert row["uplink_bytes"] == ref["uplink_bytes"]  # our codec counts the same bytes either way
        assert row["flower_uplink_total"] > row["uplink_total"]  # Flower's records and framing on top
        assert row["eval_loss"] == ref["eval_loss"]
    assert {m.metadata.message_type for m in grid.sent} == {"train", "query"}
    if algorithm["name"] != "ferret":
        assert [r["downlink_bytes"] for r in rows] == [r["downlink_bytes"] for r in ref_rows]
        return
    # Ferret replays rounds: client 1 continues from its copy cached after round 2, client 0 (new) from the base
    since = {(m.content["fedseed"]["round"], m.content["fedseed"]["client"]): m.content["fedseed"]["since"]
             for m in grid.sent if m.metadata.message_type == "train"}
    assert since == {(1, 1): 0, (1, 2): 0, (2, 1): 0, (2, 2): 0, (3, 0): 0, (3, 1): 1}
    assert NodeCache(tmp_path / "node0").position(read_instruction(grid.sent[-1]).run) == 2  # synced to round 2


@pytest.mark.slow
def test_a_private_flower_run_gives_the_in_process_ledger_and_epsilon(tmp_path):
    """Client-level privacy on Flower: the server clips and noises, and reports epsilon every round."""
    privacy = {"mode": "client", "noise_multiplier": 1.0, "clip": 1.0, "noise_seed": 5}
    cfg = {**config(tmp_path / "flower", FEDKSEED, rounds=2, evaluate=False), "privacy": privacy}
    flower_run(cfg, tmp_path)
    _, reference, _ = run_simulation({**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "inproc")}})
    assert RunFolder(tmp_path / "flower").ledger_path.read_bytes() == reference.ledger_path.read_bytes()
    rows = [r for r in RunFolder(tmp_path / "flower").metrics() if r["round"] > 0]
    assert [r["epsilon"] for r in rows] == [r["epsilon"] for r in reference.metrics() if r["round"] > 0]
    assert rows[0]["epsilon"] < rows[1]["epsilon"] and all("train_loss" not in r for r in rows)


# -- partial participation, failures, rejoining ---------------------------------------------


@pytest.mark.slow
def test_silent_node_is_dropped_and_catches_up_when_back(tmp_path):
    cfg = config(tmp_path / "run", FERRET, rounds=4, per_round=3)
    rc = run_config(cfg, round_timeout=2.0)
    grid = LoopbackGrid(nodes(3, tmp_path, rc))
    grid.silent[NODE_BASE + 1] = {3}  # listed, but deaf in round 3
    flower_run(cfg, tmp_path, grid, round_timeout=2.0)
    rows = [r for r in RunFolder(tmp_path / "run").metrics() if r["round"] > 0]
    assert [r["accepted"] for r in rows] == [[0, 1, 2], [0, 1, 2], [0, 2], [0, 1, 2]]
    assert rows[2]["dropped"] == {"1": "no reply within 2 s"}
    last = [m for m in grid.sent if m.metadata.dst_node_id == NODE_BASE + 1][-1]
    assert last.content["fedseed"]["since"] == 1  # it replayed rounds 2 and 3 from its cached round 1
    assert ledger_frames(tmp_path / "run") == expected_frames(cfg, [r["accepted"] for r in rows])


@pytest.mark.slow
def test_node_that_lost_its_cache_says_so_and_is_resent_the_task(tmp_path):
    cfg = config(tmp_path / "run", FERRET, rounds=3, per_round=3)
    rc = run_config(cfg)
    grid = LoopbackGrid(nodes(3, tmp_path, rc))

    def lose_cache(ins: Message, answer: Message) -> list[Message]:
        if ins.content["fedseed"].get("round") == 2 and ins.metadata.dst_node_id == NODE_BASE + 2:
            (tmp_path / "node2" / CACHE_FILE).unlink()
        return [answer]

    grid.tamper = lose_cache
    flower_run(cfg, tmp_path, grid)
    to_node2 = [m.content["fedseed"]["since"] for m in grid.sent
                if m.metadata.dst_node_id == NODE_BASE + 2 and m.metadata.message_type == "train"]
    assert to_node2 == [0, 0, 1, 0]  # round 3 at since=1: "stale, I hold 0", resent from the base
    rows = [r for r in RunFolder(tmp_path / "run").metrics() if r["round"] > 0]
    assert rows[2]["accepted"] == [0, 1, 2]
    assert ledger_frames(tmp_path / "run") == expected_frames(cfg, [[0, 1, 2]] * 3)


@pytest.mark.slow
def test_node_whose_cached_copy_drifted_is_resynced_from_the_ledger(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    cfg = config(tmp_path / "run", FERRET, rounds=3, per_round=3)
    rc = run_config(cfg)
    grid = LoopbackGrid(nodes(3, tmp_path, rc))
    cache = tmp_path / "node2" / CACHE_FILE

    def flip_a_bit(ins: Message, answer: Message) -> list[Message]:
        if ins.content["fedseed"].get("round") == 2 and ins.metadata.dst_node_id == NODE_BASE + 2:
            tensors = load_file(cache)
            name = sorted(tensors)[0]
            raw = tensors[name].view(-1).view(torch.int32)
            raw ^= 1 << 22  # one mantissa bit of every element: a faulty memory or disk, silently
            save_file(tensors, cache, metadata={"run": read_instruction(ins).run, "position": "1"})
        return [answer]

    grid.tamper = flip_a_bit
    flower_run(cfg, tmp_path, grid)
    to_node2 = [m.content["fedseed"]["since"] for m in grid.sent
                if m.metadata.dst_node_id == NODE_BASE + 2 and m.metadata.message_type == "train"]
    assert to_node2 == [0, 0, 1, 0]  # round 3 from its (drifted) cache of round 1, then rebuilt from the base
    rows = [r for r in RunFolder(tmp_path / "run").metrics() if r["round"] > 0]
    assert list(rows[2]["drifted"]) == ["2"] and "fingerprint" in rows[2]["drifted"]["2"]
    assert rows[2]["accepted"] == [0, 1, 2] and not rows[2]["rejected"]
    assert ledger_frames(tmp_path / "run") == expected_frames(cfg, [[0, 1, 2]] * 3)


@pytest.mark.slow
def test_duplicated_and_replayed_replies_are_rejected_by_name(tmp_path):
    cfg = config(tmp_path / "run", FEDKSEED, rounds=2, per_round=3)
    grid = LoopbackGrid(nodes(3, tmp_path, run_config(cfg)))
    first_round: dict[int, Message] = {}

    def attack(ins: Message, answer: Message) -> list[Message]:
        rnd, client = ins.content["fedseed"].get("round"), ins.content["fedseed"].get("client")
        if rnd is None:  # a roll call
            return [answer]
        if rnd == 1:
            first_round[client] = answer
            return [answer]
        if client == 0:  # the same answer twice
            return [answer, answer]
        if client == 1:  # last round's answer, replayed as it was
            return [Message(first_round[1].content, reply_to=ins)]
        old = first_round[2].content  # last round's reply bytes under this round's header
        header = ConfigRecord({"round": rnd, "client": client, "position": 0})
        return [Message(RecordDict({"fedseed": header, "payload": old["payload"]}), reply_to=ins)]

    grid.tamper = attack
    flower_run(cfg, tmp_path, grid)
    row = RunFolder(tmp_path / "run").metrics()[-1]
    assert row["accepted"] == [0]
    assert row["rejected"]["0"] == "duplicate reply for round 2 client 0 (the first one is kept)"
    assert row["rejected"]["1"] == "replayed: the answer is for round 1, the current round is 2"
    assert row["rejected"]["2"] == "`round` is 1, the task was for round 2"
    assert ledger_frames(tmp_path / "run") == expected_frames(cfg, [[0, 1, 2], [0]])


@pytest.mark.slow
def test_too_few_replies_stop_the_run_and_a_new_run_resumes_from_the_ledger(tmp_path):
    cfg = config(tmp_path / "run", FEDKSEED, rounds=2, per_round=3)
    rc = run_config(cfg, round_timeout=1.0, min_replies=2)
    grid = LoopbackGrid(nodes(3, tmp_path, rc))
    grid.silent = {NODE_BASE + 0: {2}, NODE_BASE + 2: {2}}
    with pytest.raises(RoundFailed, match="round 2: 1 accepted replies, `flower.min_replies` is 2"):
        flower_run(cfg, tmp_path, grid, round_timeout=1.0, min_replies=2)
    assert Ledger.open(RunFolder(tmp_path / "run").ledger_path).rounds == 1
    flower_run(cfg, tmp_path)  # the server restarts: same experiment, flower.resume = true (the default)
    _, reference, _ = run_simulation({**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "inproc")}})
    assert RunFolder(tmp_path / "run").ledger_path.read_bytes() == reference.ledger_path.read_bytes()
    assert [r["round"] for r in RunFolder(tmp_path / "run").metrics()] == [1, 2]


def test_another_experiment_in_the_run_folder_is_refused(tmp_path):
    cfg = config(tmp_path / "run", FEDKSEED, rounds=1)
    flower_run(cfg, tmp_path)
    other = {**cfg, "algorithm": {**FEDKSEED, "lr": 2e-4}}
    with pytest.raises(ValueError, match="flower.overwrite = true"):
        flower_run(other, tmp_path)
    with pytest.raises(FileExistsError, match="flower.resume = true"):
        flower_run(cfg, tmp_path, resume=False)


# -- validation before the model --------------------------------------------------------------


def _instruction(frame: bytes, **header: Any) -> Message:
    order = Instruction(1, 0, 0, "0" * 16, "0" * 64, frame)
    msg = instruction_message(order, NODE_BASE, 10.0)
    for key, value in header.items():
        msg.content["fedseed"][key] = value
    return _roundtrip(msg, "m")


@pytest.mark.parametrize("field, value, named", [
    ("round", 0, "`fedseed.round` must be an int in [1, "),
    ("client", -1, "`fedseed.client` must be an int in [0, "),
    ("since", 1, "`fedseed.since` must be an int in [0, 0]"),
    ("run", "xyz", "`fedseed.run` must be 16 lowercase hex digits"),
    ("round", True, "`fedseed.round` must be an int"),
])
def test_instruction_fields_are_validated_by_name(field, value, named):
    with pytest.raises(RecordError, match=named.replace("[", r"\[").replace("(", r"\(")):
        read_instruction(_instruction(b"FS..", **{field: value}))


def test_the_task_is_decoded_and_checked_before_any_model_is_loaded(tmp_path):
    cfg = config(tmp_path / "run", FEDKSEED)
    rc = run_config(cfg)
    node = nodes(1, tmp_path, rc)[NODE_BASE]
    node.node_config["model.name_or_path"] = str(tmp_path / "no-such-model")  # loading it would fail
    with pytest.raises(wire.WireError, match="SeedTask.seed_ids: truncated"):
        flower_app.client(_instruction(b"FS" + bytes([wire.VERSION]) + b"\x0a" + b"\x01\x00\x00\x00" * 2 + b"\xff"), node)
    conf = load_config(cfg)
    other_round = wire.encode(build_algorithm(conf.algorithm, conf.run.seed).task(2, 0, 0))
    with pytest.raises(RecordError, match="the task is for round 2 client 0, its record says round 1 client 0"):
        flower_app.client(_instruction(other_round), node)
    bad_array = _instruction(b"FS")
    bad_array.content["payload"] = ArrayRecord({"frame": Array(dtype="float32", shape=(1,), stype="raw",
                                                               data=b"\x00" * 4)})
    with pytest.raises(RecordError, match="`payload.frame` must be raw uint8 bytes"):
        flower_app.client(bad_array, node)


def test_a_node_with_another_base_model_refuses_to_train(tmp_path):
    cfg = config(tmp_path / "run", FEDKSEED)
    node = nodes(1, tmp_path, run_config(cfg))[NODE_BASE]
    conf = load_config(cfg)
    frame = wire.encode(build_algorithm(conf.algorithm, conf.run.seed).task(1, 0, 0))
    with pytest.raises(ValueError, match="has content hash .* the server's has 00000000"):
        flower_app.client(_instruction(frame), node)
    answer = read_answer(flower_app.client(_instruction(frame, base=prepare(conf).base_hash), node))
    assert answer.round == 1 and answer.client == 0 and answer.position == 0 and not answer.stale


# -- configuration ----------------------------------------------------------------------------


def test_the_app_declares_every_config_key():
    declared = tomllib.loads((REPO / "flower" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == run_config_template(), "regenerate with fedseed.runners.flower_config.template_toml()"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")) + [REPO / "flower" / "loopback.toml"],
                         ids=lambda p: p.name)
def test_a_config_file_is_a_run_config_that_means_the_same_experiment(path):
    fused = run_config(tomllib.loads(path.read_text()))  # raises if Flower would refuse a key
    cfg, settings = from_run_config(fused)
    assert cfg == load_config(path)
    assert settings.round_timeout == 30.0 and settings.resume


def test_flower_config_merges_a_file_and_overrides(tmp_path):
    text = flower_run_config(str(REPO / "flower" / "loopback.toml"), ["federation.rounds=2", "flower.min_replies=2"])
    (tmp_path / "run.toml").write_text(text)
    cfg, settings = from_run_config(run_config(tomllib.loads(text)))
    assert cfg.federation.rounds == 2 and settings.min_replies == 2
    same = load_config(REPO / "flower" / "loopback.toml", ["federation.rounds=2"])
    assert to_run_config(cfg, settings) == to_run_config(same, settings)
    assert cfg.algorithm == same.algorithm  # as written: the ledger header records it so, and resume compares it
    with pytest.raises(ConfigError, match="`flower.min_replies` must be >= 1"):
        flower_run_config(str(REPO / "flower" / "loopback.toml"), ["flower.min_replies=0"])


def test_node_config_says_who_the_node_is_and_only_local_paths():
    node = node_settings({"partition-id": 2, "cache-dir": "/tmp/c", "model.name_or_path": "/m", "num-partitions": 3})
    assert node.client == 2 and node.cache_dir == Path("/tmp/c") and node.overrides == {"model.name_or_path": "/m"}
    with pytest.raises(ConfigError, match="`partition-id` must be the node's fedseed client id"):
        node_settings({"cache-dir": "/tmp/c"})
    with pytest.raises(ConfigError, match="node-config `algorithm.lr` would change the experiment on one node"):
        node_settings({"partition-id": 0, "algorithm.lr": 1.0})


# -- deployment: every node its own data, clients that come and go, pinned identities ---------


def own_data_nodes(cfg: dict[str, Any], root: Path, rc: dict[str, Any]) -> dict[int, Context]:
    """One node per client, each with only its own file of ``fedseed partition``'s output."""
    from fedseed.experiment import write_partition

    files, _ = write_partition(load_config(cfg), root / "partition")
    contexts = nodes(len(files), root, rc)
    for c, ctx in enumerate(contexts.values()):
        ctx.node_config["data.path"] = str(files[c])
    return contexts


@pytest.mark.slow
def test_nodes_with_only_their_own_files_give_the_in_process_ledger(tmp_path):
    cfg = config(tmp_path / "flower", FEDKSEED, rounds=2, evaluate=True)
    rc = run_config(cfg)
    grid = LoopbackGrid(own_data_nodes(cfg, tmp_path, rc))
    server_cfg = {**cfg, "data": {**cfg["data"], "path": str(tmp_path / "the-server-has-no-training-data")}}
    flower_run(server_cfg, tmp_path, grid)  # the ServerApp never opens data.path
    _, reference, _ = run_simulation({**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "inproc")}})
    assert RunFolder(tmp_path / "flower").ledger_path.read_bytes() == reference.ledger_path.read_bytes()
    rows = [r for r in RunFolder(tmp_path / "flower").metrics() if r["round"] > 0]
    assert [r["eval_loss"] for r in rows] == [r["eval_loss"] for r in reference.metrics() if r["round"] > 0]
    assert not (tmp_path / "flower" / "partition.json").exists()  # nobody partitioned anything


def test_a_roll_call_answered_by_an_error_is_asked_again(tmp_path):
    """A node that vanishes between being listed and answering sends Flower's error reply, which has no content."""
    cfg = config(tmp_path / "run", FEDKSEED, rounds=1, per_round=3)
    grid = LoopbackGrid(nodes(3, tmp_path, run_config(cfg)))
    failed: list[int] = []

    def vanish_once(ins: Message, answer: Message) -> list[Message]:
        if ins.metadata.message_type == "query" and ins.metadata.dst_node_id == NODE_BASE + 2 and not failed:
            failed.append(NODE_BASE + 2)
            return [Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"), reply_to=ins)]
        return [answer]

    grid.tamper = vanish_once
    flower_run(cfg, tmp_path, grid)
    [row] = [r for r in RunFolder(tmp_path / "run").metrics() if r["round"] > 0]
    assert failed and row["accepted"] == [0, 1, 2]  # asked again at the next roll call, then trained
    queries = [m for m in grid.sent if m.metadata.message_type == "query" and m.metadata.dst_node_id == NODE_BASE + 2]
    assert len(queries) == 2


def test_answers_carry_loss_and_examples_as_a_metric_record(tmp_path):
    cfg = config(tmp_path / "run", FEDKSEED, rounds=1)
    grid = flower_run(cfg, tmp_path)
    answers = [flower_app.client(_roundtrip(m, "x"), grid.contexts[m.metadata.dst_node_id])
               for m in grid.sent if m.metadata.message_type == "train"]
    for answer in answers:
        metrics = answer.content["metrics"]
        reply = wire.decode(read_answer(answer).frame)
        assert metrics["num-examples"] == reply.num_examples and metrics["loss"] == pytest.approx(reply.loss)


def test_a_second_node_claiming_a_pinned_client_is_refused(tmp_path):
    cfg = config(tmp_path / "run", FEDKSEED, rounds=2, per_round=2)
    rc = run_config(cfg)
    contexts = nodes(3, tmp_path, rc)
    intruder = NODE_BASE + 99
    contexts[intruder] = Context(run_id=1, node_id=intruder, state=RecordDict(), run_config=dict(rc),
                                 node_config={"partition-id": 0, "cache-dir": str(tmp_path / "intruder")})
    grid = LoopbackGrid(contexts)
    flower_run(cfg, tmp_path, grid)
    rows = [r for r in RunFolder(tmp_path / "run").metrics() if r["round"] > 0]
    assert all(r["nodes"].get("0", NODE_BASE) == NODE_BASE for r in rows)  # client 0's tasks went to its first node
    assert not [m for m in grid.sent if m.metadata.dst_node_id == intruder and m.metadata.message_type == "train"]
    assert "belongs to node 1000" in rows[-1]["refused_nodes"][str(intruder)]


@pytest.mark.slow
def test_rounds_sample_among_connected_clients_and_replace_a_vanished_one(tmp_path):
    cfg = small_config(tmp_path / "run", FEDKSEED, federation={"num_clients": 4, "clients_per_round": 2, "rounds": 3},
                       eval={"every": 1000, "before": False, "loss_examples": 4, "generate_examples": 1,
                             "max_new_tokens": 2})
    rc = run_config(cfg, grace=0.5, round_timeout=20.0, min_clients=2)
    contexts = nodes(4, tmp_path, rc)
    del contexts[NODE_BASE + 3]  # client 3 never connects: the run starts with the three that did
    grid = LoopbackGrid(contexts)
    sampled: list[list[int]] = []

    def vanish(ins: Message, answer: Message) -> list[Message]:
        rnd = ins.content["fedseed"].get("round")
        if rnd == 1 and ins.metadata.message_type == "train":
            sampled.append(ins.content["fedseed"]["client"])
        if rnd == 1 and len(sampled) == 2:  # after round 1 one sampled client's node is gone for good
            grid.contexts.pop(NODE_BASE + sampled[0], None)
        return [answer]

    grid.tamper = vanish
    flower_run(cfg, tmp_path, grid, grace=0.5, round_timeout=20.0, min_clients=2)
    rows = [r for r in RunFolder(tmp_path / "run").metrics() if r["round"] > 0]
    assert rows[0]["connected"] == [0, 1, 2] and set(rows[0]["clients"]) <= {0, 1, 2}
    assert all(3 not in r["clients"] for r in rows)
    gone = sampled[0]
    later = [r for r in rows[1:] if gone in r["clients"]]
    for r in later:  # sampled while gone: replaced after the grace period, by a client not in the round
        assert r["replaced"] and int(next(iter(r["replaced"]))) == gone
        assert len(r["accepted"]) == 2 and gone not in r["accepted"]
    assert all(len(r["accepted"]) == 2 for r in rows)
    assert all(r["seconds"] < 15 for r in rows)  # the grace period, not the round timeout
    assert ledger_frames(tmp_path / "run") == expected_frames(cfg, [r["accepted"] for r in rows])


# -- the resident worker -------------------------------------------------------------------------


def start_worker(socket_path: Path, log: Path):
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "fedseed.cli", "worker", "--socket", str(socket_path)],
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, env={**__import__("os").environ,
                                                                                   "OMP_NUM_THREADS": "1"})
    for _ in range(200):
        if socket_path.exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no worker socket at {socket_path}: {log.read_text()}")


@pytest.mark.slow
def test_a_resident_worker_trains_and_a_killed_one_is_caught_up(tmp_path):
    """Node 0's rounds go to its worker; killed after round 1, the ClientApp works alone; restarted, it is resent."""
    import stat

    cfg = config(tmp_path / "run", FERRET, rounds=4, per_round=3)
    rc = run_config(cfg)
    contexts = nodes(3, tmp_path, rc)
    sock = tmp_path / "w0" / "worker.sock"
    contexts[NODE_BASE].node_config["worker"] = str(sock)
    log = tmp_path / "worker.log"
    workers = [start_worker(sock, log)]
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    grid = LoopbackGrid(contexts)

    def lifecycle(ins: Message, answer: Message) -> list[Message]:
        head = ins.content["fedseed"]
        if ins.metadata.dst_node_id == NODE_BASE and ins.metadata.message_type == "train":
            if head["round"] == 1:
                workers[-1].kill()  # the worker dies with round 1's copy in its memory
                workers[-1].wait()
            if head["round"] == 2:
                workers.append(start_worker(sock, log))  # back, empty: round 3 finds it holds nothing
        return [answer]

    grid.tamper = lifecycle
    try:
        flower_run(cfg, tmp_path, grid)
    finally:
        for w in workers:
            w.kill()
            w.wait()
    served = [line for line in log.read_text().splitlines() if "round" in line]
    assert served[0].startswith("fedseed worker: round 1 client 0 since 0: trained")
    assert any("round 3 client 0 since 1: stale, holds 0" in line for line in served)  # restarted: nothing in memory
    assert any("round 3 client 0 since 0: trained" in line for line in served)  # resent from the base
    assert any("round 4 client 0 since 2: trained" in line for line in served)  # resident again: only round 3 sent
    rows = [r for r in RunFolder(tmp_path / "run").metrics() if r["round"] > 0]
    assert all(r["accepted"] == [0, 1, 2] for r in rows)
    assert ledger_frames(tmp_path / "run") == expected_frames(cfg, [[0, 1, 2]] * 4)


# -- the Strategy a Flower user mounts ---------------------------------------------------------


@pytest.mark.slow
def test_the_strategy_gives_the_in_process_ledger_in_its_own_loop_and_in_flowers(tmp_path):
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import Strategy

    from fedseed.runners.flower_strategy import FedSeedStrategy

    ledgers = []
    for name, drive in [("own", lambda s, g: s.start(g)),
                        ("flower", lambda s, g: Strategy.start(s, g, ArrayRecord(), num_rounds=2, timeout=30))]:
        cfg = config(tmp_path / name, FEDKSEED, rounds=2, evaluate=True)
        rc = run_config(cfg)
        strategy = FedSeedStrategy(rc)
        assert isinstance(strategy, Strategy)
        drive(strategy, LoopbackGrid(nodes(3, tmp_path / f"{name}-nodes", rc)))
        ledgers.append(RunFolder(tmp_path / name).ledger_path.read_bytes())
    _, reference, _ = run_simulation({**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "inproc")}})
    assert ledgers[0] == ledgers[1] == reference.ledger_path.read_bytes()
