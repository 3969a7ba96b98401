"""How many measurement shots quantum EP needs: cosine of the EP estimate to the exact gradient
versus shots per measurement setting, on the transverse-field Ising network of
:mod:`labep.models.quantum` (Massar and Mognetti).

For each beta and each number of shots the ``quantum`` simulator relaxes (prepares and
measures) one batch in the free and the two nudged phases of the symmetric estimator,
(<dH/dtheta>_+beta - <dH/dtheta>_-beta) / (2 beta), at fresh parameters for several seeds;
the exact gradient is first-order perturbation theory (``QuantumIsing.exact_gradient``,
float64). Shot noise adds a variance ~ 1 / (beta^2 shots) to the estimate and beta a bias
~ beta^2, so the best beta grows as shots shrink. Printed: mean cosine +- its standard error
over the seeds, and the shots one update costs (2 settings x 2 nudged phases x batch x shots;
the free phase is not used by the symmetric estimate).

    python benchmarks/quantum_shots.py [--sizes 2 4 2] [--betas 0.01 0.05 0.2]
        [--shots 100 1000 10000 100000 1000000] [--seeds 0 1 2 3 4 5 6 7] [--batch 4] [--json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from labep.hardware.bench import Nudge
from labep.models.quantum import QuantumIsing
from labep.simulators.quantum import QuantumSimulator, QuantumSimulatorOptions


def flat(params: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([params[name].ravel() for name in sorted(params)])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def estimate_cosine(model: QuantumIsing, seed: int, beta: float, shots: int | None,
                    batch: int) -> float:
    """Cosine of one symmetric EP estimate with ``shots`` to the exact gradient."""
    rng = np.random.default_rng([seed, 0])
    params = model.init_params(rng)
    inputs = rng.uniform(size=(batch, model.input_size))
    target = model.encode_target(rng.integers(model.output_size, size=batch))
    bench = QuantumSimulator(model, QuantumSimulatorOptions(shots=shots, seed=seed))
    bench.write(params)
    plus = bench.relax(inputs, Nudge(beta, target))
    minus = bench.relax(inputs, Nudge(-beta, target))
    estimate = model.contrast(inputs, plus.state, minus.state, scale=1 / (2 * beta))
    exact = model.exact_gradient(inputs, None, target, params)
    return cosine(flat(estimate), flat(exact))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 2])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--shots", type=int, nargs="+",
                        default=[100, 1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = QuantumIsing(args.sizes)
    rows = []
    for shots in [*args.shots, None]:
        row: dict[str, object] = {"shots": shots,
                                  "shots_per_update": None if shots is None
                                  else 2 * 2 * args.batch * shots}
        for beta in args.betas:
            values = np.array([estimate_cosine(model, seed, beta, shots, args.batch)
                               for seed in args.seeds])
            row[f"beta={beta:g}"] = {"mean": float(values.mean()),
                                     "stderr": float(values.std(ddof=1) / np.sqrt(len(values)))
                                     if len(values) > 1 else 0.0}
        rows.append(row)
    if args.json:
        print(json.dumps({"sizes": args.sizes, "batch": args.batch, "seeds": args.seeds,
                          "rows": rows}, indent=2))
        return
    print(f"quantum EP, network {'-'.join(map(str, args.sizes))} ({model.n_qubits} qubits), "
          f"symmetric estimator, batch {args.batch}, {len(args.seeds)} seeds: cosine to the "
          "exact gradient (mean +- stderr)")
    header = f"{'shots/setting':>14} {'shots/update':>13} " + " ".join(
        f"{'beta ' + format(beta, 'g'):>16}" for beta in args.betas)
    print(header)
    for row in rows:
        shots = "exact" if row["shots"] is None else f"{row['shots']:,}"
        per_update = "-" if row["shots_per_update"] is None else f"{row['shots_per_update']:,}"
        cells = " ".join(
            f"{row[f'beta={beta:g}']['mean']:>9.4f} +- {row[f'beta={beta:g}']['stderr']:.4f}"
            for beta in args.betas)
        print(f"{shots:>14} {per_update:>13} {cells}")


if __name__ == "__main__":
    main()
