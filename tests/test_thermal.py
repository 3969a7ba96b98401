"""Thermal EP: Boltzmann samplers, the finite-nudge and thermal-covariance estimators against
exact gradients by enumeration, training without output clamping, and validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labep.ep import thermal
from labep.ep.estimators import FiniteNudge, ThermalCovariance
from labep.hardware.bench import Nudge, Settle
from labep.models.hopfield import LayeredHopfield
from labep.models.oim import LayeredOIM
from labep.protocol.text import ProtocolError
from labep.run.engine import Trainer
from labep.run.gradcheck import compare
from labep.run.validate import load_protocol
from labep.simulators.hopfield import HopfieldSimulator, HopfieldSimulatorOptions
from labep.simulators.oim import OIMSimulator, OIMSimulatorOptions
from labep.store.runs import RunStore

from .conftest import (
    PROTOCOLS,
    cli,
    cli_json,
    crash_and_resume,
    protocol_doc,
    tiny_xor,
    write_protocol,
)
from .test_resume import same_params

XOR_INPUTS = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_LABELS = np.array([0, 1, 1, 0])
TEMPERATURE = 0.5


def flat(grads: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.ravel(grads[name]) for name in names])


def binary_bench(readouts_seed: int = 0, **options: Any
                 ) -> tuple[LayeredHopfield, dict[str, np.ndarray], HopfieldSimulator]:
    """A 2-3-2 network of binary units at T = 0.5 (5 free units: 32 states to enumerate)."""
    model = LayeredHopfield([2, 3, 2], init_gain=2.0)
    params = model.init_params(np.random.default_rng(1))
    settings = {"dtype": "float64", "temperature": TEMPERATURE, "units": "binary",
                "burn_in": 100, "thin": 1, "device": {"seed": readouts_seed}, **options}
    bench = HopfieldSimulator(model, HopfieldSimulatorOptions.model_validate(settings))
    bench.open()
    bench.write(params)
    return model, params, bench


# -- samplers -------------------------------------------------------------------------------


def test_heat_bath_samples_the_boltzmann_distribution() -> None:
    model, params, bench = binary_bench()
    target = model.encode_target(XOR_LABELS)
    for beta in (0.0, 2.0):
        nudge = None if beta == 0.0 else Nudge(beta, target)
        phase = bench.relax(XOR_INPUTS, nudge, settle=Settle(1e-4, 1, readouts=100_000,
                                                             samples=True))
        assert phase.samples is not None and phase.samples.shape == (100_000, 4, 5)
        assert phase.info["temperature"] == TEMPERATURE and phase.all_converged
        _, exact, _ = thermal.enumerate_binary(model, params, XOR_INPUTS, target, beta,
                                               TEMPERATURE)
        codes = (phase.samples @ (2 ** np.arange(5)[::-1])).astype(int)
        for sample in range(4):
            histogram = np.bincount(codes[:, sample], minlength=32) / codes.shape[0]
            assert np.max(np.abs(histogram - exact[sample])) < 0.006


def truncated_gaussian_moments(mean: float, variance: float) -> tuple[float, float]:
    """Mean and variance of N(mean, variance) restricted to [0, 1], by quadrature."""
    grid = np.linspace(0.0, 1.0, 20_001)
    density = np.exp(-(grid - mean) ** 2 / (2 * variance))
    density /= np.trapezoid(density, grid)
    first = np.trapezoid(grid * density, grid)
    return first, np.trapezoid((grid - first) ** 2 * density, grid)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_langevin_in_the_box_matches_the_truncated_gaussian(beta: float) -> None:
    """One output unit, E = s^2/2 - h s (+ beta/2 (s - y)^2) on [0, 1]: p(s) is a Gaussian of
    mean (h + beta y) / (1 + beta) and variance T / (1 + beta), truncated to the box."""
    model = LayeredHopfield([1, 1])
    h, y, temperature = 0.3, 1.0, 0.1
    options = HopfieldSimulatorOptions(dtype="float64", temperature=temperature,
                                       langevin_step=0.01, burn_in=500, thin=5)
    bench = HopfieldSimulator(model, options)
    bench.open()
    bench.write({"W1": np.zeros((1, 1)), "b1": np.array([h])})
    nudge = None if beta == 0.0 else Nudge(beta, np.full((16, 1), y))
    phase = bench.relax(np.zeros((16, 1)), nudge,
                        settle=Settle(1e-4, 1, readouts=4000, samples=True))
    values = phase.samples.ravel()
    assert values.min() >= 0.0 and values.max() <= 1.0
    mean, variance = truncated_gaussian_moments((h + beta * y) / (1 + beta),
                                                temperature / (1 + beta))
    assert abs(values.mean() - mean) < 0.01
    assert abs(values.var() / variance - 1.0) < 0.05


def test_oim_phase_noise_samples_the_von_mises_distribution() -> None:
    """One oscillator with an in-phase bias h: p(phi) ~ exp(h cos(phi) / T)."""
    model = LayeredOIM([1, 1])
    h, temperature = 0.5, 0.25
    bench = OIMSimulator(model, OIMSimulatorOptions(dtype="float64", dt=0.02,
                                                    phase_noise=temperature, burn_in=500,
                                                    thin=25))
    bench.open()
    bench.write({"J1": np.zeros((1, 1)), "h1": np.array([h]), "g1": np.zeros(1)})
    phase = bench.relax(np.zeros((64, 1)), settle=Settle(1e-4, 1, readouts=300,
                                                         samples=True))
    grid = np.linspace(-np.pi, np.pi, 20_001)
    density = np.exp(h * np.cos(grid) / temperature)
    exact = np.trapezoid(np.cos(grid) * density, grid) / np.trapezoid(density, grid)
    assert phase.info["temperature"] == temperature
    assert abs(np.cos(phase.samples).mean() - exact) < 0.03
    # without samples asked, the noisy settle to tolerance is what it always was
    assert bench.relax(np.zeros((2, 1)), settle=Settle(1e-4, 5)).samples is None


def test_samples_are_deterministic_given_the_seed() -> None:
    runs = []
    for _ in range(2):
        _, _, bench = binary_bench(readouts_seed=7)
        runs.append(bench.relax(XOR_INPUTS, settle=Settle(1e-4, 1, readouts=50,
                                                          samples=True)).samples)
    assert np.array_equal(runs[0], runs[1])


def test_zero_temperature_is_the_deterministic_settle() -> None:
    model = LayeredHopfield([2, 5, 2])
    params = model.init_params(np.random.default_rng(0))
    states = []
    for options in (HopfieldSimulatorOptions(dtype="float64"),
                    HopfieldSimulatorOptions(dtype="float64", temperature=0.0,
                                             units="continuous")):
        assert options.temperature == 0.0
        bench = HopfieldSimulator(model, options)
        bench.open()
        bench.write(params)
        phase = bench.relax(XOR_INPUTS, settle=Settle(1e-10, 1000, samples=True))
        assert phase.samples is None and phase.all_converged
        states.append(phase.state)
    assert np.array_equal(states[0], states[1])
    assert model.residual(XOR_INPUTS, states[0], params).max() <= 1e-9


# -- estimators against exact gradients -------------------------------------------------------


def test_finite_nudge_identity_by_enumeration() -> None:
    """(<dE/dtheta>_beta - <dE/dtheta>_0) / beta is the gradient of (F_beta - F_0) / beta."""
    model, params, _ = binary_bench()
    target = model.encode_target(XOR_LABELS)
    names = list(params)
    reference = np.zeros(model.state_size)
    for beta in (0.1, 1.0, 10.0):
        nudged = thermal.enumerated_mean_gradient(model, params, XOR_INPUTS, target, beta,
                                                  TEMPERATURE, reference)
        free = thermal.enumerated_mean_gradient(model, params, XOR_INPUTS, target, 0.0,
                                                TEMPERATURE, reference)
        exact = thermal.exact_free_energy_gradient(model, params, XOR_INPUTS, target, beta,
                                                   TEMPERATURE)
        np.testing.assert_allclose((flat(nudged, names) - flat(free, names)) / beta,
                                   flat(exact, names), atol=1e-7)


@pytest.mark.parametrize(("beta", "readouts"), [(0.1, 800_000), (1.0, 100_000),
                                               (10.0, 50_000)])
def test_finite_nudge_matches_the_free_energy_gradient(beta: float, readouts: int) -> None:
    """The estimator on heat-bath samples vs the exact gradient of (F_beta - F_0) / beta
    (central differences of the enumerated free energies). The signal shrinks with beta, so
    the small nudge needs more samples (with common noise for the two phases)."""
    model, params, bench = binary_bench(common_noise=True)
    target = model.encode_target(XOR_LABELS)
    settle = Settle(1e-4, 1, readouts=readouts, samples=True)
    free = bench.relax(XOR_INPUTS, settle=settle)
    nudged = bench.relax(XOR_INPUTS, Nudge(beta, target), start=free.state, settle=settle)
    estimator = FiniteNudge()
    assert estimator.strengths(beta, None) == [beta]
    estimate = estimator.estimate(model, XOR_INPUTS, free, [nudged], [beta], np.ones(4),
                                  target=target)
    exact = thermal.exact_free_energy_gradient(model, params, XOR_INPUTS, target, beta,
                                               TEMPERATURE)
    names = list(exact)
    assert compare(flat(estimate.gradient, names), flat(exact, names)).cosine >= 0.99
    metrics = estimate.metrics()
    assert metrics["estimate_readouts"] == readouts and 0 < metrics["estimate_rel_stderr"] < 0.2


def test_thermal_covariance_matches_the_expected_cost_gradient() -> None:
    """-(1/T) Cov(C, dE/dtheta) from free-phase samples vs d<C>/dtheta by enumeration."""
    model, params, bench = binary_bench()
    target = model.encode_target(XOR_LABELS)
    free = bench.relax(XOR_INPUTS, settle=Settle(1e-4, 1, readouts=200_000, samples=True))
    estimator = ThermalCovariance()
    assert estimator.strengths(0.5, None) == []
    estimate = estimator.estimate(model, XOR_INPUTS, free, [], [], np.ones(4), target=target)
    exact = thermal.exact_cost_gradient(model, params, XOR_INPUTS, target, TEMPERATURE)
    names = list(exact)
    assert compare(flat(estimate.gradient, names), flat(exact, names)).cosine >= 0.99
    # the standard error is honest: the error is within a few standard errors
    error = flat(estimate.gradient, names) - flat(exact, names)
    stderr = flat(estimate.stderr, names)
    assert np.sqrt(np.mean((error / stderr) ** 2)) < 3.0


def test_thermal_covariance_tends_to_deterministic_ep_at_low_temperature() -> None:
    """As T -> 0 the Boltzmann distribution concentrates on the fixed point: the gradient of
    <C> tends to dC/dtheta through the Hessian at the free fixed point (continuous units)."""
    model = LayeredHopfield([2, 5, 2])
    params = model.init_params(np.random.default_rng(2))
    target = model.encode_target(XOR_LABELS)
    exact_bench = HopfieldSimulator(model, HopfieldSimulatorOptions(dtype="float64"))
    exact_bench.open()
    exact_bench.write(params)
    fixed_point = exact_bench.relax(XOR_INPUTS, settle=Settle(1e-12, 10_000)).state
    exact = model.exact_gradient(XOR_INPUTS, fixed_point, target, params)
    bench = HopfieldSimulator(model, HopfieldSimulatorOptions(
        dtype="float64", temperature=0.001, langevin_step=0.02, burn_in=1000, thin=5))
    bench.open()
    bench.write(params)
    free = bench.relax(XOR_INPUTS, settle=Settle(1e-4, 1, readouts=20_000, samples=True))
    estimate = ThermalCovariance().estimate(
        model, XOR_INPUTS, free, [], [], np.ones(4), target=target)
    names = list(exact)
    assert compare(flat(estimate.gradient, names), flat(exact, names)).cosine >= 0.95


def test_same_seed_same_thermal_run(store: Path) -> None:
    loaded = load_protocol(PROTOCOLS / "thermal_xor.yaml", ["training.epochs=3",
                                                           "phases.readout_average=20"])
    with RunStore(store) as runs:
        first = Trainer(loaded, runs, progress=False).run()
        second = Trainer(loaded, runs, progress=False).run()
        losses = [runs.metric_series(run.run_id, "loss")[1] for run in (first, second)]
    assert list(losses[0]) == list(losses[1]) and len(losses[0]) == 3


def test_a_crashed_thermal_run_resumes_to_identical_parameters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The samplers' noise keys come from the bench's saved generator: a resumed run draws
    the same samples as one never interrupted."""
    doc = tiny_xor(**{"bench.options": {"dtype": "float64", "temperature": 0.3,
                                        "units": "binary", "burn_in": 20,
                                        "common_noise": True},
                      "phases": {"readout_average": 20},
                      "estimator": {"name": "finite_nudge", "beta": 1.0},
                      "training.checkpoint_every": 3})
    with RunStore(tmp_path / "clean.db") as clean:
        expected = Trainer(load_protocol(doc), clean, progress=False).run()
        store, run, resumed = crash_and_resume(doc, tmp_path / "crash.db", monkeypatch)
        assert resumed.status == "completed" and resumed.steps == expected.steps
        same_params(clean, expected.run_id, store, run["id"])
        store.close()


def test_thermal_estimators_refuse_phases_without_samples() -> None:
    model, _params, bench = binary_bench()
    free = bench.relax(XOR_INPUTS, settle=Settle(1e-4, 1, readouts=10))
    with pytest.raises(ValueError, match="sample sets"):
        ThermalCovariance().estimate(
            model, XOR_INPUTS, free, [], [], np.ones(4), target=model.encode_target(XOR_LABELS))


def test_gradcheck_compares_thermal_estimators_with_enumeration(tmp_path: Path) -> None:
    doc = tiny_xor(**{"bench.options": {"dtype": "float64", "temperature": 0.5,
                                        "units": "binary", "burn_in": 100, "thin": 1},
                      "model.sizes": [2, 3, 2], "model.init_gain": 2.0,
                      "phases": {"readout_average": 100_000},
                      "estimator": {"name": "thermal_covariance"}})
    path = write_protocol(tmp_path / "binary.yaml", doc)
    report = cli_json("gradcheck", str(path), "--json")
    assert report["estimator"] == "thermal_covariance" and report["readouts"] == 100_000
    assert report["cosine"] >= 0.99 and report["estimate_rel_stderr"] < 0.1
    report = cli_json("gradcheck", str(path), "--estimator", "finite_nudge", "--beta", "10",
                      "--json")
    assert report["cosine"] >= 0.99
    # continuous units have no enumeration: refused, exit 3
    result = cli("gradcheck", str(PROTOCOLS / "thermal_xor.yaml"))
    assert result.exit_code == 3 and "units: binary" in result.stderr


# -- training without output clamping ---------------------------------------------------------


def run_never_nudged(protocol: Any, store: Path, monkeypatch: pytest.MonkeyPatch
                     ) -> tuple[Any, list[Any]]:
    """Run a protocol, recording the nudge of every phase the simulator is asked for."""
    nudges: list[Any] = []
    relax = HopfieldSimulator.relax

    def recording(self: HopfieldSimulator, inputs: Any, nudge: Any = None, *args: Any,
                  **kwargs: Any) -> Any:
        nudges.append(nudge)
        return relax(self, inputs, nudge, *args, **kwargs)

    monkeypatch.setattr(HopfieldSimulator, "relax", recording)
    with RunStore(store) as runs:
        result = Trainer(protocol, runs, progress=False).run()
        metrics = {name: runs.metric_series(result.run_id, name)[1]
                   for name in ("estimate_rel_stderr", "estimate_readouts")}
    return (result, metrics), nudges


def test_thermal_xor_learns_without_output_clamping(store: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_protocol(PROTOCOLS / "thermal_xor.yaml")
    (result, metrics), nudges = run_never_nudged(loaded, store, monkeypatch)
    assert result.test_accuracy == 1.0
    assert nudges and all(nudge is None for nudge in nudges)  # never a nudged phase
    assert len(metrics["estimate_rel_stderr"]) == result.steps
    assert set(metrics["estimate_readouts"]) == {1000.0}


@pytest.mark.slow
def test_thermal_digits_learns_without_output_clamping(store: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_protocol(PROTOCOLS / "thermal_digits.yaml")
    (result, _), nudges = run_never_nudged(loaded, store, monkeypatch)
    assert all(nudge is None for nudge in nudges)
    assert result.test_accuracy >= 0.93  # 0.955 with the protocol as shipped (seed 0)


def test_finite_nudge_trains(store: Path) -> None:
    """The finite-nudge estimator runs through the engine (one nudged phase a step)."""
    doc = tiny_xor(**{"bench.options": {"dtype": "float64", "temperature": 0.2, "burn_in": 50},
                      "phases": {"readout_average": 50},
                      "estimator": {"name": "finite_nudge", "beta": 1.0},
                      "training.epochs": 1})
    with RunStore(store) as runs:
        result = Trainer(load_protocol(doc), runs, progress=False).run()
        _, nudged_steps = runs.metric_series(result.run_id, "nudged_steps")
    assert result.status == "completed" and result.steps == 8
    assert all(value == 50 + 50 * 2 for value in nudged_steps)


# -- validation -------------------------------------------------------------------------------


def refused(doc: dict[str, Any]) -> str:
    with pytest.raises(ProtocolError) as caught:
        load_protocol(doc)
    return str(caught.value)


def test_negative_temperature_is_refused() -> None:
    message = refused(tiny_xor(**{"bench.options.temperature": -0.1}))
    assert "bench.options.temperature" in message


def test_binary_units_need_a_temperature() -> None:
    assert "temperature > 0" in refused(tiny_xor(**{"bench.options.units": "binary"}))


def test_thermal_estimator_on_a_bench_at_zero_temperature_is_refused(tmp_path: Path) -> None:
    """Refused at validation, before any bench is opened and before the store is created."""
    doc = protocol_doc("thermal_xor.yaml")
    doc["bench"]["options"]["temperature"] = 0.0
    store = tmp_path / "never.db"
    result = cli("run", str(write_protocol(tmp_path / "p.yaml", doc)), "--store", str(store),
                 "--no-progress")
    assert result.exit_code == 2
    assert "thermal_covariance takes Boltzmann samples at a temperature T > 0" in result.stderr
    assert not store.exists()


def test_thermal_estimator_needs_a_sampling_bench_and_readouts() -> None:
    doc = tiny_xor(**{"estimator.name": "finite_nudge"})
    doc["bench"] = {"simulator": "polariton"}
    doc["model"] = {"kind": "polariton", "lattice": [4], "inputs": 2, "input_sites": [0, 1],
                    "output_sites": [2, 3]}
    assert "cannot return samples" in refused(doc)
    message = refused(tiny_xor(**{"estimator.name": "thermal_covariance",
                                  "bench.options.temperature": 0.1}))
    assert "phases.readout_average" in message


def test_a_sample_set_too_large_to_hold_is_refused() -> None:
    message = refused(tiny_xor(**{"estimator.name": "thermal_covariance",
                                  "bench.options.temperature": 0.1,
                                  "model.sizes": [2, 5000, 2], "training.batch_size": 100,
                                  "phases.readout_average": 1000}))
    assert "phases.readout_average" in message and "GiB per phase" in message
