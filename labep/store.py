"""The run store: one SQLite file (WAL) holding every run, readable with the standard library.

Tables (schema version in ``meta``):

- ``runs``: one row per run: protocol as run (JSON), labep version, bench name and identity,
  seed, status (running / completed / failed / interrupted), heartbeat, error and traceback.
- ``steps``: one row per committed training step; written in the same transaction as the
  step's ``metrics`` rows (name, value), so a step is either wholly there or not at all.
- ``arrays``: parameter snapshots (checkpoints) and other arrays, each a ``.npy`` blob
  (``numpy.load(io.BytesIO(blob))``; no pickle).
- ``events``: faults and notable events (unsettled phases, refused writes), with detail JSON.
"""

from __future__ import annotations

import io
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

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
    traceback TEXT
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
CREATE INDEX IF NOT EXISTS metrics_by_name ON metrics (run_id, name, step);
"""


class StoreError(RuntimeError):
    """The store cannot be opened or a run cannot be found."""


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
    import os

    return Path(explicit or os.environ.get("LABEP_STORE") or protocol_store or "labep.db")


class RunStore:
    """A SQLite run store. One connection per process; one transaction per committed step."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(f"no run store at {self.path}")
        parent = self.path.resolve().parent
        if not parent.is_dir():
            raise StoreError(f"cannot create the run store {self.path}: {parent} is not a folder")
        try:
            self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)  # idempotent: CREATE ... IF NOT EXISTS
            with self.transaction():
                self.db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
        except sqlite3.Error as err:
            raise StoreError(f"cannot open the run store {self.path}: {err}") from err
        version = int(self.db.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this labep "
                f"({SCHEMA_VERSION}); upgrade labep to read it"
            )

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
                "bench_name, seed, protocol) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
                (run_id, name, now, now, labep_version, bench_name, seed,
                 json.dumps(protocol, sort_keys=False)),
            )
        return run_id

    def set_bench_identity(self, run_id: str, identity: dict[str, str]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET bench_identity = ?, heartbeat = ? WHERE id = ?",
                       (json.dumps(identity), _now(), run_id))

    def commit_step(self, run_id: str, step: int, epoch: int, metrics: dict[str, float],
                    arrays: dict[str, np.ndarray] | None = None,
                    events: list[tuple[str, str, dict[str, Any]]] | None = None) -> None:
        """Commit one training step (its metrics, optional checkpoint arrays, events) at once."""
        now = _now()
        with self.transaction() as db:
            db.execute("INSERT INTO steps (run_id, step, epoch, time) VALUES (?, ?, ?, ?)",
                       (run_id, step, epoch, now))
            self._metrics(db, run_id, step, metrics)
            if arrays:
                self._arrays(db, run_id, step, "checkpoint", arrays)
            for kind, message, detail in events or ():
                db.execute(
                    "INSERT INTO events (run_id, step, time, kind, message, detail) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, step, now, kind, message, json.dumps(detail)),
                )
            db.execute("UPDATE runs SET heartbeat = ? WHERE id = ?", (now, run_id))

    def record_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        with self.transaction() as db:
            self._metrics(db, run_id, step, metrics)

    def save_arrays(self, run_id: str, step: int, kind: str,
                    arrays: dict[str, np.ndarray]) -> None:
        with self.transaction() as db:
            self._arrays(db, run_id, step, kind, arrays)

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
                "traceback = ? WHERE id = ?",
                (status, now, now, error, traceback, run_id),
            )

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
            "bench_identity, seed, protocol, error, traceback FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        keys = ("id", "name", "status", "created", "heartbeat", "finished", "labep_version",
                "bench_name", "bench_identity", "seed", "protocol", "error", "traceback")
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
            "steps": steps[0],
            "epochs": 0 if steps[1] is None else steps[1] + 1,
            "metrics": self.final_metrics(run_id),
        }
        if with_protocol:
            out["protocol"] = json.loads(run["protocol"])
            out["error"] = run["error"]
            out["traceback"] = run["traceback"]
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
