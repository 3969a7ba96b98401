"""``labep export RUN``: a run's data in files that xarray and pandas open without labep.

What a run holds, in three tables and one record:

- ``steps``: one row per committed training step (``step``, ``epoch``, 1-based) and every
  metric that is recorded at each step (``loss``, ``samples_used``, write counters, ...);
- ``epochs``: one row per recorded epoch end (``epoch``, ``step``) and every other metric
  (``train_loss``, ``test_accuracy``, link counters, ...);
- ``events``: every event (faults, run start and end) with its step, time, kind, message and
  detail (JSON text);
- the newest checkpoint's parameters (and the codes the bench held), and the run record: the
  protocol as run, the bench and its identity, the status, as JSON.

Formats: ``netcdf`` (one file, xarray's ``scipy`` engine, netCDF-3: dimensions ``step``,
``epoch``, ``event`` and one per parameter axis; the record as attributes), ``parquet`` and
``csv`` (a folder: ``steps``, ``epochs``, ``events``, ``parameters`` in long form with
``name``, ``flat_index``, ``value``, and ``run.json``). pandas, xarray and pyarrow are the
``export`` extra (``pip install -e ".[export]"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from labep.store.runs import RunStore

Format = Literal["netcdf", "parquet", "csv"]
FORMATS: tuple[str, ...] = ("netcdf", "parquet", "csv")


class ExportError(RuntimeError):
    """The export cannot be written (a missing library, an existing output)."""


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as err:
        raise ExportError("labep export needs pandas (and xarray for netcdf, pyarrow for "
                          "parquet): pip install -e \".[export]\"") from err
    return pandas


def run_tables(store: RunStore, run_id: str) -> dict[str, Any]:
    """The run's ``steps``, ``epochs``, ``events`` and ``parameters`` as pandas DataFrames and
    its ``record`` as a JSON-ready dict."""
    pd = _pandas()
    run_id = store.resolve(run_id)
    steps = pd.read_sql_query("SELECT step, epoch + 1 AS epoch FROM steps WHERE run_id = ? "
                              "ORDER BY step",
                              store.db, params=(run_id,))
    long = pd.read_sql_query("SELECT step, name, value FROM metrics WHERE run_id = ?",
                             store.db, params=(run_id,))
    wide = long.pivot_table(index="step", columns="name", values="value", aggfunc="last",
                            dropna=False) if len(long) else pd.DataFrame()
    committed = set(steps["step"])
    per_step = [name for name in wide.columns
                if committed and set(wide.index[wide[name].notna()]) >= committed]
    step_table = steps.merge(wide[per_step], left_on="step", right_index=True, how="left")
    epoch_rows = wide[wide["epoch"].notna()] if "epoch" in wide.columns else wide.iloc[0:0]
    epoch_table = (epoch_rows.drop(columns=per_step).rename_axis(None, axis=1).reset_index()
                   .astype({"epoch": "int64"}) if len(epoch_rows) else
                   pd.DataFrame({"epoch": pd.Series(dtype="int64"),
                                 "step": pd.Series(dtype="int64")}))
    epoch_table = epoch_table[["epoch", "step", *[c for c in epoch_table.columns
                                                  if c not in ("epoch", "step")]]]
    events = pd.DataFrame([{**event, "detail": json.dumps(event["detail"])
                            if event["detail"] is not None else ""}
                           for event in store.events(run_id)],
                          columns=["step", "time", "kind", "message", "detail"])
    events["step"] = events["step"].fillna(-1).astype("int64")  # -1: no step
    snapshot = store.arrays(run_id, "checkpoint")
    params = snapshot[1] if snapshot else {}
    parameters = pd.DataFrame(
        [{"name": name, "flat_index": index, "value": float(value)}
         for name, array in sorted(params.items())
         for index, value in enumerate(np.asarray(array, dtype=float).ravel())],
        columns=["name", "flat_index", "value"])
    summary = store.summary(run_id)
    record = {"id": run_id, "name": summary["name"], "status": summary["status"],
              "bench": summary["bench"], "protocol": summary["protocol"],
              "checkpoint_step": snapshot[0] if snapshot else None,
              "parameter_shapes": {name: list(np.shape(a)) for name, a in params.items()}}
    step_table.columns.name = None
    return {"steps": step_table.reset_index(drop=True), "epochs": epoch_table,
            "events": events, "parameters": parameters, "record": record,
            "arrays": params}


def export_run(store: RunStore, run_id: str, fmt: Format, out: Path) -> Path:
    """Write run ``run_id`` to ``out`` (a ``.nc`` file, or a folder for parquet and csv);
    refuses to overwrite anything."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if out.exists():
        raise ExportError(f"{out} exists; refusing to overwrite it")
    tables = run_tables(store, run_id)
    if fmt == "netcdf":
        return _netcdf(tables, out)
    out.mkdir(parents=True)
    for name in ("steps", "epochs", "events", "parameters"):
        frame = tables[name]
        if fmt == "csv":
            frame.to_csv(out / f"{name}.csv", index=False)
        else:
            try:
                frame.to_parquet(out / f"{name}.parquet", index=False)
            except ImportError as err:
                raise ExportError("parquet needs pyarrow: pip install -e \".[export]\"") \
                    from err
    (out / "run.json").write_text(json.dumps(tables["record"], indent=2, default=str) + "\n")
    return out


def _netcdf(tables: dict[str, Any], out: Path) -> Path:
    try:
        import xarray as xr
    except ImportError as err:
        raise ExportError("netcdf needs xarray: pip install -e \".[export]\"") from err
    steps, epochs, events = tables["steps"], tables["epochs"], tables["events"]
    data: dict[str, Any] = {}
    for column in steps.columns.drop(["step"]):
        data[column if column != "epoch" else "step_epoch"] = ("step", steps[column].to_numpy())
    for column in epochs.columns.drop(["epoch"]):
        data[column if column != "step" else "epoch_step"] = ("epoch",
                                                              epochs[column].to_numpy())
    for column in events.columns:
        values = events[column].to_numpy()
        data[f"event_{column}"] = ("event", values if column == "step"
                                   else values.astype(str))
    for name, array in tables["arrays"].items():
        array = np.asarray(array, dtype=float)
        data[f"param_{name}"] = ([f"{name}_axis{k}" for k in range(array.ndim)], array)
    record = tables["record"]
    attrs = {"labep_run": record["id"], "name": record["name"], "status": record["status"],
             "bench": json.dumps(record["bench"]), "protocol": json.dumps(record["protocol"]),
             "checkpoint_step": -1 if record["checkpoint_step"] is None
             else int(record["checkpoint_step"])}
    dataset = xr.Dataset(data, coords={"step": steps["step"].to_numpy(),
                                       "epoch": epochs["epoch"].to_numpy()}, attrs=attrs)
    dataset.to_netcdf(out, engine="scipy")
    return out
