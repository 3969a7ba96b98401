"""Sweeps in the run store: a sweep's row, its trials (axis values, protocol document, the one
run each has), and the trials read back with their runs' final metrics."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from typing import Any

from labep.store.files import StoreError, _now


class SweepShelf:
    """The sweeps of a store (a mixin of :class:`labep.store.runs.RunStore`: ``db`` is its
    connection, ``transaction`` its write transaction)."""

    db: sqlite3.Connection

    def create_sweep(self, name: str, source: str, spec: dict[str, Any], axes: list[str],
                     trials: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
        """A new sweep and all its trials ((axis values, protocol document) each), at once."""
        sweep_id = "sw-" + time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        with self.transaction() as db:  # type: ignore[attr-defined]
            db.execute("INSERT INTO sweeps (id, name, created, source, spec, axes, trials) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (sweep_id, name, _now(), source, json.dumps(spec), json.dumps(axes),
                        len(trials)))
            db.executemany(
                "INSERT INTO sweep_trials (sweep_id, trial, axes, protocol) VALUES (?, ?, ?, ?)",
                [(sweep_id, index, json.dumps(values), json.dumps(doc))
                 for index, (values, doc) in enumerate(trials)])
        return sweep_id

    def resolve_sweep(self, sweep_id: str) -> str:
        """A sweep id, a unique prefix of one, or ``latest``."""
        if sweep_id == "latest":
            row = self.db.execute("SELECT id FROM sweeps ORDER BY created DESC LIMIT 1"
                                  ).fetchone()
            if row is None:
                raise StoreError(f"{self.path}: no sweeps yet")  # type: ignore[attr-defined]
            return str(row[0])
        rows = self.db.execute("SELECT id FROM sweeps WHERE id LIKE ? || '%'",
                               (sweep_id,)).fetchall()
        if len(rows) != 1:
            what = "no sweep" if not rows else f"{len(rows)} sweeps"
            raise StoreError(f"{self.path}: {what} matching {sweep_id!r}")  # type: ignore[attr-defined]
        return str(rows[0][0])

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        """A sweep's record: id, name, created, source, spec, axes, trials (count)."""
        sweep_id = self.resolve_sweep(sweep_id)
        row = self.db.execute("SELECT id, name, created, source, spec, axes, trials FROM sweeps "
                              "WHERE id = ?", (sweep_id,)).fetchone()
        return {"id": row[0], "name": row[1], "created": row[2], "source": row[3],
                "spec": json.loads(row[4]), "axes": json.loads(row[5]), "trials": row[6]}

    def sweep_trial(self, sweep_id: str, trial: int) -> dict[str, Any]:
        """One trial: its axis values, protocol document, run id (or None) and run status."""
        row = self.db.execute(
            "SELECT t.axes, t.protocol, t.run_id, r.status FROM sweep_trials t LEFT JOIN runs r "
            "ON r.id = t.run_id WHERE t.sweep_id = ? AND t.trial = ?",
            (sweep_id, trial)).fetchone()
        if row is None:
            raise StoreError(f"sweep {sweep_id} has no trial {trial}")
        return {"trial": trial, "axes": json.loads(row[0]), "protocol": json.loads(row[1]),
                "run_id": row[2], "status": row[3]}

    def sweep_trials(self, sweep_id: str, *, metrics: bool = True) -> list[dict[str, Any]]:
        """Every trial of a sweep in order: trial, axes, run_id, status (None: not started)
        and, with ``metrics``, its run's final metrics."""
        sweep_id = self.resolve_sweep(sweep_id)
        rows = self.db.execute(
            "SELECT t.trial, t.axes, t.run_id, r.status FROM sweep_trials t LEFT JOIN runs r "
            "ON r.id = t.run_id WHERE t.sweep_id = ? ORDER BY t.trial", (sweep_id,)).fetchall()
        out = []
        for trial, axes, run_id, status in rows:
            item: dict[str, Any] = {"trial": trial, "axes": json.loads(axes), "run_id": run_id,
                                    "status": status}
            if metrics:
                item["metrics"] = ({} if run_id is None
                                   else self.final_metrics(run_id))  # type: ignore[attr-defined]
            out.append(item)
        return out

    def sweep_counts(self, sweep_id: str) -> dict[str, int]:
        """How many trials of a sweep are completed, running, failed (failed or interrupted)
        and not started."""
        rows = self.db.execute(
            "SELECT r.status, COUNT(*) FROM sweep_trials t LEFT JOIN runs r ON r.id = t.run_id "
            "WHERE t.sweep_id = ? GROUP BY r.status", (sweep_id,)).fetchall()
        counts = {"completed": 0, "running": 0, "failed": 0, "pending": 0}
        for status, count in rows:
            key = {None: "pending", "interrupted": "failed"}.get(status, status)
            counts[key] += count
        return counts

    def sweeps(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT id FROM sweeps ORDER BY created").fetchall()
        return [self.sweep(row[0]) for row in rows]
