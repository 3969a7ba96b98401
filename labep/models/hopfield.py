"""Layered continuous Hopfield network: the classic EP system (Scellier and Bengio 2017).

Layers s_0 = x (clamped input), s_1 ... s_L (s_L the output), units confined to [0, 1].
Energy (the primitive function Phi of Laborieux et al. 2021, with E = |s|^2 / 2 - Phi):

    E(x, s; W, b) = 1/2 sum_l |s_l|^2 - sum_l s_{l-1}^T W_l s_l - sum_l b_l^T s_l

with W_l of shape (n_{l-1}, n_l). Its box-constrained stationary points are the fixed points
s_l = rho(h_l), h_l = W_l^T s_{l-1} + W_{l+1} s_{l+1} + b_l, rho the hard sigmoid clip(., 0, 1).
Cost C = 1/2 |s_L - y|^2; the nudged energy is E + beta C.

Local measurements: dE/dW_l = -s_{l-1} s_l^T, dE/db_l = -s_l.
"""

from __future__ import annotations

import numpy as np

from labep.models import Params
from labep.models.layered import LayeredModel


class LayeredHopfield(LayeredModel):
    """Layered Hopfield energy with hard-sigmoid units; the model shared by simulator and host.

    Parameters are named ``W1..WL`` (W_l couples layer l-1 to l, shape (n_{l-1}, n_l)) and
    ``b1..bL``. A read-back state is the concatenation [s_1, ..., s_L], one row per sample.
    """

    kind = "layered_hopfield"
    coupling = "W"
    vectors = ("b",)

    # -- activation -------------------------------------------------------------------------

    @staticmethod
    def rho(h: np.ndarray) -> np.ndarray:
        """Hard sigmoid rho(h) = clip(h, 0, 1)."""
        return np.clip(h, 0.0, 1.0)

    @staticmethod
    def rho_prime(h: np.ndarray) -> np.ndarray:
        """rho'(h): 1 strictly inside (0, 1), 0 where the unit is saturated."""
        return ((h > 0.0) & (h < 1.0)).astype(h.dtype)

    # -- physics ----------------------------------------------------------------------------

    def local_fields(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """h(s) = dPhi/ds for every unit, shape like ``state`` (no nudge)."""
        fields = np.empty_like(state, dtype=np.result_type(state, params["W1"]))
        for index in range(1, self.n_layers + 1):
            start, stop = self.layer_slices[index]
            below = inputs if index == 1 else self.layer(state, index - 1)
            field = below @ params[f"W{index}"] + params[f"b{index}"]
            if index < self.n_layers:
                field = field + self.layer(state, index + 1) @ params[f"W{index + 1}"].T
            fields[:, start:stop] = field
        return fields

    def energy(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """Per-sample E(x, s; theta)."""
        energy = 0.5 * np.sum(state * state, axis=1)
        for index in range(1, self.n_layers + 1):
            below = inputs if index == 1 else self.layer(state, index - 1)
            here = self.layer(state, index)
            energy -= np.sum((below @ params[f"W{index}"]) * here, axis=1)
            energy -= here @ params[f"b{index}"]
        return energy

    def residual(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        return np.max(np.abs(self.rho(self.local_fields(inputs, state, params)) - state), axis=1)

    def cost(self, state: np.ndarray, target: np.ndarray) -> np.ndarray:
        """C = 1/2 |s_L - y|^2 per sample."""
        out = self.layer(state, self.n_layers)
        return 0.5 * np.sum((out - target) ** 2, axis=1)

    def encode_target(self, labels: np.ndarray) -> np.ndarray:
        """One-hot targets y for class labels."""
        target = np.zeros((len(labels), self.output_size))
        target[np.arange(len(labels)), labels] = 1.0
        return target

    def predict(self, state: np.ndarray) -> np.ndarray:
        return np.argmax(self.layer(state, self.n_layers), axis=1)

    # -- EP measurements --------------------------------------------------------------------

    def contrast(
        self,
        inputs: np.ndarray,
        state_a: np.ndarray,
        state_b: np.ndarray,
        weights: np.ndarray | None = None,
        scale: float = 1.0,
    ) -> Params:
        """``scale`` times the weighted batch mean of dE/dtheta(s_a) - dE/dtheta(s_b).

        dE/dW_l = -s_{l-1} s_l^T, so for the clamped input layer the difference is one product
        -x^T (s_a1 - s_b1); deeper layers need both outer products. The scale rides on the
        per-sample weights, so it costs nothing on the parameter-sized arrays.
        """
        batch = state_a.shape[0]
        inputs = np.asarray(inputs, dtype=state_a.dtype)
        w = np.full(batch, 1.0 / batch) if weights is None else weights / max(weights.sum(), 1e-300)
        w = (w * scale).astype(state_a.dtype, copy=False)[:, None]
        grads: Params = {}
        for index in range(1, self.n_layers + 1):
            a, b = self.layer(state_a, index), self.layer(state_b, index)
            if index == 1:
                grads["W1"] = -(inputs * w).T @ (a - b)
            else:
                a_below, b_below = self.layer(state_a, index - 1), self.layer(state_b, index - 1)
                grads[f"W{index}"] = -((a_below * w).T @ a - (b_below * w).T @ b)
            grads[f"b{index}"] = -np.sum(w * (a - b), axis=0)
        return grads

    def exact_gradient(
        self, inputs: np.ndarray, state: np.ndarray, target: np.ndarray, params: Params
    ) -> Params:
        """d(mean C)/dtheta at the free fixed point s* = rho(h(s*)), by implicit differentiation.

        With D = diag(rho'(h)) and A = dh/ds (symmetric, the inter-layer couplings), the adjoint
        lambda solves (I - A D) lambda = dC/ds; with mu = D lambda,
        dC/dW_l[i, j] = s_{l-1,i} mu_{l,j} + mu_{l-1,i} s_{l,j} and dC/db_l = mu_l (mu_0 = 0).
        Computed in float64, one dense solve per sample.
        """
        inputs = np.asarray(inputs, dtype=np.float64)
        state = np.asarray(state, dtype=np.float64)
        params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        n = self.state_size
        coupling = np.zeros((n, n))
        for index in range(2, self.n_layers + 1):
            lo_a, hi_a = self.layer_slices[index - 1]
            lo_b, hi_b = self.layer_slices[index]
            coupling[lo_a:hi_a, lo_b:hi_b] = params[f"W{index}"]
            coupling[lo_b:hi_b, lo_a:hi_a] = params[f"W{index}"].T
        slope = self.rho_prime(self.local_fields(inputs, state, params))
        dcost = np.zeros_like(state)
        lo, hi = self.output_slice
        dcost[:, lo:hi] = state[:, lo:hi] - target
        mu = np.empty_like(state)
        eye = np.eye(n)
        for sample in range(state.shape[0]):
            adjoint = np.linalg.solve(eye - coupling * slope[sample][None, :], dcost[sample])
            mu[sample] = slope[sample] * adjoint
        batch = state.shape[0]
        grads: Params = {}
        for index in range(1, self.n_layers + 1):
            here_mu = self.layer(mu, index)
            below = inputs if index == 1 else self.layer(state, index - 1)
            grad = below.T @ here_mu
            if index > 1:
                grad += self.layer(mu, index - 1).T @ self.layer(state, index)
            grads[f"W{index}"] = grad / batch
            grads[f"b{index}"] = here_mu.sum(axis=0) / batch
        return grads
