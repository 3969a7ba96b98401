"""How close near-equilibrium EP comes to the exact gradient on the polariton lattice as the
dissipation goes to 0 (the table of the polariton issue).

For each dissipation scale s the protocol's pump P, loss gamma and saturation Gamma are all
multiplied by s (the conservative part, J, g and the potentials, is unchanged, so the
conservative limit is the same for every row), and ``labep.gradcheck.gradcheck`` compares the
symmetric EP estimate (small beta, states settled to 1e-10 in float64) with the exact gradient
(implicit differentiation of the stationary state in the rotating frame) at fresh parameters and
one batch, for several seeds. Printed per gamma: the cosine similarity and relative error (mean
and worst over seeds) with the gauge projection the model applies, and the cosine of the raw
contrast (projection off). A plot goes to ``benchmarks/out/polariton_gradcheck.png``.

    python benchmarks/polariton_gradcheck.py [--protocol protocols/polariton_xor.yaml]
        [--scales 3 1 0.3 0.1 0.03 0.01] [--seeds 0 1 2 3] [--beta 1e-3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from labep.gradcheck import GradcheckError, gradcheck
from labep.protocol import load_protocol

REPO = Path(__file__).resolve().parents[1]


def row(protocol_path: str, scale: float, seeds: list[int], beta: float, samples: int,
        base: dict[str, float]) -> dict[str, object]:
    """Gradcheck at one dissipation scale, every seed, with and without the gauge projection."""
    overrides = [f"model.pump={base['pump'] * scale}", f"model.loss={base['loss'] * scale}",
                 f"model.saturation={base['saturation'] * scale}"]
    max_steps = int(min(5_000_000, 200_000 / min(scale, 1.0)))
    out: dict[str, object] = {"scale": scale, "gamma": base["loss"] * scale}
    for projected in (True, False):
        loaded = load_protocol(protocol_path, [*overrides,
                                               f"model.gauge_projection={str(projected).lower()}"])
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
        key = "projected" if projected else "raw"
        out[key] = {"cosine_mean": float(np.mean(cosines)) if cosines else None,
                    "cosine_min": float(np.min(cosines)) if cosines else None,
                    "relative_error_mean": float(np.mean(errors)) if errors else None,
                    "seeds": len(cosines), "refused": refused}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default=str(REPO / "protocols" / "polariton_xor.yaml"))
    parser.add_argument("--scales", type=float, nargs="+",
                        default=[3.0, 1.0, 0.3, 0.1, 0.03, 0.01])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"
                                             / "polariton_gradcheck.png"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = load_protocol(args.protocol).protocol.model
    base = {"pump": model.pump, "loss": model.loss, "saturation": model.saturation}
    started = time.perf_counter()
    rows = []
    for scale in args.scales:
        rows.append(row(args.protocol, scale, args.seeds, args.beta, args.samples, base))
        print(f"scale {scale:g} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.json:
        print(json.dumps({"protocol": args.protocol, "beta": args.beta, "rows": rows},
                         indent=2))
    else:
        print(f"near-equilibrium EP vs exact gradient, {Path(args.protocol).name}: P, gamma, "
              f"Gamma scaled together (base P={base['pump']:g}, gamma={base['loss']:g}, "
              f"Gamma={base['saturation']:g}); symmetric beta={args.beta:g}, "
              f"{args.samples} samples, seeds {args.seeds}")
        print(f"{'gamma':>8} {'cos (proj)':>11} {'min':>8} {'rel err':>9} {'cos (raw)':>10}"
              f" {'min':>8} {'seeds':>6}")
        for r in rows:
            p, raw = r["projected"], r["raw"]
            assert isinstance(p, dict) and isinstance(raw, dict)

            def fmt(value: object, width: int, spec: str) -> str:
                return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"

            print(f"{r['gamma']:8.4g} {fmt(p['cosine_mean'], 11, '.4f')} "
                  f"{fmt(p['cosine_min'], 8, '.4f')} {fmt(p['relative_error_mean'], 9, '.3f')} "
                  f"{fmt(raw['cosine_mean'], 10, '.4f')} {fmt(raw['cosine_min'], 8, '.4f')} "
                  f"{p['seeds']:>6}")
        print(f"({time.perf_counter() - started:.0f} s)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return
    gammas = [r["gamma"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, label in (("projected", "gauge-projected contrast"), ("raw", "raw contrast")):
        values = [r[key]["cosine_mean"] for r in rows]  # type: ignore[index]
        lows = [r[key]["cosine_min"] for r in rows]  # type: ignore[index]
        ax.plot(gammas, values, "o-", label=f"{label} (mean)")
        ax.plot(gammas, lows, ":", color=ax.lines[-1].get_color(), label=f"{label} (worst)")
    ax.set_xscale("log")
    ax.set_xlabel("loss rate gamma (P and Gamma scaled with it), units of J")
    ax.set_ylabel("cosine(EP estimate, exact gradient)")
    ax.set_title("near-equilibrium EP on the polariton lattice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
