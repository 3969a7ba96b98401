"""Reading runs back from the run store: listings, summaries, sample accounting, link
quality, metric series, arrays and events."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import numpy as np

from labep.store.files import SAMPLE_COUNTS, StoreError, _alive, from_npy


class RunQueries:
    """The read side of a store (a mixin of :class:`labep.store.runs.RunStore`: ``db`` is its
    connection)."""

    db: sqlite3.Connection

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

    def resume_point(self, run_id: str) -> tuple[int, dict[str, Any]] | None:
        """The newest resume point of a run: (step, engine state)."""
        row = self.db.execute("SELECT step, state FROM resume_points WHERE run_id = ? "
                              "ORDER BY step DESC LIMIT 1", (run_id,)).fetchone()
        return None if row is None else (int(row[0]), json.loads(row[1]))

    def events(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT step, time, kind, message, detail FROM events WHERE run_id = ? ORDER BY rowid",
            (self.resolve(run_id),),
        ).fetchall()
        return [{"step": s, "time": t, "kind": k, "message": m,
                 "detail": json.loads(d) if d else None} for s, t, k, m, d in rows]
