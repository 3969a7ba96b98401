"""Low-temperature expansion of thermal EP vs the thermal estimators' targets, as T -> 0.

On a 2-1-1 layered Hopfield network (W1 = [[1.5], [-1.5]], b1 = 0.3, W2 = 0.5, b2 = 0.25,
three inputs whose free and nudged minima sit inside the box), for a grid of T: the cosine and
relative error of the ``low_temperature`` estimate (order 0: deterministic EP; order 1: plus
the Hessian term) against

- finite_nudge: the exact gradient of (F_beta - F_0) / beta at beta = 0.5, by trapezoid
  quadrature of exp(-(E + beta C) / T) on [0, 1]^2 (1201 nodes a side);
- thermal_covariance: the exact d<C>_0/dtheta by the same quadrature (the expansion taken at
  beta = 0.01), and the thermal_covariance estimator itself on 20,000 Langevin readouts of
  the simulator at T (its cosine against the exact value and against order 1 at beta = 0.01,
  with its relative standard error).

Prints figures; asserts nothing.
    nice -n 19 python benchmarks/low_temperature.py
"""

from __future__ import annotations

import numpy as np

from labep.ep import thermal
from labep.ep.estimators import LowTemperature, ThermalCovariance
from labep.hardware.bench import Nudge, Settle
from labep.models.hopfield import LayeredHopfield
from labep.run.gradcheck import compare
from labep.simulators.hopfield import HopfieldSimulator, HopfieldSimulatorOptions

MODEL = LayeredHopfield([2, 1, 1])
PARAMS = {"W1": np.array([[1.5], [-1.5]]), "b1": np.array([0.3]),
          "W2": np.array([[0.5]]), "b2": np.array([0.25])}
INPUTS = np.array([[0.0, 0.0], [0.1, 0.05], [0.05, 0.1]])
TARGET = np.array([[0.7], [0.4], [0.55]])
GRID = 1201
TEMPERATURES = (0.04, 0.02, 0.01, 0.005, 0.0025, 0.00125)


def flat(grads: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(grads[name]) for name in sorted(grads)])


def phases(beta: float):
    bench = HopfieldSimulator(MODEL, HopfieldSimulatorOptions(dtype="float64"))
    bench.open()
    bench.write(PARAMS)
    settle = Settle(1e-13, 100_000)
    free = bench.relax(INPUTS, settle=settle)
    return free, bench.relax(INPUTS, Nudge(beta, TARGET), start=free.state, settle=settle)


def low_temperature(free, nudged, beta: float, temperature: float, order: int) -> np.ndarray:
    return flat(LowTemperature(temperature, order).estimate(
        MODEL, INPUTS, free, [nudged], [beta], np.ones(len(INPUTS)), target=TARGET,
        params=PARAMS).gradient)


def sampled_covariance(temperature: float) -> tuple[np.ndarray, float]:
    bench = HopfieldSimulator(MODEL, HopfieldSimulatorOptions(
        dtype="float64", temperature=temperature, langevin_step=0.02, burn_in=1000, thin=5))
    bench.open()
    bench.write(PARAMS)
    free = bench.relax(INPUTS, settle=Settle(1e-4, 1, readouts=20_000, samples=True))
    estimate = ThermalCovariance().estimate(MODEL, INPUTS, free, [], [], np.ones(len(INPUTS)),
                                            target=TARGET)
    return flat(estimate.gradient), estimate.metrics()["estimate_rel_stderr"]


def main() -> None:
    beta, small = 0.5, 0.01
    free, nudged = phases(beta)
    free_s, nudged_s = phases(small)
    print(f"2-1-1 Hopfield, 3 inputs; free fixed points {free.state.round(3).tolist()}")
    print("cosine / relative error of low_temperature against each exact target")
    print(f"{'T':>8} | finite_nudge (beta={beta}): {'order 0':>17} {'order 1':>17} | "
          f"thermal_covariance: {'order 0':>17} {'order 1':>17} | "
          "sampled thermal_covariance estimator (cosine)")
    for temperature in TEMPERATURES:
        states, free_p, _ = thermal.quadrature_box(MODEL, PARAMS, INPUTS, TARGET, 0.0,
                                                   temperature, GRID)
        _, nudged_p, _ = thermal.quadrature_box(MODEL, PARAMS, INPUTS, TARGET, beta,
                                                temperature, GRID)
        rest = np.zeros(MODEL.state_size)
        finite = (flat(thermal.table_mean_gradient(MODEL, INPUTS, states, nudged_p, rest))
                  - flat(thermal.table_mean_gradient(MODEL, INPUTS, states, free_p, rest))
                  ) / beta
        cost = flat(thermal.table_cost_gradient(MODEL, INPUTS, states, free_p, TARGET,
                                                temperature))
        cells = []
        for reference, (f, n, b) in ((finite, (free, nudged, beta)),
                                     (cost, (free_s, nudged_s, small))):
            for order in (0, 1):
                c = compare(low_temperature(f, n, b, temperature, order), reference)
                cells.append(f"{c.cosine:8.6f}/{c.relative_error:8.2e}")
        sampled, stderr = sampled_covariance(temperature)
        c = compare(sampled, cost)
        mine = compare(low_temperature(free_s, nudged_s, small, temperature, 1), sampled)
        print(f"{temperature:8.5f} | {'':>26}{cells[0]:>17} {cells[1]:>17} | {'':>19} "
              f"{cells[2]:>17} {cells[3]:>17} | vs exact {c.cosine:7.5f}, vs order 1 "
              f"{mine.cosine:7.5f} (rel. stderr {stderr:5.3f})")


if __name__ == "__main__":
    main()
