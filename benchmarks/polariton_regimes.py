"""Where in parameter space a polariton chain can learn XOR, and where near-equilibrium EP
estimates its gradient: the regime map behind polariton_xor.yaml.

Each regime is a 9-site chain (``labep.models.polariton.PolaritonLattice``), run on the numba
simulator in float64. For every regime and seed the script reports:

- ``settled``: the fraction of the four XOR samples whose free phase settled (rotating-frame
  residual <= 1e-8) at fresh parameters;
- ``response``: how much the inputs move the readout, max over outputs of the spread (max - min
  over the four inputs) of the output intensity (or fraction), at fresh parameters;
- ``EP cosine``: cosine between the symmetric EP estimate (beta 0.01, the model's intensity
  projection applied) and the exact gradient (implicit differentiation), at fresh parameters;
- ``exact XOR``: the accuracy reached by training V with the *exact* gradient and Adam (lr 0.05,
  ``--steps`` full-batch steps): what the physics can represent, independent of EP;
- ``EP XOR``: the same training with the symmetric EP estimate in place of the exact gradient.

Regimes (J = 1 is the energy unit). The first three read one site per class as its absolute
intensity (``cost: intensity``); the last is the shipped ``polariton_xor.yaml``:

- ``uniform-TF``: every site pumped, g |psi|^2 ~ 2 J: the healing length is under a site, each
  site's intensity follows its own potential, and the inputs at the ends barely reach the
  outputs;
- ``uniform-weak``: every site pumped, dissipation 10x weaker, g = 0.3, energy relaxation
  eta = 0.05, inputs flanking the outputs: settles, responds, but the lowest-energy state's
  intensities are nodeless and no single site is lit for both unequal inputs;
- ``source``: one pumped site at the end of the chain (a polariton source), loss everywhere:
  waves run through the two input barriers and interfere, XOR is representable; the state is
  far from equilibrium (strong currents) and EP's estimate is poor;
- ``ground-state``: weak uniform dissipation, eta = 0.5, g = 0.1, inputs on sites 2 and 6, class 0
  read on site 4 and class 1 on the region {0, 8}, ``cost: fraction`` (the protocol): EP is
  exact, and training digs the double well that separates XOR.

    python benchmarks/polariton_regimes.py [--seeds 0 1] [--steps 300] [--only source] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from labep.hardware.bench import Nudge, Settle
from labep.models.polariton import PolaritonLattice
from labep.simulators.polariton import PolaritonSimulator, PolaritonSimulatorOptions

XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
LABELS = np.array([0, 1, 1, 0])
SETTLE = Settle(1e-8, 50_000)

REGIMES: dict[str, dict[str, Any]] = {
    "uniform-TF": {"input_sites": [0, 8], "output_sites": [3, 5], "interaction": 1.0,
                   "pump": 0.9, "loss": 0.3, "saturation": 0.3, "input_potential": 1.5,
                   "target_low": 1.0, "target_high": 2.5},
    "uniform-weak": {"input_sites": [2, 6], "output_sites": [4, 5], "interaction": 0.3,
                     "pump": 0.06, "loss": 0.03, "saturation": 0.015, "input_potential": 1.5,
                     "energy_relaxation": 0.05, "target_low": 1.0, "target_high": 2.5},
    "source": {"input_sites": [3, 5], "output_sites": [7, 8], "pump_sites": [0],
               "interaction": 0.3, "pump": 1.5, "loss": 0.3, "saturation": 0.3,
               "input_potential": 1.5, "target_low": 0.1, "target_high": 0.5},
    "ground-state": {"input_sites": [2, 6], "output_sites": [4, [0, 8]], "interaction": 0.1,
                     "pump": 0.06, "loss": 0.03, "saturation": 0.015,
                     "energy_relaxation": 0.5, "input_potential": 1.0, "cost": "fraction",
                     "target_low": 0.3, "target_high": 0.7},
}


def bench(config: dict[str, Any]) -> tuple[PolaritonLattice, PolaritonSimulator]:
    model = PolaritonLattice([9], 2, **config)
    sim = PolaritonSimulator(model, PolaritonSimulatorOptions(
        dtype="float64", dt=0.1, potential_range=(-20.0, 20.0), margin=5.0))
    return model, sim


def ep_estimate(model: PolaritonLattice, sim: PolaritonSimulator, free_state: np.ndarray,
                target: np.ndarray, beta: float) -> np.ndarray:
    plus = sim.relax(XOR, Nudge(beta, target), start=free_state, settle=SETTLE)
    minus = sim.relax(XOR, Nudge(-beta, target), start=free_state, settle=SETTLE)
    return model.contrast(XOR, plus.state, minus.state, None, 1.0 / (2.0 * beta))["V"]


def train(model: PolaritonLattice, sim: PolaritonSimulator, seed: int, steps: int,
          use_ep: bool, beta: float) -> float:
    """Full-batch Adam on V (exact gradient or EP); the last step's free-phase accuracy."""
    v = model.init_params(np.random.default_rng(seed))["V"]
    first, second = np.zeros_like(v), np.zeros_like(v)
    target = model.encode_target(LABELS)
    accuracy = 0.0
    for t in range(1, steps + 1):
        sim.write({"V": v})
        free = sim.relax(XOR, settle=SETTLE)
        accuracy = float(np.mean(model.predict(free.state) == LABELS))
        grad = (ep_estimate(model, sim, free.state, target, beta) if use_ep else
                model.exact_gradient(XOR, free.state, target, {"V": v})["V"])
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad * grad
        v = v - 0.05 * (first / (1 - 0.9 ** t)) / (np.sqrt(second / (1 - 0.999 ** t)) + 1e-8)
    return accuracy


def measure(name: str, seed: int, steps: int, beta: float) -> dict[str, Any]:
    model, sim = bench(REGIMES[name])
    v = model.init_params(np.random.default_rng(seed))["V"]
    sim.write({"V": v})
    free = sim.relax(XOR, settle=SETTLE)
    target = model.encode_target(LABELS)
    outputs = model.output_intensities(free.state)
    if model.cost_kind == "fraction":
        outputs = outputs / outputs.sum(axis=1, keepdims=True)
    exact = model.exact_gradient(XOR, free.state, target, {"V": v})["V"]
    estimate = ep_estimate(model, sim, free.state, target, beta)
    cosine = float(exact @ estimate / (np.linalg.norm(exact) * np.linalg.norm(estimate)))
    return {"regime": name, "seed": seed,
            "settled": float(np.mean(free.converged)),
            "response": float(np.max(np.ptp(outputs, axis=0))),
            "ep_cosine": cosine,
            "exact_xor": train(model, sim, seed, steps, False, beta),
            "ep_xor": train(model, sim, seed, steps, True, beta)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--only", action="append", choices=sorted(REGIMES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    started = time.perf_counter()
    for name in args.only or list(REGIMES):
        for seed in args.seeds:
            rows.append(measure(name, seed, args.steps, args.beta))
            if not args.json:
                r = rows[-1]
                print(f"{r['regime']:>13}  seed {seed}  settled {r['settled']:.2f}  response "
                      f"{r['response']:.3f}  EP cosine {r['ep_cosine']:+.3f}  exact XOR "
                      f"{r['exact_xor']:.2f}  EP XOR {r['ep_xor']:.2f}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"({time.perf_counter() - started:.0f} s, {args.steps} Adam steps per training)")


if __name__ == "__main__":
    main()
