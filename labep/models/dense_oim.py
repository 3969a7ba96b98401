"""All-to-all oscillator Ising machine: the small dense machines (every free oscillator coupled
to every other), as opposed to the layered networks of :mod:`labep.models.oim`.

Oscillators: n_0 clamped inputs phi_0 and N = n_hidden + n_out free ones phi (hidden first,
outputs last). Parameters: ``K`` (n_0, N), the input couplings; ``J`` (N, N), the couplings
among free oscillators, symmetric with a zero diagonal; ``h`` and ``g`` (N), the in-phase and
quadrature bias fields. Energy

    E(phi) = - sum_{i<j} J_ij cos(phi_i - phi_j) - sum_{k,i} K_ki cos(phi_0k - phi_i)
             - sum_i (h_i cos(phi_i) + g_i sin(phi_i)) - (K_s / 2) sum_i cos(2 phi_i).

Each pair i < j is one coupling, held twice in the matrix (J_ij = J_ji): its local measurement
dE/dJ_ij = -cos(phi_i - phi_j) is reported in both entries, so an update keeps J symmetric, and
the diagonal's is 0. The dynamics, readout, cost and targets are those of the layered OIM:
-dE/dphi_i = cos(phi_i) B_i - sin(phi_i) A_i - K_s sin(2 phi_i) with the fields
A = J cos(phi) + K^T cos(phi_0) + h and B = J sin(phi) + K^T sin(phi_0) + g.

Learning-rate groups (``training.learning_rates``): 1 the input couplings K, 2 the couplings J
and the biases h, g.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from labep.models import Params
from labep.models.oim import LayeredOIM
from labep.protocol.sections import ModelSection


class DenseOIMConfig(ModelSection):
    """All-to-all oscillator Ising machine: sizes [n_0 (inputs), n_hidden, n_out]; every free
    oscillator is coupled to every other (J, symmetric) and to every input (K)."""

    kind: Literal["dense_oim"]
    sizes: list[PositiveInt] = Field(min_length=3, max_length=3)
    shil: float = Field(0.0, ge=0.0, le=1e3,
                        description="K_s, second-harmonic injection locking strength.")
    init_gain: PositiveFloat = Field(1.0, description="K, h, g ~ U(-g/sqrt(n_0), g/sqrt(n_0)); "
                                     "J ~ U(-g/sqrt(N), g/sqrt(N)).")

    @field_validator("sizes")
    @classmethod
    def _small(cls, sizes: list[int]) -> list[int]:
        if sizes[1] + sizes[2] > 4096 or sizes[0] > 1_000_000:
            raise ValueError("a dense machine has at most 4,096 free oscillators (N^2 couplings)")
        return sizes


class DenseOIM(LayeredOIM):
    """The all-to-all OIM model, shared by the OIM simulator and drivers of dense boards.

    ``sizes`` is [n_0 (inputs), n_hidden, n_out]; a read-back state is the N free phases
    [hidden..., outputs...] in radians.
    """

    #: the protocol section this model is built from (``model:``)
    config_model: ClassVar[type[ModelSection]] = DenseOIMConfig

    kind = "dense_oim"

    def __init__(self, sizes: list[int] | tuple[int, ...], shil: float = 0.0,
                 init_gain: float = 1.0) -> None:
        if len(sizes) != 3:
            raise ValueError(f"a dense OIM has sizes [inputs, hidden, outputs], got {sizes}")
        super().__init__(sizes, shil, init_gain)
        self.n_free = self.state_size

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        n = self.n_free
        return {"K": (self.input_size, n), "J": (n, n), "h": (n,), "g": (n,)}

    def layer_of(self, name: str) -> int:
        if name not in ("K", "J", "h", "g"):
            raise KeyError(name)
        return 1 if name == "K" else 2

    def init_params(self, rng: np.random.Generator) -> Params:
        """K, h, g ~ U(-g0/sqrt(n_0), g0/sqrt(n_0)); J symmetric, U(-g0/sqrt(N), g0/sqrt(N)),
        zero diagonal (g0 the init gain)."""
        n = self.n_free
        wide = self.init_gain / np.sqrt(self.input_size)
        params: Params = {"K": rng.uniform(-wide, wide, size=(self.input_size, n))}
        upper = np.triu(rng.uniform(-1.0, 1.0, size=(n, n)), 1) * self.init_gain / np.sqrt(n)
        params["J"] = upper + upper.T
        params["h"] = rng.uniform(-wide, wide, size=n)
        params["g"] = rng.uniform(-wide, wide, size=n)
        return params

    # -- physics ----------------------------------------------------------------------------

    def _dense_fields(self, inputs: np.ndarray, state: np.ndarray, params: Params
                      ) -> tuple[np.ndarray, ...]:
        """cos, sin of the free phases, of the inputs, and the fields A, B (batch, N)."""
        phases0 = self.input_phases(inputs)
        c0, s0 = np.cos(phases0), np.sin(phases0)
        c, s = np.cos(state), np.sin(state)
        coupling = params["J"]
        a = c @ coupling.T + c0 @ params["K"] + params["h"]
        b = s @ coupling.T + s0 @ params["K"] + params["g"]
        return c, s, c0, s0, a, b

    def energy(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        c, s, c0, s0, _, _ = self._dense_fields(inputs, state, params)
        coupling = params["J"]
        pairs = 0.5 * np.sum((c @ coupling.T) * c + (s @ coupling.T) * s, axis=1)
        drive = np.sum((c0 @ params["K"]) * c + (s0 @ params["K"]) * s, axis=1)
        bias = c @ params["h"] + s @ params["g"]
        return -(pairs + drive + bias) - 0.5 * self.shil * np.sum(c * c - s * s, axis=1)

    def force(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """-dE/dphi = cos(phi) B - sin(phi) A - K_s sin(2 phi), per free oscillator."""
        c, s, _, _, a, b = self._dense_fields(inputs, state, params)
        return c * b - s * a - 2.0 * self.shil * s * c

    # -- EP measurements --------------------------------------------------------------------

    def contrast(
        self,
        inputs: np.ndarray,
        state_a: np.ndarray,
        state_b: np.ndarray,
        weights: np.ndarray | None = None,
        scale: float = 1.0,
    ) -> Params:
        """``scale`` times the weighted batch mean of dE/dtheta(phi_a) - dE/dtheta(phi_b):
        dE/dJ_ij = -cos(phi_i - phi_j) (both entries of the pair, 0 on the diagonal),
        dE/dK_ki = -cos(phi_0k - phi_i), dE/dh = -cos(phi), dE/dg = -sin(phi)."""
        batch = state_a.shape[0]
        dtype = state_a.dtype
        w = np.full(batch, 1.0 / batch) if weights is None else weights / max(weights.sum(), 1e-300)
        w = (w * scale).astype(dtype, copy=False)[:, None]
        phases0 = self.input_phases(inputs).astype(dtype)
        c0, s0 = np.cos(phases0), np.sin(phases0)
        ca, sa, cb, sb = np.cos(state_a), np.sin(state_a), np.cos(state_b), np.sin(state_b)
        pairs = -((ca * w).T @ ca + (sa * w).T @ sa - (cb * w).T @ cb - (sb * w).T @ sb)
        pairs = 0.5 * (pairs + pairs.T)  # exactly symmetric (BLAS rounds i,j and j,i apart)
        np.fill_diagonal(pairs, 0.0)
        grads: Params = {
            "K": -((c0 * w).T @ (ca - cb) + (s0 * w).T @ (sa - sb)),
            "J": pairs,
            "h": -np.sum(w * (ca - cb), axis=0),
            "g": -np.sum(w * (sa - sb), axis=0),
        }
        return {k: np.asarray(v, dtype=dtype) for k, v in grads.items()}

    def exact_gradient(
        self, inputs: np.ndarray, state: np.ndarray, target: np.ndarray, params: Params
    ) -> Params:
        """d(mean C)/dtheta at a stable fixed point by implicit differentiation: with the
        Hessian H (H_ii = cos(phi_i) A_i + sin(phi_i) B_i + 2 K_s cos(2 phi_i),
        H_ij = -J_ij cos(phi_i - phi_j)) and lambda = H^-1 dC/dphi,
        dC/dJ_ij = -(lambda_i - lambda_j) sin(phi_i - phi_j) (the pair, in both entries),
        dC/dK_ki = -lambda_i sin(phi_i - phi_0k), dC/dh_i = -lambda_i sin(phi_i),
        dC/dg_i = lambda_i cos(phi_i). Float64, one dense solve per sample."""
        inputs = np.asarray(inputs, dtype=np.float64)
        state = np.asarray(state, dtype=np.float64)
        params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        c, s, c0, s0, a, b = self._dense_fields(inputs, state, params)
        batch, n = state.shape
        lo, hi = self.output_slice
        lam = np.empty_like(state)
        for sample in range(batch):
            ci, si = c[sample], s[sample]
            hessian = -params["J"] * (np.outer(ci, ci) + np.outer(si, si))
            hessian[np.arange(n), np.arange(n)] = (ci * a[sample] + si * b[sample]
                                                   + 2.0 * self.shil * (ci * ci - si * si))
            gradient = np.zeros(n)
            gradient[lo:hi] = -(ci[lo:hi] - target[sample]) * si[lo:hi]
            lam[sample] = np.linalg.solve(hessian, gradient)
        # sin(phi_i - phi_j) = s_i c_j - c_i s_j
        lam_s, lam_c = lam * s, lam * c
        pairs = -((lam_s.T @ c - lam_c.T @ s) - (s.T @ lam_c - c.T @ lam_s))
        np.fill_diagonal(pairs, 0.0)
        return {
            # -lambda_i sin(phi_i - phi_0k) = -lambda_i (s_i c0_k - c_i s0_k)
            "K": -(c0.T @ lam_s - s0.T @ lam_c) / batch,
            "J": pairs / batch,
            "h": -np.sum(lam_s, axis=0) / batch,
            "g": np.sum(lam_c, axis=0) / batch,
        }
