"""How close EP comes to the exact gradient on a non-reciprocal network, with and without the
non-conservative correction, as the asymmetry grows (issue 8; Scurria et al. 2026).

For each asymmetry a (0: reciprocal couplings, a conservative system; 1: feedforward) and
each seed, ``labep.run.gradcheck.gradcheck`` draws fresh parameters and one batch of digits,
settles the free phase to 1e-10 in float64, and compares the symmetric EP estimate at a small
beta with the exact gradient (implicit differentiation, J^T lambda = dC/ds): once with the
corrected nudge (J^T - J)(s - s0) and once with the vector-field nudge. Printed per a: the
cosine similarity (mean and worst over seeds) and the mean relative error of both.

    nice -n 10 python benchmarks/nonconservative_gradcheck.py [--protocol
        protocols/nonreciprocal_digits.yaml] [--sizes 64 32 16 10]
        [--asymmetries 0 0.25 0.5 0.75 1] [--seeds 0 1 2 3 4] [--beta 1e-3] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from labep.run.gradcheck import gradcheck
from labep.run.validate import load_protocol

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default=str(REPO / "protocols" /
                                                  "nonreciprocal_digits.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 32, 16, 10])
    parser.add_argument("--asymmetries", type=float, nargs="+",
                        default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--init-gain", type=float, default=1.5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for asymmetry in args.asymmetries:
        protocol = load_protocol(args.protocol, [
            f"model.sizes={args.sizes}", f"model.asymmetry={asymmetry}",
            f"model.init_gain={args.init_gain}", "training.learning_rates=0.1"]).protocol
        row: dict[str, object] = {"asymmetry": asymmetry}
        for label, correction in (("corrected", True), ("vector_field", False)):
            reports = [gradcheck(protocol, beta=args.beta, estimator="symmetric", seed=seed,
                                 samples=args.samples, correction=correction)
                       for seed in args.seeds]
            cosines = [r["cosine"] for r in reports]
            row[label] = {"cosine_mean": float(np.mean(cosines)),
                          "cosine_min": float(np.min(cosines)),
                          "relative_error_mean": float(np.mean([r["relative_error"]
                                                                for r in reports]))}
        rows.append(row)
    if args.json:
        print(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
        return
    sizes = "-".join(map(str, args.sizes))
    print(f"symmetric EP vs exact gradient, {sizes} network, beta = {args.beta:g}, "
          f"{args.samples} digits per batch, seeds {args.seeds}")
    print(f"{'a':>5} | {'corrected: cosine mean (min)':>29} {'rel. err':>9} | "
          f"{'vector-field: cosine mean (min)':>32} {'rel. err':>9}")
    for row in rows:
        c, v = row["corrected"], row["vector_field"]
        print(f"{row['asymmetry']:>5.2f} | {c['cosine_mean']:>20.6f} ({c['cosine_min']:.6f})"
              f" {c['relative_error_mean']:>9.2e} | {v['cosine_mean']:>23.6f} "
              f"({v['cosine_min']:.6f}) {v['relative_error_mean']:>9.2e}")


if __name__ == "__main__":
    main()
