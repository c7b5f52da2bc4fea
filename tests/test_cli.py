"""The command line, end to end: run, resume, export (loadable by from_pretrained), eval."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from conftest import small_config
from fedseed.cli import main
from fedseed.runfolder import to_toml


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = small_config(root / "run", federation={"rounds": 2})
    path = root / "exp.toml"
    path.write_text(to_toml(cfg))
    assert main(["run", str(path), "--set", "algorithm.local_steps=10"]) == 0
    return root, root / "run"


def test_run_writes_the_run_folder(cli_run):
    _, run = cli_run
    for name in ("config.toml", "partition.json", "ledger.bin", "metrics.jsonl", "report.md", "report.json",
                 "loss.png", "bytes.png"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["rounds"] == 2 and report["algorithm"] == "fedkseed"
    assert report["bytes"]["fedavg_over_ours"] > 100
    assert "local_steps = 10" in (run / "config.toml").read_text()  # the override is recorded
    partition = json.loads((run / "partition.json").read_text())
    assert len(partition["clients"]) == 6


def test_refuses_to_overwrite_and_resume_of_finished_run_is_a_no_op(cli_run, capsys):
    root, run = cli_run
    assert main(["run", str(root / "exp.toml")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    before = (run / "ledger.bin").read_bytes()
    assert main(["run", "--resume", str(run)]) == 0
    assert (run / "ledger.bin").read_bytes() == before


def test_export_loads_with_from_pretrained_and_equals_the_ledger_model(cli_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from fedseed.replay import rebuild

    _, run = cli_run
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "hf").iterdir():  # others can load it, as far as the umask allows
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    rebuilt = rebuild(run)
    state = dict(exported.named_parameters())
    for name, p in rebuilt.model.trainable:
        assert torch.equal(state[name], p), name


def test_eval_prints_metrics(cli_run, capsys):
    _, run = cli_run
    assert main(["eval", str(run), "--loss-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert out["round"] == 2 and out["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.toml")]) == 2
    assert "config file" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(to_toml(small_config(tmp_path / "r")))
    assert main(["run", str(bad), "--set", "algorithm.tau=3"]) == 2
    assert "unknown key `algorithm.tau`" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "no ledger at" in capsys.readouterr().err


def test_partition_writes_one_file_per_client_holding_exactly_its_share(tmp_path, capsys):
    """What `fedseed partition` hands each data owner is what the in-process runner gives that client."""
    from fedseed.config import load_config
    from fedseed.data.loaders import load_examples
    from fedseed.experiment import partition_examples, split_examples

    cfg = small_config(tmp_path / "run")
    path = tmp_path / "exp.toml"
    path.write_text(to_toml(cfg))
    assert main(["partition", str(path), "--out", str(tmp_path / "parts")]) == 0
    printed = capsys.readouterr().out
    config = load_config(cfg)
    train, heldout = split_examples(config)
    shares = partition_examples(config, train).clients
    files = sorted((tmp_path / "parts").glob("client-*"))
    assert len(files) == len(shares) == 6
    for c, (f, idx) in enumerate(zip(files, shares)):
        assert f'partition-id={c} data.path="{f}"' in printed
        mine = load_examples("dolly", f, "train")
        assert [(e.instruction, e.input, e.output) for e in mine] == \
            [(train[i].instruction, train[i].input, train[i].output) for i in idx]
    held = load_examples("dolly", tmp_path / "parts" / "eval.jsonl", "test")
    assert [e.output for e in held] == [e.output for e in heldout]
    assert main(["partition", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "x")]) == 2


def test_settings_prints_every_key_with_its_help_as_a_config(capsys):
    import tomllib

    from fedseed.config import SECTIONS, load_config

    assert main(["settings", "--method", "ferret"]) == 0
    out = capsys.readouterr().out
    table = tomllib.loads(out)
    assert set(table) == {*SECTIONS, "flower", "algorithm"} and table["algorithm"]["name"] == "ferret"
    assert "server_lr = 3.0  # global step on the mean reconstruction" in out
    assert "optimizer = \"sgd\"  # local optimiser" in out and "(sgd | adam | adamw)" in out
    table.pop("flower")  # run-config only
    cfg = load_config(table)
    assert cfg.algorithm["server_lr"] == 3.0 and cfg.data.prompt == "alpaca"
    assert main(["settings", "--method", "fedkseed-pro"]) == 0
    assert "\npro = " not in capsys.readouterr().out  # fixed by the method name
    assert main(["settings", "--method", "sgd"]) == 2


def test_metrics_are_tensorboard_scalars_too(cli_run):
    """tensorboard's own reader finds every number of metrics.jsonl at its round."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedseed.event_file import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    _, run = cli_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run))
    events.Reload()
    assert "eval_loss" in events.Tags()["scalars"] and "uplink_total" in events.Tags()["scalars"]
    for tag in ("eval_loss", "train_loss", "uplink_total"):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        expected = {r["round"]: r[tag] for r in rows if tag in r}
        assert logged.keys() == expected.keys(), tag
        assert all(logged[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items()), tag
