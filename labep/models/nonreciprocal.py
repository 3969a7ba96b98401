"""Layered network with non-reciprocal couplings: a non-conservative system for EP.

Scurria, Vanden Abeele, Mognetti and Massar, "Equilibrium propagation for non-conservative
systems" (2026). Layers s_0 = x (clamped input), s_1 ... s_L (s_L the output); the state
s = [s_1, ..., s_L] follows the vector field

    ds_l/dt = f_l(s) = -s_l + rho'(s_l) * h_l(s),
    h_l(s) = W_l^T rho(s_{l-1}) + M_{l+1}^T rho(s_{l+1}) + b_l         (rho(s_0) := x),

with forward couplings W_l (n_{l-1} x n_l) and effective backward couplings M_l (n_l x n_{l-1},
layer l acting on layer l-1, l = 2..L). The activation is the smooth sigmoid
rho(u) = 1 / (1 + exp(-(4u - 2))) (slope 1 at u = 1/2, like the hard sigmoid clip(u, 0, 1)),
so the Jacobian J = df/ds is defined everywhere.

The asymmetry knob a in [0, 1] (a protocol field, not trained) sets the backward couplings from
the trained W_l and B_l (both n_l x n_{l-1} for B_l):

    M_l = (1 - a) [(1 - a) W_l^T + a B_l].

a = 0: M_l = W_l^T, the couplings are reciprocal and f = -dE/ds for the Hopfield energy
E = 1/2 |s|^2 - 1/2 rho(s)^T A rho(s) - b^T rho(s) (Scellier and Bengio 2017): a conservative
system, J symmetric, and classic EP is exact. a = 1: M_l = 0, a feedforward network (each
layer settles on the one below only). In between, the feedback is weaker than the feedforward
drive and only partly aligned with W_l^T. B_l gets a gradient only for 0 < a < 1.

Cost C = 1/2 |s_L - y|^2. The exact gradient at a fixed point f(s0) = 0 is, by implicit
differentiation, dC/dtheta = -lambda^T df/dtheta(s0) with the adjoint J^T lambda = dC/ds.

EP. Vector-field EP nudges the same dynamics, ds/dt = f(s) - beta dC/ds, whose response
delta = s_beta - s0 ~ beta J^{-1} dC/ds is the adjoint only when J is symmetric. The corrected
nudge ds/dt = f(s) + (J^T - J)(s - s0) - beta dC/ds (J at s0) has the linear response
J^T delta = beta dC/ds, so -(1/beta) delta^T df/dtheta(s0) is the exact gradient as beta -> 0.
Here (J^T - J) = D (A^T - A) D with D = diag(rho'(s0)) and A the state-to-state couplings:
the correction needs rho'(s0) per unit and the antisymmetric part of the couplings only.

Local measurements, for a response vector v (the nudged minus the free state): the pull-back
v^T df/dtheta at a state s is, with u = rho'(s) * v,

    W_l:  rho(s_{l-1}) u_l^T + (1 - a)^2 u_{l-1} rho(s_l)^T      (second term for l >= 2),
    B_l:  a (1 - a) rho(s_l) u_{l-1}^T,
    b_l:  u_l.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from labep.models import Params
from labep.models.layered import SquaredErrorReadout, not_huge
from labep.protocol.sections import ModelSection


def rho(state: np.ndarray) -> np.ndarray:
    """rho(u) = sigmoid(4u - 2), a smooth hard sigmoid."""
    return 0.5 * (1.0 + np.tanh(2.0 * state - 1.0))


def rho_prime(state: np.ndarray) -> np.ndarray:
    """rho'(u) = 4 rho (1 - rho)."""
    r = rho(state)
    return 4.0 * r * (1.0 - r)


def rho_second(state: np.ndarray) -> np.ndarray:
    """rho''(u) = 4 rho'(u) (1 - 2 rho(u))."""
    r = rho(state)
    return 16.0 * r * (1.0 - r) * (1.0 - 2.0 * r)


class NonreciprocalConfig(ModelSection):
    """Layered network with non-reciprocal couplings (labep.models.nonreciprocal): forward W_l,
    backward M_l = (1 - a)((1 - a) W_l^T + a B_l); a = 0 conservative, a = 1 feedforward."""

    kind: Literal["nonreciprocal"]
    sizes: list[PositiveInt] = Field(min_length=2, max_length=64)
    activation: Literal["sigmoid"] = Field(
        "sigmoid", description="rho(s) = sigmoid(4 s - 2), smooth so that J = df/ds exists.")
    asymmetry: float = Field(0.5, ge=0.0, le=1.0,
                             description="a: 0 reciprocal (B = W^T), 1 feedforward (no feedback).")
    init_gain: PositiveFloat = Field(1.0, description="W, B, b ~ U(-g/sqrt(n_in), g/sqrt(n_in)).")

    def model_arguments(self) -> dict[str, Any]:
        return self.model_dump(exclude={"kind", "activation"})

    _not_huge = field_validator("sizes")(not_huge)


class NonreciprocalLayered(SquaredErrorReadout):
    """Layered network with forward couplings ``W1..WL``, backward couplings ``B2..BL`` mixed
    by the asymmetry a, and biases ``b1..bL``; a read-back state is [s_1, ..., s_L]."""

    #: the protocol section this model is built from (``model:``)
    config_model: ClassVar[type[ModelSection]] = NonreciprocalConfig

    kind = "nonreciprocal"
    coupling = "W"
    vectors = ("b",)

    def __init__(self, sizes: list[int] | tuple[int, ...], asymmetry: float = 0.5,
                 init_gain: float = 1.0) -> None:
        super().__init__(sizes, init_gain)
        if not 0.0 <= float(asymmetry) <= 1.0:
            raise ValueError(f"asymmetry must lie in [0, 1], got {asymmetry}")
        self.asymmetry = float(asymmetry)

    # -- parameters -------------------------------------------------------------------------

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """W_l (n_{l-1}, n_l) for l = 1..L, B_l (n_l, n_{l-1}) for l = 2..L, b_l (n_l,)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for index in range(1, self.n_layers + 1):
            shapes[f"W{index}"] = (self.sizes[index - 1], self.sizes[index])
        for index in range(2, self.n_layers + 1):
            shapes[f"B{index}"] = (self.sizes[index], self.sizes[index - 1])
        for index in range(1, self.n_layers + 1):
            shapes[f"b{index}"] = (self.sizes[index],)
        return shapes

    def layer_of(self, name: str) -> int:
        """The coupling layer l of ``W<l>``, ``B<l>`` or ``b<l>`` (its learning-rate group)."""
        return int(name[1:])

    @property
    def mixing(self) -> tuple[float, float]:
        """(c_W, c_B) with M_l = c_W W_l^T + c_B B_l: ((1 - a)^2, a (1 - a))."""
        a = self.asymmetry
        return (1.0 - a) ** 2, a * (1.0 - a)

    def backward_couplings(self, params: Params) -> dict[int, np.ndarray]:
        """M_l = (1 - a)((1 - a) W_l^T + a B_l), shape (n_l, n_{l-1}), for l = 2..L."""
        c_w, c_b = self.mixing
        return {index: c_w * params[f"W{index}"].T + c_b * params[f"B{index}"]
                for index in range(2, self.n_layers + 1)}

    # -- physics ----------------------------------------------------------------------------

    def local_fields(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """h(s) = W_l^T rho(s_{l-1}) + M_{l+1}^T rho(s_{l+1}) + b_l for every unit."""
        backward = self.backward_couplings(params)
        rates = rho(state)
        fields = np.empty_like(state, dtype=np.result_type(state, params["W1"]))
        for index in range(1, self.n_layers + 1):
            start, stop = self.layer_slices[index]
            below = inputs if index == 1 else self.layer(rates, index - 1)
            field = below @ params[f"W{index}"] + params[f"b{index}"]
            if index < self.n_layers:
                field = field + self.layer(rates, index + 1) @ backward[index + 1]
            fields[:, start:stop] = field
        return fields

    def vector_field(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """f(s) = -s + rho'(s) h(s) (no nudge)."""
        return -state + rho_prime(state) * self.local_fields(inputs, state, params)

    def coupling_matrix(self, params: Params) -> np.ndarray:
        """A (n x n): h = A rho(s) + (input drive) + b; blocks A[l, l-1] = W_l^T and
        A[l-1, l] = M_l^T; symmetric iff a = 0."""
        n = self.state_size
        coupling = np.zeros((n, n))
        for index, backward in self.backward_couplings(params).items():
            lo_a, hi_a = self.layer_slices[index - 1]
            lo_b, hi_b = self.layer_slices[index]
            coupling[lo_b:hi_b, lo_a:hi_a] = params[f"W{index}"].T
            coupling[lo_a:hi_a, lo_b:hi_b] = backward.T
        return coupling

    def jacobian(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """J = df/ds per sample, shape (batch, n, n):
        J = -I + diag(rho''(s) h(s)) + diag(rho'(s)) A diag(rho'(s))."""
        coupling = self.coupling_matrix(params)
        fields = self.local_fields(inputs, state, params)
        slope = rho_prime(state)
        jac = slope[:, :, None] * coupling[None, :, :] * slope[:, None, :]
        diagonal = -1.0 + rho_second(state) * fields
        index = np.arange(self.state_size)
        jac[:, index, index] += diagonal
        return jac

    def correction(self, state: np.ndarray, reference: np.ndarray, params: Params) -> np.ndarray:
        """(J^T - J)(s - s0) with J at the free state s0 = ``reference``:
        D (A^T - A) D (s - s0), D = diag(rho'(s0)); matrix-free, per sample."""
        slope = rho_prime(reference)
        u = slope * (state - reference)
        coupling = self.coupling_matrix(params)
        return slope * (u @ coupling - u @ coupling.T)

    def residual(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """Per-sample max |f(s)|, zero at a fixed point."""
        return np.max(np.abs(self.vector_field(inputs, state, params)), axis=1)

    # -- EP measurements --------------------------------------------------------------------

    def pullback(self, inputs: np.ndarray, state: np.ndarray, vector: np.ndarray,
                 weights: np.ndarray) -> Params:
        """sum over samples of weights * vector^T df/dtheta at ``state``: the local products
        rho(s_pre) (rho'(s_post) v_post) of the module docstring."""
        inputs = np.asarray(inputs, dtype=state.dtype)
        w = weights.astype(state.dtype, copy=False)[:, None]
        u = rho_prime(state) * vector * w
        rates = rho(state)
        c_w, c_b = self.mixing
        grads: Params = {}
        for index in range(1, self.n_layers + 1):
            u_here = self.layer(u, index)
            below = inputs if index == 1 else self.layer(rates, index - 1)
            grad = below.T @ u_here
            if index > 1:
                # the backward path: u_{l-1} rho(s_l)^T, i.e. dM_l[i, j] = rho(s_l)_i u_{l-1,j}
                back = self.layer(rates, index).T @ self.layer(u, index - 1)  # (n_l, n_{l-1})
                if c_w:
                    grad = grad + c_w * back.T
                grads[f"B{index}"] = c_b * back
            grads[f"W{index}"] = grad
            grads[f"b{index}"] = u_here.sum(axis=0)
        return grads

    def contrast(
        self,
        inputs: np.ndarray,
        state_a: np.ndarray,
        state_b: np.ndarray,
        weights: np.ndarray | None = None,
        scale: float = 1.0,
    ) -> Params:
        """``scale`` times the weighted batch mean of -(s_a - s_b)^T df/dtheta(m), with the
        local derivative linearized at the midpoint m = (s_a + s_b) / 2.

        There is no energy here, so this is not a difference of one function at two states.
        For the symmetric estimator (s_a, s_b = s_{+beta}, s_{-beta}) m = s0 + O(beta^2); for
        the one-sided one (s_beta, s0) m = s0 + O(beta), within the estimator's own O(beta)
        bias. At a = 0 (f = -dE/ds) it equals dE/dtheta(s_a) - dE/dtheta(s_b) up to
        O(|s_a - s_b|^3), the classic EP contrast.
        """
        batch = state_a.shape[0]
        w = np.full(batch, 1.0 / batch) if weights is None else weights / max(weights.sum(), 1e-300)
        midpoint = 0.5 * (state_a + state_b)
        grads = self.pullback(inputs, midpoint, state_a - state_b, w * (-scale))
        return grads

    def exact_gradient(
        self, inputs: np.ndarray, state: np.ndarray, target: np.ndarray, params: Params
    ) -> Params:
        """d(mean C)/dtheta at the free fixed point s0 by implicit differentiation:
        J^T lambda = dC/ds (one dense float64 solve per sample), dC/dtheta = -lambda^T df/dtheta.
        """
        inputs = np.asarray(inputs, dtype=np.float64)
        state = np.asarray(state, dtype=np.float64)
        params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        jac = self.jacobian(inputs, state, params)
        dcost = np.zeros_like(state)
        lo, hi = self.output_slice
        dcost[:, lo:hi] = state[:, lo:hi] - target
        adjoint = np.linalg.solve(np.swapaxes(jac, 1, 2), dcost[:, :, None])[:, :, 0]
        batch = state.shape[0]
        return self.pullback(inputs, state, adjoint, np.full(batch, -1.0 / batch))
