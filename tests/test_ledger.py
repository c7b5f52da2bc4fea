"""The ledger file: append, reopen, torn tails, foreign bases, and resume to the same model."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_simulation, small_config
from fedseed.algorithms.fedkseed import SeedUpdate
from fedseed.ledger import FORMAT, Ledger, LedgerError, LedgerHeader


def _header() -> LedgerHeader:
    return LedgerHeader(FORMAT, "fedkseed", "{}", 1, "m", "h" * 64)


def _update(r: int) -> SeedUpdate:
    return SeedUpdate(r, np.array([r]), np.array([0.5]), np.array([1.0]), np.array([1]))


def test_append_and_reopen(tmp_path):
    led = Ledger.create(tmp_path / "l.bin", _header())
    for r in (1, 2):
        led.append(_update(r))
    again = Ledger.open(tmp_path / "l.bin")
    assert again.header == _header() and again.rounds == 2
    assert [u.round for u in again.decoded(SeedUpdate)] == [1, 2]


def test_torn_tail_is_reported_or_repaired(tmp_path):
    path = tmp_path / "l.bin"
    led = Ledger.create(path, _header())
    led.append(_update(1))
    good = path.stat().st_size
    led.append(_update(2))
    path.write_bytes(path.read_bytes()[:-3])  # crash mid-write of round 2
    with pytest.raises(LedgerError, match="truncated"):
        Ledger.open(path)
    repaired = Ledger.open(path, repair=True)
    assert repaired.rounds == 1 and path.stat().st_size == good
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match="checksum"):
        Ledger.open(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger.open(tmp_path / "nope.bin")
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(LedgerError, match="not a fedseed ledger"):
        Ledger.open(tmp_path / "x.bin")
    led = Ledger.create(tmp_path / "l.bin", _header())
    with pytest.raises(LedgerError, match="load the same base model"):
        led.check_base("other", "0" * 64)


def test_resume_after_interruption_reaches_the_same_ledger(fedkseed_run, tmp_path):
    _, full, _ = fedkseed_run
    cfg = small_config(tmp_path / "resumed")
    _, folder, ledger = run_simulation(cfg, stop_after=1)
    assert ledger.rounds == 1
    # a crash in the middle of writing round 2: a torn record at the end
    with open(folder.ledger_path, "ab") as f:
        f.write(b"\x10\x00\x00\x00garbage")
    _, folder, ledger = run_simulation(cfg, resume=True)
    assert ledger.rounds == 3
    assert folder.ledger_path.read_bytes() == full.ledger_path.read_bytes()
    assert [r["round"] for r in folder.metrics()] == [0, 1, 2, 3]


def test_resume_refuses_a_different_algorithm(fedkseed_run, tmp_path):
    from fedseed.config import load_config
    from fedseed.experiment import prepare
    from fedseed.runfolder import RunFolder
    from fedseed.runners.simulation import simulate

    _, full, _ = fedkseed_run
    cfg = small_config(full.path, {"name": "fedkseed", "num_seeds": 256, "local_steps": 30, "lr": 2e-4, "eps": 1e-3})
    with pytest.raises(LedgerError, match="different|not"):
        simulate(prepare(load_config(cfg)), RunFolder(full.path), resume=True)
