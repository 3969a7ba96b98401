"""End to end: the quickstart and the MNIST protocol reach their accuracy targets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

from .conftest import MNIST, PROTOCOLS, cli_json, needs_mnist, tiny_xor

REPO = PROTOCOLS.parent


def test_quickstart_reaches_90_percent(tmp_path: Path) -> None:
    """README's first command, as a user runs it: the console script on the shipped protocol."""
    env = {**os.environ, "LABEP_STORE": str(tmp_path / "labep.db")}
    labep = Path(sys.executable).with_name("labep")
    command = [str(labep)] if labep.exists() else [sys.executable, "-m", "labep.cli.main"]
    result = subprocess.run([*command, "run", "protocols/quickstart.yaml", "--no-progress"],
                            cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    shown = cli_json("show", "latest", "--store", str(tmp_path / "labep.db"), "--json")
    assert shown["metrics"]["test_accuracy"] >= 0.90


def test_xor_is_learned(store: Path) -> None:
    doc = tiny_xor(**{"training.epochs": 30, "dataset.repeats": 4})
    with RunStore(store) as runs:
        result = Trainer(load_protocol(doc), runs, progress=False).run()
    assert result.test_accuracy == 1.0


def test_same_seed_same_run(store: Path) -> None:
    loaded = load_protocol(tiny_xor(**{"training.epochs": 3}))
    with RunStore(store) as runs:
        a = Trainer(loaded, runs, progress=False).run()
        b = Trainer(loaded, runs, progress=False).run()
        _, loss_a = runs.metric_series(a.run_id, "loss")
        _, loss_b = runs.metric_series(b.run_id, "loss")
    assert list(loss_a) == list(loss_b) and len(loss_a) == a.steps


@pytest.mark.slow
@needs_mnist
def test_hopfield_mnist_reaches_96_percent(store: Path) -> None:
    """784-500-10 on the 8k/2k split, symmetric EP, at most 10 epochs (the protocol as shipped)."""
    loaded = load_protocol(PROTOCOLS / "hopfield_mnist.yaml", [f"dataset.path={MNIST}"])
    assert loaded.protocol.training.epochs <= 10
    with RunStore(store) as runs:
        result = Trainer(loaded, runs, progress=False).run()
    assert result.test_accuracy >= 0.96
