"""``labep export``: a run's metrics, events, parameters and protocol in netCDF, parquet and
CSV files that pandas and xarray read back, with the same numbers, in a Python where labep
cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from labep.store.runs import RunStore

from .conftest import cli, tiny_xor, write_protocol

READER = r'''
import json, sys
sys.modules["labep"] = None  # labep is not importable here
import numpy as np, pandas as pd, xarray as xr
fmt, where = sys.argv[1], sys.argv[2]
if fmt == "netcdf":
    ds = xr.open_dataset(where, engine="scipy")
    out = {"loss": ds["loss"].values.tolist(), "step": ds["step"].values.tolist(),
           "test_accuracy": ds["test_accuracy"].values.tolist(),
           "epoch": ds["epoch"].values.tolist(), "W1": ds["param_W1"].values.tolist(),
           "protocol": json.loads(ds.attrs["protocol"]),
           "events": ds["event_kind"].values.astype(str).tolist()}
else:
    read = pd.read_parquet if fmt == "parquet" else pd.read_csv
    steps, epochs = read(f"{where}/steps.{fmt}"), read(f"{where}/epochs.{fmt}")
    params, events = read(f"{where}/parameters.{fmt}"), read(f"{where}/events.{fmt}")
    record = json.load(open(f"{where}/run.json"))
    w1 = params[params["name"] == "W1"].sort_values("flat_index")["value"].to_numpy()
    out = {"loss": steps["loss"].tolist(), "step": steps["step"].tolist(),
           "test_accuracy": epochs["test_accuracy"].tolist(),
           "epoch": epochs["epoch"].tolist(),
           "W1": w1.reshape(record["parameter_shapes"]["W1"]).tolist(),
           "protocol": record["protocol"], "events": events["kind"].tolist()}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("export")
    doc = tiny_xor(**{"training.epochs": 3, "evaluation.every_epochs": 1})
    path = write_protocol(folder / "p.yaml", doc)
    store = folder / "runs.db"
    assert cli("run", str(path), "--store", str(store), "--no-progress").exit_code == 0
    return store, RunStore(store).runs()[0]["id"]


@pytest.mark.parametrize("fmt", ["netcdf", "parquet", "csv"])
def test_an_export_reads_back_without_labep(finished_run, tmp_path: Path, fmt: str) -> None:
    store_path, run_id = finished_run
    out = tmp_path / ("run.nc" if fmt == "netcdf" else "run")
    result = cli("export", run_id, "--store", str(store_path), "--format", fmt,
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    read = subprocess.run([sys.executable, "-c", READER, fmt, str(out)], capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    got = json.loads(read.stdout)
    store = RunStore(store_path, create=False)
    steps, loss = store.metric_series(run_id, "loss")
    assert got["step"] == steps.tolist() and np.allclose(got["loss"], loss)
    _, accuracy = store.metric_series(run_id, "test_accuracy")
    assert got["epoch"] == [1, 2, 3] and np.allclose(got["test_accuracy"], accuracy)
    _, params = store.arrays(run_id, "checkpoint")
    np.testing.assert_array_equal(np.array(got["W1"]), params["W1"])
    assert got["protocol"] == store.summary(run_id)["protocol"]
    assert [event["kind"] for event in store.events(run_id)] == got["events"]


def test_an_export_never_overwrites(finished_run, tmp_path: Path) -> None:
    store_path, run_id = finished_run
    out = tmp_path / "taken.nc"
    out.write_text("mine")
    result = cli("export", run_id, "--store", str(store_path), "--out", str(out))
    assert result.exit_code == 1 and "exists" in result.stderr
    assert out.read_text() == "mine"
