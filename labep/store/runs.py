"""The run store's writer side: :class:`RunStore` opens (verifies, creates, migrates) a store
and commits runs to it, each training step whole in one transaction (steps the engine lets it
hold are grouped into the next transaction: see :meth:`RunStore.commit_step`); reading runs back
(:class:`labep.store.queries.RunQueries`) and calibration records
(:class:`labep.store.calibrations.CalibrationShelf`) are its two mixins. The tables and the
file checks are :mod:`labep.store.files`.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labep.store.calibrations import CalibrationShelf
from labep.store.files import (
    _LABEP_TABLES,
    _SCHEMA,
    HEARTBEAT_SECONDS,
    HOLD_SECONDS,
    MIGRATIONS,
    PAGE_SIZE,
    SCHEMA_VERSION,
    SQLITE_MAGIC,
    FileHold,
    StoreError,
    _alive,
    _check_report,
    _now,
    _owner,
    store_error,
    to_npy,
)
from labep.store.queries import RunQueries
from labep.store.sweeps import SweepShelf

#: the statements that write a run's rows (every writer of a table uses its one)
_INSERT_RESUME = "INSERT OR REPLACE INTO resume_points (run_id, step, state) VALUES (?, ?, ?)"
_INSERT_ARRAYS = ("INSERT OR REPLACE INTO arrays (run_id, step, kind, name, npy) "
                  "VALUES (?, ?, ?, ?, ?)")
_INSERT_STEPS = "INSERT INTO steps (run_id, step, epoch, time) VALUES (?, ?, ?, ?)"
_INSERT_METRICS = ("INSERT OR REPLACE INTO metrics (run_id, step, name, value) "
                   "VALUES (?, ?, ?, ?)")
_INSERT_EVENTS = ("INSERT INTO events (run_id, step, time, kind, message, detail) "
                  "VALUES (?, ?, ?, ?, ?, ?)")


@dataclass
class _Rows:
    """Rows of held steps ready for their transaction (no live arrays: bytes and JSON)."""

    steps: list[tuple[Any, ...]]
    metrics: list[tuple[Any, ...]]
    events: list[tuple[Any, ...]]
    resumes: list[tuple[Any, ...]]
    arrays: list[tuple[Any, ...]]
    #: the heartbeat update (time, run id), if one is due
    beat: tuple[str, str] | None


class RunStore(RunQueries, CalibrationShelf, SweepShelf):
    """A SQLite run store. One connection per process; a committed step is whole in one
    transaction (with the steps held back before it, see :meth:`commit_step`)."""

    def __init__(self, path: str | Path, *, create: bool = True,
                 check_pages: bool | None = None) -> None:
        """Open the store at ``path``; ``create``: make a new one if there is no file (or an
        empty one). An existing file is verified first, reading only (see the module's
        docstring); ``check_pages`` also reads every page (default: when ``create``, i.e.
        for a writer; always before a migration). Raises :class:`StoreError`."""
        self.path = Path(path)
        self._beat = -float("inf")
        #: steps handed to :meth:`commit_step` with ``hold`` and not committed yet, in order
        self._held: list[tuple[Any, ...]] = []
        self._committed = time.monotonic()
        #: the one thread (with its own connection) that commits checkpoints in the
        #: background, and the checkpoint transaction it is writing (see commit_step)
        self._writer: ThreadPoolExecutor | None = None
        self._writer_db: sqlite3.Connection | None = None
        self._in_flight: tuple[Future[None], list[tuple[Any, ...]]] | None = None
        if not create and not self.path.exists():
            raise StoreError(f"no run store at {self.path}")
        parent = self.path.resolve().parent
        if not parent.is_dir():
            raise StoreError(f"cannot create the run store {self.path}: {parent} is not a folder")
        new = create and (not self.path.exists() or self.path.stat().st_size == 0)
        #: this process's descriptor of the file (raw reads only through it; see FileHold)
        self._hold: FileHold | None = None
        if not new:
            self._hold_file()
            try:
                self._check_header()
            except BaseException:
                self._release()
                raise
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as err:
            self._release()
            raise store_error(self.path, err, "open") from err
        try:
            if new:
                # one transaction: a second process creating the same store waits, then
                # finds it whole (IF NOT EXISTS, OR IGNORE)
                # 64 KiB pages: a checkpoint's arrays are megabytes of blob, which SQLite
                # keeps in chains of overflow pages; at the default 4 KiB a 784 x 500
                # checkpoint took 19 ms to commit, at 64 KiB 3.7 ms (set before the first
                # table; a store created with other pages keeps them)
                self.db.execute(f"PRAGMA page_size={PAGE_SIZE}")
                self.db.executescript(
                    "BEGIN IMMEDIATE;\n" + _SCHEMA + "INSERT OR IGNORE INTO meta (key, value) "
                    f"VALUES ('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;")
                self._hold_file()
            self.schema_version = self._verify(create if check_pages is None else check_pages)
            # only now may the file change: WAL (a no-op on a store labep wrote)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
        except BaseException as err:
            self.close()
            if isinstance(err, sqlite3.Error | UnicodeDecodeError):
                raise store_error(self.path, err, "open") from err
            raise
        if self.schema_version < SCHEMA_VERSION:
            self._migrate()

    def _hold_file(self) -> None:
        try:
            self._hold = FileHold(self.path)
        except OSError as err:
            raise StoreError(f"cannot read the run store {self.path}: {err.strerror}") from err

    def _release(self) -> None:
        if self._hold is not None:
            self._hold.release()

    def _check_header(self) -> None:
        """Refuse a file that does not start like an SQLite database (reading 100 bytes
        through the process's held descriptor: never an open and close of the file that
        would drop another connection's locks)."""
        assert self._hold is not None
        try:
            header = self._hold.read(100)
        except OSError as err:
            raise StoreError(f"cannot read the run store {self.path}: {err.strerror}") from err
        if not header:
            raise StoreError(f"{self.path}: not a labep run store (an empty file)")
        if not header.startswith(SQLITE_MAGIC):
            raise StoreError(f"{self.path}: not a labep run store (not an SQLite database: "
                             "a file of another type, or damaged over its header)")
        if len(header) < 100:
            raise StoreError(f"{self.path}: damaged: the SQLite header is cut short "
                             f"({len(header)} of 100 bytes)")

    def _verify(self, check_pages: bool) -> int:
        """The schema version of the open file, once it is known (by reading only) to be a
        labep store this labep can read: labep's tables, a schema version not newer than
        this labep's, and with ``check_pages`` (or before a migration) every page sound."""
        tables = {str(name) for (name,) in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not _LABEP_TABLES.issubset(tables):
            shown = ", ".join(sorted(tables)[:6]) + (", ..." if len(tables) > 6 else "")
            what = (f"an SQLite database with other tables: {shown}" if tables
                    else "an SQLite database without tables")
            raise StoreError(f"{self.path}: not a labep run store ({what})")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or not str(row[0]).isdigit() or int(row[0]) < min(MIGRATIONS):
            raise StoreError(f"{self.path}: damaged: labep's tables are there but not a schema "
                             f"version in meta (found {None if row is None else row[0]!r})")
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is newer than this "
                             f"labep's {SCHEMA_VERSION}; upgrade labep to read it")
        if check_pages or version < SCHEMA_VERSION:
            problems = _check_report(
                [str(line) for (line,) in self.db.execute("PRAGMA quick_check(3)")])
            if problems is not None:
                raise StoreError(f"{self.path}: damaged: {problems}")
        return version

    def _migrate(self) -> None:
        """Upgrade an older store in place, after a backup copy of it as it was."""
        old = self.schema_version
        self.backup_path = self.path.with_name(f"{self.path.name}.v{old}.bak")
        with sqlite3.connect(self.backup_path) as backup:
            self.db.backup(backup)
        backup.close()
        with self.transaction() as db:
            for version in range(old, SCHEMA_VERSION):
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                       (str(SCHEMA_VERSION),))
        self.schema_version = SCHEMA_VERSION

    def close(self) -> None:
        """Commit the steps held back, close the connection, then let go of the file (in that
        order: see FileHold)."""
        try:
            try:
                self._wait()
            finally:  # a checkpoint that failed in the background is tried once more
                if self._held:
                    self.flush()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self._stop_writer()
            self.db.close()
        finally:
            self._release()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _begin(self) -> None:
        """Take the write lock (a store shared by many writers retries it)."""
        self.db.execute("BEGIN IMMEDIATE")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the steps held back are written first, in it (so they are
        committed before anything that follows them, and stay held if it rolls back)."""
        self._wait()
        self._begin()
        try:
            if self._held:
                self._insert(self.db, self._rows(self._held))
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self._held.clear()
        self._committed = time.monotonic()

    def flush(self) -> None:
        """Commit the steps held back (nothing if there are none)."""
        if self._held:
            with self.transaction():
                pass

    # -- writing ----------------------------------------------------------------------------

    def create_run(self, name: str, protocol: dict[str, Any], bench_name: str, seed: int,
                   labep_version: str, trial: tuple[str, int] | None = None) -> str:
        """A new run, ``running``; with ``trial`` (sweep id, trial index) the run becomes
        that trial's run in the same transaction, refused if the trial has one already."""
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        now = _now()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runs (id, name, status, created, heartbeat, labep_version, "
                "bench_name, seed, protocol, owner) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (run_id, name, now, now, labep_version, bench_name, seed,
                 json.dumps(protocol, sort_keys=False), _owner()),
            )
            if trial is not None:
                linked = db.execute("UPDATE sweep_trials SET run_id = ? WHERE sweep_id = ? AND "
                                    "trial = ? AND run_id IS NULL", (run_id, *trial)).rowcount
                if linked != 1:
                    raise StoreError(f"trial {trial[1]} of sweep {trial[0]} has a run already "
                                     "(or does not exist): refused (one run per trial)")
        return run_id

    def claim(self, run_id: str) -> dict[str, Any]:
        """Take over a run to resume it: refused if it completed or if another live process
        writes it (its ``owner``); a dead owner is a stale lock. Returns the run's row."""
        run_id = self.resolve(run_id)
        with self.transaction() as db:
            status, owner, protocol = db.execute(
                "SELECT status, owner, protocol FROM runs WHERE id = ?", (run_id,)).fetchone()
            if status == "completed":
                raise StoreError(f"run {run_id} completed: nothing to resume")
            if status == "running" and owner and owner != _owner() and _alive(owner):
                raise StoreError(f"run {run_id} is being written by process {owner}; "
                                 "refused (one writer per run)")
            db.execute("UPDATE runs SET status = 'running', owner = ?, heartbeat = ?, "
                       "finished = NULL, error = NULL, traceback = NULL WHERE id = ?",
                       (_owner(), _now(), run_id))
        return {"id": run_id, "status": status, "owner": owner,
                "protocol": json.loads(protocol)}

    def truncate_after(self, run_id: str, step: int) -> int:
        """Delete what steps after ``step`` committed (they are run again from the resume
        point at ``step``), except the ``run_ended`` events that say why an attempt ended;
        returns how many steps were removed."""
        with self.transaction() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM steps WHERE run_id = ? AND step > ?",
                                  (run_id, step)).fetchone()
            for table in ("steps", "metrics", "arrays", "resume_points"):
                db.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?",
                           (run_id, step))
            # why an earlier attempt ended stays on record
            db.execute("DELETE FROM events WHERE run_id = ? AND step > ? AND kind != "
                       "'run_ended'", (run_id, step))
        return int(count)

    def set_bench_identity(self, run_id: str, identity: dict[str, str]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET bench_identity = ?, heartbeat = ? WHERE id = ?",
                       (json.dumps(identity), _now(), run_id))

    def commit_step(self, run_id: str, step: int, epoch: int, metrics: dict[str, float],
                    arrays: dict[str, dict[str, np.ndarray]] | None = None,
                    events: list[tuple[str, str, dict[str, Any]]] | None = None,
                    resume: dict[str, Any] | None = None, *, hold: bool = False) -> None:
        """Commit one training step (its metrics, arrays by kind, events and, at a
        checkpoint, the engine's resume state) at once, with the steps held back before it.

        ``hold``: the store may hold the step back and commit it with the next transaction,
        which comes at the latest :data:`HOLD_SECONDS` after the last one, with the next step
        that has arrays or a resume state (a checkpoint), with any other write (events, metrics,
        the run's end) or on :meth:`close`. A step held back is not committed: a process
        killed before that transaction loses it, as it loses the step it was running.

        A checkpoint the store may hold (``hold`` with arrays or a resume state) is committed
        in the background: its arrays are copied out now, and its transaction (with the steps
        held before it) runs on the store's writer thread, so the training loop does not wait
        for megabytes of blob to reach the file. It is committed once that transaction
        completes, which every later write of this store waits for first (and :meth:`close`);
        until then it is held like any other step. If it fails, its steps stay held and the
        error is raised by the store's next write."""
        self._held.append((run_id, step, epoch, _now(), metrics, arrays, events, resume))
        if (hold and arrays is None and resume is None
                and time.monotonic() - self._committed < HOLD_SECONDS):
            return
        if hold:
            self._commit_in_background()
        else:
            self.flush()

    def _commit_in_background(self) -> None:
        """Hand the held steps (a checkpoint among them) to the writer thread, once the
        transaction it may still be writing has completed."""
        self._wait()
        rows = self._rows(self._held)  # copies every array: the caller may reuse them
        held, self._held = self._held, []
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labep-store")
        self._in_flight = (self._writer.submit(self._write_rows, rows), held)
        self._committed = time.monotonic()

    def _write_rows(self, rows: _Rows) -> None:
        """On the writer thread: one transaction of ``rows`` on its own connection."""
        if self._writer_db is None:
            self._writer_db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._writer_db.execute("PRAGMA synchronous=NORMAL")
            self._writer_db.execute("PRAGMA foreign_keys=ON")
        db = self._writer_db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._insert(db, rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _wait(self) -> None:
        """Let the checkpoint transaction in flight complete; if it failed, its steps go back
        to the front of the held ones and its error is raised here."""
        if self._in_flight is None:
            return
        future, held = self._in_flight
        self._in_flight = None
        error = future.exception()
        if error is not None:
            self._held[:0] = held
            raise error

    def _stop_writer(self) -> None:
        """Close the writer thread's connection (on its thread) and end the thread."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            if self._in_flight is not None:
                self._in_flight[0].exception()  # closing: the error was the caller's to see
                self._in_flight = None
            writer.submit(self._close_writer_db).result()
        finally:
            writer.shutdown()

    def _close_writer_db(self) -> None:
        if self._writer_db is not None:
            db, self._writer_db = self._writer_db, None
            db.close()

    def _rows(self, held: list[tuple[Any, ...]]) -> _Rows:
        """The rows of the steps ``held`` (arrays as .npy bytes, states as JSON), by table."""
        steps, metrics, events, resumes, arrays = [], [], [], [], []
        run_id, now = None, None
        for run_id, step, epoch, now, values, named_arrays, step_events, resume in held:
            steps.append((run_id, step, epoch, now))
            metrics += [(run_id, step, k, None if v is None else float(v))
                        for k, v in values.items()]
            events += [(run_id, step, now, kind, message, json.dumps(detail))
                       for kind, message, detail in step_events or ()]
            if resume is not None:
                resumes.append((run_id, step, json.dumps(resume)))
            for kind, named in (named_arrays or {}).items():
                arrays += [(run_id, step, kind, k, to_npy(v)) for k, v in named.items()]
        beat = None
        if held and time.monotonic() - self._beat >= HEARTBEAT_SECONDS:
            beat = (now, run_id)
            self._beat = time.monotonic()
        return _Rows(steps, metrics, events, resumes, arrays, beat)

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: _Rows) -> None:
        """Write ``rows`` (one statement per table) in the open transaction of ``db``."""
        if rows.resumes:
            db.executemany(_INSERT_RESUME, rows.resumes)
        if rows.arrays:
            db.executemany(_INSERT_ARRAYS, rows.arrays)
        db.executemany(_INSERT_STEPS, rows.steps)
        db.executemany(_INSERT_METRICS, rows.metrics)
        if rows.events:
            db.executemany(_INSERT_EVENTS, rows.events)
        if rows.beat is not None:
            db.execute("UPDATE runs SET heartbeat = ? WHERE id = ?", rows.beat)

    def record_events(self, run_id: str, step: int,
                      events: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Events outside a training step's commit (e.g. faults during an evaluation)."""
        if not events:
            return
        now = _now()
        with self.transaction() as db:
            db.executemany(
                _INSERT_EVENTS,
                [(run_id, step, now, kind, message, json.dumps(detail))
                 for kind, message, detail in events])

    def record_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        with self.transaction() as db:
            self._metrics(db, run_id, step, metrics)

    def save_arrays(self, run_id: str, step: int, kind: str,
                    arrays: dict[str, np.ndarray]) -> None:
        with self.transaction() as db:
            self._arrays(db, run_id, step, kind, arrays)

    def save_start(self, run_id: str, arrays: dict[str, dict[str, np.ndarray]],
                   resume: dict[str, Any]) -> None:
        """Step 0 of a run (no training step yet): its arrays and resume state at once."""
        with self.transaction() as db:
            for kind, named in arrays.items():
                self._arrays(db, run_id, 0, kind, named)
            self._resume(db, run_id, 0, resume)

    @staticmethod
    def _resume(db: sqlite3.Connection, run_id: str, step: int, state: dict[str, Any]) -> None:
        db.execute(_INSERT_RESUME, (run_id, step, json.dumps(state)))

    @staticmethod
    def _metrics(db: sqlite3.Connection, run_id: str, step: int,
                 metrics: dict[str, float]) -> None:
        db.executemany(
            _INSERT_METRICS,
            [(run_id, step, k, None if v is None else float(v)) for k, v in metrics.items()],
        )

    @staticmethod
    def _arrays(db: sqlite3.Connection, run_id: str, step: int, kind: str,
                arrays: dict[str, np.ndarray]) -> None:
        db.executemany(
            _INSERT_ARRAYS,
            [(run_id, step, kind, k, to_npy(v)) for k, v in arrays.items()],
        )

    def finish(self, run_id: str, status: str, error: str | None = None,
               traceback: str | None = None) -> None:
        now = _now()
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished = ?, heartbeat = ?, error = ?, "
                "traceback = ?, owner = NULL WHERE id = ?",
                (status, now, now, error, traceback, run_id),
            )

    def set_calibration(self, run_id: str, calibration_id: str | None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET calibration_id = ? WHERE id = ?",
                       (calibration_id, run_id))

    # -- calibrations -----------------------------------------------------------------------
