"""The Lagrangian bench's physics: the discretized action's gradient and Hessian, Newton's
stationary trajectories for both boundary conditions, and EP from the conjugate variables
against implicit differentiation and finite differences of the cost."""

from __future__ import annotations

import numpy as np
import pytest

from labep.hardware.bench import BenchError, Nudge, OutOfRangeError, Settle
from labep.models.lagrangian import LagrangianOscillators
from labep.simulators.lagrangian import LagrangianSimulator, LagrangianSimulatorOptions

TIGHT = Settle(1e-11, 50)


def make(boundary: str, seed: int = 0):
    period = 8.0 if boundary == "periodic" else 1.5
    model = LagrangianOscillators([2, 3, 2], time_points=12, boundary=boundary, period=period)
    rng = np.random.default_rng(seed)
    params = model.init_params(rng)
    for layer in (1, 2):
        params[f"u{layer}"] = rng.uniform(0.0, 0.3, size=model.sizes[layer])
    inputs = rng.uniform(size=(3, 2))
    return model, params, inputs, model.encode_target(np.array([0, 1, 0]))


def flat(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([params[name].ravel() for name in sorted(params)])


@pytest.mark.parametrize("boundary", ["periodic", "fixed"])
def test_gradient_and_hessian_of_the_action(boundary: str) -> None:
    model, params, inputs, target = make(boundary)
    rng = np.random.default_rng(1)
    q = 0.3 * rng.normal(size=(1, model.state_size))
    beta, step = 0.7, 1e-6

    def nudged_energy(row: np.ndarray) -> float:
        return float(model.energy(inputs[:1], row, params)[0]
                     + beta * model.cost(row, target[:1])[0])

    gradient = model.gradient_q(inputs[:1], q, params, beta, target[:1]).ravel()
    hessian = model.hessian(inputs[:1], q[0], params, beta).toarray()
    basis = np.eye(model.state_size)
    for i in range(model.state_size):
        up, down = q + step * basis[i], q - step * basis[i]
        assert (nudged_energy(up) - nudged_energy(down)) / (2 * step) == pytest.approx(
            gradient[i], abs=1e-6)
        column = (model.gradient_q(inputs[:1], up, params, beta, target[:1]).ravel()
                  - model.gradient_q(inputs[:1], down, params, beta, target[:1]).ravel())
        assert np.abs(column / (2 * step) - hessian[:, i]).max() < 1e-6
    local = model.local(inputs[:1], q)
    for name in params:
        index = (0,) * params[name].ndim
        up = {k: v.copy() for k, v in params.items()}
        down = {k: v.copy() for k, v in params.items()}
        up[name][index] += step
        down[name][index] -= step
        numeric = (model.energy(inputs[:1], q, up)[0]
                   - model.energy(inputs[:1], q, down)[0]) / (2 * step)
        assert numeric == pytest.approx(local[name][(0, *index)], abs=1e-6)


@pytest.mark.parametrize("boundary", ["periodic", "fixed"])
def test_ep_matches_the_exact_gradient(boundary: str) -> None:
    model, params, inputs, target = make(boundary)
    bench = LagrangianSimulator(model)
    bench.write(params)
    free = bench.relax(inputs, settle=TIGHT)
    assert free.all_converged and np.all(free.residual <= 1e-11)
    assert model.residual(inputs, free.state, params).max() <= 1e-11
    beta = 1e-4
    plus = bench.relax(inputs, Nudge(beta, target), start=free.state, settle=TIGHT)
    minus = bench.relax(inputs, Nudge(-beta, target), start=free.state, settle=TIGHT)
    estimate = flat(model.contrast(inputs, plus.state, minus.state, scale=1 / (2 * beta)))
    exact = flat(model.exact_gradient(inputs, free.state, target, params))
    assert estimate @ exact / (np.linalg.norm(estimate) * np.linalg.norm(exact)) > 0.99999

    def mean_cost(p: dict[str, np.ndarray]) -> float:
        other = LagrangianSimulator(model)
        other.write(p)
        return float(model.cost(other.relax(inputs, settle=TIGHT).state, target).mean())

    exact_params = model.exact_gradient(inputs, free.state, target, params)
    for name in ("J1", "J2", "k1", "u2"):
        up = {k: v.copy() for k, v in params.items()}
        down = {k: v.copy() for k, v in params.items()}
        index = (0,) * params[name].ndim
        up[name][index] += 1e-5
        down[name][index] -= 1e-5
        numeric = (mean_cost(up) - mean_cost(down)) / 2e-5
        assert numeric == pytest.approx(exact_params[name][index], rel=1e-4, abs=1e-9)


def test_nudge_moves_outputs_towards_the_target() -> None:
    model, params, inputs, target = make("periodic")
    bench = LagrangianSimulator(model)
    bench.write(params)
    free = bench.relax(inputs, settle=TIGHT)
    nudged = bench.relax(inputs, Nudge(0.5, target), start=free.state, settle=TIGHT)
    assert np.all(model.cost(nudged.state, target) < model.cost(free.state, target))


def test_resonance_is_unsettled_not_used() -> None:
    """A drive harmonic on a normal mode makes the Hessian singular: the sample is reported
    unsettled (a fault), never turned into an update."""
    model = LagrangianOscillators([1, 1], time_points=8, period=2 * np.pi, init_gain=0.0)
    params = model.init_params(np.random.default_rng(0))
    # the discrete normal mode at the drive frequency: k + J = (2 / dt)^2 sin^2(pi / N)
    mode = (2 / model.dt * np.sin(np.pi / model.time_points)) ** 2
    params["J1"] = np.full((1, 1), 0.5)
    params["k1"] = np.array([mode - 0.5])
    bench = LagrangianSimulator(model)
    bench.write(params)
    relaxation = bench.relax(np.array([[1.0]]), settle=TIGHT)
    assert not relaxation.converged[0]
    params["k1"] = np.array([mode - 0.4])  # detuned: a driven steady state exists
    bench.write(params)
    assert bench.relax(np.array([[1.0]]), settle=TIGHT).converged[0]


def test_refusals() -> None:
    model, _params, inputs, _ = make("periodic")
    bench = LagrangianSimulator(model, LagrangianSimulatorOptions(spring_range=0.1))
    with pytest.raises(OutOfRangeError):
        bench.write({"J1": np.full((2, 3), 0.5)})
    with pytest.raises(BenchError, match="sample sets"):
        bench.relax(inputs, settle=Settle(1e-6, 5, readouts=2, samples=True))
