"""The write path: calibrated codes, rounding modes, range policy, verify, budget, records."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labep.hardware.bench import BenchSpec, OutOfRangeError, ParameterSpec
from labep.hardware.calibration import calibrate
from labep.hardware.write_path import (
    CodeMap,
    WriteBudgetError,
    WritePath,
    WritePolicy,
)
from labep.protocol.text import ProtocolError
from labep.run.assembly import build_bench, build_model
from labep.run.engine import Trainer
from labep.run.validate import bench_file_schema, load_bench_file, load_protocol
from labep.store.files import from_npy
from labep.store.runs import RunStore

from .conftest import cli, cli_json, tiny_xor, write_protocol

MISMATCHED = {"bits": 8, "gain_mismatch": 0.1, "offset_mismatch": 0.1, "nonlinearity": 0.05,
              "seed": 7}


def bench_file(tmp_path: Path, device: dict, sizes=(16, 32, 4)) -> Path:
    return write_protocol(tmp_path / "bench.yaml", {
        "bench": {"simulator": "hopfield",
                  "options": {"weight_range": 1.0, "bias_range": 1.0, "device": device}},
        "model": {"kind": "layered_hopfield", "sizes": list(sizes)},
    })


def realized_error_lsb(tmp_path: Path, store: Path, calibrated: bool) -> np.ndarray:
    """Write random values in the middle half of the range; |realized - requested| in LSB."""
    loaded = load_bench_file(bench_file(tmp_path, {**MISMATCHED, "readback_noise": 0.3}))
    bench = build_bench(loaded.protocol.bench, build_model(loaded.protocol.model))
    identity = bench.open()
    maps = {}
    if calibrated:
        with RunStore(store) as runs:
            record = runs.newest_calibration(identity.as_dict())
            assert record is not None
            maps = record.code_maps(bench)
    rng = np.random.default_rng(11)
    target = {s.name: rng.uniform(-0.5, 0.5, s.shape) for s in bench.spec.parameters}
    WritePath(bench, target, WritePolicy(out_of_range="clip"), maps).write_all()
    lsb = 2.0 / 255
    return np.concatenate([np.abs(bench.devices[n].values - v).ravel() / lsb
                           for n, v in target.items()])


def test_calibrated_writes_land_within_one_lsb(tmp_path: Path, store: Path) -> None:
    """10% gain and offset mismatch, 5% nonlinearity, noisy readback: after `labep calibrate`
    >= 99% of channels land within 1 LSB of the requested value; on the nominal map few do."""
    path = bench_file(tmp_path, {**MISMATCHED, "readback_noise": 0.3})
    result = cli("calibrate", str(path), "--store", str(store), "--no-progress")
    assert result.exit_code == 0, result.output
    calibrated = realized_error_lsb(tmp_path, store, calibrated=True)
    nominal = realized_error_lsb(tmp_path, store, calibrated=False)
    assert np.mean(calibrated <= 1.0) >= 0.99
    assert np.mean(nominal <= 1.0) < 0.5


def test_records_survive_restart_and_read_with_sqlite3(tmp_path: Path, store: Path) -> None:
    path = bench_file(tmp_path, MISMATCHED)
    first = cli_json("calibrate", str(path), "--store", str(store), "--no-progress", "--json")
    second = cli_json("calibrate", str(path), "--store", str(store), "--no-progress", "--json")
    listing = cli_json("calibrations", "--store", str(store), "--json")
    assert [c["id"] for c in listing] == [first["id"], second["id"]]
    assert listing[0]["superseded_by"] == second["id"] and listing[1]["superseded_by"] is None
    db = sqlite3.connect(store)
    rows = db.execute("SELECT id, serial, residual_rms_lsb, superseded_by FROM calibrations "
                      "ORDER BY created").fetchall()
    assert [r[0] for r in rows] == [first["id"], second["id"]]
    assert rows[0][1] == "hopfield-16-32-4-device7"
    blob = db.execute("SELECT npy FROM calibration_arrays WHERE calibration_id = ? AND "
                      "parameter = 'W1' AND name = 'measured'", (second["id"],)).fetchone()[0]
    assert from_npy(blob).shape == (17, 16, 32)  # the raw sweep: codes x channels
    with RunStore(store) as reopened:
        record = reopened.calibration(second["id"])
        assert record.parameters["W1"].gain.shape == (16, 32)
        assert reopened.newest_calibration(record.identity).id == second["id"]


def quantized_xor(seed: int = 7, **writes) -> dict:
    doc = tiny_xor(**{"training.epochs": 1})
    doc["bench"]["options"] = {"weight_range": 2.0, "bias_range": 2.0,
                               "device": {**MISMATCHED, "seed": seed}}
    doc["writes"] = {"out_of_range": "clip", **writes}
    return doc


def test_runs_use_the_newest_calibration_and_record_it(tmp_path: Path, store: Path) -> None:
    path = write_protocol(tmp_path / "p.yaml", quantized_xor())
    cli_json("calibrate", str(path), "--store", str(store), "--no-progress", "--json")
    newest = cli_json("calibrate", str(path), "--store", str(store), "--no-progress", "--json")
    assert cli("run", str(path), "--store", str(store), "--no-progress").exit_code == 0
    shown = cli_json("show", "latest", "--store", str(store), "--json")
    assert shown["calibration"] == newest["id"]
    assert shown["writes"]["counts"]["W1"] == shown["steps"] + 1  # + the initial write
    assert sum(shown["writes"]["code_histograms"]["W1"]) == 2 * 8


def test_calibration_of_another_bench_is_refused(tmp_path: Path, store: Path) -> None:
    other = write_protocol(tmp_path / "other.yaml", quantized_xor(seed=8))
    record = cli_json("calibrate", str(other), "--store", str(store), "--no-progress", "--json")
    path = write_protocol(tmp_path / "p.yaml", quantized_xor(calibration=record["id"]))
    result = cli("run", str(path), "--store", str(store), "--no-progress")
    assert result.exit_code == 1 and "not to this bench" in result.stderr
    assert cli_json("show", "latest", "--store", str(store), "--json")["status"] == "failed"


def test_uncalibrated_run_uses_the_nominal_map(tmp_path: Path, store: Path) -> None:
    path = write_protocol(tmp_path / "p.yaml", quantized_xor())
    assert cli("run", str(path), "--store", str(store), "--no-progress").exit_code == 0
    assert cli_json("show", "latest", "--store", str(store), "--json")["calibration"] is None


# -- the write path against a recording bench -----------------------------------------------


class RecordingBench:
    """A bench that stores codes and remembers every payload it was handed."""

    def __init__(self, levels: int, shape=(5, 3), low=-1.0, high=1.0) -> None:
        self.spec = BenchSpec((ParameterSpec("W", shape, low, high, levels=levels),), 1, 1,
                              (0, 1))
        self.received: list[np.ndarray] = []
        self.held = np.zeros(shape, dtype=np.int64)

    def write(self, params):
        codes = np.asarray(params["W"])
        self.received.append(codes.copy())
        self.held = codes.copy()

    def read_params(self):
        return {"W": self.held.copy()}


finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.integers(1, 12),
    rounding=st.sampled_from(["nearest", "stochastic", "error_feedback"]),
    policy=st.sampled_from(["refuse", "clip"]),
    gain=st.floats(0.5, 1.5), offset=st.floats(-0.3, 0.3), bow=st.floats(-0.2, 0.2),
    flip=st.booleans(),
    updates=st.lists(st.one_of(finite, st.floats(-2, 2), st.just(float("nan"))),
                     min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_no_out_of_range_code_ever_reaches_the_bench(bits, rounding, policy, gain, offset,
                                                      bow, flip, updates, seed) -> None:
    levels = 2 ** bits
    bench = RecordingBench(levels)
    spec = bench.spec.parameters[0]
    rng = np.random.default_rng(seed)
    u = np.linspace(0, 1, levels)
    response = -1 + 2 * (u + 4 * bow * u * (1 - u))
    code_map = CodeMap(spec, gain * (1 + 0.1 * rng.standard_normal(spec.shape)),
                       offset + 0.05 * rng.standard_normal(spec.shape),
                       response[::-1] if flip else response)
    path = WritePath(bench, {"W": np.zeros(spec.shape)},
                     WritePolicy(rounding=rounding, out_of_range=policy), {"W": code_map}, rng)
    with contextlib.suppress(OutOfRangeError):
        path.write_all()
    for size in updates:
        delta = size * rng.standard_normal(spec.shape)
        before = len(bench.received)
        try:
            path.apply({"W": delta})
        except OutOfRangeError:
            assert len(bench.received) == before, "a refused write reached the bench"
    for codes in bench.received:
        assert codes.dtype.kind == "i"
        assert codes.min() >= 0 and codes.max() <= levels - 1


def test_rounding_modes_on_average(tmp_path: Path) -> None:
    """A value a third of the way between two codes: nearest always writes the lower code,
    stochastic and error feedback hit it on average over repeated writes."""
    levels = 17
    averages = {}
    for rounding in ("nearest", "stochastic", "error_feedback"):
        bench = RecordingBench(levels, shape=(200,))
        spec = bench.spec.parameters[0]
        lsb = 2.0 / (levels - 1)
        value = np.full(spec.shape, 3 * lsb + lsb / 3)
        path = WritePath(bench, {"W": value}, WritePolicy(rounding=rounding),
                         rng=np.random.default_rng(0))
        for _ in range(300):
            path.apply({"W": np.zeros(spec.shape)})
        realized = np.mean([CodeMap.ideal(spec).value(c) for c in bench.received], axis=0)
        averages[rounding] = float(np.mean(np.abs(realized - value)) / lsb)
    assert averages["nearest"] == pytest.approx(1 / 3, abs=1e-9)
    assert averages["stochastic"] < 0.05 and averages["error_feedback"] < 0.01


def test_without_shadow_nearest_loses_sub_lsb_updates() -> None:
    """Updates of a quarter LSB: with the bench as the only copy, nearest rounding never moves
    a code; stochastic rounding and error feedback follow the updates on average."""
    levels = 65
    lsb = 2.0 / (levels - 1)
    moved = {}
    for rounding in ("nearest", "stochastic", "error_feedback"):
        bench = RecordingBench(levels, shape=(200,))
        path = WritePath(bench, {"W": np.zeros(200)},
                         WritePolicy(rounding=rounding, shadow=False), rng=np.random.default_rng(1))
        path.write_all()
        for _ in range(20):
            path.apply({"W": np.full(200, lsb / 4)})
        moved[rounding] = float(np.mean(path.shadow["W"]) / lsb)  # expected: 20 / 4 = 5 LSB
    assert moved["nearest"] == 0.0
    assert moved["stochastic"] == pytest.approx(5, abs=0.5)
    assert moved["error_feedback"] == pytest.approx(5, abs=0.5)


def test_clip_is_counted_and_refuse_raises() -> None:
    bench = RecordingBench(16)
    wide = {"W": np.full((5, 3), 1.5)}
    with pytest.raises(OutOfRangeError, match="cannot realize"):
        WritePath(bench, wide).write_all()
    assert bench.received == []
    path = WritePath(bench, wide, WritePolicy(out_of_range="clip"))
    report = path.write_all()
    assert report.clipped == 15 and path.clipped_total == 15
    assert np.all(bench.received[-1] == 15)


def test_accumulate_and_budget() -> None:
    bench = RecordingBench(256)
    path = WritePath(bench, {"W": np.zeros((5, 3))}, WritePolicy(accumulate=3, write_budget=4))
    path.write_all()
    step = {"W": np.full((5, 3), 0.02)}
    for _ in range(6):
        path.apply(step)
    assert len(bench.received) == 1 + 2  # one write per three updates
    np.testing.assert_allclose(path.shadow["W"], 0.12)
    assert path.writes["W"] == 3
    path.apply(step)
    assert len(bench.received) == 3 and path.pending == 1
    path.flush()
    assert len(bench.received) == 4 and path.pending == 0
    with pytest.raises(WriteBudgetError, match="write budget of 4"):
        for _ in range(3):
            path.apply(step)
    assert len(bench.received) == 4, "the budget stops before the write"


def test_verify_stops_on_large_mismatch(tmp_path: Path, store: Path) -> None:
    doc = quantized_xor(verify=True, verify_stop_fraction=0.01, calibration="none")
    path = write_protocol(tmp_path / "p.yaml", doc)
    result = cli("run", str(path), "--store", str(store), "--no-progress")
    assert result.exit_code == 1 and "write-verify" in result.stderr
    shown = cli_json("show", "latest", "--store", str(store), "--json")
    assert shown["status"] == "failed" and "WriteVerifyError" in shown["error"]


def test_verify_metrics_recorded(store: Path) -> None:
    doc = quantized_xor(verify=True)
    with RunStore(store) as runs:
        result = Trainer(load_protocol(doc), runs, progress=False).run()
        _, mismatch = runs.metric_series(result.run_id, "write_mismatch_mean_lsb")
    assert len(mismatch) == result.steps and np.all(mismatch > 0)


# -- the simulated device -------------------------------------------------------------------


def test_device_truth_is_reproducible_and_documented_fields_are_off_by_default() -> None:
    doc = {"bench": {"simulator": "hopfield", "options": {"weight_range": 1, "bias_range": 1,
                                                          "device": MISMATCHED}},
           "model": {"kind": "layered_hopfield", "sizes": [3, 4, 2]}}
    protocols = [load_protocol(doc, schema=bench_file_schema()) for _ in range(2)]
    benches = [build_bench(p.protocol.bench, build_model(p.protocol.model)) for p in protocols]
    np.testing.assert_array_equal(benches[0].devices["W1"].gain, benches[1].devices["W1"].gain)
    ideal = build_bench(load_protocol(tiny_xor()).protocol.bench,
                        build_model(load_protocol(tiny_xor()).protocol.model))
    assert ideal.devices is None and ideal.options.device.ideal_readout


def test_mismatch_without_bits_is_refused() -> None:
    doc = tiny_xor()
    doc["bench"]["options"]["device"] = {"gain_mismatch": 0.1}
    with pytest.raises(ProtocolError, match=r"bench.options.device.*set 'bits'"):
        load_protocol(doc)
    doc["bench"]["options"]["device"] = {"bits": 4}
    with pytest.raises(ProtocolError, match="finite weight_range"):
        load_protocol(doc)


def test_readout_noise_and_resolution() -> None:
    base = tiny_xor()
    base["bench"]["options"]["device"] = {"readout_bits": 2}
    loaded = load_protocol(base).protocol
    bench = build_bench(loaded.bench, build_model(loaded.model))
    bench.write(build_model(loaded.model).init_params(np.random.default_rng(0)))
    from labep.hardware.bench import Settle

    state = bench.relax(np.array([[1.0, 0.0]]), settle=Settle(1e-9, 500)).state
    assert set(np.round(state.ravel() * 3, 9)) <= {0.0, 1.0, 2.0, 3.0}


def test_calibrate_refuses_continuous_bench(tmp_path: Path, store: Path) -> None:
    path = write_protocol(tmp_path / "p.yaml", tiny_xor())
    result = cli("calibrate", str(path), "--store", str(store), "--no-progress")
    assert result.exit_code == 1 and "no quantized parameters" in result.stderr


def test_calibration_routine_recovers_the_truth() -> None:
    doc = {"bench": {"simulator": "hopfield", "options": {"weight_range": 1, "bias_range": 1,
                                                          "device": MISMATCHED}},
           "model": {"kind": "layered_hopfield", "sizes": [6, 5, 3]}}
    protocol = load_protocol(doc, schema=bench_file_schema()).protocol
    bench = build_bench(protocol.bench, build_model(protocol.model))
    record = calibrate(bench, bench.open(), "hopfield", progress=False)
    for name, device in bench.devices.items():
        codes = np.arange(device.spec.levels)
        fitted = record.parameters[name].code_map(device.spec)
        for code in codes[::17]:
            held = np.full(device.spec.shape, code)
            # exact at the swept codes; between them phi is interpolated: a 5% bow and 17 points
            # give up to ~0.07 LSB
            np.testing.assert_allclose(fitted.value(held), device.realize(held),
                                       atol=0.1 * device.lsb)
