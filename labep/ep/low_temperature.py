"""The low-temperature (Laplace) expansion of thermal EP around the deterministic fixed points.

Massar and Mognetti ("EP: the quantum and the thermal cases") expand the thermal free energy
F_beta = -T log Z_beta, Z_beta = integral over the box of exp(-E_beta(s) / T) ds,
E_beta = E + beta C, about the deterministic minimum s*_beta, which gives deterministic
learning equations built from the Hessian H_beta = d^2 E_beta / ds^2.

Interior and saturated units. A unit strictly inside its box (0 < s*_i < 1, the set I)
fluctuates by O(sqrt T) in a Gaussian of covariance T H_II^-1; a unit pinned at a wall (the
set B, where rho clips) is treated as clamped at that wall and left out of the Hessian: its
density near the wall is exp(-|g_i| delta / T) over its distance delta from the wall,
g = dE_beta/ds at s* (non-zero on B, pointing into the wall), which integrates to T / |g_i|.
Together (n_I, n_B the sizes of I and B):

    F_beta = E_beta(s*) + T Phi_beta - T (n_I / 2 log(2 pi T) + n_B log T) + O(T^2),
    Phi_beta = 1/2 log det H_II + sum_{i in B} log |g_i|.

The gradient of F_beta follows s*(theta) (the envelope theorem takes care of E_beta(s*)):

    dF_beta/dtheta = dE/dtheta(s*) + T dPhi_beta/dtheta + O(T^2),
    dPhi/dtheta = 1/2 Tr(H_II^-1 dH_II/dtheta) + sum_B (1/g_i) dg_i/dtheta,

total derivatives: ds*_I/dtheta = -H_II^-1 d^2E/(ds_I dtheta), the saturated units stay at
their wall. A model provides the derivatives through four methods (:data:`REQUIRED`):

- ``state_gradient`` g = dE_beta/ds, ``hessian`` H_beta (per sample, full n x n);
- ``hessian_gradient(M)`` = sum_ij M_ij dH_ij/dtheta, the derivative along the fixed point
  (for the layered Hopfield energy, quadratic in s, H does not depend on s: no third
  derivatives, so the shift of s* does not enter dH/dtheta);
- ``field_gradient(mu)`` = sum_i mu_i dh_i/dtheta with h = s - dE/ds the local fields.

With w = 1/g on B (0 on I) and z = H_II^-1 (H_IB w_B) on I (0 on B), the moving saturated
units' term is sum_B w_i dg_i/dtheta = field_gradient(z - w), so

    dPhi/dtheta = 1/2 hessian_gradient(H_II^-1 padded with zeros) + field_gradient(z - w).

The EP estimate is the gradient of (F_beta - F_0) / beta: order 0 is deterministic EP,
(dE/dtheta(s*_beta) - dE/dtheta(s*_0)) / beta (C does not depend on theta), order 1 adds
T (dPhi_beta/dtheta - dPhi_0/dtheta) / beta. The expansion holds where the minimum is
isolated and its interior units are O(sqrt T) away from the walls (and the saturated units'
|g_i| >> sqrt T): the error of order 1 is O(T^2), that of order 0 is O(T).
"""

from __future__ import annotations

import numpy as np

from labep.models import Model, Params

#: the model methods the expansion needs
REQUIRED = ("state_gradient", "hessian", "hessian_gradient", "field_gradient")

#: smallest |g_i| of a saturated unit taken into log |g_i| (a unit resting on its wall with
#: no force is outside the expansion's regime; this only keeps the logarithm finite)
TINY_FORCE = 1e-12


def missing_methods(model: type | Model) -> list[str]:
    """The methods of :data:`REQUIRED` a model (class or instance) lacks."""
    return [name for name in REQUIRED if not callable(getattr(model, name, None))]


def interior(state: np.ndarray) -> np.ndarray:
    """Units strictly inside the box [0, 1] (bool, like ``state``); the others are saturated
    (clipped by rho at a wall) and treated as clamped there."""
    state = np.asarray(state)
    return (state > 0.0) & (state < 1.0)


def fluctuation(model: Model, inputs: np.ndarray, state: np.ndarray, params: Params,
                strength: float, target: np.ndarray | None,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Params]:
    """Phi = 1/2 log det H_II + sum_B log |g_i| per sample at the fixed points ``state``
    (batch, n) of E + ``strength`` C, the number of interior units per sample, and
    sum_b w_b dPhi_b/dtheta (``weights`` w, default 1 each). Float64."""
    inputs = np.asarray(inputs, dtype=np.float64)
    state = np.asarray(state, dtype=np.float64)
    batch, n = state.shape
    w = np.ones(batch) if weights is None else np.asarray(weights, dtype=np.float64)
    hessians = model.hessian(inputs, state, params, strength)
    forces = model.state_gradient(inputs, state, params, strength, target)
    inside = interior(state)
    phi = np.empty(batch)
    padded = np.zeros((batch, n, n))  # w_b H_II^-1, zero rows and columns on B
    mu = np.zeros((batch, n))  # w_b (z - w)
    for b in range(batch):
        keep, pinned = inside[b], ~inside[b]
        block = hessians[b][np.ix_(keep, keep)]
        sign, log_det = np.linalg.slogdet(block) if keep.any() else (1.0, 0.0)
        if sign <= 0:
            raise ValueError(f"sample {b}: the Hessian on the interior units is not positive "
                             "definite: the state is not a minimum, the expansion does not "
                             "apply")
        pull = np.maximum(np.abs(forces[b][pinned]), TINY_FORCE)
        phi[b] = 0.5 * log_det + float(np.sum(np.log(pull)))
        inverse = np.linalg.inv(block) if keep.any() else np.zeros((0, 0))
        padded[b][np.ix_(keep, keep)] = w[b] * inverse
        reciprocal = np.zeros(n)
        reciprocal[pinned] = 1.0 / np.copysign(pull, forces[b][pinned])
        shift = np.zeros(n)
        shift[keep] = inverse @ (hessians[b][np.ix_(keep, pinned)] @ reciprocal[pinned])
        mu[b] = w[b] * (shift - reciprocal)
    gradient = model.hessian_gradient(inputs, state, params, padded)
    for name, value in model.field_gradient(inputs, state, mu).items():
        gradient[name] = 0.5 * gradient[name] + value
    return phi, inside.sum(axis=1), gradient


def free_energy(model: Model, inputs: np.ndarray, state: np.ndarray, params: Params,
                strength: float, target: np.ndarray, temperature: float,
                order: int = 1) -> np.ndarray:
    """F_beta per sample to ``order`` 0 (E_beta(s*)) or 1 (+ T Phi - T (n_I / 2 log(2 pi T)
    + n_B log T)) in T, at the fixed points ``state`` of E + ``strength`` C."""
    inputs = np.asarray(inputs, dtype=np.float64)
    state = np.asarray(state, dtype=np.float64)
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    energy = model.energy(inputs, state, params)
    if strength != 0.0:
        energy = energy + strength * model.cost(state, target)
    if order == 0 or temperature == 0.0:
        return energy
    phi, inner, _ = fluctuation(model, inputs, state, params, strength, target)
    pinned = state.shape[1] - inner
    return energy + temperature * (phi - 0.5 * inner * np.log(2 * np.pi * temperature)
                                   - pinned * np.log(temperature))


def low_temperature_gradient(model: Model, inputs: np.ndarray, free: np.ndarray,
                             nudged: np.ndarray, params: Params, target: np.ndarray,
                             beta: float, temperature: float, order: int = 1,
                             weights: np.ndarray | None = None) -> Params:
    """d/dtheta of the weighted batch mean of (F_beta - F_0) / beta to ``order`` 0 or 1 in
    T, from the free and nudged fixed points s*_0 (``free``) and s*_beta (``nudged``)."""
    gradient = model.contrast(inputs, nudged, free, weights, 1.0 / beta)
    if order == 0 or temperature == 0.0:
        return gradient
    batch = len(free)
    w = np.full(batch, 1.0 / batch) if weights is None else weights / max(weights.sum(),
                                                                          1e-300)
    _, _, up = fluctuation(model, inputs, nudged, params, beta, target, w)
    _, _, down = fluctuation(model, inputs, free, params, 0.0, target, w)
    scale = temperature / beta
    return {name: value + scale * (up[name] - down[name]) for name, value in gradient.items()}
