"""The low-temperature expansion of thermal EP (``low_temperature``): against quadrature of the
exact thermal free energy on a tiny network, its T -> 0 limit, the Hessian derivatives against
finite differences, the engine, and validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from labep.ep import low_temperature as lt
from labep.ep import thermal
from labep.ep.estimators import LowTemperature
from labep.hardware.bench import Nudge, Settle
from labep.models.hopfield import LayeredHopfield
from labep.protocol.text import ProtocolError
from labep.run.engine import Trainer
from labep.run.gradcheck import compare
from labep.run.validate import load_protocol
from labep.simulators.hopfield import HopfieldSimulator, HopfieldSimulatorOptions
from labep.store.runs import RunStore

from .conftest import tiny_xor

#: a 2-1-1 network whose free and nudged minima are interior for the inputs below
TINY = LayeredHopfield([2, 1, 1])
TINY_PARAMS = {"W1": np.array([[1.5], [-1.5]]), "b1": np.array([0.3]),
               "W2": np.array([[0.5]]), "b2": np.array([0.25])}
INPUTS = np.array([[0.0, 0.0], [0.1, 0.05], [0.05, 0.1]])
TARGET = np.array([[0.7], [0.4], [0.55]])
BETA = 0.5
GRID = 1201  # trapezoid nodes a side on [0, 1]^2


def flat(grads: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(grads[name]) for name in sorted(grads)])


def fixed_points(model, params, inputs, target, beta):
    """Deterministic free and nudged fixed points from the Hopfield simulator at T = 0."""
    bench = HopfieldSimulator(model, HopfieldSimulatorOptions(dtype="float64"))
    bench.open()
    bench.write(params)
    settle = Settle(1e-13, 100_000)
    free = bench.relax(inputs, settle=settle)
    nudged = bench.relax(inputs, Nudge(beta, target), start=free.state, settle=settle)
    assert free.all_converged and nudged.all_converged
    return free, nudged


@pytest.fixture(scope="module")
def tiny_phases():
    free, nudged = fixed_points(TINY, TINY_PARAMS, INPUTS, TARGET, BETA)
    for phase in (free, nudged):  # every unit at least 0.3 inside the box
        assert np.all(lt.interior(phase.state))
        assert np.all((phase.state > 0.3) & (phase.state < 0.7))
    return free, nudged


def exact_by_quadrature(temperature, beta=BETA):
    """(F_beta - F_0) / beta, its gradient (the finite-nudge target) and d<C>_0/dtheta (the
    thermal-covariance target), by quadrature of the exact Boltzmann density."""
    states, free_p, free_f = thermal.quadrature_box(TINY, TINY_PARAMS, INPUTS, TARGET, 0.0,
                                                    temperature, GRID)
    _, nudged_p, nudged_f = thermal.quadrature_box(TINY, TINY_PARAMS, INPUTS, TARGET, beta,
                                                   temperature, GRID)
    rest = np.zeros(TINY.state_size)
    gradient = (flat(thermal.table_mean_gradient(TINY, INPUTS, states, nudged_p, rest))
                - flat(thermal.table_mean_gradient(TINY, INPUTS, states, free_p, rest))) / beta
    cost = flat(thermal.table_cost_gradient(TINY, INPUTS, states, free_p, TARGET, temperature))
    return float(np.mean(nudged_f - free_f) / beta), gradient, cost


def expansion(free, nudged, temperature, order, beta=BETA):
    difference = np.mean(
        lt.free_energy(TINY, INPUTS, nudged.state, TINY_PARAMS, beta, TARGET, temperature, order)
        - lt.free_energy(TINY, INPUTS, free.state, TINY_PARAMS, 0.0, TARGET, temperature,
                         order)) / beta
    estimate = LowTemperature(temperature, order).estimate(
        TINY, INPUTS, free, [nudged], [beta], np.ones(len(INPUTS)), target=TARGET,
        params=TINY_PARAMS)
    return float(difference), flat(estimate.gradient)


def test_order_one_matches_quadrature_to_at_least_second_order(tiny_phases) -> None:
    """Halving T halves the error of order 0 (O(T)) and divides that of order 1 by at least
    4 (O(T^2); here more: E is quadratic in s, so Laplace is exact up to the box's tails)."""
    free, nudged = tiny_phases
    errors = {}
    for temperature in (0.005, 0.0025):
        exact_difference, exact_gradient, _ = exact_by_quadrature(temperature)
        for order in (0, 1):
            difference, gradient = expansion(free, nudged, temperature, order)
            errors[order, temperature] = (abs(difference - exact_difference),
                                          np.linalg.norm(gradient - exact_gradient))
    for part in (0, 1):  # the free-energy difference, then its gradient
        ratio_0 = errors[0, 0.005][part] / errors[0, 0.0025][part]
        ratio_1 = errors[1, 0.005][part] / errors[1, 0.0025][part]
        assert 1.8 < ratio_0 < 2.2, ratio_0
        assert ratio_1 > 4.0, ratio_1
        assert errors[1, 0.005][part] < 0.01 * errors[0, 0.005][part]


def test_order_one_tends_to_order_zero(tiny_phases) -> None:
    free, nudged = tiny_phases
    zero = expansion(free, nudged, 0.0, 0)[1]
    assert np.array_equal(expansion(free, nudged, 0.0, 1)[1], zero)
    slopes = [(expansion(free, nudged, t, 1)[1] - zero) / t for t in (1e-2, 1e-3, 1e-4)]
    assert np.linalg.norm(slopes[0]) > 0.1  # the O(T) term is there
    np.testing.assert_allclose(slopes[1], slopes[0], rtol=1e-9)  # and linear in T
    np.testing.assert_allclose(slopes[2], slopes[0], rtol=1e-9)


def test_agrees_with_the_thermal_estimators_targets_as_t_goes_to_zero(tiny_phases) -> None:
    """Cosine with the finite-nudge target (the gradient of (F_beta - F_0) / beta) and with
    the thermal-covariance target d<C>_0/dtheta (the expansion at a small beta), by
    quadrature: both orders approach them as T -> 0, order 1 much faster."""
    free, nudged = tiny_phases
    small = 0.01
    free_s, nudged_s = fixed_points(TINY, TINY_PARAMS, INPUTS, TARGET, small)
    cosines = []
    for temperature in (0.01, 0.005, 0.0025):
        _, finite, cost = exact_by_quadrature(temperature)
        cosines.append([compare(expansion(free, nudged, temperature, order)[1], finite).cosine
                        for order in (0, 1)]
                       + [compare(expansion(free_s, nudged_s, temperature, order, small)[1],
                                  cost).cosine for order in (0, 1)])
    cosines = np.array(cosines)
    # closer as T falls (order 1 against d<C>/dtheta levels off at the O(beta) bias of the
    # nudge, relative error 0.015 here)
    assert np.all(np.diff(cosines[:, :3], axis=0) > 0)
    assert cosines[-1, 1] > 0.99999 and np.all(cosines[1:, 3] > 0.9999)
    assert np.all(cosines[:, 1] > cosines[:, 0]) and np.all(cosines[:, 3] > cosines[:, 2])


def fluctuation_of(model, params, inputs, target, beta):
    free, nudged = fixed_points(model, params, inputs, target, beta)
    state = nudged.state if beta else free.state
    return lt.fluctuation(model, inputs, state, params, beta, target), state


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_fluctuation_gradient_matches_finite_differences(beta: float) -> None:
    """dPhi/dtheta, Phi = 1/2 log det H_II + sum_B log |g_i|, against central differences of
    Phi with the fixed point re-settled at every shifted theta (the total derivative), on a
    2-3-2 network with saturated units (and a skip-free interior)."""
    model = LayeredHopfield([2, 3, 2], init_gain=2.0)
    params = model.init_params(np.random.default_rng(4))
    inputs = np.array([[0.2, 0.9], [0.7, 0.1]])
    target = np.array([[1.0, 0.0], [0.0, 1.0]])
    (_, _, gradient), state = fluctuation_of(model, params, inputs, target, beta)
    inside = lt.interior(state)
    assert inside.any() and (~inside).any()  # both kinds of units are exercised

    def objective(shifted):
        (value, _, _), moved = fluctuation_of(model, shifted, inputs, target, beta)
        assert np.array_equal(lt.interior(moved), inside)  # the same active set
        return float(np.sum(value))

    numeric = thermal.numeric_gradient(objective, params, step=1e-6)
    np.testing.assert_allclose(flat(gradient), flat(numeric), atol=2e-6)


def test_hessian_gradient_matches_finite_differences() -> None:
    model = LayeredHopfield([2, 3, 2, 2], skips=[[1, 3]])
    params = model.init_params(np.random.default_rng(5))
    inputs, state = np.zeros((2, 2)), np.full((2, model.state_size), 0.5)
    matrix = np.random.default_rng(6).normal(size=(2, model.state_size, model.state_size))
    analytic = model.hessian_gradient(inputs, state, params, matrix)
    numeric = thermal.numeric_gradient(
        lambda p: float(np.sum(matrix * model.hessian(inputs, state, p, 0.3))), params)
    np.testing.assert_allclose(flat(analytic), flat(numeric), atol=1e-8)


def test_low_temperature_trains(tmp_path: Path) -> None:
    doc = tiny_xor(**{"estimator": {"name": "low_temperature", "beta": 0.5,
                                    "temperature": 0.01}, "training.epochs": 1})
    with RunStore(tmp_path / "runs.db") as runs:
        result = Trainer(load_protocol(doc), runs, progress=False).run()
    assert result.status == "completed" and result.steps == 8


# -- validation -------------------------------------------------------------------------------


def refused(doc) -> str:
    with pytest.raises(ProtocolError) as caught:
        load_protocol(doc)
    return str(caught.value)


def low(**fields):
    return {"name": "low_temperature", "beta": 0.5, **fields}


def test_validation_refuses_nonsense() -> None:
    message = refused(tiny_xor(estimator=low(temperature=-0.1)))
    assert "estimator.temperature" in message and "must be >= 0" in message
    message = refused(tiny_xor(estimator=low(temperature=0.1, order=2)))
    assert "estimator.order" in message and "order 0 or 1" in message
    assert "estimator.temperature" in refused(tiny_xor(estimator=low()))
    message = refused(tiny_xor(**{"estimator": low(temperature=0.1),
                                  "bench.options.temperature": 0.1}))
    assert "bench.options" in message and "deterministic fixed points" in message
    doc = tiny_xor(estimator=low(temperature=0.1))
    doc["bench"] = {"simulator": "oim", "options": {"dtype": "float64"}}
    doc["model"] = {"kind": "layered_oim", "sizes": [2, 8, 2]}
    message = refused(doc)
    assert "model.kind" in message and "Hessian" in message
    assert load_protocol(tiny_xor(estimator=low(temperature=0.0, order=0)))


def test_gradcheck_keeps_the_protocol_estimators_settings() -> None:
    """`labep gradcheck` on a low_temperature protocol runs its estimator with the protocol's
    temperature and order (--beta alone replaced): order 0 is deterministic EP, which meets
    the exact gradient as beta -> 0; order 1 adds a term that grows with T."""
    from labep.run.gradcheck import gradcheck

    reports = {}
    for order, temperature in ((0, 0.01), (1, 1e-6), (1, 1e-4)):
        loaded = load_protocol(tiny_xor(estimator=low(temperature=temperature, order=order)))
        reports[order, temperature] = gradcheck(loaded.protocol, beta=1e-3, samples=4)
    assert reports[0, 0.01]["estimator"] == "low_temperature"
    assert reports[0, 0.01]["cosine"] > 0.9999
    assert reports[1, 1e-6]["relative_error"] < reports[1, 1e-4]["relative_error"]
