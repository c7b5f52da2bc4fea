"""What a new user gets from a clone: the quickstart runs with nothing beside the repository.

The repository is copied file by file as ``git`` sees it (tracked files and new,
not-ignored ones: what a commit of this tree would hold) into a folder with no
``../shared`` beside it, and the quickstart config runs there from the copy's own
source tree, so its model and data must come from the copy itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def _clone(into: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    clone = into / "fedseed"
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    assert not (clone.parent / "shared").exists()
    return clone


def test_quickstart_runs_from_a_bare_clone(tmp_path: Path) -> None:
    clone = _clone(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(clone / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    where = subprocess.run([sys.executable, "-c", "import fedseed; print(fedseed.__file__)"], cwd=clone, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(clone), f"fedseed imported from {where}, not from the clone"
    run = subprocess.run(
        [sys.executable, "-m", "fedseed.cli", "run", "configs/quickstart.toml", "--overwrite",
         "--set", "federation.rounds=1", "--set", "algorithm.local_steps=40", "--set", "eval.generate_examples=4",
         "--set", "eval.loss_examples=40"],
        cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = clone / "runs" / "quickstart"
    report = json.loads((folder / "report.json").read_text())
    assert report["rounds"] == 1
    loss = report["metrics"]["eval_loss"]
    assert loss["after"] < loss["before"]  # FedKSeed on the shipped model and data learns
    assert (folder / "report.md").is_file() and (folder / "ledger.bin").stat().st_size > 0


def test_the_wheel_carries_the_quickstart_model_and_data(tmp_path: Path) -> None:
    """A plain ``pip install fedseed`` (not a checkout) must hold what the quickstart reads."""
    clone = _clone(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(clone)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("fedseed-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "LICENSE"):
        assert f"fedseed/assets/stories260K/{asset}" in names
    assert "fedseed/assets/dolly-quickstart.jsonl.gz" in names
    assert "fedseed/assets/README.md" in names
