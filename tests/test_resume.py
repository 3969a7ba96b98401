"""Exact resume: a run that crashed, was killed (SIGKILL) or interrupted continues from its
last checkpoint and ends bit-identical to a run never interrupted, every step committed once;
one writer per run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labep.run.engine import Trainer, final_params
from labep.run.validate import load_protocol
from labep.store.files import StoreError
from labep.store.runs import RunStore

from .conftest import crash_and_resume, tiny_xor, write_protocol


def noisy_oim(**changes: Any) -> dict[str, Any]:
    """A small OIM run that draws from every random generator labep has: phase noise, write
    noise and readout noise of the simulated device, stochastic rounding, random nudge signs,
    and accumulated updates pending in the shadow at checkpoints."""
    doc = tiny_xor(**{
        "bench.simulator": "oim",
        "bench.options": {"dtype": "float64", "dt": 0.2, "phase_noise": 1e-4,
                          "weight_range": 2.0, "bias_range": 2.0,
                          "device": {"bits": 8, "write_noise": 0.3, "readout_noise": 0.01,
                                     "seed": 7}},
        "model": {"kind": "layered_oim", "sizes": [2, 6, 2], "shil": 0.1},
        "phases.free": {"tolerance": 0.05, "max_steps": 300},
        "phases.nudged": {"tolerance": 0.05, "max_steps": 300},
        "estimator": {"name": "one_sided", "beta": 0.2, "random_sign": True},
        "writes": {"rounding": "stochastic", "out_of_range": "clip", "accumulate": 2},
        "training.checkpoint_every": 3,
        "training.epochs": 3,
    })
    for key, value in changes.items():
        doc[key] = value
    return doc


def same_params(store_a: RunStore, run_a: str, store_b: RunStore, run_b: str) -> None:
    a, b = final_params(store_a, run_a), final_params(store_b, run_b)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def committed_steps(path: Path, run_id: str) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [s for (s,) in db.execute("SELECT step FROM steps WHERE run_id = ? ORDER BY step",
                                         (run_id,))]
    finally:
        db.close()


@pytest.mark.parametrize("doc", [tiny_xor(**{"training.checkpoint_every": 3}), noisy_oim(),
                                 tiny_xor(**{"training.checkpoint_every": 3,
                                             "training.optimizer": {"name": "adam"},
                                             "training.learning_rates": [0.02, 0.01]})],
                         ids=["hopfield", "noisy-oim", "hopfield-adam"])
@pytest.mark.parametrize("crash_at", [1, 5, 16])
def test_crashed_run_resumes_to_identical_parameters(tmp_path: Path, doc: dict[str, Any],
                                                     crash_at: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with RunStore(tmp_path / "clean.db") as clean:
        expected = Trainer(load_protocol(doc), clean, progress=False).run()
        expected_codes = clean.arrays(expected.run_id, "codes")

        store, run, resumed = crash_and_resume(doc, tmp_path / "crash.db", monkeypatch,
                                               crash_at)
        assert run["status"] == "failed" and run["resumable"]
        assert resumed.status == "completed" and resumed.steps == expected.steps
        same_params(clean, expected.run_id, store, run["id"])
        if expected_codes is not None:
            for name, codes in expected_codes[1].items():
                np.testing.assert_array_equal(store.arrays(run["id"], "codes")[1][name], codes)
        assert committed_steps(store.path, run["id"]) == list(range(1, expected.steps + 1))
        assert store.final_metrics(run["id"])["test_accuracy"] == pytest.approx(
            clean.final_metrics(expected.run_id)["test_accuracy"], abs=0)
        (event,) = [e for e in store.events(run["id"]) if e["kind"] == "resumed"]
        assert event["detail"]["from_step"] < crash_at
        store.close()


def test_a_completed_run_is_not_resumed(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        result = Trainer(load_protocol(tiny_xor()), store, progress=False).run()
        with pytest.raises(StoreError, match="completed"):
            Trainer.resume(store, result.run_id, progress=False)


def test_a_second_writer_is_refused_until_the_owner_dies(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.db")
    run_id = store.create_run("x", tiny_xor(), "hopfield", 0, "0")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = store.db.execute("SELECT owner FROM runs").fetchone()[0].rpartition(":")[0]
        store.db.execute("UPDATE runs SET owner = ?", (f"{host}:{owner.pid}",))
        with pytest.raises(StoreError, match="being written by process"):
            store.claim(run_id)
        assert not store.summary(run_id)["resumable"]
    finally:
        owner.kill()
        owner.wait()
    store.claim(run_id)  # the owner died: a stale lock
    assert store.db.execute("SELECT owner FROM runs").fetchone()[0] == f"{host}:{os.getpid()}"


def test_sigkill_at_20_random_instants_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """A real subprocess killed with SIGKILL at 20 random moments of its run, resumed after
    each kill, ends with the parameters of an uninterrupted run, every step committed once."""
    doc = noisy_oim(**{"name": "killed"})
    doc["dataset"] = {"name": "xor", "repeats": 200}  # 200 steps an epoch, 600 in all
    doc["training"]["checkpoint_every"] = 4
    path = write_protocol(tmp_path / "run.yaml", doc)
    with RunStore(tmp_path / "clean.db") as clean:
        expected = Trainer(load_protocol(path), clean, progress=False).run()

    store_path = tmp_path / "killed.db"
    rng = np.random.default_rng(2026)
    command = [sys.executable, "-m", "labep.cli.main", "run", str(path), "--store", str(store_path),
               "--no-progress"]
    run_id = None
    kills = 0
    while kills < 20:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        # kill at a random moment once the run is writing steps (or at once if it ends)
        start = len(committed_steps(store_path, run_id)) if run_id else 0
        wait_for = int(rng.integers(1, 12))
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if store_path.exists():
                db = sqlite3.connect(store_path)
                try:
                    row = db.execute("SELECT id FROM runs").fetchone()
                    count = (db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
                             if row else 0)
                except sqlite3.OperationalError:  # tables not created yet
                    row, count = None, 0
                db.close()
                if row is not None and count >= start + wait_for:
                    run_id = row[0]
                    time.sleep(float(rng.uniform(0.0, 0.02)))
                    break
            time.sleep(0.002)
        if process.poll() is not None:
            break  # it ended by itself (finished) before the next kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        if run_id is None:
            continue  # killed before the run was created: start again
        command = [sys.executable, "-m", "labep.cli.main", "resume", run_id, "--store",
                   str(store_path), "--no-progress"]
    final = subprocess.run(command, capture_output=True, text=True, check=False)
    assert kills == 20, "the run finished before it could be killed 20 times"
    with RunStore(store_path) as store, RunStore(tmp_path / "clean.db") as clean:
        if final.returncode != 0:
            assert "completed: nothing to resume" in final.stderr, final.stderr
        (run,) = store.runs()
        assert run["status"] == "completed"
        same_params(clean, expected.run_id, store, run_id)
        assert committed_steps(store_path, run_id) == list(range(1, expected.steps + 1))
        resumed = [e for e in store.events(run_id) if e["kind"] == "resumed"]
        assert len(resumed) >= kills - 1


def test_a_reader_polls_show_while_a_run_writes(tmp_path: Path) -> None:
    """`labep show --json` in another process, over and over, while a run commits steps:
    neither the reader nor the writer fails or waits on the other."""
    import json

    doc = tiny_xor(**{"name": "watched", "training.epochs": 20})
    doc["dataset"] = {"name": "xor", "repeats": 40}
    path = write_protocol(tmp_path / "run.yaml", doc)
    store_path = tmp_path / "runs.db"
    writer = subprocess.Popen([sys.executable, "-m", "labep.cli.main", "run", str(path), "--store",
                               str(store_path), "--no-progress"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    seen_steps = []
    try:
        while writer.poll() is None or not seen_steps:
            if not store_path.exists():
                time.sleep(0.05)
                continue
            shown = subprocess.run([sys.executable, "-m", "labep.cli.main", "show", "latest",
                                    "--store", str(store_path), "--json"],
                                   capture_output=True, text=True, check=False)
            if "no runs yet" in shown.stderr:
                continue
            assert shown.returncode == 0, shown.stderr
            seen_steps.append(json.loads(shown.stdout)["steps"])
    finally:
        _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert len(seen_steps) >= 2 and seen_steps == sorted(seen_steps)
    assert any(0 < s < 20 * 40 for s in seen_steps), "no read landed while the run was writing"
