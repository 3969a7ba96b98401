"""Calibration records in the run store: saved, listed, looked up, never overwritten (a
newer record of the same bench supersedes an older one)."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from labep.store.files import StoreError, _now, from_npy, to_npy

if TYPE_CHECKING:
    from labep.hardware.calibration import CalibrationRecord


class CalibrationShelf:
    """The calibration records of a store (a mixin of :class:`labep.store.runs.RunStore`:
    ``db`` is its connection, ``transaction`` its write transaction)."""

    db: sqlite3.Connection

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
        from labep.hardware.calibration import CalibrationRecord, ParameterCalibration

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
