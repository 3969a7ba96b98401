"""How long a StochEP phase must be: cosine of the stochastic (spiking) EP estimate to the
deterministic EP gradient and to the exact gradient versus the window T (time steps of the
free phase; each nudged phase runs T / 2 from the free rates), on a spiking protocol.

StochEP (Lin, Jiang and Sengupta): each neuron fires Bernoulli spikes of probability rho(h),
synapses see rate traces of time constant tau (``bench.options.spike_trace``), and a phase's
read-back state is the traces' average over its last (1 - ``spike_discard``) T steps. For
every window and seed, ``labep gradcheck`` (:func:`labep.run.gradcheck.gradcheck`) draws fresh
parameters and a batch from the seed, computes deterministic EP on the bench's mean-field twin
(``neurons: deterministic``, fixed points settled to 1e-10 in float64) and the exact gradient
(implicit differentiation), and compares ``--repeats`` stochastic estimates with both. Printed:
mean +- standard error over the seeds of each seed's mean cosine, the spikes one update costs
per sample (free and nudged phases), and deterministic EP's own cosine to the exact gradient.
The fluctuations shrink as the window grows; what remains is the mean-field bias of a finite
tau (E rho(h) != rho(E h) at the kinks of the hard sigmoid), which shrinks as tau grows.

    python benchmarks/stochep_window.py [--protocol protocols/stochep_digits.yaml]
        [--windows 25 100 400 1600 6400] [--traces 8 32] [--seeds 0 1 2 3 4] [--repeats 1]
        [--samples 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from labep.run.gradcheck import gradcheck
from labep.run.validate import load_protocol


def mean_stderr(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    stderr = float(array.std(ddof=1) / np.sqrt(array.size)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "stderr": stderr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", default="protocols/stochep_digits.yaml")
    parser.add_argument("--windows", type=int, nargs="+", default=[25, 100, 400, 1600, 6400])
    parser.add_argument("--traces", type=float, nargs="+", default=[8.0, 32.0],
                        help="tau of the rate traces (bench.options.spike_trace)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    parser.add_argument("--repeats", type=int, default=1,
                        help="stochastic estimates per seed (averaged within the seed)")
    parser.add_argument("--samples", type=int, default=16, help="batch of each check")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    started = time.perf_counter()
    for tau in args.traces:
        for window in args.windows:
            overrides = [f"bench.options.spike_trace={tau}",
                         f"phases.free.max_steps={window}",
                         f"phases.nudged.max_steps={max(window // 2, 1)}"]
            protocol = load_protocol(args.protocol, overrides).protocol
            reports = [gradcheck(protocol, seed=seed, samples=args.samples,
                                 repeats=args.repeats) for seed in args.seeds]
            rows.append({
                "trace": tau, "window": window,
                "cosine_to_deterministic_ep": mean_stderr(
                    [r["cosine_to_deterministic_ep"] for r in reports]),
                "cosine_to_exact": mean_stderr([r["cosine"] for r in reports]),
                "deterministic_ep_to_exact": mean_stderr(
                    [r["deterministic_ep_cosine"] for r in reports]),
                "spikes_per_sample": float(np.mean([r["spikes_per_sample"] for r in reports])),
            })
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"protocol": args.protocol, "seeds": args.seeds,
                          "repeats": args.repeats, "samples": args.samples, "rows": rows,
                          "seconds": seconds}, indent=2))
        return
    print(f"StochEP on {args.protocol}: {len(args.seeds)} seeds x {args.repeats} estimate(s), "
          f"batch {args.samples}; cosine mean +- stderr over seeds ({seconds:.0f} s)")
    print(f"{'tau':>5} {'window T':>9} {'spikes/sample':>14} {'to det. EP':>17} "
          f"{'to exact':>17}")
    for row in rows:
        det, exact = row["cosine_to_deterministic_ep"], row["cosine_to_exact"]
        print(f"{row['trace']:5g} {row['window']:9d} {row['spikes_per_sample']:14,.0f} "
              f"{det['mean']:8.4f} +- {det['stderr']:.4f} "
              f"{exact['mean']:8.4f} +- {exact['stderr']:.4f}")
    reference = rows[0]["deterministic_ep_to_exact"]
    print(f"deterministic EP to exact: {reference['mean']:.4f} +- {reference['stderr']:.4f}")


if __name__ == "__main__":
    main()
