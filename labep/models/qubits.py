"""Exact numerics of a transverse-field Ising register: the physics of the quantum bench.

Massar and Mognetti, "Equilibrium Propagation: the Quantum and the Thermal Cases": a network of
qubits with Hamiltonian

    H(theta) = sum_(a,b) J_ab Z_a Z_b + sum_a h_a Z_a + sum_a g_a X_a,

trained through its ground state |psi_0> (or its Gibbs state rho ~ exp(-H/T)). By
Hellmann-Feynman dE_0/dtheta = <psi_0| dH/dtheta |psi_0>, so every parameter's EP measurement
is the expectation of one Pauli string: Z_a Z_b for J_ab, Z_a for h_a, X_a for g_a. All the
Z-strings are diagonal in the computational basis and come from one measurement setting (every
qubit measured in Z); all the X_a from a second (every qubit rotated by a Hadamard first). Two
settings per phase, whatever the size of the network.

Conventions: qubit a is bit a of a basis-state index (qubit 0 least significant); Z|0> = |0>,
so z_a(b) = 1 - 2 bit_a(b). H is real symmetric, so its eigenvectors are real.

Sizes: dense diagonalization up to :data:`DENSE_DIMENSION` basis states, sparse Lanczos
(``scipy.sparse.linalg.eigsh``) above it; 14 qubits (16,384 states) take about 0.1 s per state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg

#: basis states up to which a Hamiltonian is diagonalized densely (all eigenpairs, exact)
DENSE_DIMENSION = 512
#: qubits beyond which the register is refused (2^20 amplitudes: 8 MB per state vector)
MAX_QUBITS = 20


class QubitRegister:
    """The Pauli operators of an n-qubit register, built once per size.

    ``z[a]`` holds z_a(b) = +-1 for every basis state b (the diagonal of Z_a), ``flip[a]`` the
    basis state X_a maps b to (b with bit a flipped)."""

    def __init__(self, n_qubits: int) -> None:
        if not 1 <= n_qubits <= MAX_QUBITS:
            raise ValueError(f"a register of 1..{MAX_QUBITS} qubits, not {n_qubits}")
        self.n = int(n_qubits)
        self.dimension = 1 << self.n
        states = np.arange(self.dimension, dtype=np.int64)
        bits = (states[None, :] >> np.arange(self.n)[:, None]) & 1
        self.z = (1 - 2 * bits).astype(np.float64)
        self.flip = states[None, :] ^ (np.int64(1) << np.arange(self.n))[:, None]
        self._x_rows = self.flip.ravel()
        self._x_cols = np.tile(states, self.n)

    def diagonal(self, edges: np.ndarray, couplings: np.ndarray, fields: np.ndarray
                 ) -> np.ndarray:
        """The Z part of H on every basis state: sum J_ab z_a z_b + sum h_a z_a.

        ``edges`` (m, 2) qubit pairs with ``couplings`` J (m,); ``fields`` h (n,)."""
        diag = fields @ self.z
        if len(edges):
            diag += couplings @ (self.z[edges[:, 0]] * self.z[edges[:, 1]])
        return diag

    def hamiltonian(self, edges: np.ndarray, couplings: np.ndarray, fields: np.ndarray,
                    transverse: np.ndarray) -> sparse.csr_matrix:
        """H = sum J_ab Z_a Z_b + sum h_a Z_a + sum g_a X_a as a sparse matrix."""
        diag = self.diagonal(edges, couplings, fields)
        data = np.repeat(np.asarray(transverse, dtype=np.float64), self.dimension)
        off = sparse.csr_matrix((data, (self._x_rows, self._x_cols)),
                                shape=(self.dimension, self.dimension))
        return (off + sparse.diags(diag)).tocsr()

    def z_expectations(self, probabilities: np.ndarray, edges: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """<Z_a> and <Z_a Z_b> (over ``edges``) from computational-basis probabilities."""
        singles = self.z @ probabilities
        if not len(edges):
            return singles, np.zeros(0)
        pairs = (self.z[edges[:, 0]] * self.z[edges[:, 1]]) @ probabilities
        return singles, pairs

    def x_expectations(self, vector: np.ndarray) -> np.ndarray:
        """<psi| X_a |psi> for every qubit a of a real state vector."""
        return np.einsum("b,ab->a", vector, vector[self.flip])

    def hadamard(self, vectors: np.ndarray) -> np.ndarray:
        """H^(x n) applied to state vectors (dimension, ...): the X-basis amplitudes (fast
        Walsh-Hadamard transform, n 2^n operations)."""
        out = np.array(vectors, dtype=np.float64, copy=True)
        shape = out.shape
        for a in range(self.n):
            block = out.reshape(self.dimension >> (a + 1), 2, 1 << a, -1)
            even = block[:, 0].copy()
            block[:, 0] += block[:, 1]
            block[:, 1] = even - block[:, 1]
        return out.reshape(shape) / np.sqrt(self.dimension)


@dataclass
class Eigenstates:
    """The lowest eigenpairs of a Hamiltonian: ``energies`` ascending, ``vectors`` their
    columns (real, normalized); ``complete`` when every eigenpair is there (dense)."""

    energies: np.ndarray
    vectors: np.ndarray
    complete: bool

    @property
    def gap(self) -> float:
        """E_1 - E_0: below a threshold the ground state is (near) degenerate and not used."""
        return float(self.energies[1] - self.energies[0]) if len(self.energies) > 1 else np.inf


def lowest_states(hamiltonian: sparse.csr_matrix, *, count: int = 2, everything: bool = False,
                  tolerance: float = 0.0) -> Eigenstates:
    """The ``count`` lowest eigenpairs (all of them with ``everything``, for Gibbs states).

    Dense ``numpy.linalg.eigh`` up to :data:`DENSE_DIMENSION` states (or with
    ``everything``), else Lanczos (``eigsh``, which="SA") from a fixed start vector, so the
    result is deterministic. Each vector's sign is fixed (its largest-magnitude entry > 0)."""
    dimension = hamiltonian.shape[0]
    if everything or dimension <= DENSE_DIMENSION:
        energies, vectors = np.linalg.eigh(hamiltonian.toarray())
        if not everything:
            energies, vectors = energies[:count], vectors[:, :count]
        complete = everything or count >= dimension
    else:
        start = np.linspace(1.0, 2.0, dimension)
        energies, vectors = sparse_linalg.eigsh(hamiltonian, k=count, which="SA", v0=start,
                                                tol=tolerance)
        order = np.argsort(energies)
        energies, vectors = energies[order], vectors[:, order]
        complete = False
    peaks = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    vectors = vectors * np.where(peaks < 0, -1.0, 1.0)
    return Eigenstates(np.asarray(energies, dtype=np.float64), vectors, complete)


def gibbs_weights(energies: np.ndarray, temperature: float) -> np.ndarray:
    """Boltzmann weights exp(-(E_n - E_0) / T) / Z of a complete spectrum (T > 0)."""
    if temperature <= 0.0:
        raise ValueError("a Gibbs state needs a temperature T > 0")
    weights = np.exp(-(energies - energies[0]) / temperature)
    return weights / weights.sum()


def ground_adjoint(hamiltonian: sparse.csr_matrix, states: Eigenstates,
                   observable: np.ndarray) -> np.ndarray:
    """lambda solving (H - E_0) lambda = (O - <O>) psi_0 with lambda orthogonal to psi_0.

    ``observable`` is the diagonal of an operator O in the computational basis (the cost
    operator). First-order perturbation theory then gives the exact gradient of
    <psi_0| O |psi_0> for any parameter: d<O>/dtheta = -2 lambda^T (dH/dtheta) psi_0. Dense
    pseudo-inverse on a complete spectrum, MINRES on the deflated operator otherwise."""
    psi = states.vectors[:, 0]
    energy = states.energies[0]
    source = observable * psi
    source -= (psi @ source) * psi
    if states.complete:
        excited = states.vectors[:, 1:]
        return excited @ ((excited.T @ source) / (states.energies[1:] - energy))
    dimension = hamiltonian.shape[0]

    def deflated(vector: np.ndarray) -> np.ndarray:
        vector = vector - (psi @ vector) * psi
        out = hamiltonian @ vector - energy * vector
        return out - (psi @ out) * psi

    operator = sparse_linalg.LinearOperator((dimension, dimension), matvec=deflated,
                                            dtype=np.float64)
    solution, info = sparse_linalg.minres(operator, source, rtol=1e-12, maxiter=20 * dimension)
    if info != 0:
        raise RuntimeError(f"the adjoint solve did not converge (minres info {info})")
    return solution - (psi @ solution) * psi


def sample_counts(probabilities: np.ndarray, shots: int, rng: np.random.Generator
                  ) -> np.ndarray:
    """Outcome counts of ``shots`` projective measurements with these probabilities."""
    clean = np.clip(probabilities, 0.0, None)
    return rng.multinomial(shots, clean / clean.sum()).astype(np.float64)
