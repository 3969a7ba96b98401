"""The emulated polariton bench (the simulator behind SCPI on loopback sockets) through
pyvisa-py: the instruments' own refusals, the bench's states against the simulator's, a whole
protocol through bench + emulator ending with the simulator's potentials, the interlock, and
``labep emulate polariton-bench``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import pyvisa

from labep.drivers.polariton_bench import PolaritonBench, PolaritonBenchOptions
from labep.hardware.bench import BenchFaultError, Nudge, Settle
from labep.models.polariton import PolaritonLattice
from labep.run.assembly import build_model
from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.simulators.device import DeviceOptions
from labep.simulators.polariton import PolaritonSimulator, PolaritonSimulatorOptions
from labep.simulators.polariton_emulator import EmulatorConfig, PolaritonBenchEmulator
from labep.store.runs import RunStore

from .conftest import PROTOCOLS

XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)


@pytest.fixture
def emulator() -> Iterator[PolaritonBenchEmulator]:
    protocol = load_protocol(PROTOCOLS / "polariton_bench_xor.yaml").protocol
    emu = PolaritonBenchEmulator(EmulatorConfig.from_protocol(
        protocol, slm_bits=16, potential_mev=(-8.0, 8.0))).start()
    yield emu
    emu.close()


def sessions(emu: PolaritonBenchEmulator) -> tuple[object, object, object]:
    manager = pyvisa.ResourceManager("@py")
    return tuple(manager.open_resource(f"TCPIP::127.0.0.1::{emu.port + k}::SOCKET",
                                       read_termination="\n", write_termination="\n",
                                       timeout=2000) for k in range(3))


def test_the_emulated_instruments_refuse_what_hardware_refuses(emulator) -> None:
    slm, camera, laser = sessions(emulator)
    assert slm.query("*IDN?").startswith("labep,SLM-EMU")  # type: ignore[attr-defined]
    slm.write("SLM:PATT " + ",".join(["65536"] * 9))  # type: ignore[attr-defined]
    assert slm.query("SYST:ERR?").startswith("-222")  # type: ignore[attr-defined]
    assert slm.query("SLM:PATT?") == ",".join(["32768"] * 9)  # type: ignore[attr-defined]
    laser.write("SOUR:POW 501")  # type: ignore[attr-defined]
    assert laser.query("SYST:ERR?").startswith("-222")  # type: ignore[attr-defined]
    emulator.set_interlock(False)
    laser.write("OUTP 1")  # type: ignore[attr-defined]
    assert laser.query("SYST:ERR?").startswith("-221")  # type: ignore[attr-defined]
    assert laser.query("OUTP?") == "0"  # type: ignore[attr-defined]
    emulator.set_interlock(True)
    laser.write("SOUR:POW 90")  # type: ignore[attr-defined]
    laser.write("OUTP 1")  # type: ignore[attr-defined]
    # the three instruments are separate sockets: a query orders the laser before the camera
    assert laser.query("OUTP?") == "1"  # type: ignore[attr-defined]
    camera.write("INIT")  # type: ignore[attr-defined]
    assert camera.query("*OPC?") == "1"  # type: ignore[attr-defined]
    frame = np.array(camera.query("FETC?").split(","), dtype=float)  # type: ignore
    assert frame.size == 18 and np.all(frame[:9] > 0.1)  # a condensate formed
    assert emulator.condensate.last_residual <= 1e-12
    for session in (slm, camera, laser):
        session.close()  # type: ignore[attr-defined]


def test_bench_states_match_the_simulator_with_the_same_grid(emulator) -> None:
    """The emulator serves the bench protocol's physics; the simulator runs the same model on
    the same 16-bit grid: the same codes give the same free and nudged intensities."""
    model = build_model(load_protocol(PROTOCOLS / "polariton_bench_xor.yaml").protocol.model)
    bench = PolaritonBench(model, PolaritonBenchOptions(margin=2.0), resource=emulator.url)
    bench.open()
    simulator = PolaritonSimulator(model, PolaritonSimulatorOptions(
        potential_range=(-8.0, 8.0), margin=2.0, device=DeviceOptions(bits=16)))
    assert bench.spec == simulator.spec
    spec = simulator.spec.parameter("V")
    potentials = np.array([0.5, -0.3, -4.0, 0.4, 0.2, 0.7, -4.1, -0.4, 0.3])
    codes = np.rint((potentials - spec.low) / (spec.high - spec.low) * (spec.levels - 1))
    bench.write({"V": codes.astype(np.int64)})
    simulator.write({"V": codes.astype(np.int64)})
    target = model.encode_target(np.array([0, 1, 1, 0]))
    ours = bench.relax(XOR, settle=Settle(1e-9, 10))
    theirs = simulator.relax(XOR, settle=Settle(1e-11, 200_000))
    assert ours.all_converged
    np.testing.assert_allclose(model.intensities(ours.state), model.intensities(theirs.state),
                               atol=1e-8)
    for beta in (0.05, -0.05):
        a = bench.relax(XOR, Nudge(beta, target), start=ours.state, settle=Settle(1e-9, 10))
        b = simulator.relax(XOR, Nudge(beta, target), start=theirs.state,
                            settle=Settle(1e-11, 200_000))
        np.testing.assert_allclose(model.intensities(a.state), model.intensities(b.state),
                                   atol=1e-8)
    assert bench.drain_faults() == []
    bench.close()
    assert not emulator.condensate.emitting


def test_a_protocol_through_the_bench_ends_with_the_simulators_potentials(emulator,
                                                                           tmp_path) -> None:
    """Same protocol, seed and modulator grid, noise off: the codes the bench run ends with
    are the simulator run's."""
    epochs = ["training.epochs=8", "evaluation.every_epochs=8"]
    bench_run = load_protocol(PROTOCOLS / "polariton_bench_xor.yaml",
                              [f"bench.resource={emulator.url}", *epochs])
    simulator_run = load_protocol(PROTOCOLS / "polariton_xor.yaml", [
        "bench.options.device.bits=16", "bench.options.potential_range=[-8.0, 8.0]",
        "bench.options.margin=2.0", "phases.free.tolerance=1e-11",
        "phases.nudged.tolerance=1e-11", "phases.free.max_steps=200000",
        "phases.nudged.max_steps=200000", *epochs])
    results = {}
    with RunStore(tmp_path / "runs.db") as store:
        for label, loaded in (("bench", bench_run), ("simulator", simulator_run)):
            result = Trainer(loaded, store, progress=False).run()
            assert result.status == "completed"
            _, codes = store.arrays(result.run_id, "codes")
            _, first = store.arrays(result.run_id, "codes", step=0)
            _, shadow = store.arrays(result.run_id, "checkpoint")
            assert np.any(codes["V"] != first["V"])  # training moved the potentials
            results[label] = (result, codes["V"], shadow["V"])
    (bench_result, bench_codes, bench_shadow), (sim_result, sim_codes, sim_shadow) = (
        results["bench"], results["simulator"])
    assert bench_result.steps == sim_result.steps == 8
    np.testing.assert_array_equal(bench_codes, sim_codes)
    np.testing.assert_allclose(bench_shadow, sim_shadow, atol=1e-6)
    assert bench_result.test_accuracy == sim_result.test_accuracy


@pytest.mark.slow
def test_the_bench_protocol_learns_xor_through_the_emulator(emulator, tmp_path) -> None:
    """polariton_bench_xor.yaml as shipped (about 20 s), through pyvisa-py and the emulated
    instruments: 100% on the four XOR points, the laser off at the end."""
    loaded = load_protocol(PROTOCOLS / "polariton_bench_xor.yaml",
                           [f"bench.resource={emulator.url}"])
    with RunStore(tmp_path / "runs.db") as store:
        result = Trainer(loaded, store, progress=False).run()
    assert result.status == "completed" and result.steps == 300
    assert result.test_accuracy == 1.0
    assert not emulator.condensate.emitting


def test_opening_the_interlock_stops_the_run_with_the_laser_off(emulator) -> None:
    model = PolaritonLattice([9], 2, [0, 8], [3, 5], input_potential=1.5)
    bench = PolaritonBench(model, PolaritonBenchOptions(timeout=1.0), resource=emulator.url)
    bench.open()
    bench.relax(XOR[:1], settle=Settle(1e-9, 10))
    emulator.set_interlock(False)
    with pytest.raises(BenchFaultError) as caught:
        bench.relax(XOR[:1], settle=Settle(1e-9, 10))
    assert caught.value.fault.kind == "interlock"
    assert not emulator.condensate.emitting
    assert bench.laser.output is False  # type: ignore[union-attr]
    bench.close()


def test_labep_emulate_polariton_bench_cli() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "labep.cli.main", "emulate", "polariton-bench", "--tcp", "0",
         "--protocol", str(PROTOCOLS / "polariton_bench_xor.yaml"), "--seed", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("TCPIP::127.0.0.1::") and url.endswith("::SOCKET")
        model = PolaritonLattice([9], 2, [0, 8], [3, 5])
        bench = PolaritonBench(model, PolaritonBenchOptions(), resource=url)
        identity = bench.open()
        assert identity.serial.startswith("slm:EMU-SLM-0002")
        assert bench.relax(XOR[:2], settle=Settle(1e-9, 10)).all_converged
        bench.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode == 0
