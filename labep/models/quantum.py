"""Quantum EP on a layered transverse-field Ising network (Massar and Mognetti, "Equilibrium
Propagation: the Quantum and the Thermal Cases").

Qubits in layers 0 (inputs) .. L (outputs), couplings J_l between every qubit of layer l-1
and every qubit of layer l, and on every qubit of layers 1..L a longitudinal field h and a
transverse field g:

    H(theta; x) = sum_l sum_ij J_l[i, j] Z_(l-1,i) Z_(l,j) + sum_(a free) (h_a Z_a + g_a X_a)
                  - c sum_i (2 x_i - 1) Z_(0,i) + g_in sum_i X_(0,i).

An input x_i in [0, 1] is clamped by a field of strength c (``clamp``) on input qubit i, so
that <Z_(0,i)> follows 2 x_i - 1 (a transverse field g_in lets it take values between -1 and
1). The network's state is its ground state |psi_0> (a Gibbs state at temperature T on a
thermal bench). The cost is the expectation of the operator

    C_op = 1/2 sum_k (Z_(L,k) - y_k)^2 = sum_k (1 + y_k^2) / 2 - sum_k y_k Z_(L,k)

on the output qubits (targets y = +1 for the class, -1 for the others), so the nudged
Hamiltonian H + beta C_op only adds the field -beta y_k to output qubit k, and by
Hellmann-Feynman the EP estimate (<dH/dtheta>_beta - <dH/dtheta>_0) / beta tends to
d<C_op>_0 / dtheta as beta -> 0.

Read-back state (one row per sample): <Z_a> of the free qubits (layer by layer), <Z_a Z_b> of
every coupled pair (J_1 row-major, then J_2, ...) and <X_a> of the free qubits. These are
exactly the local measurements dE/dtheta: dE/dJ_l[i, j] = <Z Z>, dE/dh_a = <Z_a>,
dE/dg_a = <X_a>. The Z strings share one measurement setting (all qubits in Z) and the X_a a
second (all qubits in X): two settings per phase.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from labep.models import Params
from labep.models.qubits import MAX_QUBITS, QubitRegister, ground_adjoint, lowest_states
from labep.protocol.sections import ModelSection


class QuantumIsingConfig(ModelSection):
    """Layered transverse-field Ising network (Massar and Mognetti's quantum EP): qubit layers
    ``sizes`` [n_0 (input qubits), n_1, ..., n_L (output qubits, one per class)].

    The whole register, sum(sizes) qubits, is diagonalized exactly by the simulator (and the
    model computes its expectations over the 2^n basis states), so at most
    :data:`labep.models.qubits.MAX_QUBITS` qubits are accepted (a bench at temperature T > 0
    refuses more than its own, smaller limit at validation)."""

    kind: Literal["quantum_ising"]
    sizes: list[PositiveInt] = Field(min_length=2, max_length=MAX_QUBITS)
    clamp: float = Field(2.0, ge=0.0, le=1e3, description="c: input qubit i gets the "
                         "longitudinal field -c (2 x_i - 1).")
    input_transverse: float = Field(0.5, ge=-1e3, le=1e3, description="g_in: the transverse "
                                    "field on every input qubit (lets <Z> take values in "
                                    "between -1 and 1).")
    transverse: float = Field(0.5, ge=-1e3, le=1e3, description="g: the initial (or, without "
                              "train_transverse, the fixed) transverse field of a free qubit.")
    train_transverse: bool = Field(True, description="Train the transverse fields g_a too "
                                   "(measured in the X setting).")
    init_gain: PositiveFloat = Field(1.0, le=1e3, description="J_l, h_l ~ U(-gain / "
                                     "sqrt(n_(l-1)), +gain / sqrt(n_(l-1))).")

    @model_validator(mode="after")
    def _fits_the_register(self) -> QuantumIsingConfig:
        qubits = sum(self.sizes)
        if qubits > MAX_QUBITS:
            vector = (1 << qubits) * 8
            raise ValueError(
                f"{qubits} qubits (sizes {self.sizes}): the register is diagonalized exactly, "
                f"2^{qubits} amplitudes ({vector / 2**20:,.0f} MiB a state vector, several "
                f"times that for the Hamiltonian); at most MAX_QUBITS = {MAX_QUBITS} qubits")
        return self


class QuantumIsing:
    """The model of a layered transverse-field Ising network (``kind: quantum_ising``).

    Parameters ``J1..JL`` (shape (n_(l-1), n_l)), ``h1..hL`` and, with ``train_transverse``,
    ``g1..gL`` (else every free qubit keeps the transverse field ``transverse``)."""

    #: the protocol section this model is built from (``model:``)
    config_model: ClassVar[type[ModelSection]] = QuantumIsingConfig

    kind = "quantum_ising"

    def __init__(self, sizes: list[int] | tuple[int, ...], *, clamp: float = 2.0,
                 input_transverse: float = 0.5, transverse: float = 0.5,
                 train_transverse: bool = True, init_gain: float = 1.0) -> None:
        if len(sizes) < 2 or any(int(n) < 1 for n in sizes):
            raise ValueError(f"layer sizes must be >= 2 positive integers, got {sizes}")
        self.sizes = tuple(int(n) for n in sizes)
        self.clamp = float(clamp)
        self.input_transverse = float(input_transverse)
        self.transverse = float(transverse)
        self.train_transverse = bool(train_transverse)
        self.init_gain = float(init_gain)
        self.n_layers = len(self.sizes) - 1
        self.input_size = self.sizes[0]
        self.output_size = self.sizes[-1]
        self.n_qubits = sum(self.sizes)
        self.n_free = self.n_qubits - self.input_size
        #: first qubit of each layer
        self.qubit_offsets = tuple(int(v) for v in np.cumsum((0, *self.sizes[:-1])))
        edges = []
        for layer in range(1, self.n_layers + 1):
            below, here = self.qubit_offsets[layer - 1], self.qubit_offsets[layer]
            edges += [(below + i, here + j) for i in range(self.sizes[layer - 1])
                      for j in range(self.sizes[layer])]
        self.edges = np.array(edges, dtype=np.int64).reshape(-1, 2)
        self.n_edges = len(self.edges)
        self.state_size = 2 * self.n_free + self.n_edges
        self._register: QubitRegister | None = None

    # -- layout -----------------------------------------------------------------------------

    @property
    def output_slice(self) -> tuple[int, int]:
        """<Z> of the output qubits inside a state row."""
        return self.n_free - self.output_size, self.n_free

    @property
    def register(self) -> QubitRegister:
        """The Pauli operators of all n qubits (built on first use)."""
        if self._register is None:
            self._register = QubitRegister(self.n_qubits)
        return self._register

    def _free_slice(self, layer: int) -> slice:
        start = self.qubit_offsets[layer] - self.input_size
        return slice(start, start + self.sizes[layer])

    def _edge_slice(self, layer: int) -> slice:
        start = sum(self.sizes[k - 1] * self.sizes[k] for k in range(1, layer))
        return slice(start, start + self.sizes[layer - 1] * self.sizes[layer])

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(1, self.n_layers + 1):
            shapes[f"J{layer}"] = (self.sizes[layer - 1], self.sizes[layer])
        for layer in range(1, self.n_layers + 1):
            shapes[f"h{layer}"] = (self.sizes[layer],)
        if self.train_transverse:
            for layer in range(1, self.n_layers + 1):
                shapes[f"g{layer}"] = (self.sizes[layer],)
        return shapes

    def layer_of(self, name: str) -> int:
        """The coupling layer l a parameter belongs to (its learning-rate group)."""
        return int(name[1:])

    def init_params(self, rng: np.random.Generator) -> Params:
        """J_l, h_l ~ U(-gain / sqrt(n_(l-1)), +gain / sqrt(n_(l-1))); g_l = ``transverse``."""
        params: Params = {}
        for name, shape in self.parameter_shapes().items():
            if name.startswith("g"):
                params[name] = np.full(shape, self.transverse)
                continue
            bound = self.init_gain / np.sqrt(self.sizes[self.layer_of(name) - 1])
            params[name] = rng.uniform(-bound, bound, size=shape)
        return params

    # -- the Hamiltonian --------------------------------------------------------------------

    def terms(self, inputs: np.ndarray, params: Params, strength: float = 0.0,
              target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(couplings over :attr:`edges`, longitudinal fields, transverse fields) of
        H + beta C_op for one sample (``inputs`` (n_0,), ``target`` (n_L,)), constants dropped."""
        couplings = np.concatenate([np.asarray(params[f"J{layer}"], dtype=np.float64).ravel()
                                    for layer in range(1, self.n_layers + 1)])
        fields = np.empty(self.n_qubits)
        transverse = np.empty(self.n_qubits)
        fields[:self.input_size] = -self.clamp * (2.0 * np.asarray(inputs, np.float64) - 1.0)
        transverse[:self.input_size] = self.input_transverse
        for layer in range(1, self.n_layers + 1):
            span = slice(self.qubit_offsets[layer], self.qubit_offsets[layer] + self.sizes[layer])
            fields[span] = params[f"h{layer}"]
            transverse[span] = params[f"g{layer}"] if self.train_transverse else self.transverse
        if strength:
            fields[self.n_qubits - self.output_size:] -= strength * np.asarray(target, np.float64)
        return couplings, fields, transverse

    def hamiltonian(self, inputs: np.ndarray, params: Params, strength: float = 0.0,
                    target: np.ndarray | None = None):
        """H(theta; x) + beta C_op as a sparse matrix (constants dropped)."""
        return self.register.hamiltonian(self.edges, *self.terms(inputs, params, strength,
                                                                 target))

    # -- measurements -----------------------------------------------------------------------

    def measurements(self, z_probabilities: np.ndarray, x_expectations: np.ndarray
                     ) -> np.ndarray:
        """A state row from the Z-setting outcome probabilities (2^n,) and <X_a> (n,)."""
        singles, pairs = self.register.z_expectations(z_probabilities, self.edges)
        return np.concatenate([singles[self.input_size:], pairs,
                               x_expectations[self.input_size:]])

    def ground_measurements(self, vector: np.ndarray) -> np.ndarray:
        """The exact state row of a pure state |psi> (real amplitudes)."""
        return self.measurements(vector * vector, self.register.x_expectations(vector))

    def _local(self, state: np.ndarray) -> Params:
        """dE/dtheta of every sample: the measurement columns, shaped per parameter."""
        batch = len(state)
        out: Params = {}
        z = state[:, :self.n_free]
        pairs = state[:, self.n_free:self.n_free + self.n_edges]
        x = state[:, self.n_free + self.n_edges:]
        for layer in range(1, self.n_layers + 1):
            out[f"J{layer}"] = pairs[:, self._edge_slice(layer)].reshape(
                batch, self.sizes[layer - 1], self.sizes[layer])
            out[f"h{layer}"] = z[:, self._free_slice(layer)]
            if self.train_transverse:
                out[f"g{layer}"] = x[:, self._free_slice(layer)]
        return out

    def contrast(self, inputs: np.ndarray, state_a: np.ndarray, state_b: np.ndarray,
                 weights: np.ndarray | None = None, scale: float = 1.0) -> Params:
        """``scale`` x the sample-weighted mean of dE/dtheta(a) - dE/dtheta(b)."""
        a = self._local(np.asarray(state_a, dtype=np.float64))
        b = self._local(np.asarray(state_b, dtype=np.float64))
        batch = len(state_a)
        w = np.full(batch, 1.0 / batch) if weights is None else np.asarray(weights, float)
        if weights is not None:
            total = w.sum()
            w = w / total if total > 0 else w
        return {name: scale * np.tensordot(w, a[name] - b[name], axes=1) for name in a}

    # -- cost -------------------------------------------------------------------------------

    def cost(self, state: np.ndarray, target: np.ndarray) -> np.ndarray:
        """<C_op> = sum_k (1 + y_k^2) / 2 - y_k <Z_(L,k)> per sample."""
        lo, hi = self.output_slice
        target = np.asarray(target, dtype=np.float64)
        return np.sum(0.5 * (1.0 + target ** 2) - target * state[:, lo:hi], axis=1)

    def encode_target(self, labels: np.ndarray) -> np.ndarray:
        """y = +1 for the class's output qubit, -1 for the others."""
        target = -np.ones((len(labels), self.output_size))
        target[np.arange(len(labels)), labels] = 1.0
        return target

    def predict(self, state: np.ndarray) -> np.ndarray:
        """The output qubit with the largest <Z>."""
        lo, hi = self.output_slice
        return np.argmax(state[:, lo:hi], axis=1)

    # -- exact references -------------------------------------------------------------------

    def ground_state(self, inputs: np.ndarray, params: Params):
        """The lowest two eigenpairs of H(theta; x) for one sample (float64)."""
        return lowest_states(self.hamiltonian(inputs, params))

    def exact_gradient(self, inputs: np.ndarray, state: np.ndarray, target: np.ndarray,
                       params: Params) -> Params:
        """d(mean <C_op>_0)/dtheta at the ground state, by first-order perturbation theory:
        with (H - E_0) lambda = (C_op - <C_op>) psi_0 and lambda orthogonal to psi_0,
        d<C_op>/dtheta = -2 lambda^T (dH/dtheta) psi_0 (float64, one solve per sample;
        ``state`` is not used: the ground state is recomputed from the parameters)."""
        register = self.register
        grads = {name: np.zeros(shape) for name, shape in self.parameter_shapes().items()}
        outputs = np.arange(self.n_qubits - self.output_size, self.n_qubits)
        for x, y in zip(np.asarray(inputs), np.asarray(target), strict=True):
            hamiltonian = self.hamiltonian(x, params)
            states = lowest_states(hamiltonian)
            psi = states.vectors[:, 0]
            cost_diagonal = -(np.asarray(y, dtype=np.float64) @ register.z[outputs])
            adjoint = ground_adjoint(hamiltonian, states, cost_diagonal)
            weighted = adjoint * psi
            z_terms = register.z @ weighted  # lambda^T Z_a psi
            pair_terms = (register.z[self.edges[:, 0]] * register.z[self.edges[:, 1]]
                          ) @ weighted
            x_terms = np.array([adjoint @ psi[flip] for flip in register.flip])
            for layer in range(1, self.n_layers + 1):
                span = slice(self.qubit_offsets[layer],
                             self.qubit_offsets[layer] + self.sizes[layer])
                grads[f"J{layer}"] += -2.0 * pair_terms[self._edge_slice(layer)].reshape(
                    self.sizes[layer - 1], self.sizes[layer])
                grads[f"h{layer}"] += -2.0 * z_terms[span]
                if self.train_transverse:
                    grads[f"g{layer}"] += -2.0 * x_terms[span]
        return {name: value / len(inputs) for name, value in grads.items()}

    def residual(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """Per sample, max |read-back - exact ground-state measurement| (how far a read-back
        free state is from the true ground state's expectations)."""
        out = np.empty(len(state))
        for index, x in enumerate(np.asarray(inputs)):
            exact = self.ground_measurements(self.ground_state(x, params).vectors[:, 0])
            out[index] = float(np.max(np.abs(np.asarray(state[index], np.float64) - exact)))
        return out
