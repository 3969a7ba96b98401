"""Lagrangian EP on coupled nonlinear oscillators (Massar, "Equilibrium Propagation for
Learning in Lagrangian Dynamical Systems").

Coordinates q in layers 0 (inputs, prescribed) .. L (outputs), unit masses m, and the
Lagrangian L(q, dq/dt) = sum m/2 (dq/dt)^2 - V(q; theta) with the trainable potential

    V(q) = sum_(a free) (k_a / 2 q_a^2 + u_a / 4 q_a^4)
           + sum_l sum_ij J_l[i, j] / 2 (q_(l-1,i) - q_(l,j))^2

(springs J between consecutive layers, on-site stiffness k and a quartic term u). On a time
grid t_n = n dt the action is S = sum_n dt [sum_a m/2 ((q_(n+1) - q_n) / dt)^2 - V(q_n)]:

- ``periodic``: n = 0..N-1, q_N = q_0 (one period T = N dt of a steady driven oscillation);
- ``fixed``: q_0 = q_N = 0 for the free coordinates (fixed initial and final states), the
  unknowns are q_1..q_(N-1).

An input x_i in [0, 1] prescribes its coordinate q_(0,i)(t) = a (2 x_i - 1) cos(omega t),
omega = 2 pi / T (``drive``: a). The trajectory the physics takes is a stationary point of S
(dS/dq = 0: the discretized Newton equations m q'' = -dV/dq), generally a saddle, not a
minimum. The read-back state is that trajectory: row = the free coordinates' q_n, layer by
layer, each coordinate's N (or N - 1) time points in a row.

The cost acts on the outputs' in-phase amplitude at the drive frequency,
A_k = (2 / N) sum_n q_(L,k)(t_n) cos(omega t_n), as C = 1/2 sum_k (A_k - y_k)^2 with y = +a_y
(the class) and -a_y (the others; ``target_amplitude``: a_y).

EP: the "energy" of labep's estimators is E = -S, so the nudged trajectory, stationary for
E + beta C, extremizes S - beta C, and the update is measured from the conjugate variables of
the parameters: dE/dk_a = dt sum_n q_a^2 / 2, dE/du_a = dt sum_n q_a^4 / 4 and
dE/dJ_l[i, j] = dt sum_n (q_(l-1,i) - q_(l,j))^2 / 2, on the free and the nudged trajectory.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from labep.models import Params
from labep.protocol.sections import ModelSection

Boundary = Literal["periodic", "fixed"]

#: unknowns (free coordinates x time points) a trajectory may have: the Newton solve factors a
#: sparse Hessian of that many rows per sample and phase
MAX_UNKNOWNS = 200_000


class LagrangianOscillatorsConfig(ModelSection):
    """Layered nonlinear oscillators (Massar's Lagrangian EP): coordinate layers ``sizes``
    [n_0 (driven inputs), n_1, ..., n_L (outputs, one per class)], trajectories on a grid of
    ``time_points`` over one ``period``, with ``periodic`` or ``fixed`` boundary conditions."""

    kind: Literal["lagrangian_oscillators"]
    sizes: list[PositiveInt] = Field(min_length=2, max_length=64)
    time_points: int = Field(32, ge=4, le=100_000, description="N, points of the time grid "
                             "(t_n = n T / N).")
    period: PositiveFloat = Field(8.0, le=1e6, description="T = N dt; the drive's angular "
                                  "frequency is omega = 2 pi / T.")
    boundary: Literal["periodic", "fixed"] = Field(
        "periodic", description="periodic: q_N = q_0 (a steady oscillation over one period); "
        "fixed: q_0 = q_N = 0 for the free coordinates (fixed initial and final states).")
    drive: float = Field(1.0, ge=-1e3, le=1e3, description="a: input i's coordinate is "
                         "prescribed as a (2 x_i - 1) cos(omega t).")
    target_amplitude: PositiveFloat = Field(1.0, le=1e3, description="a_y: the class's output "
                                            "amplitude target (+a_y; the others -a_y).")
    mass: PositiveFloat = Field(1.0, le=1e6, description="m, every free coordinate's mass.")
    stiffness: float = Field(1.0, ge=-1e6, le=1e6, description="The initial on-site "
                             "stiffness k.")
    init_gain: PositiveFloat = Field(0.5, le=1e3, description="J_l ~ U(-g / sqrt(n_(l-1)), "
                                     "g / sqrt(n_(l-1))).")

    @model_validator(mode="after")
    def _solvable(self) -> LagrangianOscillatorsConfig:
        unknowns = sum(self.sizes[1:]) * self.time_points
        if unknowns > MAX_UNKNOWNS:
            raise ValueError(f"{sum(self.sizes[1:])} free coordinates x {self.time_points} time "
                             f"points = {unknowns:,} unknowns per trajectory; the Newton solve "
                             f"holds at most MAX_UNKNOWNS = {MAX_UNKNOWNS:,}")
        return self


class LagrangianOscillators:
    """The model of a layered network of nonlinear oscillators
    (``kind: lagrangian_oscillators``).

    Parameters ``J1..JL`` (springs, shape (n_(l-1), n_l)), ``k1..kL`` (stiffness) and
    ``u1..uL`` (quartic potential)."""

    #: the protocol section this model is built from (``model:``)
    config_model: ClassVar[type[ModelSection]] = LagrangianOscillatorsConfig

    kind = "lagrangian_oscillators"

    def __init__(self, sizes: list[int] | tuple[int, ...], *, time_points: int = 32,
                 period: float = 8.0, boundary: Boundary = "periodic", drive: float = 1.0,
                 target_amplitude: float = 1.0, mass: float = 1.0, stiffness: float = 1.0,
                 init_gain: float = 0.5) -> None:
        if len(sizes) < 2 or any(int(n) < 1 for n in sizes):
            raise ValueError(f"layer sizes must be >= 2 positive integers, got {sizes}")
        if time_points < 4:
            raise ValueError("at least 4 time points")
        self.sizes = tuple(int(n) for n in sizes)
        self.n_layers = len(self.sizes) - 1
        self.input_size = self.sizes[0]
        self.output_size = self.sizes[-1]
        self.n_free = sum(self.sizes[1:])
        self.time_points = int(time_points)
        self.period = float(period)
        self.dt = self.period / self.time_points
        self.omega = 2 * np.pi / self.period
        self.boundary: Boundary = boundary
        self.drive = float(drive)
        self.target_amplitude = float(target_amplitude)
        self.mass = float(mass)
        self.stiffness = float(stiffness)
        self.init_gain = float(init_gain)
        #: the time points of the unknowns: all N (periodic) or 1..N-1 (fixed)
        self.times = self.dt * (np.arange(self.time_points) if boundary == "periodic"
                                else np.arange(1, self.time_points))
        self.steps = len(self.times)
        self.state_size = self.n_free * self.steps
        #: first free coordinate of each layer (layer 0: the inputs, not in the state)
        self.offsets = tuple(int(v) for v in np.cumsum((0, 0, *self.sizes[1:-1])))
        #: (2 / N) cos(omega t_n): A_k = readout @ q_(L,k)
        self.readout = 2.0 / self.time_points * np.cos(self.omega * self.times)

    # -- layout -----------------------------------------------------------------------------

    @property
    def output_slice(self) -> tuple[int, int]:
        """The output coordinates' trajectories inside a state row."""
        return (self.n_free - self.output_size) * self.steps, self.state_size

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(1, self.n_layers + 1):
            shapes[f"J{layer}"] = (self.sizes[layer - 1], self.sizes[layer])
        for prefix in ("k", "u"):
            for layer in range(1, self.n_layers + 1):
                shapes[f"{prefix}{layer}"] = (self.sizes[layer],)
        return shapes

    def layer_of(self, name: str) -> int:
        return int(name[1:])

    def init_params(self, rng: np.random.Generator) -> Params:
        """J_l ~ U(-g / sqrt(n_(l-1)), g / sqrt(n_(l-1))) (g: ``init_gain``), k = ``stiffness``,
        u = 0."""
        params: Params = {}
        for name, shape in self.parameter_shapes().items():
            if name.startswith("J"):
                bound = self.init_gain / np.sqrt(self.sizes[self.layer_of(name) - 1])
                params[name] = rng.uniform(-bound, bound, size=shape)
            elif name.startswith("k"):
                params[name] = np.full(shape, self.stiffness)
            else:
                params[name] = np.zeros(shape)
        return params

    def trajectories(self, state: np.ndarray) -> np.ndarray:
        """A batch of state rows as (batch, n_free, steps)."""
        return np.asarray(state, dtype=np.float64).reshape(len(state), self.n_free, self.steps)

    def input_trajectories(self, inputs: np.ndarray) -> np.ndarray:
        """q_(0,i)(t_n) = a (2 x_i - 1) cos(omega t_n): (batch, n_0, steps)."""
        amplitude = self.drive * (2.0 * np.asarray(inputs, dtype=np.float64) - 1.0)
        return amplitude[:, :, None] * np.cos(self.omega * self.times)[None, None, :]

    def _layer(self, q: np.ndarray, x: np.ndarray, layer: int) -> np.ndarray:
        """Layer ``layer`` of trajectories q (batch, n_free, steps); layer 0 is x."""
        if layer == 0:
            return x
        start = self.offsets[layer]
        return q[:, start:start + self.sizes[layer]]

    # -- the action -------------------------------------------------------------------------

    def local(self, inputs: np.ndarray, state: np.ndarray) -> Params:
        """dE/dtheta = -dS/dtheta of every sample (the conjugate variables), per parameter."""
        q = self.trajectories(state)
        x = self.input_trajectories(inputs)
        out: Params = {}
        for layer in range(1, self.n_layers + 1):
            below, here = self._layer(q, x, layer - 1), self._layer(q, x, layer)
            diff = below[:, :, None, :] - here[:, None, :, :]
            out[f"J{layer}"] = 0.5 * self.dt * np.sum(diff * diff, axis=3)
            out[f"k{layer}"] = 0.5 * self.dt * np.sum(here * here, axis=2)
            out[f"u{layer}"] = 0.25 * self.dt * np.sum(here ** 4, axis=2)
        return out

    def energy(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """E = -S of each sample's trajectory."""
        q = self.trajectories(state)
        local = self.local(inputs, state)
        potential = sum(np.sum(local[name] * params[name], axis=tuple(range(1, local[name].ndim)))
                        for name in local)
        if self.boundary == "periodic":
            velocity = np.roll(q, -1, axis=2) - q
        else:
            padded = np.pad(q, ((0, 0), (0, 0), (1, 1)))
            velocity = np.diff(padded, axis=2)
        kinetic = 0.5 * self.mass / self.dt * np.sum(velocity * velocity, axis=(1, 2))
        return potential - kinetic

    def contrast(self, inputs: np.ndarray, state_a: np.ndarray, state_b: np.ndarray,
                 weights: np.ndarray | None = None, scale: float = 1.0) -> Params:
        """``scale`` x the sample-weighted mean of dE/dtheta(a) - dE/dtheta(b)."""
        a, b = self.local(inputs, state_a), self.local(inputs, state_b)
        batch = len(state_a)
        w = np.full(batch, 1.0 / batch) if weights is None else np.asarray(weights, float)
        if weights is not None:
            total = w.sum()
            w = w / total if total > 0 else w
        return {name: scale * np.tensordot(w, a[name] - b[name], axes=1) for name in a}

    def gradient_q(self, inputs: np.ndarray, state: np.ndarray, params: Params,
                   strength: float = 0.0, target: np.ndarray | None = None) -> np.ndarray:
        """dE_beta/dq of every sample, (batch, n_free, steps): zero on the stationary
        trajectory of E + beta C (-dS/dq: the discretized m q'' + dV/dq)."""
        q = self.trajectories(state)
        x = self.input_trajectories(inputs)
        if self.boundary == "periodic":
            second = np.roll(q, -1, axis=2) - 2 * q + np.roll(q, 1, axis=2)
        else:
            padded = np.pad(q, ((0, 0), (0, 0), (1, 1)))
            second = padded[:, :, 2:] - 2 * q + padded[:, :, :-2]
        force = np.zeros_like(q)  # dV/dq
        for layer in range(1, self.n_layers + 1):
            here = self._layer(q, x, layer)
            span = slice(self.offsets[layer], self.offsets[layer] + self.sizes[layer])
            force[:, span] += (params[f"k{layer}"][None, :, None] * here
                               + params[f"u{layer}"][None, :, None] * here ** 3)
            below = self._layer(q, x, layer - 1)
            coupling = params[f"J{layer}"]
            diff = below[:, :, None, :] - here[:, None, :, :]  # (batch, n_(l-1), n_l, steps)
            weighted = coupling[None, :, :, None] * diff
            force[:, span] -= weighted.sum(axis=1)
            if layer > 1:
                lower = slice(self.offsets[layer - 1],
                              self.offsets[layer - 1] + self.sizes[layer - 1])
                force[:, lower] += weighted.sum(axis=2)
        gradient = self.mass / self.dt * second + self.dt * force
        if strength:
            lo = self.n_free - self.output_size
            amplitude = q[:, lo:] @ self.readout
            gradient[:, lo:] += strength * (amplitude - target)[:, :, None] * self.readout
        return gradient

    def hessian(self, inputs: np.ndarray, state_row: np.ndarray, params: Params,
                strength: float = 0.0) -> sparse.csr_matrix:
        """d^2 E_beta / dq^2 of one sample (sparse: the time second difference, each time
        slice's dV'' and the readout's rank-one blocks of the nudge)."""
        q = self.trajectories(state_row[None])[0]
        n, steps = self.n_free, self.steps
        if self.boundary == "periodic":
            ones = np.ones(steps)
            laplace = sparse.diags([ones[:-1], -2 * ones, ones[:-1]], [-1, 0, 1], format="lil")
            laplace[0, steps - 1] = 1.0
            laplace[steps - 1, 0] = 1.0
            laplace = laplace.tocsr()
        else:
            ones = np.ones(steps)
            laplace = sparse.diags([ones[:-1], -2 * ones, ones[:-1]], [-1, 0, 1], format="csr")
        kinetic = sparse.kron(sparse.identity(n), laplace) * (self.mass / self.dt)
        diagonal = np.zeros((n, steps))
        rows, cols, values = [], [], []
        for layer in range(1, self.n_layers + 1):
            start = self.offsets[layer]
            span = slice(start, start + self.sizes[layer])
            here = q[span]
            diagonal[span] += (params[f"k{layer}"][:, None]
                               + 3 * params[f"u{layer}"][:, None] * here ** 2)
            coupling = params[f"J{layer}"]
            diagonal[span] += coupling.sum(axis=0)[:, None]
            if layer > 1:
                lower = self.offsets[layer - 1]
                diagonal[lower:lower + self.sizes[layer - 1]] += coupling.sum(axis=1)[:, None]
                for i in range(self.sizes[layer - 1]):
                    for j in range(self.sizes[layer]):
                        a, b = lower + i, start + j
                        index_a = a * steps + np.arange(steps)
                        index_b = b * steps + np.arange(steps)
                        rows += [index_a, index_b]
                        cols += [index_b, index_a]
                        values += [np.full(steps, -coupling[i, j])] * 2
        potential = sparse.diags(diagonal.ravel())
        if rows:
            potential = potential + sparse.csr_matrix(
                (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                shape=(n * steps, n * steps))
        hessian = kinetic + self.dt * potential
        if strength:
            block = strength * np.outer(self.readout, self.readout)
            lo = self.n_free - self.output_size
            nudge = sparse.block_diag([sparse.csr_matrix((steps, steps))] * lo
                                      + [sparse.csr_matrix(block)] * self.output_size)
            hessian = hessian + nudge
        return sparse.csr_matrix(hessian)

    # -- cost -------------------------------------------------------------------------------

    def amplitudes(self, state: np.ndarray) -> np.ndarray:
        """A_k, the outputs' in-phase amplitudes at omega: (batch, n_L)."""
        q = self.trajectories(state)
        return q[:, self.n_free - self.output_size:] @ self.readout

    def cost(self, state: np.ndarray, target: np.ndarray) -> np.ndarray:
        """C = 1/2 |A - y|^2 per sample."""
        return 0.5 * np.sum((self.amplitudes(state) - target) ** 2, axis=1)

    def encode_target(self, labels: np.ndarray) -> np.ndarray:
        target = -self.target_amplitude * np.ones((len(labels), self.output_size))
        target[np.arange(len(labels)), labels] = self.target_amplitude
        return target

    def predict(self, state: np.ndarray) -> np.ndarray:
        return np.argmax(self.amplitudes(state), axis=1)

    # -- exact references -------------------------------------------------------------------

    def exact_gradient(self, inputs: np.ndarray, state: np.ndarray, target: np.ndarray,
                       params: Params) -> Params:
        """d(mean C)/dtheta at the stationary trajectories ``state`` by implicit
        differentiation: with H = d^2E/dq^2 and lambda = H^-1 dC/dq,
        dC/dtheta = -lambda^T d(dE/dq)/dtheta (float64, one sparse solve per sample)."""
        inputs = np.asarray(inputs, dtype=np.float64)
        q_all = self.trajectories(state)
        x_all = self.input_trajectories(inputs)
        grads = {name: np.zeros(shape) for name, shape in self.parameter_shapes().items()}
        lo = self.n_free - self.output_size
        for sample in range(len(state)):
            hessian = self.hessian(inputs[sample:sample + 1], state[sample], params)
            dcost = np.zeros((self.n_free, self.steps))
            amplitude = q_all[sample, lo:] @ self.readout
            dcost[lo:] = (amplitude - target[sample])[:, None] * self.readout
            adjoint = sparse_linalg.spsolve(sparse.csc_matrix(hessian), dcost.ravel())
            adjoint = adjoint.reshape(self.n_free, self.steps)
            q, x = q_all[sample:sample + 1], x_all[sample:sample + 1]
            for layer in range(1, self.n_layers + 1):
                span = slice(self.offsets[layer], self.offsets[layer] + self.sizes[layer])
                here = self._layer(q, x, layer)[0]
                below = self._layer(q, x, layer - 1)[0]
                mu = adjoint[span]
                grads[f"k{layer}"] -= self.dt * np.sum(mu * here, axis=1)
                grads[f"u{layer}"] -= self.dt * np.sum(mu * here ** 3, axis=1)
                diff = below[:, None, :] - here[None, :, :]
                # d(dE/dq_(l,j))/dJ = -dt diff; d(dE/dq_(l-1,i))/dJ = +dt diff (free only)
                term = -np.einsum("jn,ijn->ij", mu, diff)
                if layer > 1:
                    lower = slice(self.offsets[layer - 1],
                                  self.offsets[layer - 1] + self.sizes[layer - 1])
                    term += np.einsum("in,ijn->ij", adjoint[lower], diff)
                grads[f"J{layer}"] -= self.dt * term
        return {name: value / len(state) for name, value in grads.items()}

    def residual(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """Per sample, max |dE/dq| / dt of a read-back free trajectory (0 when stationary)."""
        gradient = self.gradient_q(inputs, state, params)
        return np.max(np.abs(gradient), axis=(1, 2)) / self.dt
