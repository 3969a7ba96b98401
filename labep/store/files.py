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
- ``sweeps`` and ``sweep_trials``: a sweep (``labep sweep``) and its trials, one row per
  (sweep_id, trial) with the trial's axis values, its protocol document, and the one run it
  has (``run_id``, set in the transaction that creates that run: a trial never gets two).

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
import socket
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 5
#: a running run refreshes ``runs.heartbeat`` at most this often (with its step commits)
HEARTBEAT_SECONDS = 1.0
#: a step the engine lets the store hold back is committed at most this long after the last
#: transaction (so ``labep watch`` and ``labep show`` see a running run's steps within it)
HOLD_SECONDS = 0.5

#: SQLite page size of a new store, in bytes (the largest SQLite allows): checkpoints are
#: megabytes of blob, which SQLite keeps in chains of overflow pages, one write per page
PAGE_SIZE = 65536

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

_SWEEP_TABLES = """
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created TEXT NOT NULL,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,
    axes TEXT NOT NULL,
    trials INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sweep_trials (
    sweep_id TEXT NOT NULL REFERENCES sweeps(id),
    trial INTEGER NOT NULL,
    axes TEXT NOT NULL,
    protocol TEXT NOT NULL,
    run_id TEXT UNIQUE REFERENCES runs(id),
    PRIMARY KEY (sweep_id, trial)
);
"""

_SCHEMA += _CALIBRATION_TABLES + _RESUME_TABLE + _SWEEP_TABLES

#: forward migrations: MIGRATIONS[v] takes a store from schema version v to v + 1
MIGRATIONS: dict[int, str] = {
    1: "ALTER TABLE runs ADD COLUMN calibration_id TEXT;\n" + _CALIBRATION_TABLES,
    # a secondary index on metrics (run_id, name, step) cost more than half of every step's
    # commit; series are read by scanning the run's rows in primary-key order instead
    2: "DROP INDEX IF EXISTS metrics_by_name",
    3: "ALTER TABLE runs ADD COLUMN owner TEXT;\n" + _RESUME_TABLE,
    4: _SWEEP_TABLES,
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


#: this process's own descriptors of store files, by (st_dev, st_ino): [fd, holders]
_HELD: dict[tuple[int, int], list[int]] = {}
_HELD_LOCK = threading.Lock()


class FileHold:
    """This process's descriptor of a store file, shared by every labep connection to that
    file in the process and closed only when the last of them has closed.

    SQLite locks a database with POSIX advisory locks, and POSIX drops *every* lock a process
    holds on a file as soon as the process closes *any* descriptor of that file. Opening the
    store with ``open()`` to read its header, then closing it, while another connection of
    the same process is open silently releases that connection's SHARED lock: a writer in
    another process then takes the database for its last connection, checkpoints and
    deletes the WAL and its index under it, and the connection left behind reads (and
    checkpoints) through a stale WAL index: "database disk image is malformed"
    (https://sqlite.org/howtocorrupt.html, section 2.2). So labep reads the raw bytes of a
    store only through this one descriptor, which stays open as long as any
    :class:`labep.store.runs.RunStore` or :class:`labep.store.watch.StoreView` of the
    process has the file open, and is closed after their SQLite connections are.
    """

    def __init__(self, path: str | Path) -> None:
        """Hold ``path`` (an existing file); raises OSError like ``open``."""
        with _HELD_LOCK:
            try:
                info = os.stat(path)
                key = (info.st_dev, info.st_ino)
            except OSError:
                key = None
            if key is not None and key in _HELD:
                _HELD[key][1] += 1
            else:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                info = os.fstat(fd)
                key = (info.st_dev, info.st_ino)
                if key in _HELD:
                    # the path changed files between stat and open, to one already held:
                    # closing this descriptor would drop the held connections' locks
                    _HELD[key][1] += 1
                    _orphans.append(fd)
                else:
                    _HELD[key] = [fd, 1]
            self.key: tuple[int, int] | None = key

    def read(self, size: int) -> bytes:
        """The file's first ``size`` bytes."""
        if self.key is None:
            raise ValueError("the hold was released")
        with _HELD_LOCK:
            fd = _HELD[self.key][0]
            if hasattr(os, "pread"):
                return os.pread(fd, size, 0)
            os.lseek(fd, 0, os.SEEK_SET)  # pragma: no cover - Windows
            return os.read(fd, size)  # pragma: no cover

    def release(self) -> None:
        """Let go (after the holder's SQLite connection closed); the last one closes the
        descriptor. Releasing twice does nothing."""
        with _HELD_LOCK:
            if self.key is None:
                return
            entry = _HELD[self.key]
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[self.key]
                os.close(entry[0])
            self.key = None


#: descriptors that could not be closed without dropping a live connection's locks (a file
#: replaced under its path while held); kept open until the process ends
_orphans: list[int] = []


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
    """The ``.npy`` bytes of ``array`` (exactly what ``numpy.save`` writes). A C-contiguous
    array is joined to its header in one copy (``numpy.save`` into a BytesIO makes three:
    4 ms instead of 0.2 for a checkpoint's 784 x 500 float64 couplings)."""
    array = np.asarray(array)
    if not array.dtype.hasobject and array.flags.c_contiguous and array.size:
        header = io.BytesIO()
        try:  # format 1.0, as numpy.save writes it whenever the header fits
            np.lib.format.write_array_header_1_0(
                header, np.lib.format.header_data_from_array_1_0(array))
        except ValueError:
            pass
        else:
            return b"".join((header.getvalue(), memoryview(array).cast("B")))
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def from_npy(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def default_store_path(explicit: str | None = None, protocol_store: str | None = None) -> Path:
    """--store wins, then $LABEP_STORE, then the protocol's ``store`` field, then ./labep.db."""
    return Path(explicit or os.environ.get("LABEP_STORE") or protocol_store or "labep.db")
