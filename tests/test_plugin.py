"""A third-party bench and model, installed as a distribution of their own
(tests/fixtures/plugin: a package and its ``.dist-info`` with entry points), are found through
importlib.metadata and run a protocol with no change to labep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

PLUGIN = Path(__file__).parent / "fixtures" / "plugin"


def labep(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The ``labep`` command in a fresh interpreter with the plugin distribution on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PLUGIN), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "labep.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def plugin_protocol(path: Path, **model: object) -> Path:
    doc = {
        "name": "linear_plugin", "seed": 3,
        "bench": {"simulator": "linear_bench", "options": {"coupling_range": 2.0}},
        "model": {"kind": "linear_response", "sizes": [2, 2], **model},
        "dataset": {"name": "xor", "repeats": 4},
        "phases": {"free": {"tolerance": 1e-6, "max_steps": 10},
                   "nudged": {"tolerance": 1e-6, "max_steps": 10}},
        "estimator": {"name": "symmetric", "beta": 0.1},
        "training": {"epochs": 3, "batch_size": 4, "learning_rates": [0.1]},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_plugin_bench_and_model_run_a_protocol(tmp_path: Path) -> None:
    listed = labep("benches", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    benches = {row["name"]: row for row in json.loads(listed.stdout)}
    assert benches["linear_bench"]["models"] == ["linear_response"]
    assert "coupling_range" in {o["name"] for o in benches["linear_bench"]["options"]}
    assert "hopfield" in benches  # labep's own, through the same group
    models = labep("models", cwd=tmp_path)
    assert "linear_response" in models.stdout and "gain" in models.stdout

    protocol = plugin_protocol(tmp_path / "linear.yaml")
    store = tmp_path / "runs.db"
    ran = labep("run", str(protocol), "--store", str(store), cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    shown = json.loads(labep("runs", "--store", str(store), "--json", cwd=tmp_path).stdout)
    assert [run["status"] for run in shown] == ["completed"]
    gradcheck = labep("gradcheck", str(protocol), "--beta", "0.001", cwd=tmp_path)
    assert gradcheck.returncode == 0, gradcheck.stdout + gradcheck.stderr


def test_a_plugin_section_is_validated_with_line_numbers(tmp_path: Path) -> None:
    protocol = plugin_protocol(tmp_path / "bad.yaml", gain=50.0)
    refused = labep("run", str(protocol), "--store", str(tmp_path / "runs.db"), cwd=tmp_path)
    assert refused.returncode == 2
    line = next(n for n, text in enumerate(protocol.read_text().splitlines(), 1)
                if "gain" in text)
    assert "model.gain" in refused.stderr and f"line {line}" in refused.stderr
    assert not (tmp_path / "runs.db").exists()
