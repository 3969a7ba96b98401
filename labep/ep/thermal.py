"""EP at finite temperature: expectations over Gibbs-Boltzmann samples, and exact references.

At temperature T a bench's states follow p_beta(s) ~ exp(-(E(s) + beta C(s)) / T). With the
free energy F_beta = -T log Z_beta (Litman, "EP without limits"; Massar and Mognetti, "EP: the
quantum and the thermal cases"):

- finite nudge: dF_beta/dtheta = <dE/dtheta>_beta (C does not depend on theta), so
  (<dE/dtheta>_beta - <dE/dtheta>_0) / beta is the exact gradient of (F_beta - F_0) / beta for
  any finite beta, and tends to d<C>_0/dtheta as beta -> 0 ((F_beta - F_0) / beta -> <C>_0);
- thermal covariance: d<C>_0/dtheta = -(1/T) Cov_0(C, dE/dtheta) + <dC/dtheta>_0, from
  free-phase samples alone (no output is ever clamped or nudged).

The helpers here turn sample sets (readouts, batch, state) into those estimates through the
model's ``contrast`` (so every model with an energy gets them), estimate their standard error
by batch means over blocks of readouts, and compute the exact values by enumeration for
binary units (:func:`enumerate_binary`), the reference of the tests and of ``labep
gradcheck`` on a thermal protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product

import numpy as np

from labep.models import Model, Params

#: the estimators that take sample sets from a bench at temperature T > 0
THERMAL_ESTIMATORS = ("finite_nudge", "thermal_covariance")


def rows(samples: np.ndarray) -> np.ndarray:
    """(readouts, batch, state) -> (readouts * batch, state), readout-major."""
    return samples.reshape(-1, samples.shape[-1])


def repeat_inputs(inputs: np.ndarray, readouts: int) -> np.ndarray:
    """The inputs of :func:`rows`: every readout of sample b was taken with input b."""
    return np.tile(np.asarray(inputs), (readouts, 1))


def weighted_sum(model: Model, inputs: np.ndarray, states: np.ndarray,
                 reference: np.ndarray, weights: np.ndarray) -> Params:
    """sum_k w_k (dE/dtheta(s_k) - dE/dtheta(r_k)) for weights of any sign.

    The model's ``contrast`` takes normalized non-negative weights; the positive and the
    negative parts of ``w`` go through it separately, each rescaled by its total."""
    total: Params | None = None
    for sign, part in ((1.0, np.maximum(weights, 0.0)), (-1.0, np.maximum(-weights, 0.0))):
        mass = float(part.sum())
        if mass == 0.0:
            continue
        piece = model.contrast(inputs, states, reference, part, sign * mass)
        if total is None:
            total = piece
        else:
            for name, value in piece.items():
                total[name] = total[name] + value
    if total is None:  # every weight is zero
        total = model.contrast(inputs, states, states, None, 0.0)
    return total


def finite_nudge(model: Model, inputs: np.ndarray, free: np.ndarray, nudged: np.ndarray,
                 beta: float, weights: np.ndarray | None = None) -> Params:
    """(<dE/dtheta>_beta - <dE/dtheta>_0) / beta, the batch mean (``weights`` per sample)
    of the difference of sample means; ``free`` and ``nudged`` are (readouts, batch, state)
    with the same readout count."""
    if free.shape != nudged.shape:
        raise ValueError(f"free and nudged sample sets differ in shape: {free.shape} vs "
                         f"{nudged.shape}")
    readouts = free.shape[0]
    w = None if weights is None else np.tile(weights, readouts)
    return model.contrast(repeat_inputs(inputs, readouts), rows(nudged), rows(free), w,
                          1.0 / beta)


def thermal_covariance(model: Model, inputs: np.ndarray, samples: np.ndarray,
                       target: np.ndarray, temperature: float,
                       weights: np.ndarray | None = None,
                       explicit: Params | None = None) -> Params:
    """-(1/T) Cov(C, dE/dtheta) (+ <dC/dtheta>, ``explicit``): the gradient of the expected
    cost from free-phase samples (readouts, batch, state).

    The covariance is taken over the readouts of each input (unbiased, n - 1), then averaged
    over the batch with ``weights``: sum_{b,k} w_b (C_bk - mean_k C_bk) dE/dtheta(s_bk) /
    ((n - 1) sum_b w_b)."""
    readouts, batch, _ = samples.shape
    if readouts < 2:
        raise ValueError("a covariance needs at least 2 readouts per sample")
    w = np.ones(batch) if weights is None else np.asarray(weights, dtype=np.float64)
    cost = np.asarray(model.cost(rows(samples), repeat_inputs(target, readouts)),
                      dtype=np.float64).reshape(readouts, batch)
    centered = (cost - cost.mean(axis=0)) * w / ((readouts - 1) * max(w.sum(), 1e-300))
    # any per-input reference state cancels, since each input's centred costs sum to zero
    reference = np.broadcast_to(samples[0], samples.shape)
    gradient = weighted_sum(model, repeat_inputs(inputs, readouts), rows(samples),
                            rows(np.ascontiguousarray(reference)),
                            centered.ravel() * (-1.0 / temperature))
    if explicit is not None:
        for name, value in explicit.items():
            gradient[name] = gradient[name] + value
    return gradient


def block_stderr(estimate: Callable[[slice], Params], readouts: int,
                 blocks: int = 8) -> Params | None:
    """Standard error of an estimate by batch means: the estimate on each of ``blocks``
    contiguous blocks of readouts, their spread / sqrt(blocks) (chains are autocorrelated;
    blocks much longer than the correlation time make the block estimates independent).
    None with fewer than 2 readouts per block and 2 blocks."""
    blocks = min(blocks, readouts // 2)
    if blocks < 2:
        return None
    size = readouts // blocks
    parts = [estimate(slice(i * size, (i + 1) * size)) for i in range(blocks)]
    return {name: np.std([p[name] for p in parts], axis=0, ddof=1) / np.sqrt(blocks)
            for name in parts[0]}


def relative_stderr(gradient: Params, stderr: Params | None) -> float | None:
    """|stderr| / |gradient| over every parameter: a scalar summary of an estimate's noise."""
    if stderr is None:
        return None
    noise = np.sqrt(sum(float(np.sum(np.square(v))) for v in stderr.values()))
    signal = np.sqrt(sum(float(np.sum(np.square(v))) for v in gradient.values()))
    return noise / signal if signal > 0 else float("inf")


# -- exact references by enumeration (binary units) -------------------------------------------


def binary_states(size: int) -> np.ndarray:
    """All 2^size states in {0, 1}^size, (2^size, size)."""
    if size > 20:
        raise ValueError(f"enumerating 2^{size} states is refused (at most 2^20)")
    return np.array(list(product((0.0, 1.0), repeat=size)))


def boltzmann_table(model: Model, params: Params, inputs: np.ndarray, target: np.ndarray,
                    beta: float, temperature: float, states: np.ndarray,
                    log_measure: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The Boltzmann probabilities p_beta(s | x_b) of a table of ``states`` (m, n) per input,
    and F_beta(x_b) = -T log sum_s mu(s) exp(-(E + beta C)(s) / T), mu the measure of each
    state (``log_measure``, default 1: a sum over discrete states; quadrature weights turn
    it into the integral). Returns (probabilities (batch, m), F (batch,)), float64."""
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    energy = np.stack([
        model.energy(np.repeat(x[None], len(states), axis=0), states, params)
        + beta * model.cost(states, np.repeat(y[None], len(states), axis=0))
        for x, y in zip(np.asarray(inputs, dtype=np.float64), target, strict=True)])
    scaled = -energy / temperature
    if log_measure is not None:
        scaled = scaled + log_measure
    top = scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled - top)
    z = weights.sum(axis=1, keepdims=True)
    free_energy = -temperature * (np.log(z[:, 0]) + top[:, 0])
    return weights / z, free_energy


def enumerate_binary(model: Model, params: Params, inputs: np.ndarray, target: np.ndarray,
                     beta: float, temperature: float) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
    """Every binary state s, its Boltzmann probability p_beta(s | x_b) per input and the free
    energy F_beta(x_b) = -T log Z_beta: (states (m, n), probabilities (batch, m), F (batch,)).
    Energies from the model's ``energy`` and ``cost``, float64."""
    states = binary_states(model.state_size)
    return (states, *boltzmann_table(model, params, inputs, target, beta, temperature, states))


def box_grid(size: int, points: int) -> tuple[np.ndarray, np.ndarray]:
    """The trapezoid rule on the box [0, 1]^size with ``points`` nodes a side: the nodes
    (points^size, size) and the log of their weights. Refuses more than 2^24 nodes."""
    if points ** size > 2**24:
        raise ValueError(f"a grid of {points}^{size} nodes is refused (at most 2^24)")
    axis = np.linspace(0.0, 1.0, points)
    weight = np.full(points, 1.0 / (points - 1))
    weight[[0, -1]] *= 0.5
    grids = np.meshgrid(*([axis] * size), indexing="ij")
    logs = np.meshgrid(*([np.log(weight)] * size), indexing="ij")
    return (np.stack([g.ravel() for g in grids], axis=1),
            np.sum([g.ravel() for g in logs], axis=0))


def quadrature_box(model: Model, params: Params, inputs: np.ndarray, target: np.ndarray,
                   beta: float, temperature: float, points: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As :func:`enumerate_binary` for continuous units in [0, 1]: the Boltzmann density on
    a trapezoid grid (:func:`box_grid`) and F_beta = -T log of its integral; (nodes,
    probabilities (batch, m) including the quadrature weights, F (batch,))."""
    states, log_measure = box_grid(model.state_size, points)
    return (states, *boltzmann_table(model, params, inputs, target, beta, temperature, states,
                                     log_measure))


def table_mean_gradient(model: Model, inputs: np.ndarray, states: np.ndarray,
                        probs: np.ndarray, reference: np.ndarray) -> Params:
    """The batch mean of sum_s p(s | x_b) dE/dtheta(s) - dE/dtheta(``reference``) over a
    table of ``states`` with probabilities ``probs`` (batch, m)."""
    batch, m = probs.shape
    x = np.repeat(np.asarray(inputs, dtype=np.float64), m, axis=0)
    return weighted_sum(model, x, np.tile(states, (batch, 1)),
                        np.repeat(reference[None], batch * m, axis=0), probs.ravel() / batch)


def table_cost_gradient(model: Model, inputs: np.ndarray, states: np.ndarray,
                        probs: np.ndarray, target: np.ndarray, temperature: float) -> Params:
    """d<C>_0/dtheta = -(1/T) Cov_0(C, dE/dtheta) exactly over a table of free-phase
    ``states`` with probabilities ``probs`` (batch, m), batch mean (C does not depend on
    theta): the quantity the thermal covariance estimate targets."""
    batch, m = probs.shape
    costs = np.stack([model.cost(states, np.repeat(y[None], m, axis=0)) for y in target])
    centered = probs * (costs - np.sum(probs * costs, axis=1, keepdims=True))
    x = np.repeat(np.asarray(inputs, dtype=np.float64), m, axis=0)
    tiled = np.tile(states, (batch, 1))
    return weighted_sum(model, x, tiled, np.zeros_like(tiled),
                        centered.ravel() * (-1.0 / (temperature * batch)))


def enumerated_mean_gradient(model: Model, params: Params, inputs: np.ndarray,
                             target: np.ndarray, beta: float, temperature: float,
                             reference: np.ndarray) -> Params:
    """The batch mean of <dE/dtheta>_beta - dE/dtheta(``reference``) by enumeration."""
    states, probs, _ = enumerate_binary(model, params, inputs, target, beta, temperature)
    return table_mean_gradient(model, inputs, states, probs, reference)


def numeric_gradient(function: Callable[[Params], float], params: Params,
                     step: float = 1e-5) -> Params:
    """Central differences of a scalar function of the parameters, entry by entry."""
    grads: Params = {}
    for name, value in params.items():
        grad = np.zeros(value.shape)
        for index in np.ndindex(value.shape):
            shifted = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
            shifted[name][index] = value[index] + step
            up = function(shifted)
            shifted[name][index] = value[index] - step
            grad[index] = (up - function(shifted)) / (2 * step)
        grads[name] = grad
    return grads


def exact_free_energy_gradient(model: Model, params: Params, inputs: np.ndarray,
                               target: np.ndarray, beta: float, temperature: float) -> Params:
    """d/dtheta of the batch mean of (F_beta - F_0) / beta, by central differences of the
    enumerated free energies: the quantity the finite-nudge estimate is exact for."""
    def objective(p: Params) -> float:
        f_beta = enumerate_binary(model, p, inputs, target, beta, temperature)[2]
        f_zero = enumerate_binary(model, p, inputs, target, 0.0, temperature)[2]
        return float(np.mean(f_beta - f_zero) / beta)
    return numeric_gradient(objective, params)


def exact_cost_gradient(model: Model, params: Params, inputs: np.ndarray, target: np.ndarray,
                        temperature: float) -> Params:
    """d/dtheta of the batch mean of the expected cost <C>_0, by central differences of the
    enumerated expectation: what the thermal covariance estimate targets."""
    def objective(p: Params) -> float:
        states, probs, _ = enumerate_binary(model, p, inputs, target, 0.0, temperature)
        costs = np.stack([model.cost(states, np.repeat(y[None], len(states), axis=0))
                          for y in target])
        return float(np.mean(np.sum(probs * costs, axis=1)))
    return numeric_gradient(objective, params)


def exact_reference(name: str, model: Model, params: Params, inputs: np.ndarray,
                    target: np.ndarray, beta: float, temperature: float) -> Params:
    """The exact gradient a thermal estimator ``name`` estimates, by enumeration."""
    if name == "finite_nudge":
        return exact_free_energy_gradient(model, params, inputs, target, beta, temperature)
    if name == "thermal_covariance":
        return exact_cost_gradient(model, params, inputs, target, temperature)
    raise ValueError(f"{name!r} is not a thermal estimator ({', '.join(THERMAL_ESTIMATORS)})")
