"""Robustness of EP on an oscillator Ising machine to quantized couplings, phase noise and
phase-readout resolution (the study of Gower 2025, on labep's OIM simulator).

Trains an OIM protocol (default ``protocols/oim_digits.yaml``; ``--protocol
protocols/oim_mnist.yaml`` for the paper's 784-500-10 MNIST network) once with float parameters
and once per imperfection, each alone:

- coupling and bias resolution: 4, 6, 8, 10 bits over +-R (``bench.options.device.bits``),
  written through labep's write path (nearest rounding of the host shadow);
- phase noise: temperature T of sqrt(2 T) xi in the dynamics (``bench.options.phase_noise``,
  Euler steps; the settle tolerance is raised to the noise floor, 4 sqrt(T), since a noisy
  phase never has zero force);
- phase readout: the read-back phases quantized to 2^bits steps of 2 pi
  (``bench.options.device.readout_bits``);
- combined: 10-bit couplings and a 4-bit phase readout together (the paper's claim).

Prints the test accuracy (mean over seeds) of every setting against float and saves a plot.

    python benchmarks/oim_robustness.py [--protocol P] [--seeds 0 1] [--epochs N] [--json]
    python benchmarks/oim_robustness.py --protocol protocols/oim_mnist.yaml \
        --only "coupling bits=10" --only "readout bits=4" --only combined

``--only STUDY[=SETTING]`` (repeatable) runs those settings alone, with the float reference.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

REPO = Path(__file__).resolve().parents[1]


def settings(limit: float, base_tolerance: float) -> list[tuple[str, str, list[str]]]:
    """(study, label, overrides) of every run."""
    runs: list[tuple[str, str, list[str]]] = [("reference", "float", [])]
    for bits in (4, 6, 8, 10):
        runs.append(("coupling bits", str(bits), [
            f"bench.options.weight_range={limit}", f"bench.options.bias_range={limit}",
            f"bench.options.device.bits={bits}", "writes.out_of_range=clip"]))
    for temperature in (1e-4, 1e-3, 1e-2):
        tolerance = max(base_tolerance, 4 * math.sqrt(temperature))
        runs.append(("phase noise T", f"{temperature:g}", [
            f"bench.options.phase_noise={temperature}", "bench.options.integrator=euler",
            "bench.options.dt=0.2", f"phases.free.tolerance={tolerance}",
            f"phases.nudged.tolerance={tolerance}"]))
    for bits in (2, 3, 4, 6, 8):
        runs.append(("readout bits", str(bits), [f"bench.options.device.readout_bits={bits}"]))
    runs.append(("combined", "10b+4b", [  # the paper's claim: both at once
        *runs[4][2], "bench.options.device.readout_bits=4"]))
    return runs


def selected(only: list[str], study: str, label: str) -> bool:
    """Whether ``--only`` choices (``STUDY`` or ``STUDY=SETTING``) include this run."""
    if not only:
        return True
    return any(choice in (study, f"{study}={label}") for choice in only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", type=Path, default=REPO / "protocols" / "oim_digits.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, help="Override training.epochs.")
    parser.add_argument("--range", type=float, default=0.3, dest="limit",
                        help="Physical range +-R of quantized couplings and biases.")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Extra protocol override (repeatable).")
    parser.add_argument("--plot", type=Path,
                        default=REPO / "benchmarks" / "out" / "oim_robustness.png")
    parser.add_argument("--only", action="append", default=[], metavar="STUDY[=SETTING]",
                        help="Run only these settings (and the float reference), e.g. "
                        "'coupling bits=10', 'readout bits', 'combined'. Repeatable.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    base = list(args.overrides)
    if args.epochs:
        base.append(f"training.epochs={args.epochs}")
    protocol = load_protocol(args.protocol, base).protocol
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, RunStore(Path(tmp) / "runs.db") as store:
        chosen = [run for run in settings(args.limit, protocol.phases.free.tolerance)
                  if run[0] == "reference" or selected(args.only, run[0], run[1])]
        if len(chosen) == 1 and args.only:
            parser.error(f"--only {args.only} matches no setting")
        for study, label, overrides in chosen:
            accuracies = []
            for seed in args.seeds:
                loaded = load_protocol(args.protocol, [*base, *overrides, f"seed={seed}"])
                result = Trainer(loaded, store, progress=False).run()
                accuracies.append(float(result.test_accuracy or 0.0))
            results.setdefault(study, {})[label] = accuracies
            print(f"  {study:15} {label:>8}  {np.mean(accuracies):.4f}", flush=True)

    reference = float(np.mean(results["reference"]["float"]))
    if args.json:
        print(json.dumps({"protocol": str(args.protocol), "seeds": args.seeds,
                          "range": args.limit, "results": results}, indent=2))
    print(f"\n{protocol.name} ({'-'.join(map(str, protocol.model.sizes))}), "
          f"{protocol.training.epochs} epochs, seeds {args.seeds}; float {reference:.4f}")
    print(f"{'study':15} {'setting':>8} {'accuracy':>9} {'vs float':>9}")
    for study, row in results.items():
        if study == "reference":
            continue
        for label, accuracies in row.items():
            mean = float(np.mean(accuracies))
            print(f"{study:15} {label:>8} {mean:9.4f} {100 * (mean - reference):+8.2f}pt")

    from matplotlib.figure import Figure

    studies = [s for s in results if s != "reference"]
    fig = Figure(figsize=(4 * len(studies), 3.6), layout="constrained")
    for ax, study in zip(fig.subplots(1, len(studies)), studies, strict=True):
        labels = list(results[study])
        means = [np.mean(results[study][k]) for k in labels]
        ax.plot(range(len(labels)), means, "o-", label=study)
        ax.axhline(reference, color="k", ls="--", label="float")
        ax.set(xticks=range(len(labels)), xticklabels=labels, xlabel=study,
               ylabel="test accuracy", ylim=(0, 1), title=protocol.name)
        ax.legend(loc="lower right")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
