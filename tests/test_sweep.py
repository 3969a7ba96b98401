"""Sweeps: the sweep file (refusals with trial index and path, grid/zip/random expansion), trials
as ordinary runs on a dask LocalCluster (one run per trial, tagged with its axes), a worker
killed mid-sweep (no trial lost or duplicated: the rescheduled task resumes the trial's run),
``labep sweep resume`` (only what did not complete), ``show`` and ``report``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from labep.store.files import StoreError
from labep.store.runs import RunStore
from labep.sweep.execute import run_trial
from labep.sweep.spec import SweepError, SweepFile, load_sweep

from .conftest import cli, cli_json, tiny_xor, write_protocol


def sweep_file(tmp_path: Path, protocol: dict[str, Any] | None = None, **fields: Any) -> Path:
    write_protocol(tmp_path / "xor.yaml", protocol or tiny_xor())
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "scan", "protocol": "xor.yaml", **fields},
                                   sort_keys=False))
    return path


def assert_sound(store: Path) -> None:
    """Every page of the store checks (SQLite's full integrity check)."""
    db = sqlite3.connect(store)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()


def runs_of(store: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(store)
    try:
        return db.execute("SELECT id, status FROM runs ORDER BY created").fetchall()
    finally:
        db.close()


def test_bad_axis_value_is_refused_with_trial_and_path_and_nothing_created(
        tmp_path: Path) -> None:
    path = sweep_file(tmp_path, grid={"estimator.beta": [0.5, -1.0],
                                      "model.sizes[1]": [8]})
    store = tmp_path / "never.db"
    result = cli("sweep", str(path), "--store", str(store), "--no-progress")
    assert result.exit_code == 2, result.output
    assert "invalid sweep" in result.stderr and "nothing was created" in result.stderr
    assert "estimator.beta (trial 1: estimator.beta=-1.0" in result.stderr
    assert "trial 0" not in result.stderr  # trial 0 is valid
    assert "Traceback" not in result.stderr
    assert not store.exists()

    # a path that is no field, and a malformed sweep file (unknown key, unequal zip)
    path = sweep_file(tmp_path, grid={"training.nope": [1]})
    result = cli("sweep", str(path), "--store", str(store), "--no-progress")
    assert result.exit_code == 2 and "training.nope (trial 0" in result.stderr
    path = sweep_file(tmp_path, grdi={"seed": [1]})
    result = cli("sweep", str(path), "--store", str(store), "--no-progress")
    assert result.exit_code == 2
    assert "grdi (line 3): unknown field" in result.stderr
    assert not store.exists()
    with pytest.raises(SweepError, match="equal length"):
        load_sweep(sweep_file(tmp_path, zip={"seed": [1, 2], "estimator.beta": [0.5]}))


def test_grid_zip_random_expansion() -> None:
    spec = SweepFile.model_validate({
        "protocol": "p.yaml",
        "grid": {"estimator.beta": [0.25, 0.5], "seed": [0, 1, 2]},
        "zip": {"training.learning_rates[0]": [0.1, 0.2], "model.sizes[1]": [8, 16]},
        "random": {"count": 3, "seed": 7, "axes": {
            "phases.free.tolerance": {"log_uniform": [1e-6, 1e-3]},
            "training.learning_rates[1]": {"uniform": [0.01, 0.1]},
            "bench.options.dtype": {"choice": ["float32", "float64"]}}}})
    trials = spec.expand()
    assert len(trials) == spec.size() == 2 * 3 * 2 * 3
    assert spec.axes() == ["estimator.beta", "seed", "training.learning_rates[0]",
                           "model.sizes[1]", "phases.free.tolerance",
                           "training.learning_rates[1]", "bench.options.dtype"]
    # grid: the last axis fastest; zip rows taken together
    assert [(t["estimator.beta"], t["seed"]) for t in trials[::6]] == [
        (0.25, 0), (0.25, 1), (0.25, 2), (0.5, 0), (0.5, 1), (0.5, 2)]
    assert {(t["training.learning_rates[0]"], t["model.sizes[1]"]) for t in trials} == {
        (0.1, 8), (0.2, 16)}
    draws = [t["phases.free.tolerance"] for t in trials[:3]]
    assert all(1e-6 <= d <= 1e-3 for d in draws) and len(set(draws)) == 3
    assert all(0.01 <= t["training.learning_rates[1]"] <= 0.1 for t in trials)
    assert {t["bench.options.dtype"] for t in trials} <= {"float32", "float64"}
    assert spec.expand() == trials  # the draws are the seed's
    for bad in ({"zip": {"seed": [1, 2], "estimator.beta": [0.5]}},
                {"grid": {"seed": []}},
                {"grid": {"seed": [1]}, "set": {"seed": 2}},
                {"random": {"count": 2, "axes": {"estimator.beta": {"log_uniform": [0, 1]}}}},
                {"random": {"count": 2, "axes": {"estimator.beta": {"uniform": [1, 2],
                                                                    "choice": [1]}}}},
                {"grid": {"a..b": [1]}}):
        with pytest.raises(ValueError):
            SweepFile.model_validate({"protocol": "p.yaml", **bad})


def test_sweep_on_a_local_cluster_of_two_workers(tmp_path: Path) -> None:
    """Each trial is one ordinary run (its protocol as run), tagged with its axis values."""
    path = sweep_file(tmp_path, set={"training.epochs": 1},
                      grid={"estimator.beta": [0.25, 0.5], "seed": [0, 1]})
    store = tmp_path / "runs.db"
    result = cli("sweep", str(path), "--store", str(store), "--workers", "2")
    assert result.exit_code == 0, result.output + result.stderr
    assert "4 of 4 trial(s) completed" in result.stdout
    assert "4/4 done" in result.stderr  # plain progress lines: stderr is not a terminal
    runs = runs_of(store)
    assert len(runs) == 4 and {status for _, status in runs} == {"completed"}
    shown = cli_json("sweep", "show", "latest", "--store", str(store), "--json")
    trials = shown["trial_runs"]
    assert sorted(t["run_id"] for t in trials) == sorted(run_id for run_id, _ in runs)
    for trial in trials:
        run = cli_json("show", trial["run_id"], "--store", str(store), "--json")
        assert run["protocol"]["estimator"]["beta"] == trial["axes"]["estimator.beta"]
        assert run["protocol"]["seed"] == run["seed"] == trial["axes"]["seed"]
        assert run["protocol"]["training"]["epochs"] == 1
    assert_sound(store)
    db = sqlite3.connect(store)
    with pytest.raises(sqlite3.IntegrityError):  # the store itself refuses a second run
        db.execute("INSERT INTO sweep_trials (sweep_id, trial, axes, protocol) VALUES "
                   "(?, 0, '{}', '{}')", (shown["id"],))
    db.close()


def test_a_worker_killed_mid_sweep_loses_and_duplicates_no_trial(tmp_path: Path) -> None:
    """SIGKILL the worker process writing a trial's run: dask reschedules the task, which
    finds the trial's run and resumes it; every trial ends with exactly one completed run."""
    from distributed import Client

    from labep.sweep.execute import follow, local_cluster, submit

    protocol = tiny_xor(**{"training.epochs": 150, "training.checkpoint_every": 10})
    sweep = load_sweep(sweep_file(tmp_path, protocol, grid={"seed": [0, 1, 2, 3]}))
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        sweep_id = store.create_sweep("kill", "sweep.yaml", {}, sweep.spec.axes(), sweep.trials)
    cluster, threads = local_cluster(2)
    killed: list[str] = []
    with cluster, Client(cluster) as client:
        futures = submit(client, path, sweep_id, list(range(4)), threads)
        db = sqlite3.connect(path)
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            row = db.execute(
                "SELECT r.id, r.owner FROM runs r WHERE r.status = 'running' AND "
                "(SELECT COUNT(*) FROM steps s WHERE s.run_id = r.id) >= 25").fetchone()
            if row is not None and row[1]:
                os.kill(int(row[1].rpartition(":")[2]), signal.SIGKILL)
                killed.append(row[0])
            time.sleep(0.05)
        db.close()
        assert killed, "no trial ran long enough to be killed"
        results = follow(futures, path, sweep_id, progress=False)
        # every worker, the one restarted after the kill too, runs without dask's statistical
        # profiler (its sys._current_frames() can deadlock a worker on CPython 3.11)
        profiling = client.run(lambda: __import__("dask").config.get(
            "distributed.worker.profile.enabled"))
        assert len(profiling) == 2 and not any(profiling.values()), profiling
    assert [r["status"] for r in results] == ["completed"] * 4, results
    with RunStore(path, create=False) as store:
        trials = store.sweep_trials(sweep_id)
        assert [t["status"] for t in trials] == ["completed"] * 4
        assert len({t["run_id"] for t in trials}) == 4
        assert len(store.runs()) == 4  # no second run of any trial
        assert killed[0] in {t["run_id"] for t in trials}
        events = [e["kind"] for e in store.events(killed[0])]
        assert "resumed" in events
        (steps,) = store.db.execute("SELECT COUNT(*) FROM steps WHERE run_id = ?",
                                    (killed[0],)).fetchone()
        assert steps == 150 * 8  # every step once
    assert_sound(path)


def test_resume_runs_only_what_did_not_complete(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = load_sweep(sweep_file(tmp_path, grid={"seed": [0, 1, 2]}))
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        sweep_id = store.create_sweep("r", "sweep.yaml", sweep.spec.model_dump(mode="json"),
                                      sweep.spec.axes(), sweep.trials)
    first = run_trial(str(path), sweep_id, 0)
    assert first["status"] == "completed"
    commit = RunStore.commit_step

    def crashing(self: RunStore, run_id: str, step: int, *args: Any, **kwargs: Any) -> None:
        if step == 6:
            raise RuntimeError("power cut")
        commit(self, run_id, step, *args, **kwargs)

    monkeypatch.setattr(RunStore, "commit_step", crashing)
    crashed = run_trial(str(path), sweep_id, 1)
    monkeypatch.setattr(RunStore, "commit_step", commit)
    assert crashed["status"] == "failed" and "power cut" in crashed["error"]

    result = cli("sweep", "resume", sweep_id[:12], "--store", str(path), "--serial",
                 "--no-progress")
    assert result.exit_code == 0, result.output + result.stderr
    assert "2 of 3 trial(s) to run" in result.stderr
    with RunStore(path, create=False) as store:
        trials = store.sweep_trials(sweep_id)
        assert [t["status"] for t in trials] == ["completed"] * 3
        assert trials[0]["run_id"] == first["run_id"]
        assert trials[1]["run_id"] == crashed["run_id"]  # resumed, not started again
        assert len(store.runs()) == 3
        assert "resumed" not in [e["kind"] for e in store.events(first["run_id"])]
        assert "resumed" in [e["kind"] for e in store.events(crashed["run_id"])]
    again = cli("sweep", "resume", sweep_id, "--store", str(path), "--serial")
    assert again.exit_code == 0 and "nothing to resume" in again.stdout
    assert len(runs_of(path)) == 3


def test_show_table_and_report(tmp_path: Path) -> None:
    path = sweep_file(tmp_path, grid={"estimator.beta": [0.25, 0.5], "seed": [0, 1],
                                      "training.learning_rates[0]": [0.1, 0.2]})
    store = tmp_path / "runs.db"
    result = cli("sweep", str(path), "--store", str(store), "--serial", "--no-progress")
    assert result.exit_code == 0, result.output + result.stderr
    table = cli_json("sweep", "show", "latest", "--store", str(store), "--json")
    assert table["seeds"] and table["axes"] == ["estimator.beta", "training.learning_rates[0]"]
    assert len(table["rows"]) == 4
    with RunStore(store, create=False) as opened:
        trials = opened.sweep_trials(table["id"])
    for row in table["rows"]:
        accs = [t["metrics"]["test_accuracy"] for t in trials
                if all(t["axes"][k] == v for k, v in row["axes"].items())]
        assert row["test_accuracy"]["n"] == 2 == len(row["trials"])
        assert row["test_accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
        assert row["test_accuracy"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    text = cli("sweep", "show", table["id"], "--store", str(store)).stdout
    lines = text.splitlines()
    assert "mean ± std over seeds" in lines[0]
    assert lines[1].split()[:4] == ["estimator.beta", "training.learning_rates[0]", "trials",
                                    "test_accuracy"]
    assert len(lines) == 6 and all("completed 2" in line for line in lines[2:])
    out = tmp_path / "sweep.png"
    result = cli("sweep", "report", table["id"], "--store", str(store), "--out", str(out))
    assert result.exit_code == 0 and out.stat().st_size > 10_000
    out2 = tmp_path / "via-report.svg"
    assert cli("report", table["id"], "--store", str(store), "--out", str(out2)).exit_code == 0
    assert out2.read_text().startswith("<?xml")
    assert json.loads(json.dumps(table))  # JSON-ready
    with pytest.raises(StoreError):
        RunStore(store, create=False).resolve_sweep("sw-nope")


def test_hardware_trials_are_named_by_their_resource() -> None:
    """The lock a hardware trial holds is named by driver and resource; simulators take none.
    (The lock itself is distributed.Lock; not exercised against a real instrument here.)"""
    from labep.sweep.execute import bench_resource, holding

    assert bench_resource(tiny_xor()) is None
    doc = tiny_xor(**{"bench": {"driver": "oim_board", "resource": "/dev/ttyUSB0"}})
    assert bench_resource(doc) == "labep-bench:oim_board:/dev/ttyUSB0"
    with holding(bench_resource(doc)):  # outside a dask worker: trials already run serially
        pass


def test_trials_on_one_resource_never_overlap_on_two_workers() -> None:
    """On a LocalCluster of two workers, tasks holding the same bench resource run one at a
    time; tasks on different resources (or simulators) run at once."""
    import logging

    from distributed import Client, LocalCluster, wait

    from labep.sweep.execute import holding

    def hold(resource: str | None, index: int) -> tuple[float, float]:
        import time as clock

        with holding(resource):
            start = clock.time()
            clock.sleep(1.5)
            return start, clock.time()

    def spans(resources: list[str | None]) -> list[tuple[float, float]]:
        futures = [client.submit(hold, resource, index, pure=False)
                   for index, resource in enumerate(resources)]
        wait(futures)
        return sorted(future.result() for future in futures)

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        (a, b) = spans(["labep-bench:oim_board:/dev/ttyUSB0"] * 2)
        assert b[0] >= a[1]  # the second started after the first let go
        (c, d) = spans(["labep-bench:oim_board:/dev/ttyUSB0", "labep-bench:oim_board:COM3"])
        assert d[0] < c[1]  # two instruments: at once
        (e, f) = spans([None, None])
        assert f[0] < e[1]


def test_scheduler_option_sends_the_trials_to_an_existing_cluster(tmp_path: Path) -> None:
    """--scheduler tcp://HOST:PORT: the same tasks on a cluster started elsewhere (here one
    worker process); the sweep file's `scheduler` is the default for it."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster:
        path = sweep_file(tmp_path, set={"training.epochs": 1}, grid={"seed": [0, 1]},
                          scheduler=cluster.scheduler_address)
        store = tmp_path / "runs.db"
        result = cli("sweep", str(path), "--store", str(store), "--no-progress")
        assert result.exit_code == 0, result.output + result.stderr
        assert "2 of 2 trial(s) completed" in result.stdout
        with RunStore(store, create=False) as opened:
            (sweep,) = opened.sweeps()
            assert sweep["spec"]["scheduler"] == cluster.scheduler_address
            assert [t["status"] for t in opened.sweep_trials(sweep["id"])] == ["completed"] * 2



SWEEPS = Path(__file__).resolve().parents[1] / "protocols" / "sweeps"


@pytest.mark.parametrize("name", sorted(p.name for p in SWEEPS.glob("*.yaml")))
def test_shipped_sweep_files_validate(name: str) -> None:
    """Every shipped sweep file loads, each of its trials validated as a protocol."""
    sweep = load_sweep(SWEEPS / name)
    assert sweep.trials and len(sweep.trials) == sweep.spec.size()
    assert sweep.base.is_file() and sweep.base.parent == SWEEPS.parent


def test_no_sweep_file_among_the_protocols() -> None:
    """The protocol tests glob protocols/*.yaml: no sweep file may sit there (a sweep file
    names a base ``protocol``, which no protocol has), and the quickstart sweep is shipped."""
    assert (SWEEPS / "quickstart.yaml").is_file()
    for path in SWEEPS.parent.glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert "protocol" not in doc and "grid" not in doc, f"{path} is a sweep file"


_WITHOUT_DASK = """
import sys

class NoDask:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"dask", "distributed", "tenacity"}:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoDask())
from labep.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as end:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"dask", "distributed"})
    print("loaded:", loaded, file=sys.stderr)
    raise
"""


def test_runs_and_serial_sweeps_need_no_dask(tmp_path: Path) -> None:
    """Without the dask extra, `labep run` works and imports no dask; `labep sweep` on dask
    is refused before anything is created; `labep sweep --serial` runs."""
    import subprocess
    import sys

    def labep(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _WITHOUT_DASK, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    path = sweep_file(tmp_path, set={"training.epochs": 1}, grid={"seed": [0, 1]})
    ran = labep("run", str(tmp_path / "xor.yaml"), "--store", "run.db", "--no-progress")
    assert ran.returncode == 0, ran.stderr
    assert "loaded: []" in ran.stderr
    refused = labep("sweep", str(path), "--store", "sweep.db", "--no-progress")
    assert refused.returncode == 2 and "pip install 'labep[dask]'" in refused.stderr
    assert not (tmp_path / "sweep.db").exists()
    serial = labep("sweep", str(path), "--store", "sweep.db", "--serial", "--no-progress")
    assert serial.returncode == 0, serial.stderr
    assert "2 of 2 trial(s) completed" in serial.stdout and "loaded: []" in serial.stderr
