"""The quantum bench: a transverse-field Ising processor measured with shots.

Physics: :class:`labep.models.quantum.QuantumIsing` (Massar and Mognetti). A quantum bench
differs from the others in what a "relaxation" is: the processor prepares the ground state
(or the Gibbs state) of H(theta; x) + beta C_op and is then *measured*, with a finite number
of shots, in a few bases. Every read-back quantity of the model is a Z string or an X_a, so
two measurement settings per phase suffice (the strategy Massar and Mognetti discuss for
commuting groups):

- setting Z: every qubit measured in the computational basis: the outcome frequencies give
  <Z_a> and every <Z_a Z_b> of the coupled pairs at once;
- setting X: a Hadamard on every qubit, then Z: the frequencies give every <X_a>.

A hardware quantum backend implements :class:`QuantumBackend` (``prepare`` a Hamiltonian's
state, ``measure`` a setting with a number of shots) and is trained through
:class:`QuantumBench` unchanged; :class:`ExactBackend` is that very interface by exact
diagonalization (:mod:`labep.models.qubits`), the simulator a lab runs before hardware.

Imperfections are fields of :class:`QuantumSimulatorOptions`, all off by default: ``shots``
(None: exact expectation values), ``temperature`` (0: the ground state; T > 0: the Gibbs state
rho ~ exp(-H / T), dense, for up to :data:`MAX_GIBBS_QUBITS` qubits). A ground state whose gap
E_1 - E_0 is below ``min_gap`` is (near) degenerate: its phase is reported unsettled and never
used for an update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

from labep.hardware.bench import (
    BenchError,
    BenchIdentity,
    Nudge,
    Relaxation,
    Settle,
)
from labep.models.quantum import QuantumIsing
from labep.models.qubits import (
    MAX_QUBITS,
    QubitRegister,
    gibbs_weights,
    lowest_states,
    sample_counts,
)
from labep.protocol.strict import STRICT_CONFIG
from labep.simulators.exact_parameters import ExactParameters

#: qubits up to which a Gibbs state (a full diagonalization) is prepared
MAX_GIBBS_QUBITS = 11

Basis = Literal["Z", "X"]


@dataclass(frozen=True)
class Preparation:
    """How a prepared state came out: ``gap`` E_1 - E_0 (inf for a Gibbs state),
    ``residual`` |H psi - E_0 psi| of the ground state (0 for a Gibbs state), ``energy``."""

    energy: float
    gap: float
    residual: float


class QuantumBackend(Protocol):
    """What a quantum processor must do for labep (a hardware driver implements this).

    ``prepare`` takes H = sum J_ab Z_a Z_b + sum h_a Z_a + sum g_a X_a as its terms (``edges``
    (m, 2) qubit pairs, ``couplings`` (m,), ``fields`` (n,), ``transverse`` (n,)) and prepares
    its ground state (adiabatically, variationally, or by cooling: the backend's business);
    ``measure`` measures every qubit of that state in one ``basis`` ``shots`` times (``None``:
    the exact distribution, simulators only) and returns the outcome frequencies over the 2^n
    basis states (qubit a is bit a of the index)."""

    n_qubits: int

    def prepare(self, edges: np.ndarray, couplings: np.ndarray, fields: np.ndarray,
                transverse: np.ndarray) -> Preparation: ...

    def measure(self, basis: Basis, shots: int | None) -> np.ndarray: ...


class ExactBackend:
    """:class:`QuantumBackend` by exact diagonalization: the ground state (sparse Lanczos
    above 512 basis states) or, at ``temperature`` T > 0, the Gibbs state; shots are drawn
    from the exact outcome distribution with the seeded ``rng``."""

    def __init__(self, n_qubits: int, rng: np.random.Generator, temperature: float = 0.0,
                 tolerance: float = 0.0) -> None:
        if temperature > 0 and n_qubits > MAX_GIBBS_QUBITS:
            raise BenchError(f"quantum: a Gibbs state of {n_qubits} qubits is a dense "
                             f"2^{n_qubits} diagonalization; at most {MAX_GIBBS_QUBITS}")
        self.n_qubits = int(n_qubits)
        self.register = QubitRegister(n_qubits)
        self.rng = rng
        self.temperature = float(temperature)
        self.tolerance = float(tolerance)
        self._distributions: dict[Basis, np.ndarray] = {}

    def prepare(self, edges: np.ndarray, couplings: np.ndarray, fields: np.ndarray,
                transverse: np.ndarray) -> Preparation:
        hamiltonian = self.register.hamiltonian(edges, couplings, fields, transverse)
        if self.temperature > 0:
            states = lowest_states(hamiltonian, everything=True)
            weights = gibbs_weights(states.energies, self.temperature)
            vectors = states.vectors
            self._distributions = {
                "Z": (vectors * vectors) @ weights,
                "X": (lambda v: (v * v) @ weights)(self.register.hadamard(vectors)),
            }
            return Preparation(float(weights @ states.energies), float("inf"), 0.0)
        states = lowest_states(hamiltonian, tolerance=self.tolerance)
        psi = states.vectors[:, 0]
        residual = float(np.linalg.norm(hamiltonian @ psi - states.energies[0] * psi))
        rotated = self.register.hadamard(psi)
        self._distributions = {"Z": psi * psi, "X": rotated * rotated}
        return Preparation(float(states.energies[0]), states.gap, residual)

    def measure(self, basis: Basis, shots: int | None) -> np.ndarray:
        if not self._distributions:
            raise BenchError("quantum: measure before prepare")
        exact = self._distributions[basis]
        if shots is None:
            return exact.copy()
        return sample_counts(exact, shots, self.rng) / shots


class QuantumSimulatorOptions(BaseModel):
    """Options of the ``quantum`` simulator bench (``bench.options`` in a protocol)."""

    model_config = STRICT_CONFIG

    shots: int | None = Field(
        None, ge=1, le=10**9,
        description="Measurement shots per setting (two settings, Z and X, per phase and "
        "sample); None: exact expectation values.")
    temperature: float = Field(
        0.0, ge=0.0, le=1e6,
        description="T of the Gibbs state rho ~ exp(-H / T); 0: the ground state.")
    min_gap: float = Field(
        1e-6, ge=0.0,
        description="A ground state with E_1 - E_0 below this is (near) degenerate: the "
        "sample's phase is unsettled and never used.")
    seed: int = Field(0, ge=0, description="Draws the measurement shots.")
    coupling_range: float | None = Field(
        None, gt=0.0, description="|J| <= coupling_range; writes outside are refused.")
    field_range: float | None = Field(
        None, gt=0.0, description="|h|, |g| <= field_range; writes outside are refused.")
    eigen_tolerance: float = Field(
        0.0, ge=0.0, description="Relative tolerance of the Lanczos solve (0: machine "
        "precision).")
    dtype: Literal["float64"] = Field(
        "float64", description="The precision of the state vectors (always float64; named so "
        "that `labep gradcheck` can ask for it as on every simulator).")


class QuantumBench(ExactParameters):
    """The Bench contract over any :class:`QuantumBackend`: parameters are the Hamiltonian's
    terms, a relaxation prepares the state of each sample's H + beta C_op and measures it in
    the Z and X settings. ``shots_used`` counts every shot since the bench was built."""

    name = "quantum"
    model_kinds = ("quantum_ising",)

    def __init__(self, model: QuantumIsing, options: QuantumSimulatorOptions,
                 backend: QuantumBackend) -> None:
        if backend.n_qubits != model.n_qubits:
            raise BenchError(f"{self.name}: the backend has {backend.n_qubits} qubits, the "
                             f"network {model.n_qubits}")
        self.model = model
        self.options = options
        self.backend = backend
        self.shots_used = 0
        self._store_parameters(model, lambda name: options.coupling_range
                               if name.startswith("J") else options.field_range,
                               "expectation value")

    # -- lifecycle and parameters -----------------------------------------------------------

    def open(self) -> BenchIdentity:
        sizes = "-".join(map(str, self.model.sizes))
        return BenchIdentity("labep", f"{self.name}-simulator", f"{self.name}-{sizes}",
                             "exact-diagonalization")

    # -- a phase ----------------------------------------------------------------------------

    def relax(self, inputs: np.ndarray, nudge: Nudge | None = None,
              start: np.ndarray | None = None, settle: Settle | None = None) -> Relaxation:
        """Prepare and measure every sample's state of H(theta; x) + beta C_op.

        ``start`` is ignored (a ground state does not depend on where a preparation starts).
        ``steps`` is 1 per sample (one preparation); ``residual`` the eigen-residual; a sample
        converges when its residual is within ``settle.tolerance`` (relative to |E_0|) and
        its gap is at least ``min_gap``. ``info`` has ``shots`` (this phase's) and
        ``min_gap`` (the smallest gap met)."""
        if settle is not None and settle.samples:
            raise BenchError(f"{self.name}: a quantum bench returns expectation values, not "
                             "sample sets; use the one_sided or symmetric estimator")
        if nudge is not None and nudge.correction:
            raise BenchError(f"{self.name}: the non-conservative correction does not apply")
        inputs = np.asarray(inputs, dtype=np.float64)
        strength = 0.0 if nudge is None else float(nudge.strength)
        tolerance = 1e-8 if settle is None else float(settle.tolerance)
        register = self.model.register
        batch = len(inputs)
        state = np.empty((batch, self.model.state_size))
        converged = np.empty(batch, dtype=bool)
        residual = np.empty(batch)
        gaps = np.empty(batch)
        shots = self.options.shots
        for index in range(batch):
            target = None if nudge is None else nudge.target[index]
            couplings, fields, transverse = self.model.terms(inputs[index], self._params,
                                                             strength, target)
            prepared = self.backend.prepare(self.model.edges, couplings, fields, transverse)
            z_freq = self.backend.measure("Z", shots)
            x_freq = self.backend.measure("X", shots)
            state[index] = self.model.measurements(z_freq, register.z @ x_freq)
            gaps[index] = prepared.gap
            residual[index] = prepared.residual
            converged[index] = (prepared.residual <= tolerance * max(1.0, abs(prepared.energy))
                                and prepared.gap >= self.options.min_gap)
        phase_shots = 0 if shots is None else 2 * shots * batch
        self.shots_used += phase_shots
        return Relaxation(state, converged, np.ones(batch, dtype=np.int64), residual,
                          {"shots": phase_shots, "min_gap": float(gaps.min(initial=np.inf)),
                           "settings": 2})


class QuantumSimulator(QuantumBench):
    """A transverse-field Ising processor by exact diagonalization, measured with shots.

    :class:`QuantumBench` on :class:`ExactBackend`."""

    options_model = QuantumSimulatorOptions
    #: option values ``labep gradcheck`` runs with: exact expectation values, no shot noise
    exact_options: ClassVar[dict[str, Any]] = {"shots": None}

    @classmethod
    def check_model(cls, section: Any, options: QuantumSimulatorOptions
                    ) -> list[tuple[tuple[Any, ...], str]]:
        """At validation, before any bench opens: a Gibbs state (T > 0) is a dense
        diagonalization of all 2^n levels, refused above :data:`MAX_GIBBS_QUBITS` qubits
        (the ground state's limit, :data:`MAX_QUBITS`, is the model section's own check)."""
        qubits = sum(section.sizes)
        if options.temperature > 0 and qubits > MAX_GIBBS_QUBITS:
            dense = (1 << qubits) ** 2 * 8
            return [(("model", "sizes"),
                     f"{qubits} qubits at temperature {options.temperature:g}: a Gibbs state "
                     f"is a dense diagonalization of all 2^{qubits} levels "
                     f"({dense / 2**30:,.1f} GiB a matrix); at most MAX_GIBBS_QUBITS = "
                     f"{MAX_GIBBS_QUBITS} qubits at T > 0 (temperature 0 takes up to "
                     f"MAX_QUBITS = {MAX_QUBITS} by Lanczos)")]
        return []

    def __init__(self, model: QuantumIsing, options: QuantumSimulatorOptions | None = None
                 ) -> None:
        options = options or QuantumSimulatorOptions()
        if model.n_qubits > MAX_QUBITS:
            raise BenchError(f"quantum: {model.n_qubits} qubits; the simulator holds at most "
                             f"{MAX_QUBITS}")
        self._rng = np.random.default_rng([options.seed, 7])
        backend = ExactBackend(model.n_qubits, self._rng, options.temperature,
                               options.eigen_tolerance)
        super().__init__(model, options, backend)

    def save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The shot generator's state and the shot count, with the parameters."""
        return ({"rng": self._rng.bit_generator.state, "shots_used": self.shots_used},
                {name: value.copy() for name, value in self._params.items()})

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._rng.bit_generator.state = meta["rng"]
        self.shots_used = int(meta["shots_used"])
        for name in self._params:
            self._params[name] = np.array(arrays[name], dtype=np.float64)
