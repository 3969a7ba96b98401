"""Layered oscillator Ising machine (OIM): EP on coupled phase oscillators (Gower 2025).

Layers of oscillator phases phi_0 (clamped inputs), phi_1 ... phi_L (phi_L the outputs), with
couplings J_l between consecutive layers (shape (n_{l-1}, n_l)), bias fields h_l (in phase) and
g_l (in quadrature) and second-harmonic injection locking (SHIL) of strength K_s:

    E(phi) = - sum_l sum_ij J_l[i, j] cos(phi_{l-1,i} - phi_{l,j})
             - sum_i (h_i cos(phi_i) + g_i sin(phi_i)) - (K_s / 2) sum_i cos(2 phi_i)

(the last sums over the free units). The bias pair is a reference injection of amplitude
|h + i g| and phase arg(h + i g). The quadrature part matters: with binary inputs clamped at
0 or pi and only in-phase terms, E is symmetric under phi -> -phi and every configuration with
all phases at 0 or pi is a fixed point where sin(phi) = 0, so both the nudge force and the
gradient vanish there; the free phase can settle on such a point (small XOR networks do) and
then learns nothing. g breaks the symmetry. Dynamics d(phi)/dt = -dE/dphi (+ sqrt(2 T) xi).
A pixel x in [0, 1] is clamped as phi_0 = arccos(2x - 1); an output is read as cos(phi_L).
Cost C = 1/2 |cos(phi_L) - t|^2 with targets t = +1 (the class) and -1 (the others).

Local measurements: dE/dJ_ij = -cos(phi_i - phi_j), dE/dh_i = -cos(phi_i),
dE/dg_i = -sin(phi_i). With
cos(a - b) = cos a cos b + sin a sin b, every coupling sum is a pair of matrix products.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from labep.models import Params
from labep.models.layered import LayeredModel, not_huge
from labep.protocol.sections import ModelSection


class LayeredOIMConfig(ModelSection):
    """Layered oscillator Ising machine: sizes [n_0 (inputs), n_1, ..., n_L (outputs)]."""

    kind: Literal["layered_oim"]
    sizes: list[PositiveInt] = Field(min_length=2, max_length=64)
    shil: float = Field(0.0, ge=0.0, le=1e3,
                        description="K_s, second-harmonic injection locking strength.")
    init_gain: PositiveFloat = Field(1.0, description="J, h ~ U(-g/sqrt(n_in), g/sqrt(n_in)).")

    _not_huge = field_validator("sizes")(not_huge)


class LayeredOIM(LayeredModel):
    """The OIM model shared by the OIM simulator and the FPGA board driver.

    Parameters ``J1..JL``, ``h1..hL`` and ``g1..gL``; a read-back state is the phases
    [phi_1, ..., phi_L] in radians, one row per sample.
    """

    #: the protocol section this model is built from (``model:``)
    config_model: ClassVar[type[ModelSection]] = LayeredOIMConfig

    kind = "layered_oim"
    coupling = "J"
    vectors = ("h", "g")

    def __init__(self, sizes: list[int] | tuple[int, ...], shil: float = 0.0,
                 init_gain: float = 1.0) -> None:
        super().__init__(sizes, init_gain)
        self.shil = float(shil)

    # -- encodings --------------------------------------------------------------------------

    @staticmethod
    def input_phases(inputs: np.ndarray) -> np.ndarray:
        """phi_0 = arccos(2x - 1): x = 0 -> pi, x = 1 -> 0."""
        return np.arccos(np.clip(2.0 * np.asarray(inputs, dtype=np.float64) - 1.0, -1.0, 1.0))

    def encode_target(self, labels: np.ndarray) -> np.ndarray:
        target = -np.ones((len(labels), self.output_size))
        target[np.arange(len(labels)), labels] = 1.0
        return target

    def predict(self, state: np.ndarray) -> np.ndarray:
        return np.argmax(np.cos(self.layer(state, self.n_layers)), axis=1)

    def cost(self, state: np.ndarray, target: np.ndarray) -> np.ndarray:
        out = np.cos(self.layer(state, self.n_layers))
        return 0.5 * np.sum((out - target) ** 2, axis=1)

    # -- physics ----------------------------------------------------------------------------

    def _trig(self, inputs: np.ndarray, state: np.ndarray
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """cos and sin of every layer's phases, the clamped input layer first."""
        phases = [self.input_phases(inputs)] + [self.layer(state, i)
                                                for i in range(1, self.n_layers + 1)]
        return [np.cos(p) for p in phases], [np.sin(p) for p in phases]

    def _fields(self, cos: list[np.ndarray], sin: list[np.ndarray], params: Params
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """A_l = h_l + sum_nb J cos(phi_nb), B_l = g_l + sum_nb J sin(phi_nb) over each unit's
        neighbours (the biases are couplings to reference oscillators at 0 and pi/2)."""
        a_fields, b_fields = [], []
        for index in range(1, self.n_layers + 1):
            coupling = params[f"J{index}"]
            a = cos[index - 1] @ coupling + params[f"h{index}"]
            b = sin[index - 1] @ coupling + params[f"g{index}"]
            if index < self.n_layers:
                above = params[f"J{index + 1}"]
                a = a + cos[index + 1] @ above.T
                b = b + sin[index + 1] @ above.T
            a_fields.append(a)
            b_fields.append(b)
        return a_fields, b_fields

    def energy(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        cos, sin = self._trig(inputs, state)
        energy = np.zeros(state.shape[0])
        for index in range(1, self.n_layers + 1):
            coupling = params[f"J{index}"]
            energy -= np.sum((cos[index - 1] @ coupling) * cos[index]
                             + (sin[index - 1] @ coupling) * sin[index], axis=1)
            energy -= cos[index] @ params[f"h{index}"] + sin[index] @ params[f"g{index}"]
            energy -= 0.5 * self.shil * np.sum(cos[index] ** 2 - sin[index] ** 2, axis=1)
        return energy

    def force(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """-dE/dphi = cos(phi) B - sin(phi) A - K_s sin(2 phi), per unit."""
        cos, sin = self._trig(inputs, state)
        a_fields, b_fields = self._fields(cos, sin, params)
        out = np.empty_like(state, dtype=np.float64)
        for index in range(1, self.n_layers + 1):
            c, s = cos[index], sin[index]
            start, stop = self.layer_slices[index]
            out[:, start:stop] = (c * b_fields[index - 1] - s * a_fields[index - 1]
                                  - 2.0 * self.shil * s * c)
        return out

    def residual(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """max |d(phi)/dt| per sample (rad per unit time)."""
        return np.max(np.abs(self.force(inputs, state, params)), axis=1)

    # -- EP measurements --------------------------------------------------------------------

    def contrast(
        self,
        inputs: np.ndarray,
        state_a: np.ndarray,
        state_b: np.ndarray,
        weights: np.ndarray | None = None,
        scale: float = 1.0,
    ) -> Params:
        """``scale`` times the weighted batch mean of dE/dtheta(phi_a) - dE/dtheta(phi_b),
        with dE/dJ_l = -(cos phi_{l-1}^T cos phi_l + sin phi_{l-1}^T sin phi_l)."""
        batch = state_a.shape[0]
        dtype = state_a.dtype
        w = np.full(batch, 1.0 / batch) if weights is None else weights / max(weights.sum(), 1e-300)
        w = (w * scale).astype(dtype, copy=False)[:, None]
        ca, sa = self._trig(np.asarray(inputs, dtype=dtype), state_a)
        cb, sb = self._trig(np.asarray(inputs, dtype=dtype), state_b)
        grads: Params = {}
        for index in range(1, self.n_layers + 1):
            if index == 1:  # the clamped layer is the same in both states
                grads["J1"] = -((ca[0] * w).T @ (ca[1] - cb[1]) + (sa[0] * w).T @ (sa[1] - sb[1]))
            else:
                grads[f"J{index}"] = -(
                    (ca[index - 1] * w).T @ ca[index] + (sa[index - 1] * w).T @ sa[index]
                    - (cb[index - 1] * w).T @ cb[index] - (sb[index - 1] * w).T @ sb[index])
            grads[f"h{index}"] = -np.sum(w * (ca[index] - cb[index]), axis=0)
            grads[f"g{index}"] = -np.sum(w * (sa[index] - sb[index]), axis=0)
        return {k: np.asarray(v, dtype=dtype) for k, v in grads.items()}

    def exact_gradient(
        self, inputs: np.ndarray, state: np.ndarray, target: np.ndarray, params: Params
    ) -> Params:
        """d(mean C)/dtheta at a stable fixed point phi* by implicit differentiation.

        With the Hessian H = d^2E/dphi^2 and g = dC/dphi, lambda = H^-1 g and
        dC/dJ_ij = -(lambda_j - lambda_i) sin(phi_j - phi_i) (lambda = 0 on the clamped
        inputs), dC/dh_j = -lambda_j sin(phi_j), dC/dg_j = lambda_j cos(phi_j). Float64, one
        dense solve per sample.
        """
        inputs = np.asarray(inputs, dtype=np.float64)
        state = np.asarray(state, dtype=np.float64)
        params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        cos, sin = self._trig(inputs, state)
        a_fields, b_fields = self._fields(cos, sin, params)
        n, batch = self.state_size, state.shape[0]
        lo, hi = self.output_slice
        lam = np.empty_like(state)
        for sample in range(batch):
            hessian = np.zeros((n, n))
            diagonal = np.empty(n)
            for index in range(1, self.n_layers + 1):
                start, stop = self.layer_slices[index]
                c, s = cos[index][sample], sin[index][sample]
                diagonal[start:stop] = (c * a_fields[index - 1][sample]
                                        + s * b_fields[index - 1][sample]
                                        + 2.0 * self.shil * (c * c - s * s))
                if index > 1:
                    below_lo, below_hi = self.layer_slices[index - 1]
                    cb, sb = cos[index - 1][sample], sin[index - 1][sample]
                    # -J_ij cos(phi_i - phi_j)
                    block = -params[f"J{index}"] * (np.outer(cb, c) + np.outer(sb, s))
                    hessian[below_lo:below_hi, start:stop] = block
                    hessian[start:stop, below_lo:below_hi] = block.T
            hessian[np.arange(n), np.arange(n)] = diagonal
            gradient = np.zeros(n)
            out_c, out_s = cos[-1][sample], sin[-1][sample]
            gradient[lo:hi] = -(out_c - target[sample]) * out_s
            lam[sample] = np.linalg.solve(hessian, gradient)
        grads: Params = {}
        for index in range(1, self.n_layers + 1):
            lam_here = self.layer(lam, index)
            c, s = cos[index], sin[index]
            cb, sb = cos[index - 1], sin[index - 1]
            # -lambda_j sin(phi_j - phi_i) = -lambda_j (s_j c_i - c_j s_i)
            grad = -(cb.T @ (lam_here * s) - sb.T @ (lam_here * c))
            if index > 1:  # + lambda_i sin(phi_j - phi_i) = lambda_i (s_j c_i - c_j s_i)
                lam_below = self.layer(lam, index - 1)
                grad += (lam_below * cb).T @ s - (lam_below * sb).T @ c
            grads[f"J{index}"] = grad / batch
            grads[f"h{index}"] = -np.sum(lam_here * s, axis=0) / batch
            grads[f"g{index}"] = np.sum(lam_here * c, axis=0) / batch
        return grads
