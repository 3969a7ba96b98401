"""Polariton lattice: the model's physics and state layout, the numba simulator, the exact
gradient (implicit differentiation in the rotating frame) against finite differences,
near-equilibrium EP against the exact gradient as the dissipation goes to 0, imperfections,
and training through the engine."""

from __future__ import annotations

import numpy as np
import pytest

from labep.hardware.bench import Nudge, OutOfRangeError, Resumable, Settle
from labep.models.polariton import PolaritonLattice, lattice_neighbours
from labep.protocol.text import ProtocolError
from labep.run.engine import Trainer, final_params
from labep.run.gradcheck import gradcheck
from labep.run.validate import load_protocol
from labep.simulators.device import DeviceOptions
from labep.simulators.polariton import (
    PolaritonSimulator,
    PolaritonSimulatorOptions,
    _bordered_factor,
    _bordered_substitute,
    _derivative,
    _implicit_system,
    band_layout,
)
from labep.store.runs import RunStore

from .conftest import MNIST, PROTOCOLS, cli_json, needs_mnist

XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
XOR_LABELS = np.array([0, 1, 1, 0])
TIGHT = Settle(1e-11, 400_000)


def make(n: int = 6, seed: int = 0, relaxation: float = 0.0, physics: dict | None = None,
         **options) -> tuple[PolaritonLattice, PolaritonSimulator, dict[str, np.ndarray]]:
    physics = {"output_sites": [2, 3], **(physics or {})}
    model = PolaritonLattice([n], 2, [0, n - 1], energy_relaxation=relaxation, **physics)
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
    # a region of several sites reads their summed intensity (a camera region of interest)
    regions = PolaritonLattice([6], 2, [1, 4], [3, [0, 5]])
    assert regions.readout_order.tolist() == [1, 2, 4, 3, 0, 5]
    assert regions.output_slice == (6, 12)
    state = regions.pack(psi)
    intensity = np.abs(psi) ** 2
    np.testing.assert_allclose(regions.output_intensities(state),
                               np.stack([intensity[:, 3], intensity[:, 0] + intensity[:, 5]], 1))
    # an output region may hold input sites: the camera reads a site the modulator drives
    shared = PolaritonLattice([6], 2, [1, 4], [3, [4, 5]], input_potential=2.0)
    np.testing.assert_allclose(shared.output_intensities(shared.pack(psi)),
                               np.stack([intensity[:, 3], intensity[:, 4] + intensity[:, 5]], 1))
    np.testing.assert_allclose(shared.input_potentials(np.array([[0.5, 1.0]]))[0],
                               [0, 1.0, 0, 0, 2.0, 0])
    with pytest.raises(ValueError, match="repeat"):
        PolaritonLattice([6], 2, [1, 4], [3, [0, 3]])


def test_an_input_region_displays_its_feature_on_every_site() -> None:
    """input_sites entries may be regions: feature k's potential u x_k (and input pump) is on
    every site of region k, nowhere else; a protocol takes the nested form."""
    model = PolaritonLattice([8], 2, [[0, 1], [5, 6]], [3, 7], input_potential=2.0,
                             input_pump=0.5, pump=0.1, pump_sites=[0, 4])
    x = np.array([[0.25, 1.0]])
    np.testing.assert_allclose(model.input_potentials(x)[0],
                               [0.5, 0.5, 0, 0, 0, 2.0, 2.0, 0])
    np.testing.assert_allclose(model.pumps(x)[0],
                               [0.225, 0.125, 0, 0, 0.1, 0.5, 0.5, 0])
    assert model.input_sites.tolist() == [0, 1, 5, 6]
    with pytest.raises(ValueError, match="2 features but there are 3 input regions"):
        PolaritonLattice([8], 2, [[0, 1], 5, 6], [3, 7])
    with pytest.raises(ValueError, match="input region has no sites"):
        PolaritonLattice([8], 2, [[0, 1], []], [3, 7])
    doc = load_protocol(PROTOCOLS / "polariton_xor.yaml").document
    wide = load_protocol({**doc, "model": {**doc["model"], "input_sites": [[1, 2], [6, 7]]}})
    assert wide.protocol.model.input_site_list == [1, 2, 6, 7]


def test_an_inverted_input_region_displays_the_feature_with_the_other_sign() -> None:
    """inverted_input_sites: feature k is also displayed as -u x_k on its inverted region (no
    input pump there). On a mirror-symmetric chain with the input at one end and its inverted
    region at the other, the simulator's state for x is the mirror image of its state for
    -x; the protocol validates the regions (one per feature, no site twice)."""
    model = PolaritonLattice([8], 2, [0, 1], [[3, 4], 7], inverted_input_sites=[6, 5],
                             input_potential=2.0, input_pump=0.5, pump=0.1)
    x = np.array([[0.25, -1.0]])
    np.testing.assert_allclose(model.input_potentials(x)[0],
                               [0.5, -2.0, 0, 0, 0, 2.0, -0.5, 0])
    np.testing.assert_allclose(model.pumps(x)[0], [0.225, -0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert model.input_sites.tolist() == [0, 1, 6, 5]
    with pytest.raises(ValueError, match="1 inverted input regions for 2 input regions"):
        PolaritonLattice([8], 2, [0, 1], [3, 7], inverted_input_sites=[6])
    chain = PolaritonLattice([7], 1, [0], [[2, 3, 4]], inverted_input_sites=[6],
                             interaction=0.1, pump=0.06, loss=0.03, saturation=0.015,
                             energy_relaxation=0.5, input_potential=0.5)
    sim = PolaritonSimulator(chain, PolaritonSimulatorOptions())
    sim.write({"V": np.array([0.3, -0.2, 0.1, -0.4, 0.1, -0.2, 0.3])})
    states = sim.relax(np.array([[0.8], [-0.8]]), settle=Settle(1e-9, 400_000))
    assert states.converged.all()
    density = chain.intensities(states.state)
    assert abs(density[0, 0] - density[0, 6]) > 1e-3  # the input breaks the mirror symmetry
    np.testing.assert_allclose(density[0], density[1, ::-1], rtol=1e-6)
    doc = load_protocol(PROTOCOLS / "polariton_xor.yaml").document
    for inverted, message in (([3], "1 regions for 2 input regions"),
                              ([[3, 4], doc["model"]["input_sites"][0]], "a site appears twice")):
        with pytest.raises(ProtocolError, match=message):
            load_protocol({**doc, "model": {**doc["model"], "inverted_input_sites": inverted}})


def test_pca_encoding_is_fitted_on_the_training_inputs() -> None:
    """encoding: pca projects on the first K principal directions of the training inputs (K
    input regions), standardized: mean 0, unit variance, uncorrelated on the training set;
    the fit is deterministic; encoding before the fit is refused with the remedy named."""
    from labep.data.loaders import load_digits

    data = load_digits(0.2, 0)
    model = PolaritonLattice([4, 4], 64, [0, 1, 2, 3], list(range(6, 16)), encoding="pca")
    with pytest.raises(ValueError, match="fitted on the training inputs first"):
        model.encode(data.train_inputs[:2])
    model.fit_encoding(data.train_inputs)
    z = model.encode(data.train_inputs)
    assert z.shape == (len(data.train_inputs), 4)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(4), atol=1e-9)
    x = data.train_inputs.astype(np.float64)
    _, vectors = np.linalg.eigh(np.cov(x.T, bias=True))
    top = vectors[:, -1]
    assert abs(abs(top @ model.pca[1][0]) - 1.0) < 1e-9  # the leading principal direction
    again = PolaritonLattice([4, 4], 64, [0, 1, 2, 3], list(range(6, 16)), encoding="pca")
    again.fit_encoding(data.train_inputs)
    np.testing.assert_array_equal(again.encode(data.test_inputs), model.encode(data.test_inputs))
    np.testing.assert_allclose(model.input_potentials(data.test_inputs[:3])[:, :4],
                               model.input_potential * model.encode(data.test_inputs[:3]))


def test_a_pca_protocol_is_fitted_by_the_engine_and_ep_stays_exact() -> None:
    """A protocol with the pca encoding: the engine fits it on the training split when it
    builds the model (gradcheck runs through it), and EP is exact there too; more components
    than raw inputs is refused by the protocol."""
    doc = {"name": "pca", "seed": 0,
           "bench": {"simulator": "polariton", "options": {"dtype": "float64"}},
           "model": {"kind": "polariton", "lattice": [4, 4], "inputs": 64, "encoding": "pca",
                     "input_sites": [0, 1, 2, 3], "output_sites": list(range(6, 16)),
                     "interaction": 0.1, "pump": 0.06, "loss": 0.03, "saturation": 0.015,
                     "energy_relaxation": 0.5, "input_potential": 0.3,
                     "cost": "cross_entropy", "target_low": 0.0, "target_high": 1.0},
           "dataset": {"name": "digits"},
           "estimator": {"name": "symmetric", "beta": 0.001},
           "training": {"epochs": 1, "batch_size": 4, "learning_rates": [0.01]}}
    report = gradcheck(load_protocol(doc).protocol, beta=1e-3, samples=4, seed=0,
                       tolerance=1e-10)
    assert report["cosine"] > 0.9999
    xor = load_protocol(PROTOCOLS / "polariton_xor.yaml").document
    bad = {**xor, "model": {**xor["model"], "encoding": "pca", "input_sites": [1, 2, 3]}}
    with pytest.raises(ProtocolError, match="pca keeps at most the 2 inputs"):
        load_protocol(bad)


def test_init_regions_draw_their_own_potentials() -> None:
    """init_regions: the listed sites start from their own range (walls between regions),
    the others from init_potential; seeded; a site off the lattice is refused by name."""
    doc = load_protocol(PROTOCOLS / "polariton_xor.yaml").document
    walls = {**doc, "model": {**doc["model"], "init_potential": [-0.1, 0.1], "init_regions": [
        {"sites": [0, 8], "potential": [3.0, 3.5]}, {"sites": [4], "potential": [-1.0, -1.0]}]}}
    loaded = load_protocol(walls)
    from labep.run.assembly import build_model

    model = build_model(loaded.protocol.model)
    first = model.init_params(np.random.default_rng(5))["V"]
    assert np.all((first[[0, 8]] >= 3.0) & (first[[0, 8]] <= 3.5))
    assert first[4] == -1.0
    assert np.all(np.abs(first[[1, 2, 3, 5, 6, 7]]) <= 0.1)
    np.testing.assert_array_equal(model.init_params(np.random.default_rng(5))["V"], first)
    bad = {**doc, "model": {**doc["model"], "init_regions": [{"sites": [9],
                                                              "potential": [1, 1]}]}}
    with pytest.raises(ProtocolError, match="init_regions"):
        load_protocol(bad)


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


def aligned_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a e^{i phi} - b| / |b| per row, phi the global phase that aligns a on b."""
    phase = np.angle(np.sum(np.conj(a) * b, axis=1))
    return np.linalg.norm(a * np.exp(1j * phase)[:, None] - b, axis=1) / np.linalg.norm(b, axis=1)


def test_implicit_system_is_the_backward_euler_step_with_mu_and_the_gauge() -> None:
    """The banded matrix is I / h - df/dx (f = d(psi)/dt, by finite differences of the RK4
    kernel's derivative), its border -df/dmu and the gauge row Im(psi^dagger dpsi); the
    bordered band solve agrees with a dense solve."""
    model = PolaritonLattice([3, 5], 2, [0, 14], [[2, 3], [11, 12]], energy_relaxation=0.4,
                             interaction=0.7)
    sim = PolaritonSimulator(model)
    params = model.init_params(np.random.default_rng(1))
    sim.write(params)
    x = np.array([[0.3, 0.7]])
    rng = np.random.default_rng(0)
    psi = rng.standard_normal(15) + 1j * rng.standard_normal(15)
    potential, pump = sim.display(model.input_potentials(x))[0], sim.pumps(x)[0]
    order, slots, width = band_layout(model.neighbours, model.lattice)
    assert width == 7  # 3 rows: column by column, neighbours 3 positions apart
    constants = (model.hopping, model.interaction, model.loss, model.saturation,
                 model.energy_relaxation)
    frame, step, n, m = 0.37, 2.0, 15, 30

    def flow(vector: np.ndarray, mu: float = frame) -> np.ndarray:
        re, im = np.zeros(n), np.zeros(n)
        re[order], im[order] = vector[0::2], vector[1::2]
        out_re, out_im = np.zeros(n), np.zeros(n)
        _derivative(re, im, model.neighbours, potential, mu, pump, *constants, out_re, out_im)
        out = np.zeros(m)
        out[0::2], out[1::2] = out_re[order], out_im[order]
        return out

    band = np.zeros((m, 3 * width + 1))
    column, row, rhs = np.zeros(m), np.zeros(m), np.zeros(m + 1)
    flow_re, flow_im = np.zeros(n), np.zeros(n)
    _derivative(psi.real.copy(), psi.imag.copy(), model.neighbours, potential, frame, pump,
                *constants, flow_re, flow_im)
    _implicit_system(psi.real.copy(), psi.imag.copy(), order, slots, potential, frame, pump,
                     *constants, step, flow_re, flow_im, width, width, band, column, row, rhs)
    dense = np.zeros((m + 1, m + 1))
    for j in range(m):
        for i in range(max(0, j - 2 * width), min(m, j + width + 1)):
            dense[i, j] = band[j, 2 * width + i - j]
    dense[:m, m], dense[m, :m] = column, row
    vector = np.zeros(m)
    vector[0::2], vector[1::2] = psi.real[order], psi.imag[order]
    eps = 1e-6
    jacobian = np.stack([(flow(vector + eps * e) - flow(vector - eps * e)) / (2 * eps)
                         for e in np.eye(m)], axis=1)
    np.testing.assert_allclose(dense[:m, :m], np.eye(m) / step - jacobian, atol=1e-7)
    np.testing.assert_allclose(column, -(flow(vector, frame + eps) - flow(vector, frame - eps))
                               / (2 * eps), atol=1e-7)
    np.testing.assert_allclose(row, np.stack([-vector[1::2], vector[0::2]], axis=1).ravel())
    np.testing.assert_allclose(rhs[:m], flow(vector))
    want = np.linalg.solve(dense, rhs)
    pivots, factors = np.zeros(m, dtype=np.int64), np.zeros(m)
    corner = _bordered_factor(band, column, row, 0.0, width, width, m, pivots, factors)
    assert np.isfinite(corner)
    _bordered_substitute(band, column, corner, pivots, factors, rhs, width, width, m)
    np.testing.assert_allclose(rhs, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("lattice", "inputs", "outputs", "relaxation"), [
    ([6], [0, 5], [2, 3], 0.0), ([6], [0, 5], [2, 3], 0.4),
    ([3, 5], [0, 14], [[2, 3], [11, 12]], 0.5), ([5, 3], [0, 14], [[1, 4], [10, 13]], 0.5)])
def test_implicit_steady_state_is_the_fixed_point_rk4_settles_to(
        lattice: list[int], inputs: list[int], outputs: list, relaxation: float) -> None:
    """steady_state implicit lands on the state RK4 settles to (same residual criterion),
    uses the solver (no fallback), is deterministic, and so are nudged phases from it."""
    model = PolaritonLattice(lattice, 2, inputs, outputs, energy_relaxation=relaxation)
    params = model.init_params(np.random.default_rng(3))
    benches = {}
    for kind in ("rk4", "implicit"):
        benches[kind] = PolaritonSimulator(model, PolaritonSimulatorOptions(steady_state=kind))
        benches[kind].write(params)
    settle = Settle(1e-10, 400_000)
    rk4 = benches["rk4"].relax(XOR, settle=settle)
    implicit = benches["implicit"].relax(XOR, settle=settle)
    assert rk4.all_converged and implicit.all_converged
    assert np.all(benches["implicit"].last_implicit > 0)
    assert np.all(implicit.steps < rk4.steps)
    np.testing.assert_allclose(model.residual(XOR, implicit.state, params), implicit.residual,
                               rtol=1e-3, atol=1e-13)
    distance = aligned_distance(model.field(implicit.state), model.field(rk4.state))
    assert distance.max() < 1e-7
    again = benches["implicit"].relax(XOR, settle=settle)
    np.testing.assert_array_equal(again.state, implicit.state)
    target = model.encode_target(XOR_LABELS)
    nudged = [benches[kind].relax(XOR, Nudge(0.05, target), start=free.state, settle=settle)
              for kind, free in (("rk4", rk4), ("implicit", implicit))]
    assert aligned_distance(model.field(nudged[1].state), model.field(nudged[0].state)).max() < 1e-7


def test_bordered_factors_solve_any_right_hand_side() -> None:
    """Factored once, the bordered band system solves several right-hand sides (the chord
    steps' reuse) exactly as dense solves do, with pivoting at work; a singular one is
    refused."""
    rng = np.random.default_rng(4)
    m, lower, upper = 24, 3, 3
    top = lower + upper
    dense = np.zeros((m + 1, m + 1))
    for i in range(m):
        for j in range(max(0, i - lower), min(m, i + upper + 1)):
            dense[i, j] = rng.standard_normal()
    dense[:m, :m] += 0.1 * np.eye(m)  # small diagonal: the band's pivoting swaps rows
    dense[:m, m], dense[m, :m], dense[m, m] = rng.standard_normal((3, m))[0], \
        rng.standard_normal(m), 0.3
    band = np.zeros((m, 2 * lower + upper + 1))
    for j in range(m):
        for i in range(max(0, j - upper), min(m, j + lower + 1)):
            band[j, top + i - j] = dense[i, j]
    column, row = dense[:m, m].copy(), dense[m, :m].copy()
    pivots, factors = np.zeros(m, dtype=np.int64), np.zeros(m)
    corner = _bordered_factor(band, column, row, dense[m, m], lower, upper, m, pivots, factors)
    assert np.isfinite(corner) and np.any(pivots != np.arange(m))
    for _ in range(3):
        rhs = rng.standard_normal(m + 1)
        want = np.linalg.solve(dense, rhs)
        _bordered_substitute(band, column, corner, pivots, factors, rhs, lower, upper, m)
        np.testing.assert_allclose(rhs, want, rtol=1e-9, atol=1e-11)
    singular = np.zeros((m, 2 * lower + upper + 1))
    assert np.isnan(_bordered_factor(singular, np.ones(m), np.ones(m), 0.0, lower, upper, m,
                                     pivots, factors))


def test_chord_steps_reuse_one_factorization_per_relaxation() -> None:
    """On a small grid from the rest seed, one banded factorization per free and per nudged
    relaxation suffices to 1e-10: the chord steps (the same factors, the new f) do the rest
    (pseudo-transient steps alone took 4 and 3 solves), and the residual falls at every chord
    step it keeps: a kept chord step cuts it at least in half, so the chord count is bounded
    by log2 of the residual's fall."""
    model = PolaritonLattice([3, 5], 2, [0, 14], [[2, 3], [11, 12]], energy_relaxation=0.5)
    params = model.init_params(np.random.default_rng(3))
    sim = PolaritonSimulator(model, PolaritonSimulatorOptions(steady_state="implicit"))
    sim.write(params)
    settle = Settle(1e-10, 400_000)
    free = sim.relax(XOR, settle=settle)
    assert free.all_converged
    np.testing.assert_array_equal(sim.last_implicit, 1)
    chords = sim.last_chord.copy()
    assert np.all(chords >= 1)
    assert np.all(chords <= np.log2(sim.options.implicit_from / 1e-10) + 1)
    assert np.all(free.steps > chords)  # RK4 steps, then the factorization and the chords
    target = model.encode_target(XOR_LABELS)
    nudged = sim.relax(XOR, Nudge(0.05, target), start=free.state, settle=settle)
    assert nudged.all_converged
    np.testing.assert_array_equal(sim.last_implicit, 1)
    assert np.all(sim.last_chord >= 1)


def test_a_failed_implicit_solve_restores_the_field_and_rk4_goes_on() -> None:
    """The fallback: steps too small to converge within implicit_iterations (-1) or a start
    so far from the fixed point that the residual explodes (-2, from the rest seed) leave
    the field as it was, and RK4 goes on to exactly the state and step count of RK4 alone."""
    model = PolaritonLattice([3, 5], 2, [0, 14], [[2, 3], [11, 12]], energy_relaxation=0.5)
    params = model.init_params(np.random.default_rng(3))
    settle = Settle(1e-10, 400_000)
    rk4 = PolaritonSimulator(model, PolaritonSimulatorOptions(steady_state="rk4"))
    rk4.write(params)
    want = rk4.relax(XOR, settle=settle)
    for options, code in ((dict(implicit_iterations=1, implicit_step=0.01), -1),
                          (dict(implicit_from=1e3), -2)):
        sim = PolaritonSimulator(model, PolaritonSimulatorOptions(steady_state="implicit",
                                                                  **options))
        sim.write(params)
        got = sim.relax(XOR, settle=settle)
        np.testing.assert_array_equal(sim.last_implicit, code)
        np.testing.assert_array_equal(sim.last_chord, 0)
        assert got.all_converged
        np.testing.assert_array_equal(got.state, want.state)
        np.testing.assert_array_equal(got.steps, want.steps)


def test_the_implicit_solver_keeps_the_gradcheck_cosine() -> None:
    """EP through the implicit steady state: the same cosine with the exact gradient as
    through RK4 (protocols/polariton_xor.yaml, beta 1e-3)."""
    cosines = {}
    for kind in ("rk4", "implicit"):
        protocol = load_protocol(PROTOCOLS / "polariton_xor.yaml",
                                 [f"bench.options.steady_state={kind}"]).protocol
        cosines[kind] = gradcheck(protocol, beta=1e-3, samples=4, seed=0)["cosine"]
    assert cosines["implicit"] > 0.9999
    assert abs(cosines["implicit"] - cosines["rk4"]) < 1e-6


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


@pytest.mark.parametrize(("detuning", "stationary"), [(0.1, False), (0.5, True)])
def test_an_unlit_well_near_the_condensate_frequency_lases_too(detuning: float,
                                                                stationary: bool) -> None:
    """Two single-site wells behind 5 J walls (no tunnelling to speak of). The lit well is
    saturated, the other is not: if its energy lies below mu + (P - gamma) / (2 eta), mu the
    condensate frequency (the lit well's energy plus its shift g n, about 0.22 J here), it
    lases at its own frequency and the state never becomes stationary; 0.5 J above the lit
    well, it stays dark and the state settles."""
    n = 11
    model = PolaritonLattice([n], 2, [0, n - 1], [1, n - 2], interaction=0.1, pump=0.06,
                             loss=0.03, saturation=0.015, energy_relaxation=0.5)
    sim = PolaritonSimulator(model)
    wells = np.full(n, 2.5)
    wells[1], wells[n - 2] = -2.5, -2.5 + detuning
    sim.write({"V": wells})
    free = sim.relax(np.zeros((1, 2)), settle=Settle(1e-6, 60_000))
    light = model.output_intensities(free.state)[0]
    assert free.converged[0] == stationary
    if stationary:
        assert light[1] < 1e-6 * light[0]  # the higher well stays dark
    else:
        assert free.residual[0] > 1e-3 and light.min() > 0.1 * light.max()  # both lase


@pytest.mark.parametrize(("relaxation", "physics"), [
    (0.0, {}), (0.4, {}),
    (0.4, {"cost": "fraction", "output_sites": [2, [3, 4]], "target_low": 0.3,
           "target_high": 0.7}),
    (0.4, {"cost": "cross_entropy", "output_sites": [2, [3, 4]], "target_low": 0.0,
           "target_high": 1.0}),
    (0.4, {"cost": "fraction_hinge", "output_sites": [2, [3, 4]], "target_low": 0.3,
           "target_high": 0.6})])
def test_exact_gradient_matches_finite_differences(relaxation: float, physics: dict) -> None:
    model, sim, params = make(seed=2, relaxation=relaxation, physics=physics)
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


def test_a_uniform_potential_is_a_gauge_and_the_projections_remove_it() -> None:
    """Shifting every V_i by c only shifts mu: the exact gradient has no uniform part, the
    raw EP contrast has one, and both projections make it sum to zero: the uniform one by
    removing the mean, the intensity one along the intensity pattern."""
    model, sim, params = make(seed=3)
    target = model.encode_target(XOR_LABELS)
    free = sim.relax(XOR, settle=TIGHT)
    exact = model.exact_gradient(XOR, free.state, target, params)["V"]
    assert abs(exact.sum()) < 1e-6 * np.abs(exact).sum()
    beta = 1e-3
    plus = sim.relax(XOR, Nudge(beta, target), start=free.state, settle=TIGHT)
    minus = sim.relax(XOR, Nudge(-beta, target), start=free.state, settle=TIGHT)
    estimates = {}
    for projection in ("none", "uniform", "intensity"):
        lattice = PolaritonLattice([6], 2, [0, 5], [2, 3], projection=projection)
        estimates[projection] = lattice.contrast(XOR, plus.state, minus.state, None,
                                                 1 / (2 * beta))["V"]
    raw = estimates["none"]
    assert abs(raw.mean()) > 1e-3
    np.testing.assert_allclose(estimates["uniform"], raw - raw.mean(), atol=1e-12)
    assert abs(estimates["intensity"].sum()) < 1e-9 * np.abs(raw).sum()
    for projection in ("uniform", "intensity"):
        assert cosine(estimates[projection], exact) > cosine(raw, exact)
        assert cosine(estimates[projection], exact) > 0.95


@pytest.mark.parametrize("interaction", [0.1, 1.0, 3.0])
def test_fraction_cost_and_intensity_projection_give_the_exact_gradient(
        interaction: float) -> None:
    """Under a uniform pump near equilibrium, EP with the fraction cost and the intensity
    projection is the exact gradient (the model docstring's claim), where the uniform
    projection and the raw contrast are not; from weak to strong interaction."""
    loaded = load_protocol(PROTOCOLS / "polariton_xor.yaml",
                           [f"model.interaction={interaction}"])
    cosines = {}
    for projection in ("intensity", "uniform", "none"):
        doc = {**loaded.document, "model": {**loaded.document["model"],
                                            "projection": projection}}
        cosines[projection] = [gradcheck(load_protocol(doc).protocol, beta=1e-3, samples=4,
                                         seed=seed, tolerance=1e-10)["cosine"]
                               for seed in (0, 1)]
    assert min(cosines["intensity"]) > 0.9999
    assert max(cosines["none"]) < 0.999
    assert np.mean(cosines["intensity"]) > np.mean(cosines["uniform"])


def test_cross_entropy_cost_keeps_ep_exact() -> None:
    """The categorical cross-entropy of the output fractions is blind to the total intensity
    too: with the intensity projection EP is the exact gradient (weak and strong g)."""
    for interaction in (0.1, 1.0):
        protocol = load_protocol(PROTOCOLS / "polariton_xor.yaml", [
            "model.cost=cross_entropy", "model.target_low=0", "model.target_high=1",
            f"model.interaction={interaction}"]).protocol
        for seed in (0, 1):
            report = gradcheck(protocol, beta=1e-3, samples=4, seed=seed, tolerance=1e-10)
            assert report["cosine"] > 0.9999


@needs_mnist
def test_on_the_digits_protocol_every_state_settles_and_ep_is_exact() -> None:
    """protocols/polariton_digits.yaml as shipped (its accuracy: benchmarks/
    polariton_digits.py): on training images at fresh potentials the states settle (gradcheck
    refuses a state that does not) and near-equilibrium EP is the exact gradient of the
    hinge cost."""
    protocol = load_protocol(PROTOCOLS / "polariton_digits.yaml",
                             [f"dataset.path={MNIST}"]).protocol
    assert protocol.model.cost == "fraction_hinge"
    report = gradcheck(protocol, samples=4, seed=1)
    assert report["cosine"] > 0.9999


@needs_mnist
def test_the_digits_protocols_steady_state_is_where_the_dynamics_go() -> None:
    """protocols/polariton_digits.yaml relaxes with the implicit steady state (RK4 to
    0.02 J, then Newton steps): on training images, free and nudged, its states are those of
    RK4 run to 1e-9 (the distance up to a global phase far below the 1e-2 of another branch),
    and closer to them than RK4 at the protocol's own tolerance, in a fraction of the steps."""
    from labep.run.assembly import build_bench, build_model, stream

    protocol = load_protocol(PROTOCOLS / "polariton_digits.yaml",
                             [f"dataset.path={MNIST}"]).protocol
    assert protocol.bench.options["steady_state"] == "implicit"
    data = protocol.dataset.load()
    model = build_model(protocol.model, data)
    params = model.init_params(stream(protocol.seed, 0))
    x = data.train_inputs[:24]
    target = model.encode_target(data.train_labels[:24])
    settle = Settle(protocol.phases.free.tolerance, protocol.phases.free.max_steps)

    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        fa, fb = model.field(a), model.field(b)
        phase = np.angle(np.sum(np.conj(fa) * fb, axis=1))
        return (np.linalg.norm(fa * np.exp(1j * phase)[:, None] - fb, axis=1)
                / np.linalg.norm(fb, axis=1))

    shipped = build_bench(protocol.bench, model)
    exact = build_bench(protocol.bench, model, steady_state="rk4")
    for bench in (shipped, exact):
        bench.write(params)
    free = shipped.relax(x, settle=settle)
    reference = exact.relax(x, settle=Settle(1e-9, 400_000))
    plain = exact.relax(x, settle=settle)
    assert free.all_converged and reference.all_converged
    assert np.all(distance(free.state, reference.state) < 1e-2)
    assert np.median(distance(free.state, reference.state)) < np.median(
        distance(plain.state, reference.state))
    assert free.steps.mean() < 0.5 * plain.steps.mean()
    nudge = Nudge(protocol.estimator.beta, target)
    nudged = shipped.relax(x, nudge, start=free.state, settle=settle)
    nudged_reference = exact.relax(x, nudge, start=reference.state,
                                   settle=Settle(1e-9, 400_000))
    assert np.all(distance(nudged.state, nudged_reference.state) < 1e-2)


def test_near_equilibrium_ep_approaches_the_exact_gradient_as_dissipation_vanishes() -> None:
    """The gradcheck table's claim, on two rows: ten times the protocol's dissipation
    (gamma = 0.3) is further from the exact gradient than the protocol's (gamma = 0.03),
    where EP is exact."""
    loaded = load_protocol(PROTOCOLS / "polariton_xor.yaml")
    cosines = {}
    for scale in (10.0, 1.0):
        model = loaded.document["model"]
        doc = {**loaded.document, "model": {**model, "pump": model["pump"] * scale,
                                            "loss": model["loss"] * scale,
                                            "saturation": model["saturation"] * scale}}
        protocol = load_protocol(doc).protocol
        cosines[scale] = [gradcheck(protocol, beta=1e-3, samples=4, seed=seed,
                                    tolerance=1e-10)["cosine"] for seed in (0, 1, 2)]
    assert min(cosines[1.0]) > 0.9999
    assert np.mean(cosines[1.0]) > np.mean(cosines[10.0])


def test_gradcheck_cli_on_the_polariton_protocol() -> None:
    report = cli_json("gradcheck", str(PROTOCOLS / "polariton_xor.yaml"), "--beta", "0.001",
                      "--json")
    assert report["cosine"] > 0.9999 and report["free_residual"] < 1e-8
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


FRACTION_COSTS = {
    "fraction": lambda f, t: 0.5 * ((f - t) ** 2).sum(1),
    "cross_entropy": lambda f, t: -(t * np.log(f)).sum(1),
    "fraction_hinge": lambda f, t: 0.5 * (np.where(t == t.max(1, keepdims=True),
                                                   np.minimum(f - t, 0), np.maximum(f - t, 0))
                                          ** 2).sum(1),
}


@pytest.mark.parametrize(("cost", "low", "high"), [("fraction", 0.3, 0.7),
                                                   ("cross_entropy", 0.0, 1.0),
                                                   ("fraction_hinge", 0.3, 0.6)])
def test_fraction_nudge_is_the_cost_gradient_on_every_site_of_a_region(
        cost: str, low: float, high: float) -> None:
    """cost: fraction, fraction_hinge or cross_entropy, regions: the step on each site of
    region k is beta dC/dn_k, dC/dn_k the derivative of 1/2 sum (f_k - t_k)^2 (clipped
    one-sidedly for the hinge) or -sum t_k log f_k,
    f_k = n_k / sum n (checked by finite differences), blind to the total intensity, and a
    positive nudge lowers the cost."""
    model, sim, _ = make(seed=6, relaxation=0.4, physics={
        "cost": cost, "output_sites": [2, [3, 4]], "target_low": low, "target_high": high})
    formula = FRACTION_COSTS[cost]
    free = sim.relax(XOR, settle=TIGHT)
    target = model.encode_target(XOR_LABELS)
    step = model.nudge_potential(0.1, target, free.state)
    n_out = model.output_intensities(free.state)
    gradient = model.cost_gradient(n_out, target)
    for k in range(2):
        shift = np.zeros_like(n_out)
        shift[:, k] = 1e-6
        fractions = [(n / n.sum(1, keepdims=True)) for n in (n_out + shift, n_out - shift)]
        numeric = (formula(fractions[0], target) - formula(fractions[1], target)) / 2e-6
        np.testing.assert_allclose(gradient[:, k], numeric, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose((gradient * n_out).sum(1), 0.0, atol=1e-12)
    np.testing.assert_allclose(model.cost(free.state, target),
                               formula(n_out / n_out.sum(1, keepdims=True), target))
    np.testing.assert_allclose(step[:, 2], 0.1 * gradient[:, 0])
    np.testing.assert_allclose(step[:, [3, 4]], 0.1 * gradient[:, [1, 1]])
    assert np.all(step[:, [0, 1, 5]] == 0)
    nudged = sim.relax(XOR, Nudge(0.1, target), start=free.state, settle=TIGHT)
    assert model.cost(nudged.state, target).sum() < model.cost(free.state, target).sum()


def test_fraction_hinge_costs_nothing_past_the_targets() -> None:
    """The hinge holds the class's fraction at or above target_high and the others' at or
    below target_low: a region past its target costs nothing and is not nudged, where the
    plain fraction cost pulls a confident class back down."""
    kwargs = {"output_sites": [0, 1, 2], "target_low": 0.2, "target_high": 0.5}
    hinge = PolaritonLattice([6], 2, [4, 5], cost="fraction_hinge", **kwargs)
    plain = PolaritonLattice([6], 2, [4, 5], cost="fraction", **kwargs)
    target = hinge.encode_target(np.array([0, 0]))
    n_out = np.array([[0.8, 0.1, 0.1],    # past every target
                      [0.4, 0.45, 0.15]])  # class short, region 1 over, region 2 fine
    gradient = hinge.cost_gradient(n_out, target)
    np.testing.assert_array_equal(gradient[0], 0.0)
    assert np.all(plain.cost_gradient(n_out, target)[0] != 0.0)
    assert gradient[1, 0] < 0 < gradient[1, 1]
    np.testing.assert_allclose((gradient * n_out).sum(1), 0.0, atol=1e-15)
    excess = np.array([0.4 - 0.5, 0.45 - 0.2, 0.0])
    np.testing.assert_allclose(gradient[1], excess - excess @ n_out[1])


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
    bad = {**doc, "dataset": {"name": "digits"},
           "model": {**doc["model"], "inputs": 64, "encoding": "downsample",
                     "image_shape": [8, 8], "pool": 4}}  # 4 features for 2 input regions
    with pytest.raises(ProtocolError, match="input regions"):
        load_protocol(bad)
    empty = {**doc, "model": {**doc["model"], "input_sites": [2, []]}}
    with pytest.raises(ProtocolError, match="input_sites: a region has no sites"):
        load_protocol(empty)
    overlap = load_protocol({**doc, "model": {**doc["model"], "input_sites": [2, [6, 4]]}})
    assert 4 in overlap.protocol.model.input_site_list
    assert 4 in overlap.protocol.model.output_site_list


@pytest.mark.parametrize("seed", [0, 3])
def test_the_xor_protocol_learns_xor(tmp_path, seed: int) -> None:
    """polariton_xor.yaml as shipped (300 Adam steps of near-equilibrium EP, seconds): 100%
    on the four XOR points, the cost down, and the potentials under the two inputs dug into
    two wells of nearly equal depth (the double-well comparator)."""
    loaded = load_protocol(PROTOCOLS / "polariton_xor.yaml", [f"seed={seed}"])
    losses: list[float] = []
    with RunStore(tmp_path / "runs.db") as store:
        result = Trainer(loaded, store, progress=False,
                         on_epoch=lambda _, m: losses.append(m["train_loss"])).run()
        potentials = final_params(store, result.run_id)["V"]
    assert result.status == "completed"
    assert result.test_accuracy == 1.0
    assert losses[-1] < 0.5 * losses[0]
    wells = potentials[[2, 6]]
    others = np.delete(potentials, [2, 6])
    assert wells.max() < others.min() - 1.0
    assert abs(wells[0] - wells[1]) < 0.5
