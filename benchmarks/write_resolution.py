"""Accuracy vs. parameter resolution and rounding mode (the write path of labep).

Trains the quickstart protocol (layered Hopfield 64-256-10 on scikit-learn digits) on the
simulator with its couplings and biases stored as codes of 4, 6 and 8 bits over a physical
range of +-0.3 (the trained weights stay inside it), written with ``nearest``, ``stochastic``
and ``error_feedback`` rounding, once from full-precision host shadows (``writes.shadow:
true``, the default) and once with the bench's codes as the only copy of each parameter
(``writes.shadow: false``, a device trained by pulses), and once with float parameters as the
reference. Prints the test accuracy (mean and spread over seeds) as a table
and saves a plot.

    python benchmarks/write_resolution.py [--seeds 0 1 2] [--epochs 10] [--plot FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

REPO = Path(__file__).resolve().parents[1]
ROUNDINGS = ("nearest", "stochastic", "error_feedback")


def accuracy(store: RunStore, overrides: list[str]) -> float:
    loaded = load_protocol(REPO / "protocols" / "quickstart.yaml", overrides)
    result = Trainer(loaded, store, progress=False).run()
    assert result.test_accuracy is not None
    return result.test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--range", type=float, default=0.3, dest="limit",
                        help="Physical range +-R of couplings and biases.")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "out" /
                        "write_resolution.png")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, RunStore(Path(tmp) / "runs.db") as store:
        base = [f"training.epochs={args.epochs}"]
        results["float"] = {"float": [accuracy(store, [*base, f"seed={s}"])
                                      for s in args.seeds]}
        for bits, shadow in ((b, s) for s in (True, False) for b in args.bits):
            label = f"{bits} bits" + ("" if shadow else ", no shadow")
            results[label] = {}
            for rounding in ROUNDINGS:
                overrides = [
                    *base,
                    f"writes.shadow={str(shadow).lower()}",
                    f"bench.options.weight_range={args.limit}",
                    f"bench.options.bias_range={args.limit}",
                    f"bench.options.device.bits={bits}",
                    f"writes.rounding={rounding}",
                    "writes.out_of_range=clip",
                ]
                results[label][rounding] = [
                    accuracy(store, [*overrides, f"seed={s}"]) for s in args.seeds]
                print(f"  {label:20} {rounding:15} {np.mean(results[label][rounding]):.4f}",
                      flush=True)

    reference = float(np.mean(results["float"]["float"]))
    if args.json:
        print(json.dumps({"seeds": args.seeds, "epochs": args.epochs, "range": args.limit,
                          "results": results}, indent=2))
    print(f"\nquickstart (64-256-10, digits), {args.epochs} epochs, seeds {args.seeds}, "
          f"parameters in +-{args.limit}")
    print(f"float reference: {reference:.4f}")
    print(f"{'resolution':22}" + "".join(f"{r:>22}" for r in ROUNDINGS))
    for label in (k for k in results if k != "float"):
        cells = []
        for rounding in ROUNDINGS:
            acc = results[label][rounding]
            cells.append(f"{np.mean(acc):.4f} +- {np.std(acc):.4f}")
        print(f"{label:22}" + "".join(f"{c:>22}" for c in cells))

    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    for ax, suffix, title in zip(fig.subplots(1, 2), ("", ", no shadow"),
                                 ("host shadow (writes.shadow: true)",
                                  "codes only (writes.shadow: false)"), strict=True):
        for rounding in ROUNDINGS:
            means = [np.mean(results[f"{b} bits{suffix}"][rounding]) for b in args.bits]
            spread = [np.std(results[f"{b} bits{suffix}"][rounding]) for b in args.bits]
            ax.errorbar(args.bits, means, yerr=spread, marker="o", capsize=3, label=rounding)
        ax.axhline(reference, color="k", ls="--", label="float")
        ax.set(xlabel="parameter resolution (bits)", ylabel="test accuracy", title=title,
               xticks=args.bits, ylim=(0, 1))
        ax.legend(loc="lower right")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
