"""How close near-equilibrium EP comes to the exact gradient on the polariton lattice as the
dissipation goes to 0 (the table of the polariton issue), for each projection of the contrast.

For each dissipation scale s the protocol's pump P, loss gamma and saturation Gamma are all
multiplied by s (the conservative part, J, g and the potentials, is unchanged, so the
conservative limit is the same for every row), and ``labep.run.gradcheck.gradcheck`` compares the
symmetric EP estimate (states settled to 1e-10 in float64) with the exact gradient (implicit
differentiation of the stationary state in the rotating frame) at fresh parameters and one
batch, for several seeds. Printed per gamma: the cosine similarity (mean and worst over seeds)
for the three projections of the contrast (``model.projection``: ``intensity``, the default,
``uniform`` and ``none``) and the relative error of the first. ``--cost`` overrides the
protocol's cost (``fraction``, ``cross_entropy`` with targets 0 and 1, or ``intensity``).
A plot goes to
``benchmarks/out/polariton_gradcheck.png``.

    python benchmarks/polariton_gradcheck.py [--protocol protocols/polariton_xor.yaml]
        [--scales 30 10 3 1 0.3 0.1] [--seeds 0 1 2 3] [--beta 1e-3] [--cost cross_entropy] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from labep.run.gradcheck import GradcheckError, gradcheck
from labep.run.validate import load_protocol

REPO = Path(__file__).resolve().parents[1]
PROJECTIONS = ("intensity", "uniform", "none")


def row(protocol_path: str, scale: float, seeds: list[int], beta: float, samples: int,
        base: dict[str, float], extra: list[str]) -> dict[str, object]:
    """Gradcheck at one dissipation scale, every seed, for every projection."""
    overrides = [f"model.pump={base['pump'] * scale}", f"model.loss={base['loss'] * scale}",
                 f"model.saturation={base['saturation'] * scale}", *extra]
    max_steps = int(min(5_000_000, 200_000 / min(scale, 1.0)))
    out: dict[str, object] = {"scale": scale, "gamma": base["loss"] * scale}
    for projection in PROJECTIONS:
        loaded = load_protocol(protocol_path, [*overrides, f"model.projection={projection}"])
        cosines, errors, refused = [], [], 0
        for seed in seeds:
            try:
                report = gradcheck(loaded.protocol, beta=beta, estimator="symmetric",
                                   samples=samples, seed=seed, tolerance=1e-10,
                                   max_steps=max_steps)
            except GradcheckError as err:
                print(f"  gamma {out['gamma']:.4g} seed {seed}: refused ({err})",
                      file=sys.stderr)
                refused += 1
                continue
            cosines.append(report["cosine"])
            errors.append(report["relative_error"])
        out[projection] = {"cosine_mean": float(np.mean(cosines)) if cosines else None,
                           "cosine_min": float(np.min(cosines)) if cosines else None,
                           "relative_error_mean": float(np.mean(errors)) if errors else None,
                           "seeds": len(cosines), "refused": refused}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default=str(REPO / "protocols" / "polariton_xor.yaml"))
    parser.add_argument("--scales", type=float, nargs="+",
                        default=[30.0, 10.0, 3.0, 1.0, 0.3, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--cost", choices=["fraction", "cross_entropy", "intensity"],
                        default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"
                                             / "polariton_gradcheck.png"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    extra = [] if args.cost is None else [f"model.cost={args.cost}"]
    if args.cost == "cross_entropy":
        extra += ["model.target_low=0", "model.target_high=1"]
    model = load_protocol(args.protocol, extra).protocol.model
    base = {"pump": model.pump, "loss": model.loss, "saturation": model.saturation}
    started = time.perf_counter()
    rows = []
    for scale in args.scales:
        rows.append(row(args.protocol, scale, args.seeds, args.beta, args.samples, base, extra))
        print(f"scale {scale:g} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.json:
        print(json.dumps({"protocol": args.protocol, "cost": model.cost, "beta": args.beta,
                          "rows": rows}, indent=2))
    else:
        print(f"near-equilibrium EP vs exact gradient, {Path(args.protocol).name}, cost "
              f"{model.cost}: P, gamma, Gamma scaled together (base P={base['pump']:g}, "
              f"gamma={base['loss']:g}, Gamma={base['saturation']:g}); symmetric "
              f"beta={args.beta:g}, {args.samples} samples, seeds {args.seeds}")
        print(f"{'gamma':>8} " + " ".join(f"{'cos ' + p:>15} {'min':>7}" for p in PROJECTIONS)
              + f" {'rel err':>9} {'seeds':>6}")

        def fmt(value: object, width: int, spec: str) -> str:
            return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"

        for r in rows:
            cells = []
            for projection in PROJECTIONS:
                p = r[projection]
                assert isinstance(p, dict)
                cells.append(f"{fmt(p['cosine_mean'], 15, '.4f')} "
                             f"{fmt(p['cosine_min'], 7, '.4f')}")
            first = r[PROJECTIONS[0]]
            assert isinstance(first, dict)
            print(f"{r['gamma']:8.4g} " + " ".join(cells)
                  + f" {fmt(first['relative_error_mean'], 9, '.2e')} {first['seeds']:>6}")
        print(f"({time.perf_counter() - started:.0f} s)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return
    gammas = [r["gamma"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for projection in PROJECTIONS:
        values = [r[projection]["cosine_mean"] for r in rows]  # type: ignore[index]
        lows = [r[projection]["cosine_min"] for r in rows]  # type: ignore[index]
        ax.plot(gammas, values, "o-", label=f"projection {projection} (mean)")
        ax.plot(gammas, lows, ":", color=ax.lines[-1].get_color(), label="(worst)")
    ax.set_xscale("log")
    ax.set_xlabel("loss rate gamma (P and Gamma scaled with it), units of J")
    ax.set_ylabel("cosine(EP estimate, exact gradient)")
    ax.set_title(f"near-equilibrium EP on the polariton lattice ({model.cost} cost)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
