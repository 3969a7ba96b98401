"""Whether the polariton simulator's fast steady state lands where the dynamics go.

The lattice is multistable: which stationary state a relaxation reaches depends on the path
(the transient picks a branch). ``steady_state: rk4`` integrates the dynamics to the
tolerance; ``steady_state: implicit`` integrates until the residual is ``implicit_from``, then
solves the stationary equations (pseudo-transient continuation into Newton steps), which may
end on another branch if the hand-over comes before the transient has chosen one. This script
takes trained potentials (the last run of a run store, or it trains
``protocols/polariton_digits.yaml`` first), relaxes training and test images with RK4 run to
1e-9 (the reference: the dynamics' own choice) and compares, per state, with RK4 at the
protocol's tolerance and with the implicit solver at each hand-over: the distance
min over a global phase of |psi - psi_ref| / |psi_ref|, its median, and how many states are
farther than 1e-2 (another branch), with the mean steps per state (RK4 steps plus implicit
steps) and the time.

    python benchmarks/polariton_basins.py                       # trains first (2-3 minutes)
    python benchmarks/polariton_basins.py --store RUNS.db --count 320 --froms 0.03 0.02 0.01

``--protocol`` another polariton protocol, ``--data PATH`` the MNIST IDX folder, ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import load_average, log

from labep.hardware.bench import Settle
from labep.run.assembly import build_bench, build_model
from labep.run.engine import Trainer, final_params
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

REPO = Path(__file__).resolve().parents[1]
#: a state this far (relative, up to a global phase) from the reference is on another branch
FAR = 1e-2


def distance(field: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per state: min over a global phase of |psi - psi_ref| / |psi_ref|."""
    phase = np.angle(np.sum(np.conj(field) * reference, axis=1))
    aligned = field * np.exp(1j * phase)[:, None]
    return np.linalg.norm(aligned - reference, axis=1) / np.linalg.norm(reference, axis=1)


def relax_all(bench, inputs: np.ndarray, settle: Settle, batch: int
              ) -> tuple[np.ndarray, np.ndarray, float]:
    """Every input relaxed in batches: the states, the steps per state, the seconds."""
    began = time.perf_counter()
    states, steps = [], []
    for start in range(0, len(inputs), batch):
        relaxed = bench.relax(inputs[start:start + batch], settle=settle)
        states.append(relaxed.state)
        steps.append(relaxed.steps)
    return np.concatenate(states), np.concatenate(steps), time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", default=str(REPO / "protocols" / "polariton_digits.yaml"))
    parser.add_argument("--store", help="a run store whose last run holds the potentials "
                        "(default: train the protocol first, in a temporary store)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--count", type=int, default=320, help="images of each split")
    parser.add_argument("--froms", type=float, nargs="+", default=[0.03, 0.02, 0.01],
                        help="implicit_from hand-overs to compare (units of J)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    overrides = [f"dataset.path={args.data}"]
    protocol = load_protocol(args.protocol, overrides).protocol
    with tempfile.TemporaryDirectory() as folder:
        store_path = Path(args.store) if args.store else Path(folder) / "runs.db"
        trained = None
        if not args.store:
            log(f"training {args.protocol} for its potentials ...")
            began = time.perf_counter()
            with RunStore(store_path) as store:
                result = Trainer(load_protocol(args.protocol, overrides), store,
                                 progress=False).run()
            trained = {"seconds": time.perf_counter() - began,
                       "test_accuracy": result.test_accuracy, "steps": result.steps,
                       "load_average": load_average()}
            log(f"trained in {trained['seconds']:.0f} s, test accuracy "
                f"{result.test_accuracy:.4f}")
        with RunStore(store_path, create=False) as store:
            params = final_params(store, store.runs()[-1]["id"])
    data = protocol.dataset.load()
    model = build_model(protocol.model, data)
    tolerance = float(protocol.phases.free.tolerance)
    cap = int(protocol.phases.free.max_steps)
    batch = int(protocol.training.batch_size)

    def bench(**options: object):
        made = build_bench(protocol.bench, model, **options)
        made.write(params)
        return made

    rows = []
    for split, inputs in (("train", data.train_inputs[:args.count]),
                          ("test", data.test_inputs[:args.count])):
        log(f"{split}: reference (RK4 to 1e-9) ...")
        reference, _, _ = relax_all(bench(steady_state="rk4"), inputs,
                                    Settle(1e-9, 400_000), batch)
        reference = model.field(reference)
        cases = [("rk4", None)] + [("implicit", f) for f in args.froms]
        for kind, hand_over in cases:
            options = {"steady_state": kind}
            if hand_over is not None:
                options["implicit_from"] = hand_over
            states, steps, seconds = relax_all(bench(**options), inputs,
                                               Settle(tolerance, cap), batch)
            far = distance(model.field(states), reference)
            rows.append({"split": split, "steady_state": kind, "implicit_from": hand_over,
                         "states": len(inputs), "median_distance": float(np.median(far)),
                         "far": int(np.count_nonzero(far > FAR)),
                         "far_states": np.flatnonzero(far > FAR).tolist(),
                         "mean_steps": float(steps.mean()), "seconds": seconds})
    if args.json:
        print(json.dumps({"rows": rows, "tolerance": tolerance, "trained": trained,
                          "load_average": load_average()}, indent=2))
        return 0
    print(f"{args.protocol}: states against RK4 run to 1e-9 (tolerance {tolerance:g}, "
          f"{args.count} images of each split; another branch: distance > {FAR:g})")
    print(f"{'split':6s} {'steady state':22s} {'median dist':>11s} {'far':>4s} "
          f"{'steps':>7s} {'seconds':>8s}  far states")
    for row in rows:
        name = (row["steady_state"] if row["implicit_from"] is None
                else f"implicit from {row['implicit_from']:g}")
        print(f"{row['split']:6s} {name:22s} {row['median_distance']:11.2e} {row['far']:4d} "
              f"{row['mean_steps']:7.0f} {row['seconds']:8.1f}  {row['far_states']}")
    if trained is not None:
        print(f"potentials: the protocol trained as shipped in {trained['seconds']:.0f} s "
              f"({trained['steps']} steps, test accuracy {trained['test_accuracy']:.4f}, "
              f"load average {trained['load_average']})")
    print(f"load average {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
