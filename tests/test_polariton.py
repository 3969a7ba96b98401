"""Polariton lattice: the model's physics and state layout, the numba simulator, the exact
gradient (implicit differentiation in the rotating frame) against finite differences,
near-equilibrium EP against the exact gradient as the dissipation goes to 0, imperfections,
and training through the engine."""

from __future__ import annotations

import numpy as np
import pytest

from labep.bench import Nudge, OutOfRangeError, Resumable, Settle
from labep.engine import Trainer
from labep.gradcheck import gradcheck
from labep.models.polariton import PolaritonLattice, lattice_neighbours
from labep.protocol import ProtocolError, load_protocol
from labep.simulators.device import DeviceOptions
from labep.simulators.polariton import PolaritonSimulator, PolaritonSimulatorOptions
from labep.store import RunStore

from .conftest import PROTOCOLS, cli_json

XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
XOR_LABELS = np.array([0, 1, 1, 0])
TIGHT = Settle(1e-11, 400_000)


def make(n: int = 6, seed: int = 0, relaxation: float = 0.0, **options) -> tuple[
        PolaritonLattice, PolaritonSimulator, dict[str, np.ndarray]]:
    model = PolaritonLattice([n], 2, [0, n - 1], [2, 3], energy_relaxation=relaxation)
    sim = PolaritonSimulator(model, PolaritonSimulatorOptions(**options))
    params = model.init_params(np.random.default_rng(seed))
    if sim.device is None:  # quantized storage takes codes: the test writes them
        sim.write(params)
    return model, sim, params


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_lattice_geometry_and_state_layout() -> None:
    table = lattice_neighbours((2, 3))  # 0 1 2 / 3 4 5
    assert sorted(table[4][table[4] >= 0].tolist()) == [1, 3, 5]
    assert sorted(table[0][table[0] >= 0].tolist()) == [1, 3]
    model = PolaritonLattice([6], 2, [0, 5], [3, 1])
    assert model.readout_order.tolist() == [0, 2, 4, 5, 3, 1]  # outputs last, by class
    assert model.output_slice == (8, 12) and model.state_size == 12
    psi = np.random.default_rng(0).standard_normal((2, 6)) + 1j
    state = model.pack(psi)
    np.testing.assert_array_equal(model.field(state), psi)
    np.testing.assert_allclose(model.output_intensities(state), np.abs(psi[:, [3, 1]]) ** 2)
    lo, hi = model.output_slice
    outputs = state[:, lo:hi]
    np.testing.assert_allclose(outputs[:, 0::2] ** 2 + outputs[:, 1::2] ** 2,
                               model.output_intensities(state))


def test_downsample_encoding_averages_blocks() -> None:
    model = PolaritonLattice([3, 3], 16, [0, 1, 2, 3], [7, 8], encoding="downsample",
                             image_shape=[4, 4], pool=2)
    image = np.arange(16, dtype=float).reshape(1, 16) / 15
    expected = image.reshape(2, 2, 2, 2).mean(axis=(1, 3)).reshape(1, 4)
    np.testing.assert_allclose(model.encode(image), expected)
    potentials = model.input_potentials(image)
    np.testing.assert_allclose(potentials[0, :4], model.input_potential * expected[0])
    assert np.all(potentials[0, 4:] == 0)


def test_conservative_part_is_the_energy_gradient() -> None:
    """h_E = dE/d(psi*): dE = 2 Re(h_E . dpsi*), checked along random directions."""
    model, _, params = make()
    rng = np.random.default_rng(1)
    psi = rng.standard_normal((2, 6)) + 1j * rng.standard_normal((2, 6))
    conservative_only = PolaritonLattice([6], 2, [0, 5], [2, 3], pump=0.0, loss=1e-300,
                                         saturation=0.0)
    x = XOR[1:3]
    force, mu = conservative_only.stationarity(x, psi, params)
    h = force + mu[:, None] * psi  # F = h_E - mu psi without dissipation
    for _ in range(3):
        d = rng.standard_normal((2, 6)) + 1j * rng.standard_normal((2, 6))
        eps = 1e-6
        numeric = (model.energy(x, model.pack(psi + eps * d), params)
                   - model.energy(x, model.pack(psi - eps * d), params)) / (2 * eps)
        np.testing.assert_allclose(numeric, 2 * np.real(np.sum(h * np.conj(d), axis=1)),
                                   rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("relaxation", [0.0, 0.4])
def test_kernel_settles_where_the_model_residual_vanishes(relaxation: float) -> None:
    model, sim, params = make(relaxation=relaxation)
    free = sim.relax(XOR, settle=TIGHT)
    assert free.all_converged and np.all(free.steps > 0)
    np.testing.assert_allclose(model.residual(XOR, free.state, params), free.residual,
                               rtol=1e-3, atol=1e-13)
    assert np.all(model.intensities(free.state) > 1e-3)  # a condensate, not the vacuum


def test_two_dimensional_grid_settles() -> None:
    model = PolaritonLattice([3, 3], 2, [0, 8], [2, 6])
    sim = PolaritonSimulator(model)
    params = model.init_params(np.random.default_rng(4))
    sim.write(params)
    free = sim.relax(XOR, settle=Settle(1e-10, 200_000))
    assert free.all_converged
    assert np.max(model.residual(XOR, free.state, params)) < 1e-9


def test_a_dead_condensate_never_counts_as_settled() -> None:
    model = PolaritonLattice([6], 2, [0, 5], [2, 3], pump=0.1, loss=0.3)  # below threshold
    sim = PolaritonSimulator(model)
    sim.write(model.init_params(np.random.default_rng(0)))
    free = sim.relax(XOR, settle=Settle(1e-8, 20_000))
    assert not free.converged.any()


@pytest.mark.parametrize("relaxation", [0.0, 0.4])
def test_exact_gradient_matches_finite_differences(relaxation: float) -> None:
    model, sim, params = make(seed=2, relaxation=relaxation)
    target = model.encode_target(XOR_LABELS)
    start = sim.relax(XOR, settle=TIGHT).state
    exact = model.exact_gradient(XOR, start, target, params)["V"]

    def cost(values: np.ndarray) -> float:
        sim.write({"V": values})
        return float(model.cost(sim.relax(XOR, start=start, settle=TIGHT).state, target).mean())

    for site in (0, 2, 4):
        step = np.zeros(6)
        step[site] = 1e-4  # central differences: O(h^2) error, well above the settle noise
        numeric = (cost(params["V"] + step) - cost(params["V"] - step)) / 2e-4
        assert numeric == pytest.approx(exact[site], rel=1e-5, abs=1e-8)


def test_a_uniform_potential_is_a_gauge_and_the_projection_removes_it() -> None:
    """Shifting every V_i by c only shifts mu: the exact gradient has no uniform part, the
    raw EP contrast has one, and the gauge projection removes exactly that."""
    model, sim, params = make(seed=3)
    target = model.encode_target(XOR_LABELS)
    free = sim.relax(XOR, settle=TIGHT)
    exact = model.exact_gradient(XOR, free.state, target, params)["V"]
    assert abs(exact.sum()) < 1e-6 * np.abs(exact).sum()
    beta = 1e-3
    plus = sim.relax(XOR, Nudge(beta, target), start=free.state, settle=TIGHT)
    minus = sim.relax(XOR, Nudge(-beta, target), start=free.state, settle=TIGHT)
    raw = PolaritonLattice([6], 2, [0, 5], [2, 3], gauge_projection=False)
    raw_estimate = raw.contrast(XOR, plus.state, minus.state, None, 1 / (2 * beta))["V"]
    projected = model.contrast(XOR, plus.state, minus.state, None, 1 / (2 * beta))["V"]
    assert abs(raw_estimate.mean()) > 1e-3
    np.testing.assert_allclose(projected, raw_estimate - raw_estimate.mean(), atol=1e-12)
    assert cosine(projected, exact) > cosine(raw_estimate, exact)
    assert cosine(projected, exact) > 0.95


def test_near_equilibrium_ep_approaches_the_exact_gradient_as_dissipation_vanishes() -> None:
    """The gradcheck table's claim, on two rows: strong dissipation (gamma = 0.9) is further
    from the exact gradient than weak dissipation (gamma = 0.03), which is close."""
    loaded = load_protocol(PROTOCOLS / "polariton_xor.yaml")
    cosines = {}
    for scale in (3.0, 0.1):
        doc = {**loaded.document, "model": {**loaded.document["model"],
                                            "pump": 0.9 * scale, "loss": 0.3 * scale,
                                            "saturation": 0.3 * scale}}
        protocol = load_protocol(doc).protocol
        cosines[scale] = [gradcheck(protocol, beta=1e-3, samples=4, seed=seed,
                                    max_steps=2_000_000)["cosine"] for seed in (0, 1)]
    assert min(cosines[0.1]) > 0.97
    assert np.mean(cosines[0.1]) > np.mean(cosines[3.0])


def test_gradcheck_cli_on_the_polariton_protocol() -> None:
    report = cli_json("gradcheck", str(PROTOCOLS / "polariton_xor.yaml"), "--beta", "0.001",
                      "--json")
    assert report["cosine"] > 0.97 and report["free_residual"] < 1e-9
    assert set(report["parameters"]) == {"V"}


def test_modulator_grid_codes_and_pattern_limits() -> None:
    """8-bit modulator over [-4, 4] J, margin 1.5 J: V's codes sit margin levels in; an input
    potential that pushes the pattern past the top grey level is refused before running."""
    model = PolaritonLattice([6], 2, [0, 5], [2, 3], input_potential=1.6)
    sim = PolaritonSimulator(model, PolaritonSimulatorOptions(
        potential_range=(-4.0, 4.0), margin=1.5, device=DeviceOptions(bits=8)))
    (spec,) = sim.spec.parameters
    lsb = 8.0 / 255
    margin_levels = round(1.5 / lsb)  # 48
    assert spec.levels == 256 - 2 * margin_levels
    assert spec.low == pytest.approx(-4.0 + margin_levels * lsb)
    codes = np.full(6, spec.levels - 1)  # V at the top of its range: grey level 207
    sim.write({"V": codes})
    np.testing.assert_array_equal(sim.read_params()["V"], codes)
    sim.relax(XOR[:1], settle=Settle(1e-6, 5000))  # no input: the pattern fits
    with pytest.raises(OutOfRangeError, match="grey levels"):
        sim.relax(XOR[1:2], settle=Settle(1e-6, 5000))  # + round(1.6 / lsb) = 51 levels
    with pytest.raises(OutOfRangeError):
        sim.write({"V": np.full(6, spec.levels)})


def test_continuous_pattern_limits_are_refused_before_running() -> None:
    model = PolaritonLattice([6], 2, [0, 5], [2, 3], input_potential=3.0)
    sim = PolaritonSimulator(model, PolaritonSimulatorOptions(potential_range=(-4.0, 4.0),
                                                              margin=1.5))
    sim.write({"V": np.full(6, 2.0)})
    with pytest.raises(OutOfRangeError, match="outside the modulator's range"):
        sim.relax(XOR[1:2])
    with pytest.raises(OutOfRangeError):
        sim.write({"V": np.full(6, 2.6)})  # beyond high - margin


def test_camera_bit_depth_noise_and_pump_fluctuations_are_seeded() -> None:
    def run(**options):
        model, sim, _ = make(seed=5, **options)
        return model, sim.relax(XOR, settle=Settle(1e-9, 100_000))

    model, ideal = run()
    _, coarse = run(device=DeviceOptions(readout_bits=4), intensity_full_scale=16.0)
    levels = model.intensities(coarse.state) / (16.0 / 15)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-9)
    _, noisy_a = run(device=DeviceOptions(readout_noise=0.01, seed=3), pump_noise=0.05)
    _, noisy_b = run(device=DeviceOptions(readout_noise=0.01, seed=3), pump_noise=0.05)
    _, noisy_c = run(device=DeviceOptions(readout_noise=0.01, seed=4), pump_noise=0.05)
    np.testing.assert_array_equal(noisy_a.state, noisy_b.state)
    assert not np.array_equal(noisy_a.state, noisy_c.state)
    assert not np.allclose(model.intensities(noisy_a.state), model.intensities(ideal.state))


def test_nudge_is_a_potential_step_on_the_outputs() -> None:
    model, sim, _ = make(seed=6)
    free = sim.relax(XOR, settle=TIGHT)
    target = model.encode_target(XOR_LABELS)
    step = model.nudge_potential(0.1, target, free.state)
    np.testing.assert_allclose(step[:, model.output_sites],
                               0.1 * (model.output_intensities(free.state) - target))
    assert np.all(np.delete(step, model.output_sites, axis=1) == 0)
    nudged = sim.relax(XOR, Nudge(0.1, target), start=free.state, settle=TIGHT)
    # a positive nudge pulls the outputs towards their targets
    before = np.abs(model.output_intensities(free.state) - target).sum()
    after = np.abs(model.output_intensities(nudged.state) - target).sum()
    assert after < before


def test_simulator_state_round_trips_for_resume() -> None:
    _, sim, _ = make(device=DeviceOptions(bits=8, gain_mismatch=0.02, write_noise=0.3,
                                          readout_noise=0.01, seed=2),
                     potential_range=(-4.0, 4.0), pump_noise=0.02)
    assert isinstance(sim, Resumable)
    sim.write({"V": np.full(6, 100)})
    meta, arrays = sim.save_state()
    first = sim.relax(XOR, settle=Settle(1e-8, 100_000)).state
    sim.write({"V": np.full(6, 120)})
    sim.load_state(meta, arrays)
    again = sim.relax(XOR, settle=Settle(1e-8, 100_000)).state
    np.testing.assert_array_equal(first, again)


def test_protocol_validation_names_the_offending_field() -> None:
    doc = load_protocol(PROTOCOLS / "polariton_xor.yaml").document
    bad = {**doc, "model": {**doc["model"], "output_sites": [3, 9]}}
    with pytest.raises(ProtocolError, match="output_sites"):
        load_protocol(bad)
    digits = load_protocol(PROTOCOLS / "polariton_digits.yaml").document
    bad = {**digits, "model": {**digits["model"], "pool": 4}}
    with pytest.raises(ProtocolError, match="input sites"):
        load_protocol(bad)


def test_ep_training_lowers_the_cost(tmp_path) -> None:
    """EP through the engine descends the polariton cost (the XOR protocol, 8 epochs)."""
    loaded = load_protocol(PROTOCOLS / "polariton_xor.yaml", ["training.epochs=8",
                                                              "evaluation.every_epochs=8"])
    losses: list[float] = []
    with RunStore(tmp_path / "runs.db") as store:
        result = Trainer(loaded, store, progress=False,
                         on_epoch=lambda _, m: losses.append(m["train_loss"])).run()
    assert result.status == "completed"
    assert losses[-1] < 0.9 * losses[0]
