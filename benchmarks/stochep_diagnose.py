"""Why a StochEP protocol does (not) learn: on a few hundred training samples, at fresh
parameters or at a run's checkpoint, compare the spiking bench's phases and EP estimate with
deterministic EP on its mean-field twin (fixed points settled to 1e-8, float64).

Printed per phase (free, +beta, -beta): the fraction of samples whose mean-field residual is
within the protocol's tolerance (the rest a run leaves out of the update), the residual's
median and 90th percentile, the mean |s_bar - s*| of the hidden and output units; then, per
parameter, the cosine of one stochastic estimate to deterministic EP, the ratio of their
norms, and the cosine of the mean of ``--repeats`` estimates (noise averages out of it, bias
does not). Also the spikes per sample of one update (free + nudged phases).

    python benchmarks/stochep_diagnose.py [--protocol protocols/stochep_mnist.yaml]
        [--set KEY=VALUE ...] [--samples 200] [--repeats 4] [--store labep.db --run ID]
"""

from __future__ import annotations

import argparse
import io
import sqlite3
import time

import numpy as np

from labep.hardware.bench import Nudge, Settle
from labep.run.assembly import assemble, stream
from labep.run.validate import load_protocol


def checkpoint(store: str, run: str) -> dict[str, np.ndarray]:
    """The newest parameter snapshot of run ``run`` (an id or its prefix) in ``store``."""
    with sqlite3.connect(store) as db:
        (run_id,) = db.execute("SELECT id FROM runs WHERE id LIKE ?", (run + "%",)).fetchone()
        (step,) = db.execute("SELECT MAX(step) FROM arrays WHERE run_id = ? AND kind = "
                             "'checkpoint'", (run_id,)).fetchone()
        rows = db.execute("SELECT name, npy FROM arrays WHERE run_id = ? AND step = ? AND "
                          "kind = 'checkpoint'", (run_id, step)).fetchall()
    print(f"parameters: run {run_id[:8]} checkpoint at step {step}")
    return {name: np.load(io.BytesIO(npy)) for name, npy in rows}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", default="protocols/stochep_mnist.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store")
    parser.add_argument("--run")
    args = parser.parse_args()
    protocol = load_protocol(args.protocol, args.overrides).protocol
    parts = assemble(protocol)
    twin = assemble(protocol, dtype="float64", neurons="deterministic")
    model, data = parts.model, parts.data
    rows = stream(args.seed, 3).choice(len(data.train_labels), size=args.samples, replace=False)
    x, target = data.train_inputs[rows], model.encode_target(data.train_labels[rows])
    params = (checkpoint(args.store, args.run) if args.store else
              parts.initial_params(args.seed))
    beta = protocol.estimator.beta
    strengths = parts.estimator.strengths(beta, stream(args.seed, 2))
    ones = np.ones(len(x))
    started = time.perf_counter()
    with twin.bench as bench:
        bench.write(params)
        exact = Settle(1e-8, 100_000)
        free = bench.relax(x, settle=exact)
        nudged = [bench.relax(x, Nudge(s, target), start=free.state, settle=exact)
                  for s in strengths]
        assert all(p.all_converged for p in (free, *nudged)), "the twin did not settle"
        deterministic = parts.estimator.estimate(model, x, free, nudged, strengths,
                                                 ones).gradient
        fixed = [free.state, *(p.state for p in nudged)]
    hidden = slice(0, model.state_size - target.shape[1])
    output = slice(model.state_size - target.shape[1], model.state_size)
    print(f"{protocol.name}: {len(x)} samples, T = {parts.free_settle.max_steps} / "
          f"{parts.nudged_settle.max_steps}, tolerance {parts.free_settle.tolerance:g} / "
          f"{parts.nudged_settle.tolerance:g}, tau {protocol.bench.options.get('spike_trace')}")
    print("deterministic: free accuracy "
          f"{np.mean(model.predict(free.state) == data.train_labels[rows]):.3f}, "
          f"hidden units saturated at 0/1: {np.mean(free.state[:, hidden] <= 0):.2f}/"
          f"{np.mean(free.state[:, hidden] >= 1):.2f}, "
          f"mean |s+ - s-| hidden {np.abs(fixed[1] - fixed[2])[:, hidden].mean():.4f} "
          f"output {np.abs(fixed[1] - fixed[2])[:, output].mean():.4f}")
    estimates, spikes = [], []
    with parts.bench as bench:
        bench.write(params)
        for repeat in range(args.repeats):
            sfree = bench.relax(x, settle=parts.free_settle)
            snudged = [bench.relax(x, Nudge(s, target), start=sfree.state,
                                   settle=parts.nudged_settle) for s in strengths]
            phases = [sfree, *snudged]
            spikes.append(sum(int(p.info["spikes"]) for p in phases) / len(x))
            estimates.append(parts.estimator.estimate(model, x, sfree, snudged, strengths,
                                                      ones).gradient)
            if repeat == 0:
                used = np.ones(len(x), dtype=bool)
                for name, phase, point in zip(("free", "+beta", "-beta"), phases, fixed,
                                              strict=True):
                    used &= phase.converged
                    error = np.abs(phase.state - point)
                    print(f"  {name:>6}: settled {phase.converged.mean():.3f}, residual "
                          f"median {np.median(phase.residual):.3f} p90 "
                          f"{np.percentile(phase.residual, 90):.3f}; |s_bar - s*| hidden "
                          f"{error[:, hidden].mean():.4f} output {error[:, output].mean():.4f}")
                print(f"  used in an update (every phase settled): {used.mean():.3f}; "
                      f"spiking free accuracy "
                      f"{np.mean(model.predict(sfree.state) == data.train_labels[rows]):.3f}")
                difference = snudged[0].state - snudged[1].state
                reference = fixed[1] - fixed[2]
                print(f"  s+ - s-: cosine to deterministic hidden "
                      f"{cosine(difference[:, hidden], reference[:, hidden]):.3f} output "
                      f"{cosine(difference[:, output], reference[:, output]):.3f}")
    print(f"spikes per sample and update: {np.mean(spikes):,.0f}")
    print(f"{'param':>6} {'cos one':>8} {'|est|/|det|':>12} {'cos mean of':>12}")
    for name in deterministic:
        ones_cos = [cosine(e[name], deterministic[name]) for e in estimates]
        ratio = np.mean([np.linalg.norm(e[name]) for e in estimates]) / np.linalg.norm(
            deterministic[name])
        mean = np.mean([e[name] for e in estimates], axis=0)
        print(f"{name:>6} {np.mean(ones_cos):8.3f} {ratio:12.2f} "
              f"{cosine(mean, deterministic[name]):12.3f}")
    print(f"({time.perf_counter() - started:.0f} s, under load)")


if __name__ == "__main__":
    main()
