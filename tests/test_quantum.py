"""The quantum bench's physics: Pauli operators, ground and Gibbs states, Hellmann-Feynman EP
against the exact (perturbation-theory) gradient, shot noise and the degenerate-gap refusal."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sparse

from labep.hardware.bench import BenchError, Nudge, OutOfRangeError, Settle
from labep.models import qubits
from labep.models.quantum import QuantumIsing
from labep.models.qubits import QubitRegister, ground_adjoint, lowest_states
from labep.simulators.quantum import QuantumSimulator, QuantumSimulatorOptions

PAULI = {"I": np.eye(2), "Z": np.diag([1.0, -1.0]), "X": np.array([[0.0, 1.0], [1.0, 0.0]])}


def kron_operator(n: int, factors: dict[int, str]) -> np.ndarray:
    """A Pauli string on n qubits by Kronecker products (qubit 0 the least significant)."""
    out = np.array([[1.0]])
    for qubit in reversed(range(n)):
        out = np.kron(out, PAULI[factors.get(qubit, "I")])
    return out


def flat(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([params[name].ravel() for name in sorted(params)])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
def network() -> tuple[QuantumIsing, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    model = QuantumIsing([2, 3, 2])
    rng = np.random.default_rng(11)
    params = model.init_params(rng)
    inputs = rng.uniform(size=(3, 2))
    return model, params, inputs, model.encode_target(np.array([0, 1, 1]))


def test_hamiltonian_matches_kronecker_products() -> None:
    n = 4
    rng = np.random.default_rng(3)
    register = QubitRegister(n)
    edges = np.array([(0, 1), (1, 3), (0, 2)])
    J, h, g = rng.normal(size=3), rng.normal(size=n), rng.normal(size=n)
    dense = sum(J[k] * kron_operator(n, {int(a): "Z", int(b): "Z"})
                for k, (a, b) in enumerate(edges))
    dense += sum(h[a] * kron_operator(n, {a: "Z"}) + g[a] * kron_operator(n, {a: "X"})
                 for a in range(n))
    assert np.abs(register.hamiltonian(edges, J, h, g).toarray() - dense).max() < 1e-12
    vector = rng.normal(size=2 ** n)
    vector /= np.linalg.norm(vector)
    hadamard = kron_operator(0, {})
    for _ in range(n):
        hadamard = np.kron(hadamard, np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2))
    assert np.abs(register.hadamard(vector) - hadamard @ vector).max() < 1e-12
    x_exact = [vector @ kron_operator(n, {a: "X"}) @ vector for a in range(n)]
    assert np.abs(register.x_expectations(vector) - x_exact).max() < 1e-12


def test_lanczos_and_dense_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    model = QuantumIsing([2, 3, 2])
    params = model.init_params(np.random.default_rng(5))
    hamiltonian = model.hamiltonian(np.array([0.2, 0.9]), params)
    dense = lowest_states(hamiltonian)
    monkeypatch.setattr(qubits, "DENSE_DIMENSION", 8)
    lanczos = lowest_states(hamiltonian)
    assert not lanczos.complete
    assert np.allclose(lanczos.energies, dense.energies, atol=1e-10)
    assert np.abs(lanczos.vectors[:, 0] - dense.vectors[:, 0]).max() < 1e-8
    observable = model.register.z[-1]
    full = lowest_states(hamiltonian, everything=True)
    assert np.abs(ground_adjoint(hamiltonian, lanczos, observable)
                  - ground_adjoint(hamiltonian, full, observable)).max() < 1e-8


def test_exact_gradient_matches_finite_differences(network) -> None:
    model, params, inputs, target = network

    def mean_cost(p: dict[str, np.ndarray]) -> float:
        states = np.array([model.ground_measurements(model.ground_state(x, p).vectors[:, 0])
                           for x in inputs])
        return float(model.cost(states, target).mean())

    exact = model.exact_gradient(inputs, None, target, params)
    step = 1e-6
    for name in params:
        for index in np.ndindex(params[name].shape):
            up = {k: v.copy() for k, v in params.items()}
            down = {k: v.copy() for k, v in params.items()}
            up[name][index] += step
            down[name][index] -= step
            numeric = (mean_cost(up) - mean_cost(down)) / (2 * step)
            assert numeric == pytest.approx(exact[name][index], abs=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_ep_estimate_is_the_exact_gradient(network, symmetric: bool) -> None:
    """Hellmann-Feynman EP on the simulator's exact expectations: cosine >= 0.999 at beta 1e-3
    (one-sided), and the symmetric estimate closer still."""
    model, params, inputs, target = network
    bench = QuantumSimulator(model)
    bench.write(params)
    beta = 1e-3
    free = bench.relax(inputs)
    plus = bench.relax(inputs, Nudge(beta, target))
    if symmetric:
        minus = bench.relax(inputs, Nudge(-beta, target))
        estimate = model.contrast(inputs, plus.state, minus.state, scale=1 / (2 * beta))
    else:
        estimate = model.contrast(inputs, plus.state, free.state, scale=1 / beta)
    exact = flat(model.exact_gradient(inputs, free.state, target, params))
    assert cosine(flat(estimate), exact) > (0.999999 if symmetric else 0.999)
    assert free.all_converged and free.info["shots"] == 0


def test_measured_state_is_the_ground_state(network) -> None:
    model, params, inputs, _ = network
    bench = QuantumSimulator(model)
    bench.write(params)
    free = bench.relax(inputs)
    assert model.residual(inputs, free.state, params).max() < 1e-10
    psi = model.ground_state(inputs[0], params).vectors[:, 0]
    n = model.n_qubits
    _lo, hi = model.output_slice
    z_last = psi @ kron_operator(n, {n - 1: "Z"}) @ psi
    assert free.state[0, hi - 1] == pytest.approx(z_last, abs=1e-12)


def test_gibbs_state_expectations() -> None:
    model = QuantumIsing([1, 2, 1])
    params = model.init_params(np.random.default_rng(2))
    bench = QuantumSimulator(model, QuantumSimulatorOptions(temperature=0.7))
    bench.write(params)
    x = np.array([[0.3]])
    state = bench.relax(x).state[0]
    rho = scipy.linalg.expm(-model.hamiltonian(x[0], params).toarray() / 0.7)
    rho /= np.trace(rho)
    n = model.n_qubits
    for a in range(1, n):
        assert state[a - 1] == pytest.approx(np.trace(rho @ kron_operator(n, {a: "Z"})))
        x_column = model.n_free + model.n_edges + a - 1
        assert state[x_column] == pytest.approx(np.trace(rho @ kron_operator(n, {a: "X"})))


def test_shots_are_seeded_counted_and_converge(network) -> None:
    model, params, inputs, _target = network
    exact_bench = QuantumSimulator(model)
    exact_bench.write(params)
    exact = exact_bench.relax(inputs).state

    def measured(shots: int, seed: int) -> tuple[np.ndarray, int]:
        bench = QuantumSimulator(model, QuantumSimulatorOptions(shots=shots, seed=seed))
        bench.write(params)
        relaxation = bench.relax(inputs)
        return relaxation.state, relaxation.info["shots"]

    first, counted = measured(400, 0)
    assert counted == 2 * 400 * len(inputs)
    assert np.array_equal(first, measured(400, 0)[0])
    assert not np.array_equal(first, measured(400, 1)[0])
    errors = [np.abs(measured(shots, 0)[0] - exact).mean() for shots in (100, 10_000, 1_000_000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 3e-3
    # each single-qubit estimate is a mean of +-1 outcomes: its error is about 1/sqrt(shots)
    assert errors[0] == pytest.approx(np.sqrt(2 / np.pi) * np.sqrt(
        np.mean(1 - exact[:, :model.n_free] ** 2)) / 10, rel=0.5)


def test_shot_generator_resumes_exactly(network) -> None:
    model, params, inputs, _ = network
    bench = QuantumSimulator(model, QuantumSimulatorOptions(shots=50, seed=4))
    bench.write(params)
    bench.relax(inputs)
    meta, arrays = bench.save_state()
    expected = bench.relax(inputs).state
    restored = QuantumSimulator(model, QuantumSimulatorOptions(shots=50, seed=4))
    restored.load_state(meta, arrays)
    assert np.array_equal(restored.relax(inputs).state, expected)
    assert restored.shots_used == bench.shots_used


def test_degenerate_ground_state_is_unsettled() -> None:
    """No transverse field and no coupling: every free qubit with h = 0 is degenerate; such a
    phase is reported unsettled, never used."""
    model = QuantumIsing([1, 1, 1], train_transverse=False, transverse=0.0,
                         input_transverse=0.0)
    params = {name: np.zeros(shape) for name, shape in model.parameter_shapes().items()}
    bench = QuantumSimulator(model)
    bench.write(params)
    relaxation = bench.relax(np.array([[1.0]]), settle=Settle(1e-8, 1))
    assert not relaxation.converged[0]
    assert relaxation.info["min_gap"] < 1e-6
    params["h1"] = np.array([0.5])
    params["h2"] = np.array([-0.5])
    bench.write(params)
    assert bench.relax(np.array([[1.0]]), settle=Settle(1e-8, 1)).converged[0]


def test_ranges_and_sample_sets_are_refused(network) -> None:
    model, _params, inputs, _ = network
    bench = QuantumSimulator(model, QuantumSimulatorOptions(coupling_range=0.1))
    with pytest.raises(OutOfRangeError):
        bench.write({"J1": np.full((2, 3), 0.5)})
    with pytest.raises(BenchError, match="sample sets"):
        bench.relax(inputs, settle=Settle(1e-6, 1, readouts=4, samples=True))


def test_fourteen_qubits_by_lanczos() -> None:
    model = QuantumIsing([4, 6, 4])
    assert model.n_qubits == 14
    params = model.init_params(np.random.default_rng(0))
    bench = QuantumSimulator(model)
    bench.write(params)
    relaxation = bench.relax(np.array([[0.1, 0.5, 0.9, 0.3]]))
    assert relaxation.all_converged
    hamiltonian = model.hamiltonian(np.array([0.1, 0.5, 0.9, 0.3]), params)
    assert isinstance(hamiltonian, sparse.csr_matrix) and hamiltonian.shape == (2**14, 2**14)
    assert relaxation.residual[0] < 1e-8
