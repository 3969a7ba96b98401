"""Runs are recorded in a SQLite store readable without labep; runs/show/run on the CLI."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from labep.models.polariton_map import draw_lattice_map
from labep.run.engine import Trainer, final_params
from labep.run.validate import load_protocol
from labep.store.files import SCHEMA_VERSION, StoreError
from labep.store.runs import RunStore

from .conftest import PROTOCOLS, cli, cli_json, tiny_xor, write_protocol


def test_run_is_readable_with_sqlite3_alone(tmp_path: Path, store: Path) -> None:
    path = write_protocol(tmp_path / "xor.yaml", tiny_xor())
    result = cli("run", str(path), "--store", str(store), "--no-progress")
    assert result.exit_code == 0, result.output
    run_id = result.stdout.split()[1]
    db = sqlite3.connect(store)
    assert {"runs", "steps", "metrics", "arrays", "events", "meta"} <= {
        row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),)
    status, protocol = db.execute("SELECT status, protocol FROM runs WHERE id = ?",
                                  (run_id,)).fetchone()
    assert status == "completed" and '"tiny-xor"' in protocol
    n_steps = db.execute("SELECT COUNT(*) FROM steps WHERE run_id = ?", (run_id,)).fetchone()[0]
    assert n_steps == 2 * 8  # 2 epochs of 32 samples in batches of 4
    losses = db.execute("SELECT value FROM metrics WHERE run_id = ? AND name = 'loss' "
                        "ORDER BY step", (run_id,)).fetchall()
    assert len(losses) == n_steps and all(np.isfinite(v) for (v,) in losses)
    (acc,) = db.execute("SELECT value FROM metrics WHERE run_id = ? AND name = "
                        "'test_accuracy' ORDER BY step DESC LIMIT 1", (run_id,)).fetchone()
    assert 0.0 <= acc <= 1.0
    blob = db.execute("SELECT npy FROM arrays WHERE run_id = ? AND name = 'W1' ORDER BY step "
                      "DESC LIMIT 1", (run_id,)).fetchone()[0]
    assert np.load(io.BytesIO(blob), allow_pickle=False).shape == (2, 8)


def test_show_and_runs_json(tmp_path: Path, store: Path) -> None:
    path = write_protocol(tmp_path / "xor.yaml", tiny_xor())
    assert cli("run", str(path), "--store", str(store), "--no-progress").exit_code == 0
    listing = cli_json("runs", "--store", str(store), "--json")
    assert len(listing) == 1
    shown = cli_json("show", listing[0]["id"][:15], "--store", str(store), "--json")
    assert {"id", "status", "protocol", "bench", "metrics"} <= set(shown)
    assert shown["status"] == "completed"
    assert shown["protocol"]["name"] == "tiny-xor"
    assert shown["bench"]["name"] == "hopfield"
    assert shown["bench"]["identity"]["model"] == "hopfield-simulator"
    assert shown["metrics"]["test_accuracy"] is not None
    assert shown["metrics"]["train_loss"] is not None
    text = cli("show", "latest", "--store", str(store))
    assert "completed" in text.stdout
    assert "tiny-xor" in cli("runs", "--store", str(store)).stdout


def test_store_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_protocol(tmp_path / "xor.yaml", tiny_xor(**{"training.epochs": 1}))
    monkeypatch.setenv("LABEP_STORE", str(tmp_path / "env.db"))
    assert cli("run", str(path), "--no-progress").exit_code == 0
    assert len(cli_json("runs", "--json")) == 1
    assert (tmp_path / "env.db").exists()


def test_show_unknown_run_and_missing_store(tmp_path: Path, store: Path) -> None:
    result = cli("show", "nope", "--store", str(tmp_path / "absent.db"))
    assert result.exit_code == 1 and "no run store" in result.stderr
    RunStore(store).close()
    result = cli("show", "nope", "--store", str(store))
    assert result.exit_code == 1 and "no run matching" in result.stderr


def test_unwritable_store_is_refused_before_the_bench(tmp_path: Path) -> None:
    path = write_protocol(tmp_path / "xor.yaml", tiny_xor())
    result = cli("run", str(path), "--store", str(tmp_path / "no" / "such" / "dir.db"))
    assert result.exit_code == 2 and "cannot create the run store" in result.stderr


def test_failed_run_keeps_status_and_traceback(tmp_path: Path, store: Path) -> None:
    doc = tiny_xor(**{"phases.nudged.max_steps": 1, "phases.nudged.tolerance": 1e-12,
                      "phases.on_unsettled": "stop"})
    result = cli("run", str(write_protocol(tmp_path / "p.yaml", doc)), "--store", str(store),
                 "--no-progress")
    assert result.exit_code == 1 and "did not settle" in result.stderr
    shown = cli_json("show", "latest", "--store", str(store), "--json")
    assert shown["status"] == "failed"
    assert "UnsettledPhaseError" in shown["error"]
    assert "Traceback" in shown["traceback"]


def test_unsettled_samples_never_update(store: Path) -> None:
    """With the nudged phase capped at one step, no sample settles: the run completes, every
    step is logged as a fault, and the parameters never move."""
    doc = tiny_xor(**{"phases.nudged.max_steps": 1, "phases.nudged.tolerance": 1e-12,
                      "training.epochs": 1})
    with RunStore(store) as runs:
        result = Trainer(load_protocol(doc), runs, progress=False).run()
        first = runs.arrays(result.run_id, "checkpoint", step=0)[1]
        last = final_params(runs, result.run_id)
        for name in first:
            np.testing.assert_array_equal(first[name], last[name])
        events = runs.events(result.run_id)
        assert len(events) == result.steps
        assert all(e["kind"] == "unsettled" and e["detail"]["samples"] == 4 for e in events)


def test_lattice_map_puts_every_potential_on_its_site() -> None:
    from matplotlib.figure import Figure

    model = {"kind": "polariton", "lattice": [3, 4], "input_sites": [0, [5, 6]],
             "output_sites": [[1, 2], 11]}
    ax = Figure().subplots()
    draw_lattice_map(ax, model, {"V": np.arange(12.0)})
    np.testing.assert_array_equal(ax.images[0].get_array(), np.arange(12.0).reshape(3, 4))
    marks = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata(), strict=True))
             for line in ax.lines}
    assert marks == {"input sites": [(0, 0), (1, 1), (2, 1)],
                     "class 0": [(1, 0), (2, 0)], "class 1": [(3, 2)]}


def test_lattice_map_dots_the_inverted_input_sites_too() -> None:
    from matplotlib.figure import Figure

    model = {"kind": "polariton", "lattice": [2, 3], "input_sites": [0],
             "inverted_input_sites": [[4, 5]], "output_sites": [1, 2]}
    ax = Figure().subplots()
    draw_lattice_map(ax, model, {"V": np.zeros(6)})
    dots = next(line for line in ax.lines if line.get_label() == "input sites")
    assert list(zip(dots.get_xdata(), dots.get_ydata(), strict=True)) == [(0, 0), (1, 1), (2, 1)]


def test_report_of_a_polariton_run_adds_the_lattice_map(tmp_path: Path, store: Path) -> None:
    import matplotlib.image

    heights = []
    for protocol in (write_protocol(tmp_path / "xor.yaml", tiny_xor()),
                     PROTOCOLS / "polariton_xor.yaml"):
        assert cli("run", str(protocol), "--store", str(store), "--no-progress",
                   "--set", "training.epochs=2").exit_code == 0
        out = tmp_path / f"{protocol.stem}.png"
        assert cli("report", "latest", "--store", str(store), "--out", str(out)).exit_code == 0
        heights.append(matplotlib.image.imread(out).shape[0])
    assert heights[1] > heights[0] * 1.4  # one more row of the figure: the map


def test_newer_schema_is_refused(store: Path) -> None:
    RunStore(store).close()
    db = sqlite3.connect(store)
    db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this labep"):
        RunStore(store)


def _downgrade(store: Path, version: int) -> None:
    """Turn a current store into the layout of an older schema version (what that labep
    wrote), keeping its rows."""
    db = sqlite3.connect(store)
    if version <= 4:
        db.execute("DROP TABLE sweep_trials")
        db.execute("DROP TABLE sweeps")
    if version <= 3:
        db.execute("DROP TABLE resume_points")
        db.execute("ALTER TABLE runs DROP COLUMN owner")
    if version <= 2:
        db.execute("CREATE INDEX metrics_by_name ON metrics (run_id, name, step)")
    if version <= 1:
        db.execute("DROP TABLE calibration_arrays")
        db.execute("DROP TABLE calibrations")
        db.execute("ALTER TABLE runs DROP COLUMN calibration_id")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    db.commit()
    db.close()


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_older_store_is_upgraded_after_a_backup(tmp_path: Path, store: Path,
                                                version: int) -> None:
    path = write_protocol(tmp_path / "xor.yaml", tiny_xor())
    assert cli("run", str(path), "--store", str(store), "--no-progress").exit_code == 0
    _downgrade(store, version)
    before = sqlite3.connect(store).execute("SELECT COUNT(*) FROM metrics").fetchone()[0]

    shown = cli_json("show", "latest", "--store", str(store), "--json")  # opens and upgrades
    assert shown["status"] == "completed" and shown["metrics"]["test_accuracy"] is not None
    db = sqlite3.connect(store)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),)
    assert db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == before
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = "
                                            "'index' AND sql IS NOT NULL")}
    assert "metrics_by_name" not in indexes
    backup = store.with_name(f"{store.name}.v{version}.bak")
    old = sqlite3.connect(backup)  # the file as it was, untouched
    assert old.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(version),)
    assert old.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == before
    # the upgraded store takes new runs
    assert cli("run", str(path), "--store", str(store), "--no-progress").exit_code == 0


def test_console_script_entry_point(tmp_path: Path) -> None:
    """`labep` as installed: the console script (python -m labep.cli.main as fallback)."""
    result = subprocess.run([sys.executable, "-m", "labep.cli.main", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "gradcheck" in result.stdout


def test_report_draws_the_curves(tmp_path: Path, store: Path) -> None:
    path = write_protocol(tmp_path / "xor.yaml", tiny_xor())
    assert cli("run", str(path), "--store", str(store), "--no-progress").exit_code == 0
    out = tmp_path / "figs" / "run.png"
    result = cli("report", "latest", "--store", str(store), "--out", str(out))
    assert result.exit_code == 0, result.output
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05, "a blank figure"
    assert cli("report", "nope", "--store", str(store)).exit_code == 1


_WRITER = """
import sys
from labep.store.runs import RunStore
with RunStore(sys.argv[1], create=False, check_pages=False) as store:
    for seed in range(40):
        store.create_run("writer", {"padding": "x" * 3000}, "hopfield", seed, "0")
"""


@pytest.mark.parametrize("held", ["RunStore", "StoreView"])
def test_a_second_store_opened_and_closed_keeps_the_process_locks(store: Path,
                                                                  held: str) -> None:
    """POSIX drops every lock a process holds on a file when it closes any descriptor of it.
    A store opened and closed while another connection of the same process stays open must
    not do that: otherwise a writer in another process takes itself for the last connection,
    checkpoints and deletes the WAL and its index under the open one, and this process then
    reads a "database disk image is malformed" (what a sweep's progress poll, opening the
    store next to the command's own connection, met with two workers writing)."""
    from labep.store.watch import StoreView

    RunStore(store).close()
    first = RunStore(store, create=False) if held == "RunStore" else StoreView(store)
    try:
        for round_ in range(1, 4):
            with RunStore(store, create=False, check_pages=False) as second:
                second.runs()
            for _ in range(2):  # each writer closes last of the writers
                subprocess.run([sys.executable, "-c", _WRITER, str(store)], check=True)
            with RunStore(store, create=False, check_pages=False) as third:
                assert len(third.runs()) == 80 * round_
            assert len(first.runs()) == 80 * round_
    finally:
        first.close()
    db = sqlite3.connect(store)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()


def _rows(path: Path, sql: str) -> list[tuple]:
    """What another connection (another process would see the same) finds committed."""
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def test_a_checkpoint_is_committed_in_the_background_before_any_later_write(
        tmp_path: Path) -> None:
    """A checkpoint step the store may hold goes to the writer thread with the steps held
    before it; the next write (a step with a fault, committed at once) waits for it, so what
    is committed is always a prefix of the steps."""
    path = tmp_path / "runs.db"
    with RunStore(path) as store:
        run_id = store.create_run("r", tiny_xor(), "hopfield", 0, "0")
        store.commit_step(run_id, 1, 0, {"loss": 1.0}, hold=True)  # held back
        shadow = np.arange(6.0).reshape(2, 3)
        store.commit_step(run_id, 2, 0, {"loss": 0.5}, arrays={"checkpoint": {"W1": shadow}},
                          resume={"step": 2}, hold=True)
        shadow += 100.0  # the caller reuses its buffers at once: the checkpoint was copied
        store.commit_step(run_id, 3, 0, {"loss": 0.4},
                          events=[("fault", "timeout", {})], hold=False)
        assert _rows(path, "SELECT step FROM steps ORDER BY step") == [(1,), (2,), (3,)]
        assert _rows(path, "SELECT step FROM resume_points") == [(2,)]
        np.testing.assert_array_equal(final_params(store, run_id)["W1"],
                                      np.arange(6.0).reshape(2, 3))


def test_a_failed_background_checkpoint_is_raised_by_the_next_write_and_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "runs.db"
    store = RunStore(path)
    run_id = store.create_run("r", tiny_xor(), "hopfield", 0, "0")
    write_rows = RunStore._write_rows
    failures = [sqlite3.OperationalError("disk I/O error")]

    def failing(self: RunStore, rows: object) -> None:
        if failures:
            raise failures.pop()
        write_rows(self, rows)

    monkeypatch.setattr(RunStore, "_write_rows", failing)
    store.commit_step(run_id, 1, 0, {"loss": 1.0}, arrays={"checkpoint": {"b": np.ones(2)}},
                      resume={"step": 1}, hold=True)  # returns: the failure is on the thread
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        store.commit_step(run_id, 2, 0, {"loss": 0.9}, hold=False)
    assert _rows(path, "SELECT step FROM steps") == []  # nothing committed out of order
    store.close()  # steps 1 and 2 were kept held: committed now, in order
    assert _rows(path, "SELECT step FROM steps ORDER BY step") == [(1,), (2,)]
    assert _rows(path, "SELECT step FROM resume_points") == [(1,)]


def test_closing_after_a_failed_background_checkpoint_commits_it_and_raises(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() tries the failed checkpoint's transaction once more (on the caller's thread)
    and still reports the failure it met."""
    path = tmp_path / "runs.db"
    store = RunStore(path)
    run_id = store.create_run("r", tiny_xor(), "hopfield", 0, "0")

    def failing(self: RunStore, rows: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(RunStore, "_write_rows", failing)
    store.commit_step(run_id, 1, 0, {"loss": 1.0}, arrays={"checkpoint": {"b": np.ones(2)}},
                      resume={"step": 1}, hold=True)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.close()
    assert _rows(path, "SELECT step FROM steps") == [(1,)]
    assert _rows(path, "SELECT step FROM resume_points") == [(1,)]


def test_a_new_store_has_64_kib_pages(tmp_path: Path) -> None:
    """Checkpoint blobs are kept in overflow pages: a new store uses SQLite's largest."""
    RunStore(tmp_path / "runs.db").close()
    assert _rows(tmp_path / "runs.db", "PRAGMA page_size") == [(65536,)]
