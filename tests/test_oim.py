"""Oscillator Ising machine: physics, exact gradient, EP agreement, training, noise, readout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from labep.hardware.bench import Nudge, Settle
from labep.models.oim import LayeredOIM
from labep.protocol.text import ProtocolError
from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.simulators.device import DeviceOptions, read_out
from labep.simulators.oim import OIMSimulator, OIMSimulatorOptions
from labep.store.runs import RunStore

from .conftest import MNIST, PROTOCOLS, assert_force_is_minus_energy_gradient, cli_json, needs_mnist

TIGHT = Settle(1e-12, 200_000)
XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)


def make(sizes=(2, 5, 3), shil=0.2, seed=0, **options):
    model = LayeredOIM(sizes, shil=shil)
    sim = OIMSimulator(model, OIMSimulatorOptions(dtype="float64", **options))
    params = model.init_params(np.random.default_rng(seed))
    sim.write(params)
    return model, sim, params


def mean_cost(sim, model, params, x, target):
    sim.write(params)
    return model.cost(sim.relax(x, settle=TIGHT).state, target).mean()


def test_force_is_minus_the_energy_gradient() -> None:
    model, _, params = make()
    x = np.random.default_rng(1).random((3, 2))
    phases = np.random.default_rng(2).uniform(0, 2 * np.pi, (3, model.state_size))
    assert_force_is_minus_energy_gradient(model, params, x, phases)


def test_exact_gradient_matches_finite_differences() -> None:
    model, sim, params = make(sizes=(2, 4, 3, 2))
    x = np.random.default_rng(3).random((3, 2))
    target = model.encode_target(np.array([0, 1, 1]))
    state = sim.relax(x, settle=TIGHT).state
    exact = model.exact_gradient(x, state, target, params)
    rng = np.random.default_rng(4)
    for name in exact:
        index = tuple(rng.integers(0, n) for n in params[name].shape)
        plus = {k: v.copy() for k, v in params.items()}
        minus = {k: v.copy() for k, v in params.items()}
        plus[name][index] += 1e-6
        minus[name][index] -= 1e-6
        numeric = (mean_cost(sim, model, plus, x, target)
                   - mean_cost(sim, model, minus, x, target)) / 2e-6
        assert numeric == pytest.approx(exact[name][index], rel=1e-4, abs=1e-8), name


def test_binary_inputs_without_quadrature_bias_have_no_gradient() -> None:
    """phi -> -phi symmetry: with inputs at 0 or pi and g = 0, phases on the axis stay there
    (a fixed point with sin(phi) = 0: no nudge force, no gradient). The quadrature bias g
    breaks it."""
    model, sim, params = make()
    target = model.encode_target(np.array([0, 1, 1, 0]))
    on_axis = np.zeros((4, model.state_size))
    flat = {k: (np.zeros_like(v) if k.startswith("g") else v) for k, v in params.items()}
    sim.write(flat)
    state = sim.relax(XOR, start=on_axis, settle=TIGHT).state
    assert np.allclose(np.sin(state), 0.0, atol=1e-9)
    nudged = sim.relax(XOR, Nudge(0.5, target), start=state, settle=TIGHT).state
    np.testing.assert_allclose(np.cos(nudged), np.cos(state), atol=1e-9)
    exact = model.exact_gradient(XOR, state, target, flat)
    assert max(np.abs(v).max() for v in exact.values()) < 1e-9
    sim.write(params)
    state = sim.relax(XOR, start=on_axis, settle=TIGHT).state
    exact = model.exact_gradient(XOR, state, target, params)
    assert max(np.abs(v).max() for v in exact.values()) > 1e-3


@pytest.mark.parametrize("integrator", ["euler", "heun", "adaptive"])
def test_integrators_settle_to_minima(integrator: str) -> None:
    """Every integrator descends to a fixed point that is a local minimum of E (the energy is
    not convex: different paths may end in different minima)."""
    model, sim, params = make(integrator=integrator, dt=0.3)
    x = np.random.default_rng(5).random((4, 2))
    relax = sim.relax(x, settle=TIGHT)
    assert relax.all_converged
    assert np.max(model.residual(x, relax.state, params)) < 1e-10
    start = np.full_like(relax.state, sim.options.rest_phase)
    assert np.all(model.energy(x, relax.state, params) < model.energy(x, start, params))
    for sample in range(4):  # no direction lowers E: a minimum, not a saddle
        for trial in range(20):
            kick = 1e-3 * np.random.default_rng((sample, trial)).standard_normal(
                model.state_size)
            assert (model.energy(x[sample:sample + 1], relax.state[sample:sample + 1] + kick,
                                 params) >= model.energy(x[sample:sample + 1],
                                                         relax.state[sample:sample + 1],
                                                         params) - 1e-12)


def test_nudge_moves_outputs_toward_the_target() -> None:
    model, sim, _ = make()
    target = model.encode_target(np.array([0, 1, 2, 0]))
    free = sim.relax(XOR, settle=TIGHT)
    nudged = sim.relax(XOR, Nudge(0.5, target), start=free.state, settle=TIGHT)
    assert model.cost(nudged.state, target).mean() < model.cost(free.state, target).mean()


def test_oim_xor_gradcheck_cli() -> None:
    report = cli_json("gradcheck", str(PROTOCOLS / "oim_xor.yaml"), "--estimator", "symmetric",
                      "--beta", "0.001", "--json")
    assert report["cosine"] >= 0.999
    assert {"J1", "J2", "h1", "h2", "g1", "g2"} == set(report["parameters"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oim_xor_is_learned(tmp_path, seed: int) -> None:
    loaded = load_protocol(PROTOCOLS / "oim_xor.yaml", [f"seed={seed}"])
    with RunStore(tmp_path / "runs.db") as store:
        assert Trainer(loaded, store, progress=False).run().test_accuracy == 1.0


def test_phase_noise_is_seeded_and_thread_independent() -> None:
    x = np.random.default_rng(6).random((6, 2))
    runs = []
    for seed in (0, 0, 1):
        _, sim, _ = make(phase_noise=1e-3, device=DeviceOptions(seed=seed))
        runs.append(sim.relax(x, settle=Settle(1e-12, 300)).state)
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    _, quiet, _ = make()
    assert np.abs(np.cos(quiet.relax(x, settle=Settle(1e-12, 300)).state)
                  - np.cos(runs[0])).max() > 1e-4


def test_phase_readout_wraps_quantizes_and_averages_on_the_circle() -> None:
    options = DeviceOptions(readout_bits=4, readout_noise=0.05)
    state = np.array([[0.01, 2 * np.pi - 0.01, 1.0]])
    mean = read_out(state, options, np.random.default_rng(0), 64, 0.0, 2 * np.pi,
                    periodic=True)
    distance = np.abs(np.angle(np.exp(1j * (mean - state))))
    assert distance.max() < 0.1  # not pi: the readouts straddle the wrap
    single = read_out(state, DeviceOptions(readout_bits=4), np.random.default_rng(0), 1, 0.0,
                      2 * np.pi, periodic=True)
    step = 2 * np.pi / 16
    np.testing.assert_allclose(np.mod(single / step + 0.5, 1.0) - 0.5, 0.0, atol=1e-9)


def test_adaptive_integrator_refuses_noise() -> None:
    doc = load_protocol(PROTOCOLS / "oim_xor.yaml").document
    doc["bench"]["options"].update(integrator="adaptive", phase_noise=0.1)
    with pytest.raises(ProtocolError, match="adaptive integrator"):
        load_protocol(doc)


def test_input_encoding() -> None:
    phases = LayeredOIM.input_phases(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(phases, [math.pi, math.pi / 2, 0.0])


@pytest.mark.slow
@needs_mnist
def test_oim_mnist_reaches_95_percent(tmp_path) -> None:
    """The paper's 784-500-10 OIM on the 8k/2k split, the protocol as shipped."""
    loaded = load_protocol(PROTOCOLS / "oim_mnist.yaml", [f"dataset.path={MNIST}"])
    with RunStore(tmp_path / "runs.db") as store:
        assert Trainer(loaded, store, progress=False).run().test_accuracy >= 0.95


def test_branch_free_sincos_matches_libm_to_an_ulp() -> None:
    """The kernels' cos and sin (simulators/sincos.py) agree with numpy's to within an ulp
    everywhere a relaxation's phases go, at the quadrant edges too, for float32 and float64
    phases; a NaN phase gives NaN."""
    import numba

    from labep.simulators.sincos import sincos

    @numba.njit
    def both(x):
        c, s = np.empty(x.shape[0]), np.empty(x.shape[0])
        for u in range(x.shape[0]):
            c[u], s[u] = sincos(x[u])
        return c, s

    edges = np.arange(-400, 401) * (math.pi / 4)
    x = np.concatenate([np.random.default_rng(0).uniform(-1e4, 1e4, 20_000), edges,
                        np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf), [0.0]])
    for phases in (x, x.astype(np.float32)):
        exact = phases.astype(np.float64)
        c, s = both(phases)
        assert np.abs(c - np.cos(exact)).max() <= 2.3e-16
        assert np.abs(s - np.sin(exact)).max() <= 2.3e-16
    assert np.isnan(both(np.array([np.nan]))[0]).all()



def test_single_precision_sincos_is_accurate_to_float32() -> None:
    """sincos_single (the float32 kernels') is within 6e-11 of numpy's cos and sin over the
    same phases, far under a float32 ulp; sincos_like picks it for float32 arrays only (float64
    ones get sincos, bit for bit); a NaN phase gives NaN."""
    import numba

    from labep.simulators.sincos import sincos, sincos_like, sincos_single

    @numba.njit
    def run(x, single):
        c, s = np.empty(x.shape[0]), np.empty(x.shape[0])
        for u in range(x.shape[0]):
            c[u], s[u] = sincos_single(x[u]) if single else sincos(x[u])
        return c, s

    @numba.njit
    def like(x):
        c, s = np.empty(x.shape[0]), np.empty(x.shape[0])
        for u in range(x.shape[0]):
            c[u], s[u] = sincos_like(x, x[u])
        return c, s

    edges = np.arange(-400, 401) * (math.pi / 4)
    x = np.concatenate([np.random.default_rng(1).uniform(-1e4, 1e4, 20_000), edges,
                        np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf), [0.0]])
    single = x.astype(np.float32)
    c, s = run(single, True)
    exact = single.astype(np.float64)
    assert np.abs(c - np.cos(exact)).max() <= 6e-11
    assert np.abs(s - np.sin(exact)).max() <= 6e-11
    for got, want in zip(like(single), (c, s), strict=True):
        assert np.array_equal(got, want)
    for got, want in zip(like(x), run(x, False), strict=True):
        assert np.array_equal(got, want)
    assert np.isnan(run(np.array([np.nan], dtype=np.float32), True)[0]).all()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("sizes", [(3, 7, 2), (2, 3, 9, 6, 11, 1), (4, 12, 5, 13, 3)])
def test_one_euler_step_of_the_kernel_is_the_model_force(sizes, dtype: str) -> None:
    """One Euler step of the numba kernel moves every phase by dt * model.force: its coupling
    rows taken a few a pass (groups of 5 and 4 with short last groups, blocks stored
    transposed or not, layers growing and shrinking) give the model's -dE/dphi, to float64
    rounding in float64 and to float32 rounding in float32."""
    model = LayeredOIM(sizes, shil=0.3)
    sim = OIMSimulator(model, OIMSimulatorOptions(dtype=dtype, dt=0.01, integrator="euler"))
    params = model.init_params(np.random.default_rng(5))
    params = {k: v + 0.3 * np.random.default_rng(6).standard_normal(v.shape)
              for k, v in params.items()}  # biases h, g not zero either
    sim.write(params)
    rng = np.random.default_rng(7)
    x = rng.random((4, sizes[0])).astype(dtype)
    start = rng.uniform(0.0, 2.0 * np.pi, (4, model.state_size)).astype(dtype)
    stored = sim.read_params()  # the float32 bench rounds the parameters
    got = sim.relax(x, start=start.copy(), settle=Settle(1e-30, 1)).state
    want = (start.astype(np.float64) + 0.01 * model.force(
        x.astype(np.float64), start.astype(np.float64),
        {k: v.astype(np.float64) for k, v in stored.items()})) % (2.0 * np.pi)
    gap = np.abs(np.angle(np.exp(1j * (got - want))))
    assert gap.max() <= (1e-14 if dtype == "float64" else 2e-6)

def test_the_residual_is_nan_when_any_force_is() -> None:
    """max |force| as the kernels take it (settle_loop.max_abs): NaN wherever a NaN is, so a
    diverged sample ends its relaxation unsettled; inf above every finite value."""
    from labep.simulators.settle_loop import max_abs

    values = np.random.default_rng(1).normal(size=37)
    assert max_abs(values) == np.abs(values).max()
    for where in (0, 17, 36):
        bad = values.copy()
        bad[where] = np.nan
        assert math.isnan(max_abs(bad))
        bad[where] = -np.inf
        assert max_abs(bad) == np.inf
    assert max_abs(np.zeros(0)) == 0.0


def test_the_clamp_drive_is_cos_and_sin_of_the_input_phases_times_the_couplings() -> None:
    """The numba kernel that replaced the two BLAS products (OIMSimulator._phase_fields):
    cos(phi_0) J_1 and sin(phi_0) J_1, to the bench dtype's rounding, odd input counts too."""
    for sizes in ([7, 5, 3], [784, 40, 10]):
        model = LayeredOIM(sizes, shil=0.1)
        sim = OIMSimulator(model, OIMSimulatorOptions(dtype="float32"))
        sim.open()
        sim.write(model.init_params(np.random.default_rng(0)))
        phases = np.random.default_rng(1).uniform(0, 2 * math.pi, (3, sizes[0]))
        drive_a, drive_b = sim._phase_fields(phases)
        coupling = sim.read_params()["J1"].astype(np.float64)
        scale = np.abs(coupling).sum(axis=0).max()
        np.testing.assert_allclose(drive_a, np.cos(phases) @ coupling, rtol=0, atol=1e-6 * scale)
        np.testing.assert_allclose(drive_b, np.sin(phases) @ coupling, rtol=0, atol=1e-6 * scale)
