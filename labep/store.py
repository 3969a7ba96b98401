"""The run store: one SQLite file (WAL) holding every run, readable with the standard library.

Tables (schema version in ``meta``):

- ``runs``: one row per run: protocol as run (JSON), labep version, bench name and identity,
  seed, status (running / completed / failed / interrupted), heartbeat, error and traceback.
- ``steps``: one row per committed training step; written in the same transaction as the
  step's ``metrics`` rows (name, value), so a step is either wholly there or not at all.
  ``metrics`` is keyed (run_id, step, name) and has no other index, so a step's commit appends
  to one B-tree; a series (one name over the steps) is read by scanning the run's rows.
- ``arrays``: parameter snapshots (checkpoints) and other arrays, each a ``.npy`` blob
  (``numpy.load(io.BytesIO(blob))``; no pickle).
- ``events``: faults and notable events (unsettled phases, refused writes), with detail JSON.
- ``calibrations`` and ``calibration_arrays``: calibration records (bench identity, time,
  raw sweep, fitted maps, residual); never overwritten, a newer record supersedes an older one
  of the same bench. ``runs.calibration_id`` names the record a run used.

- ``resume_points``: at every checkpoint, the engine's state as JSON (position in the epoch,
  accumulators, every random generator's state, write-path and fault counters, the bench's
  own state where it has one); its arrays are in ``arrays`` under kind ``resume``.
  ``runs.owner`` (host:pid) is the process writing a run: a second writer is refused while
  that process lives; a dead owner's run is resumable.

An older store is upgraded on open by forward migrations, after a backup copy
(``NAME.vN.bak``) of the file as it was.

An existing file is checked, by reading only, before anything could change it (the WAL
switch, a migration, a run's writes): its SQLite header, labep's tables and schema version,
and (for a writer or a migration) every page (``PRAGMA quick_check``). A file that is not a
labep store, a damaged one, or one of a newer schema is refused with a :class:`StoreError`
and left byte for byte as it was.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from labep.calibration import CalibrationRecord

SCHEMA_VERSION = 4
#: a running run refreshes ``runs.heartbeat`` at most this often (with its step commits)
HEARTBEAT_SECONDS = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
    created TEXT NOT NULL,
    heartbeat TEXT NOT NULL,
    finished TEXT,
    labep_version TEXT NOT NULL,
    bench_name TEXT NOT NULL,
    bench_identity TEXT,
    seed INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    error TEXT,
    traceback TEXT,
    calibration_id TEXT,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    time TEXT NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, step, name)
);
CREATE TABLE IF NOT EXISTS arrays (
    run_id TEXT NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    npy BLOB NOT NULL,
    PRIMARY KEY (run_id, step, kind, name)
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL REFERENCES runs(id),
    step INTEGER,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    detail TEXT
);
"""

_CALIBRATION_TABLES = """
CREATE TABLE IF NOT EXISTS calibrations (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    bench_name TEXT NOT NULL,
    vendor TEXT NOT NULL,
    model TEXT NOT NULL,
    serial TEXT NOT NULL,
    identity TEXT NOT NULL,
    parameters TEXT NOT NULL,
    points INTEGER NOT NULL,
    repeats INTEGER NOT NULL,
    residual_rms_lsb REAL NOT NULL,
    summary TEXT NOT NULL,
    superseded_by TEXT
);
CREATE TABLE IF NOT EXISTS calibration_arrays (
    calibration_id TEXT NOT NULL REFERENCES calibrations(id),
    parameter TEXT NOT NULL,
    name TEXT NOT NULL,
    npy BLOB NOT NULL,
    PRIMARY KEY (calibration_id, parameter, name)
);
"""

_RESUME_TABLE = """
CREATE TABLE IF NOT EXISTS resume_points (
    run_id TEXT NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (run_id, step)
);
"""

_SCHEMA += _CALIBRATION_TABLES + _RESUME_TABLE

#: forward migrations: MIGRATIONS[v] takes a store from schema version v to v + 1
MIGRATIONS: dict[int, str] = {
    1: "ALTER TABLE runs ADD COLUMN calibration_id TEXT;\n" + _CALIBRATION_TABLES,
    # a secondary index on metrics (run_id, name, step) cost more than half of every step's
    # commit; series are read by scanning the run's rows in primary-key order instead
    2: "DROP INDEX IF EXISTS metrics_by_name",
    3: "ALTER TABLE runs ADD COLUMN owner TEXT;\n" + _RESUME_TABLE,
}



#: Per-step sample accounting (metrics, summed by ``labep show``). Every training sample of a
#: step is in exactly one of: ``samples_used`` (in the update), ``samples_free_nonfinite`` /
#: ``samples_free_unsettled`` (its free phase read back a non-finite state / did not settle:
#: never nudged), ``samples_nudged_nonfinite`` / ``samples_nudged_unsettled`` (a nudged
#: phase did), ``samples_skipped`` (its batch was given up by the fault policy). A sample
#: both non-finite and unsettled counts as non-finite. Left out of the update = the four
#: middle ones (the step's ``unsettled`` metric).
SAMPLE_COUNTS = ("samples_used", "samples_free_nonfinite", "samples_free_unsettled",
                 "samples_nudged_nonfinite", "samples_nudged_unsettled", "samples_skipped")


class StoreError(RuntimeError):
    """The store cannot be opened or a run cannot be found."""


#: the first 16 bytes of every SQLite database file
SQLITE_MAGIC = b"SQLite format 3\x00"
#: tables every labep store has had since schema version 1
_LABEP_TABLES = frozenset({"meta", "runs", "steps", "metrics", "arrays", "events"})
#: SQLite result codes of a file whose bytes are not a (whole) database
_DAMAGE_CODES = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_FORMAT"})


def store_error(path: str | Path, err: BaseException, doing: str = "read") -> StoreError:
    """The :class:`StoreError` for an SQLite error (or text that does not decode) met while
    opening or reading the store at ``path``: ``damaged: ...`` when the file's bytes are at
    fault, else ``cannot read the run store ...`` (a lock, an I/O error)."""
    if isinstance(err, StoreError):
        return err
    if isinstance(err, UnicodeDecodeError):
        return StoreError(f"{path}: damaged: text that is not UTF-8 ({err.reason})")
    if isinstance(err, json.JSONDecodeError):
        return StoreError(f"{path}: damaged: a stored JSON value does not parse ({err.msg})")
    message = str(err)
    if (getattr(err, "sqlite_errorname", None) in _DAMAGE_CODES or "malformed" in message
            or "decode" in message):
        return StoreError(f"{path}: damaged: {message}")
    return StoreError(f"cannot {doing} the run store {path}: {message}")


def _check_report(lines: list[str]) -> str | None:
    """The problems an SQLite ``quick_check``/``integrity_check`` listed, on one line (None
    for a sound file)."""
    if lines == ["ok"]:
        return None
    problems = [" ".join(part.split()) for line in lines for part in line.splitlines()
                if part.strip() and part.strip() != "*** in database main ***"]
    return "; ".join(problems) or "the file's pages do not check"


def find_damage(path: str | Path) -> str | None:
    """What SQLite's full check (``PRAGMA integrity_check``) finds wrong with the existing
    file at ``path``, on one line, or None if it is sound. Reads only; used to tell a damaged
    store from a bug when a read fails in an unforeseen way."""
    if not Path(path).is_file():
        return None
    try:
        db = sqlite3.connect(path, timeout=30.0)
    except sqlite3.Error as err:
        return str(err)
    try:
        return _check_report([str(line) for (line,) in db.execute("PRAGMA integrity_check(3)")])
    except (sqlite3.Error, UnicodeDecodeError) as err:
        return str(err)
    finally:
        db.close()


def _owner() -> str:
    """This process, as ``runs.owner`` names it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(owner: str) -> bool:
    """Whether the process ``host:pid`` still runs (assumed so on another host)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def from_npy(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def default_store_path(explicit: str | None = None, protocol_store: str | None = None) -> Path:
    """--store wins, then $LABEP_STORE, then the protocol's ``store`` field, then ./labep.db."""
    return Path(explicit or os.environ.get("LABEP_STORE") or protocol_store or "labep.db")


class RunStore:
    """A SQLite run store. One connection per process; one transaction per committed step."""

    def __init__(self, path: str | Path, *, create: bool = True,
                 check_pages: bool | None = None) -> None:
        """Open the store at ``path``; ``create``: make a new one if there is no file (or an
        empty one). An existing file is verified first, reading only (see the module's
        docstring); ``check_pages`` also reads every page (default: when ``create``, i.e.
        for a writer; always before a migration). Raises :class:`StoreError`."""
        self.path = Path(path)
        self._beat = -float("inf")
        if not create and not self.path.exists():
            raise StoreError(f"no run store at {self.path}")
        parent = self.path.resolve().parent
        if not parent.is_dir():
            raise StoreError(f"cannot create the run store {self.path}: {parent} is not a folder")
        new = create and (not self.path.exists() or self.path.stat().st_size == 0)
        if not new:
            self._check_header()
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as err:
            raise store_error(self.path, err, "open") from err
        try:
            if new:
                # one transaction: a second process creating the same store waits, then
                # finds it whole (IF NOT EXISTS, OR IGNORE)
                self.db.executescript(
                    "BEGIN IMMEDIATE;\n" + _SCHEMA + "INSERT OR IGNORE INTO meta (key, value) "
                    f"VALUES ('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;")
            self.schema_version = self._verify(create if check_pages is None else check_pages)
            # only now may the file change: WAL (a no-op on a store labep wrote)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
        except BaseException as err:
            self.db.close()
            if isinstance(err, sqlite3.Error | UnicodeDecodeError):
                raise store_error(self.path, err, "open") from err
            raise
        if self.schema_version < SCHEMA_VERSION:
            self._migrate()

    def _check_header(self) -> None:
        """Refuse a file that does not start like an SQLite database (reading 100 bytes)."""
        try:
            with self.path.open("rb") as file:
                header = file.read(100)
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
        self.db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- writing ----------------------------------------------------------------------------

    def create_run(self, name: str, protocol: dict[str, Any], bench_name: str, seed: int,
                   labep_version: str) -> str:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        now = _now()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO runs (id, name, status, created, heartbeat, labep_version, "
                "bench_name, seed, protocol, owner) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (run_id, name, now, now, labep_version, bench_name, seed,
                 json.dumps(protocol, sort_keys=False), _owner()),
            )
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

    def resume_point(self, run_id: str) -> tuple[int, dict[str, Any]] | None:
        """The newest resume point of a run: (step, engine state)."""
        row = self.db.execute("SELECT step, state FROM resume_points WHERE run_id = ? "
                              "ORDER BY step DESC LIMIT 1", (run_id,)).fetchone()
        return None if row is None else (int(row[0]), json.loads(row[1]))

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
                    resume: dict[str, Any] | None = None) -> None:
        """Commit one training step (its metrics, arrays by kind, events and, at a
        checkpoint, the engine's resume state) at once."""
        now = _now()
        with self.transaction() as db:
            db.execute("INSERT INTO steps (run_id, step, epoch, time) VALUES (?, ?, ?, ?)",
                       (run_id, step, epoch, now))
            if resume is not None:
                self._resume(db, run_id, step, resume)
            self._metrics(db, run_id, step, metrics)
            for kind, named in (arrays or {}).items():
                self._arrays(db, run_id, step, kind, named)
            for kind, message, detail in events or ():
                db.execute(
                    "INSERT INTO events (run_id, step, time, kind, message, detail) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, step, now, kind, message, json.dumps(detail)),
                )
            if time.monotonic() - self._beat >= HEARTBEAT_SECONDS:
                db.execute("UPDATE runs SET heartbeat = ? WHERE id = ?", (now, run_id))
                self._beat = time.monotonic()

    def record_events(self, run_id: str, step: int,
                      events: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Events outside a training step's commit (e.g. faults during an evaluation)."""
        if not events:
            return
        now = _now()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO events (run_id, step, time, kind, message, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
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
        db.execute("INSERT OR REPLACE INTO resume_points (run_id, step, state) VALUES (?, ?, ?)",
                   (run_id, step, json.dumps(state)))

    @staticmethod
    def _metrics(db: sqlite3.Connection, run_id: str, step: int,
                 metrics: dict[str, float]) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO metrics (run_id, step, name, value) VALUES (?, ?, ?, ?)",
            [(run_id, step, k, None if v is None else float(v)) for k, v in metrics.items()],
        )

    @staticmethod
    def _arrays(db: sqlite3.Connection, run_id: str, step: int, kind: str,
                arrays: dict[str, np.ndarray]) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO arrays (run_id, step, kind, name, npy) VALUES (?, ?, ?, ?, ?)",
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

    def save_calibration(self, record: CalibrationRecord) -> str:
        """Store a new calibration record; it supersedes the bench's previous valid one."""
        record.id = "cal-" + time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        record.created = _now()
        ident = record.identity
        with self.transaction() as db:
            db.execute(
                "UPDATE calibrations SET superseded_by = ? WHERE vendor = ? AND model = ? "
                "AND serial = ? AND superseded_by IS NULL",
                (record.id, ident["vendor"], ident["model"], ident["serial"]))
            db.execute(
                "INSERT INTO calibrations (id, created, bench_name, vendor, model, serial, "
                "identity, parameters, points, repeats, residual_rms_lsb, summary) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.created, record.bench_name, ident["vendor"], ident["model"],
                 ident["serial"], json.dumps(ident), json.dumps(sorted(record.parameters)),
                 record.points, record.repeats, record.residual_rms_lsb,
                 json.dumps(record.summary())))
            rows = []
            for name, cal in record.parameters.items():
                for key in ("codes", "measured", "gain", "offset", "response"):
                    rows.append((record.id, name, key, to_npy(getattr(cal, key))))
                rows.append((record.id, name, "residual_lsb",
                             to_npy(np.array([cal.residual_rms_lsb, cal.residual_max_lsb]))))
            db.executemany("INSERT INTO calibration_arrays (calibration_id, parameter, name, "
                           "npy) VALUES (?, ?, ?, ?)", rows)
        return record.id

    def calibrations(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT summary, id, created, superseded_by FROM calibrations ORDER BY created"
        ).fetchall()
        out = []
        for summary, cal_id, created, superseded in rows:
            entry = json.loads(summary)
            entry.update(id=cal_id, created=created, superseded_by=superseded)
            out.append(entry)
        return out

    def calibration(self, calibration_id: str) -> CalibrationRecord:
        from labep.calibration import CalibrationRecord, ParameterCalibration

        rows = self.db.execute(
            "SELECT id, created, bench_name, identity, points, repeats, superseded_by "
            "FROM calibrations WHERE id LIKE ? || '%'", (calibration_id,)).fetchall()
        if len(rows) != 1:
            what = "no calibration" if not rows else f"{len(rows)} calibrations"
            raise StoreError(f"{self.path}: {what} matching {calibration_id!r}")
        cal_id, created, bench_name, identity, points, repeats, superseded = rows[0]
        arrays: dict[str, dict[str, np.ndarray]] = {}
        for parameter, name, blob in self.db.execute(
                "SELECT parameter, name, npy FROM calibration_arrays WHERE calibration_id = ?",
                (cal_id,)):
            arrays.setdefault(parameter, {})[name] = from_npy(blob)
        parameters = {}
        for parameter, found in arrays.items():
            rms, worst = found.pop("residual_lsb")
            parameters[parameter] = ParameterCalibration(
                **found, residual_rms_lsb=float(rms), residual_max_lsb=float(worst))
        return CalibrationRecord(bench_name, json.loads(identity), parameters, points, repeats,
                                 id=cal_id, created=created, superseded_by=superseded)

    def newest_calibration(self, identity: dict[str, str]) -> CalibrationRecord | None:
        """The valid (not superseded) calibration of the bench with this identity."""
        row = self.db.execute(
            "SELECT id FROM calibrations WHERE vendor = ? AND model = ? AND serial = ? "
            "AND superseded_by IS NULL ORDER BY created DESC LIMIT 1",
            (identity["vendor"], identity["model"], identity["serial"])).fetchone()
        return None if row is None else self.calibration(row[0])

    # -- reading ----------------------------------------------------------------------------

    def resolve(self, run_id: str) -> str:
        """A run id, or a unique prefix of one, or ``latest``."""
        if run_id == "latest":
            row = self.db.execute("SELECT id FROM runs ORDER BY created DESC LIMIT 1").fetchone()
            if row is None:
                raise StoreError(f"{self.path}: no runs yet")
            return row[0]
        rows = self.db.execute("SELECT id FROM runs WHERE id LIKE ? || '%'",
                               (run_id,)).fetchall()
        if len(rows) != 1:
            what = "no run" if not rows else f"{len(rows)} runs"
            raise StoreError(f"{self.path}: {what} matching {run_id!r}")
        return rows[0][0]

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT id FROM runs ORDER BY created").fetchall()
        return [self.summary(row[0], with_protocol=False) for row in rows]

    def summary(self, run_id: str, *, with_protocol: bool = True) -> dict[str, Any]:
        run_id = self.resolve(run_id)
        row = self.db.execute(
            "SELECT id, name, status, created, heartbeat, finished, labep_version, bench_name, "
            "bench_identity, seed, protocol, error, traceback, calibration_id, owner FROM runs "
            "WHERE id = ?", (run_id,)
        ).fetchone()
        keys = ("id", "name", "status", "created", "heartbeat", "finished", "labep_version",
                "bench_name", "bench_identity", "seed", "protocol", "error", "traceback",
                "calibration_id", "owner")
        run = dict(zip(keys, row, strict=True))
        steps = self.db.execute("SELECT COUNT(*), MAX(epoch) FROM steps WHERE run_id = ?",
                                (run_id,)).fetchone()
        out: dict[str, Any] = {
            "id": run["id"],
            "name": run["name"],
            "status": run["status"],
            "created": run["created"],
            "heartbeat": run["heartbeat"],
            "finished": run["finished"],
            "labep_version": run["labep_version"],
            "bench": {
                "name": run["bench_name"],
                "identity": json.loads(run["bench_identity"]) if run["bench_identity"] else None,
            },
            "seed": run["seed"],
            "owner": run["owner"],
            # killed (a dead owner), interrupted or failed, with a checkpoint to resume from
            "resumable": (run["status"] in ("interrupted", "failed") or (
                run["status"] == "running" and run["owner"] is not None
                and not _alive(run["owner"]))) and self.resume_point(run_id) is not None,
            "calibration": run["calibration_id"],
            "steps": steps[0],
            "epochs": 0 if steps[1] is None else steps[1] + 1,
            "metrics": self.final_metrics(run_id),
            "writes": self.write_summary(run_id),
            "samples": self.sample_accounting(run_id),
            "link": self.link_quality(run_id),
        }
        if with_protocol:
            out["protocol"] = json.loads(run["protocol"])
            out["error"] = run["error"]
            out["traceback"] = run["traceback"]
        return out

    def sample_accounting(self, run_id: str) -> dict[str, Any]:
        """Where every sample of a run went (:data:`SAMPLE_COUNTS`, summed over the
        committed steps): ``trained`` = ``used`` + ``left_out`` + ``skipped``, ``left_out`` =
        free (non-finite, unsettled) + nudged (non-finite, unsettled); the test samples
        (evaluated only, never in an update) that were unsettled, non-finite or in a batch
        the fault policy gave up on; and the bench's own per-sample reports (fault events
        ``unsettled`` and ``invalid_readout``, one per sample and phase: a sample can be
        reported by several phases, and by both kinds)."""
        names = (*SAMPLE_COUNTS, "test_samples", "test_unsettled", "test_nonfinite",
                 "test_skipped")
        rows = self.db.execute(
            "SELECT name, SUM(value) FROM metrics WHERE run_id = ? AND name IN "
            f"({', '.join('?' * len(names))}) GROUP BY name", (run_id, *names)).fetchall()
        total = {name: 0 for name in names}
        total.update({name: int(value or 0) for name, value in rows})
        free = {"nonfinite": total["samples_free_nonfinite"],
                "unsettled": total["samples_free_unsettled"]}
        nudged = {"nonfinite": total["samples_nudged_nonfinite"],
                  "unsettled": total["samples_nudged_unsettled"]}
        left_out = sum(free.values()) + sum(nudged.values())
        reported: dict[str, dict[str, int]] = {"training": {}, "evaluation": {}}
        for kind, during, count in self.db.execute(
                "SELECT json_extract(detail, '$.fault'), json_extract(detail, '$.during'), "
                "COUNT(*) FROM events WHERE run_id = ? AND kind = 'fault' AND "
                "json_extract(detail, '$.fault') IN ('unsettled', 'invalid_readout') "
                "GROUP BY 1, 2", (run_id,)):
            where = "evaluation" if during == "evaluation" else "training"
            reported[where][kind] = reported[where].get(kind, 0) + int(count)
        test_bad = total["test_unsettled"]
        return {
            "trained": total["samples_used"] + left_out + total["samples_skipped"],
            "used": total["samples_used"],
            "left_out": left_out,
            "free": free,
            "nudged": nudged,
            "skipped": total["samples_skipped"],
            "evaluated": {"samples": total["test_samples"],
                          "unsettled": test_bad - total["test_nonfinite"]
                          - total["test_skipped"],
                          "nonfinite": total["test_nonfinite"],
                          "skipped": total["test_skipped"]},
            "bench_reports": reported,
        }

    def link_quality(self, run_id: str) -> dict[str, float]:
        """The newest link-quality counters of a run behind a link (``link_*`` metrics,
        cumulative since the run, or its last resume, opened the bench); empty otherwise."""
        rows = self.db.execute(
            "SELECT m.name, m.value FROM metrics m JOIN (SELECT name, MAX(step) AS step "
            "FROM metrics WHERE run_id = ? AND name LIKE 'link\\_%' ESCAPE '\\' "
            "GROUP BY name) last ON m.name = last.name AND m.step = last.step "
            "WHERE m.run_id = ?", (run_id, run_id)).fetchall()
        return {name[len("link_"):]: value for name, value in rows}

    def write_summary(self, run_id: str) -> dict[str, Any]:
        """Writes of a run: counts per parameter, most code changes on one channel, clipped
        channels, the newest write-verify mismatch, and histograms of the codes held."""
        metrics = self.final_metrics(run_id)
        out: dict[str, Any] = {
            "counts": {k[len("writes_"):]: int(v) for k, v in metrics.items()
                       if k.startswith("writes_") and k != "writes_clipped" and v is not None},
            "code_changes_max": {k[len("code_changes_max_"):]: int(v)
                                 for k, v in metrics.items()
                                 if k.startswith("code_changes_max_") and v is not None},
            "clipped": int(metrics.get("writes_clipped") or 0),
            "mismatch": {key: metrics.get(f"write_{key}")
                         for key in ("mismatch_mean_lsb", "mismatch_max_lsb", "miss_fraction")},
            "code_histograms": {},
        }
        codes = self.arrays(run_id, "codes")
        if codes is not None:
            for name, held in codes[1].items():
                out["code_histograms"][name] = np.bincount(held.ravel()).tolist()
        return out

    def final_metrics(self, run_id: str) -> dict[str, float | None]:
        """The newest value of every metric of a run."""
        rows = self.db.execute(
            "SELECT m.name, m.value FROM metrics m JOIN (SELECT name, MAX(step) AS step "
            "FROM metrics WHERE run_id = ? GROUP BY name) last "
            "ON m.name = last.name AND m.step = last.step WHERE m.run_id = ?",
            (run_id, run_id),
        ).fetchall()
        metrics: dict[str, float | None] = {"test_accuracy": None, "train_loss": None}
        metrics.update(dict(rows))
        return metrics

    def metric_series(self, run_id: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self.db.execute(
            "SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step",
            (self.resolve(run_id), name),
        ).fetchall()
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        steps, values = zip(*rows, strict=True)
        return np.asarray(steps), np.asarray(values, dtype=float)

    def arrays(self, run_id: str, kind: str, step: int | None = None
               ) -> tuple[int, dict[str, np.ndarray]] | None:
        """The arrays of ``kind`` at ``step`` (default: the newest step that has any)."""
        run_id = self.resolve(run_id)
        if step is None:
            row = self.db.execute("SELECT MAX(step) FROM arrays WHERE run_id = ? AND kind = ?",
                                  (run_id, kind)).fetchone()
            if row[0] is None:
                return None
            step = int(row[0])
        rows = self.db.execute(
            "SELECT name, npy FROM arrays WHERE run_id = ? AND kind = ? AND step = ?",
            (run_id, kind, step),
        ).fetchall()
        return step, {name: from_npy(blob) for name, blob in rows}

    def events(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT step, time, kind, message, detail FROM events WHERE run_id = ? ORDER BY rowid",
            (self.resolve(run_id),),
        ).fetchall()
        return [{"step": s, "time": t, "kind": k, "message": m,
                 "detail": json.loads(d) if d else None} for s, t, k, m, d in rows]
