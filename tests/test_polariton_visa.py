"""The VISA polariton bench through pyvisa-sim (the definitions shipped in labep.drivers):
declared limits, the error queue as faults, and the safety rules: the laser is switched off
first, it is never on while the modulator's pattern is out of its limits or unverified, and any
error leaves it off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from labep.drivers.polariton_bench import (
    SIM_RESOURCES,
    PolaritonBench,
    PolaritonBenchOptions,
    sim_definitions,
)
from labep.hardware.bench import (
    BenchError,
    BenchFaultError,
    FaultReporting,
    OutOfRangeError,
    Settle,
)
from labep.models.polariton import PolaritonLattice
from labep.protocol.text import ProtocolError
from labep.run.validate import load_protocol

from .conftest import PROTOCOLS

XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
FRAMES = Settle(1e-6, 5)


def model(**changes: float) -> PolaritonLattice:
    return PolaritonLattice([9], 2, [0, 8], [3, 5], **changes)


def sim_file(tmp_path: Path, *edits: tuple[str, str]) -> str:
    """A copy of the shipped definitions with text replacements (a faulty instrument)."""
    text = Path(sim_definitions()).read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "faulty.yaml"
    path.write_text(text)
    return f"{path}@sim"


def opened(resource: str = "@sim", **changes: float) -> PolaritonBench:
    bench = PolaritonBench(model(**changes), PolaritonBenchOptions(timeout=0.5, backoff=0.0),
                           resource=resource)
    bench.open()
    return bench


def laser_commands(bench: PolaritonBench) -> list[str]:
    assert bench.laser is not None
    return [c for c in bench.laser.history if c.startswith("OUTP")]


def test_the_definitions_ship_with_the_package() -> None:
    assert Path(sim_definitions()).is_file()
    assert set(SIM_RESOURCES) == {"slm", "camera", "laser"}


def test_open_turns_the_laser_off_first_and_reads_the_modulator() -> None:
    bench = opened()
    assert bench.laser is not None and bench.slm is not None
    first = next(c for c in bench.laser.history if c != "*CLS")
    assert first == "OUTP 0"
    assert bench.laser.output is False
    (spec,) = bench.spec.parameters
    lsb = 8.0 / 1023
    margin_levels = round(1.5 / lsb)
    assert spec.levels == 1024 - 2 * margin_levels
    assert spec.low == pytest.approx(-4.0 + margin_levels * lsb)
    assert bench.laser.power == pytest.approx(90.0)  # P = 0.9 at 0.01 per mW
    assert isinstance(bench, FaultReporting)
    bench.close()


def test_write_and_read_back_codes() -> None:
    bench = opened()
    codes = np.arange(300, 309)
    bench.write({"V": codes})
    np.testing.assert_array_equal(bench.read_params()["V"], codes)
    sent = len(bench.slm.history)  # type: ignore[union-attr]
    with pytest.raises(OutOfRangeError):
        bench.write({"V": np.full(9, bench.spec.parameters[0].levels)})
    with pytest.raises(OutOfRangeError):
        bench.write({"V": np.full(9, 300.5)})
    assert len(bench.slm.history) == sent  # type: ignore[union-attr]  # nothing was sent
    bench.close()


def test_relax_reads_intensities_and_phases_and_leaves_the_laser_off() -> None:
    bench = opened()
    free = bench.relax(XOR, settle=FRAMES)
    assert free.all_converged and np.all(free.steps == 2)  # two equal frames
    intensities = bench.model.intensities(free.state)
    np.testing.assert_allclose(intensities[0], [0.21, 0.34, 0.52, 0.61, 0.66, 0.61, 0.52,
                                                0.34, 0.21])
    psi = bench.model.field(free.state)
    np.testing.assert_allclose(np.angle(psi[0, 1:5]), [0.1, 0.2, 0.3, 0.4], atol=1e-12)
    assert laser_commands(bench)[-2:] == ["OUTP 0", "OUTP?"]
    assert bench.laser.output is False  # type: ignore[union-attr]
    assert bench.drain_faults() == []
    bench.close()


def test_a_pattern_out_of_limits_is_never_sent_and_the_laser_stays_off() -> None:
    bench = opened(input_potential=5.0)  # +5 J on the input sites: beyond the modulator
    slm_writes = [c for c in bench.slm.history if c.startswith("SLM:PATT ")]  # type: ignore
    with pytest.raises(OutOfRangeError, match="grey levels"):
        bench.relax(XOR, settle=FRAMES)
    assert [c for c in bench.slm.history if c.startswith("SLM:PATT ")] == slm_writes  # type: ignore
    assert "OUTP 1" not in laser_commands(bench)
    assert bench.laser.output is False  # type: ignore[union-attr]
    bench.close()


def test_a_modulator_that_does_not_hold_the_pattern_keeps_the_laser_off(tmp_path) -> None:
    """A stuck modulator (reads back 512 everywhere): the first pattern that differs is
    caught by the read-back, before emission."""
    stuck = ",".join(["512"] * 9)
    resource = sim_file(tmp_path, ('      - q: "SLM:SIZE?"',
                                   f'      - q: "SLM:PATT?"\n        r: "{stuck}"\n'
                                   '      - q: "SLM:SIZE?"'))
    bench = opened(resource)  # the rest pattern is all 512: it verifies
    bench.write({"V": np.full(9, 320)})  # 320 + 192 = 512 again
    with pytest.raises(BenchFaultError) as caught:
        bench.relax(XOR[1:2], settle=FRAMES)  # the input changes pixel 8
    assert caught.value.fault.kind == "verify"
    assert "OUTP 1" not in laser_commands(bench)
    assert bench.laser.output is False  # type: ignore[union-attr]
    bench.close()


def test_a_modulator_reporting_levels_out_of_limits_is_refused(tmp_path) -> None:
    bad = ",".join(["2000"] + ["512"] * 8)
    resource = sim_file(tmp_path, ('      - q: "SLM:SIZE?"',
                                   f'      - q: "SLM:PATT?"\n        r: "{bad}"\n'
                                   '      - q: "SLM:SIZE?"'))
    bench = PolaritonBench(model(), PolaritonBenchOptions(timeout=0.5), resource=resource)
    with pytest.raises(BenchFaultError) as caught:
        bench.open()
    assert caught.value.fault.kind == "limits"
    assert "OUTP 1" not in laser_commands(bench)
    assert laser_commands(bench)[0] == "OUTP 0"


def test_an_open_interlock_refuses_emission(tmp_path) -> None:
    resource = sim_file(tmp_path, ("      interlock:\n        default: 1",
                                   "      interlock:\n        default: 0"))
    bench = opened(resource)
    with pytest.raises(BenchFaultError) as caught:
        bench.relax(XOR, settle=FRAMES)
    assert caught.value.fault.kind == "interlock"
    assert "OUTP 1" not in laser_commands(bench)
    assert bench.laser.output is False  # type: ignore[union-attr]
    bench.close()


def test_a_camera_failure_after_emission_leaves_the_laser_off(tmp_path) -> None:
    resource = sim_file(tmp_path, ('r: "0.21,0.34,0.52,0.61,0.66,0.61,0.52,0.34,0.21,0.0,',
                                   'r: "0.21,0.34,0.0,'))
    bench = opened(resource)
    with pytest.raises(BenchFaultError) as caught:
        bench.relax(XOR, settle=FRAMES)
    assert caught.value.fault.kind == "garbled"
    commands = laser_commands(bench)
    assert "OUTP 1" in commands  # it was on when the camera failed
    assert commands[commands.index("OUTP 1") + 1:].count("OUTP 0") >= 1
    assert bench.laser.output is False  # type: ignore[union-attr]
    bench.close()
    assert laser_commands(bench)[-2:] == ["OUTP 0", "OUTP?"]  # close: off, confirmed


def test_instrument_errors_are_reported_as_faults() -> None:
    bench = opened()
    bench.laser.write("SOUR:POW 9999")  # type: ignore[union-attr]  # beyond the laser's 500 mW
    bench.check_instruments()
    faults = bench.drain_faults()
    assert len(faults) == 1
    fault = faults[0]
    assert fault.kind == "instrument_error" and fault.instrument.startswith("laser")
    assert fault.detail["code"] == -100 and fault.recovered
    assert bench.drain_faults() == []
    bench.close()


def test_settings_refuse_values_outside_their_limits_before_sending() -> None:
    bench = opened()
    sent = len(bench.laser.history)  # type: ignore[union-attr]
    with pytest.raises(OutOfRangeError, match="mW"):
        bench.laser.power = 600.0  # type: ignore[union-attr]  # the laser reports 500 mW max
    with pytest.raises(OutOfRangeError):
        bench.camera.exposure = 20.0  # type: ignore[union-attr]
    assert len(bench.laser.history) == sent  # type: ignore[union-attr]
    with pytest.raises(OutOfRangeError):
        PolaritonBench(model(pump=9.0), PolaritonBenchOptions(timeout=0.5),
                       resource="@sim").open()  # 900 mW asked at open
    bench.close()


def test_a_query_without_reply_is_retried_then_reported() -> None:
    bench = opened()
    bench.laser.retries = 1  # type: ignore[union-attr]
    bench.laser.resource.timeout = 50  # type: ignore[union-attr]
    with pytest.raises(BenchFaultError) as caught:
        bench.laser.query("BOGUS?")  # type: ignore[union-attr]
    assert caught.value.fault.kind == "timeout"
    retried = [f for f in bench.drain_faults() if f.kind == "timeout"]
    assert len(retried) == 1 and retried[0].recovered
    bench.close()


def test_the_bench_protocol_validates_and_needs_a_resource() -> None:
    load_protocol(PROTOCOLS / "polariton_bench_xor.yaml", ['bench.resource="@sim"'])
    doc = load_protocol(PROTOCOLS / "polariton_bench_xor.yaml").document
    del doc["bench"]["resource"]
    with pytest.raises(ProtocolError, match="resource"):
        load_protocol(doc)


def test_protocol_defined_safe_potential_on_open_error_and_close(tmp_path) -> None:
    """``bench.options.safe_values: {V: v}``: the modulator displays v (nearest level) on
    open, after any error (laser off first) and on close."""
    bench = PolaritonBench(model(), PolaritonBenchOptions(
        timeout=0.5, backoff=0.0, safe_values={"V": 0.5}), resource=sim_file(tmp_path))
    bench.open()
    assert bench.slm is not None and bench.laser is not None and bench.camera is not None
    (spec,) = bench.spec.parameters
    safe = np.full(9, round((0.5 - spec.low) / bench.lsb))
    np.testing.assert_array_equal(bench.read_params()["V"], safe)
    bench.write({"V": np.arange(300, 309)})

    def broken() -> None:
        raise BenchFaultError("the camera stopped answering", kind="timeout",
                              instrument="camera", command="FETC?")

    acquire, bench.camera.acquire = bench.camera.acquire, broken  # type: ignore[method-assign]
    with pytest.raises(BenchFaultError, match="camera stopped"):
        bench.relax(XOR, settle=FRAMES)
    assert bench.laser.output is False
    np.testing.assert_array_equal(bench.read_params()["V"], safe)
    bench.camera.acquire = acquire  # type: ignore[method-assign]
    bench.write({"V": np.arange(300, 309)})
    bench.relax(XOR, settle=FRAMES)
    bench.close()
    shown = [c for c in bench.slm.history if c.startswith("SLM:PATT ")]
    assert shown[-1] == "SLM:PATT " + ",".join(str(int(g)) for g in safe + bench.margin_levels)
    assert laser_commands(bench)[-2:] == ["OUTP 0", "OUTP?"]


def test_a_safe_potential_out_of_range_or_unknown_is_refused_with_the_laser_off(
        tmp_path) -> None:
    with pytest.raises(BenchError, match="safe_values: no parameter 'W'"):
        PolaritonBench(model(), PolaritonBenchOptions(safe_values={"W": 0.0}), resource="@sim")
    bench = PolaritonBench(model(), PolaritonBenchOptions(timeout=0.5, safe_values={"V": 3.9}),
                           resource=sim_file(tmp_path))
    with pytest.raises(OutOfRangeError, match="safe_values"):
        bench.open()
    assert laser_commands(bench)[:2] == ["OUTP 0", "OUTP?"]  # off first, confirmed
    assert "OUTP 1" not in laser_commands(bench)


def test_a_resource_manager_or_open_resources_handed_in_are_the_transport() -> None:
    """``transport``: a pyvisa ResourceManager (the bench opens the instruments named in
    ``options.resources`` and closes them) or open resources by role (the caller's: left
    open); either relaxes as through ``resource="@sim"``."""
    import pyvisa

    reference = opened()
    expected = reference.relax(XOR, settle=FRAMES).state
    reference.close()
    manager = pyvisa.ResourceManager(f"{sim_definitions()}@sim")
    options = PolaritonBenchOptions(timeout=0.5, backoff=0.0, resources=SIM_RESOURCES)
    bench = PolaritonBench(model(), options, transport=manager)
    bench.open()
    np.testing.assert_array_equal(bench.relax(XOR, settle=FRAMES).state, expected)
    bench.close()
    sessions = {role: manager.open_resource(name, read_termination="\n",
                                            write_termination="\n", timeout=500)
                for role, name in SIM_RESOURCES.items()}
    bench = PolaritonBench(model(), PolaritonBenchOptions(timeout=0.5, backoff=0.0),
                           transport=sessions)
    bench.open()
    np.testing.assert_array_equal(bench.relax(XOR, settle=FRAMES).state, expected)
    bench.close()
    assert bench.laser is not None and bench.laser.output is False
    assert sessions["laser"].query("*IDN?")  # the caller's session is still open
    with pytest.raises(BenchError, match="exactly the roles"):
        PolaritonBench(model(), transport={"laser": sessions["laser"]})


def test_errors_left_in_a_queue_by_an_earlier_session_are_not_taken_for_this_one() -> None:
    """``*CLS`` does not empty every instrument's error queue (pyvisa-sim's, some real ones):
    open empties it and logs what it found as recovered, and the bench opens."""
    import pyvisa

    manager = pyvisa.ResourceManager(f"{sim_definitions()}@sim")
    earlier = manager.open_resource(SIM_RESOURCES["laser"], read_termination="\n",
                                    write_termination="\n", timeout=500)
    earlier.write("SOUR:POW 900")  # above the limit: a queued command error, never read
    earlier.write("SOUR:POW 901")
    earlier.close()
    options = PolaritonBenchOptions(timeout=0.5, backoff=0.0, resources=SIM_RESOURCES)
    bench = PolaritonBench(model(), options, transport=manager)
    bench.open()
    assert bench.laser is not None and bench.laser.power == pytest.approx(90.0)
    stale = [f for f in bench.drain_faults() if f.kind == "instrument_error"]
    assert len(stale) == 2 and all(f.recovered for f in stale)
    assert all("before *CLS" in f.command for f in stale)
    bench.close()
