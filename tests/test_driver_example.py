"""The example driver of docs/writing-a-driver.md (docs/examples/crossbar_board.py), run
against a fake transport: a crossbar board emulated behind a pyserial-like object, with the
Hopfield simulator as its physics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from labep.hardware.bench import BenchFaultError, Nudge, OutOfRangeError, Settle
from labep.models.hopfield import LayeredHopfield
from labep.simulators.hopfield import HopfieldSimulator, HopfieldSimulatorOptions

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "crossbar_board.py"


def example():
    spec = importlib.util.spec_from_file_location("crossbar_board", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeCrossbar:
    """A pyserial-like port: ``write`` a command line, ``readline`` its reply."""

    def __init__(self, model: LayeredHopfield, fail: str = "") -> None:
        self.sim = HopfieldSimulator(model, HopfieldSimulatorOptions(dtype="float64"))
        self.held = {n: np.zeros(s) for n, s in model.parameter_shapes().items()}
        self.sent: list[str] = []
        self.replies: list[bytes] = []
        self.is_open, self.fail = True, fail

    def close(self) -> None:
        self.is_open = False

    def readline(self) -> bytes:
        return self.replies.pop(0)

    def write(self, data: bytes) -> None:
        line = data.decode().strip()
        self.sent.append(line)
        command, _, rest = line.partition(" ")
        if command == self.fail:
            reply = "ERR refused"
        elif command == "*IDN?":
            reply = "Example Lab,Crossbar 1,0042,1.0"
        elif command == "SET":
            name, values = rest.split(" ")
            self.held[name] = np.array(values.split(","), float).reshape(self.held[name].shape)
            reply = "OK"
        elif command == "GET":
            reply = ",".join(map(repr, self.held[rest].ravel().tolist()))
        else:  # RELAX
            x, beta, y, tolerance, max_steps = rest.split(";")
            self.sim.write(self.held)
            nudge = Nudge(float(beta), np.array([y.split(",")], float))
            out = self.sim.relax(np.array([x.split(",")], float), nudge,
                                 settle=Settle(float(tolerance), int(max_steps)))
            reply = (f"{out.steps[0]};{float(out.residual[0])!r};"
                     + ",".join(map(repr, out.state[0].tolist())))
        self.replies.append(reply.encode() + b"\n")


@pytest.fixture
def model() -> LayeredHopfield:
    return LayeredHopfield([3, 4, 2])


def board(model: LayeredHopfield, port: FakeCrossbar):
    module = example()
    return module.CrossbarBoard(model, module.CrossbarOptions(), transport=port)


def test_the_example_driver_reads_what_the_simulator_settles(model) -> None:
    port = FakeCrossbar(model)
    params = {n: 0.5 * v for n, v in model.init_params(np.random.default_rng(1)).items()}
    x = np.random.default_rng(2).uniform(0, 1, (3, 3))
    nudge = Nudge(0.5, np.eye(2)[[0, 1, 0]])
    with board(model, port) as bench:
        bench.write(params)
        for n, v in bench.read_params().items():
            np.testing.assert_array_equal(v, params[n])
        free = bench.relax(x, settle=Settle(1e-9, 500))
        nudged = bench.relax(x, nudge, start=free.state, settle=Settle(1e-9, 500))
    reference = HopfieldSimulator(model, HopfieldSimulatorOptions(dtype="float64"))
    reference.write(params)
    np.testing.assert_allclose(free.state, reference.relax(x, settle=Settle(1e-9, 500)).state)
    np.testing.assert_allclose(nudged.state, reference.relax(
        x, nudge, start=free.state, settle=Settle(1e-9, 500)).state)
    assert free.all_converged


def test_out_of_range_is_refused_before_sending_and_close_leaves_it_safe(model) -> None:
    port = FakeCrossbar(model)
    with pytest.raises(OutOfRangeError), board(model, port) as bench:
        bench.write({n: np.full(s, 0.3) for n, s in model.parameter_shapes().items()})
        sent = len(port.sent)
        bench.write({"W1": np.full((3, 4), 0.2), "b2": np.full(2, 1.5)})
    assert len(port.sent) > sent and not any("0.2" in line for line in port.sent[sent:])
    assert not port.is_open
    assert all(np.all(v == 0.0) for v in port.held.values())  # the safe state, after the error


def test_a_refusal_is_a_bench_fault_naming_the_command(model) -> None:
    with pytest.raises(BenchFaultError, match="RELAX"), board(model, FakeCrossbar(
            model, fail="RELAX")) as bench:
        bench.relax(np.zeros((1, 3)))
