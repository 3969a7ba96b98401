"""A sweep of the quickstart on dask's LocalCluster against the same trials one after another.

What is measured
----------------
16 trials of ``protocols/quickstart.yaml`` (seeds 0..15; shortened to ``--epochs`` epochs,
default 1, by a fixed ``set`` override: the protocol's 10 epochs would take about a minute a
trial), run twice into fresh stores:

``sequential``  one after another in this process (``labep sweep --serial``): each run's
                numba kernels use every core
``cluster``     on a LocalCluster of ``--workers`` processes (default one per core), one
                thread each, numba limited to cores / workers threads per worker

Wall time of each covers everything a user waits for: for the cluster, starting the
LocalCluster, the workers' imports and numba's (cached) kernels, the trials, and the shutdown.
Both sweeps must end with 16 completed runs, one per trial; the mean test accuracy of each is
printed (the same trials, so it matches).

    python benchmarks/sweep_local.py
    python benchmarks/sweep_local.py --epochs 2 --workers 2

On a shared machine the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from labep.store.runs import RunStore
from labep.sweep.execute import run_dask, run_serial
from labep.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]


def one(folder: Path, sweep_file: Path, label: str, workers: int | None) -> tuple[float, float]:
    sweep = load_sweep(sweep_file)
    store_path = folder / f"{label}.db"
    with RunStore(store_path) as store:
        sweep_id = store.create_sweep(sweep.spec.name, str(sweep_file),
                                      sweep.spec.model_dump(mode="json"), sweep.spec.axes(),
                                      sweep.trials)
    trials = list(range(len(sweep.trials)))
    started = time.perf_counter()
    if label == "sequential":
        results = run_serial(store_path, sweep_id, trials, progress=True)
    else:
        results = run_dask(store_path, sweep_id, trials, workers=workers, progress=True)
    wall = time.perf_counter() - started
    with RunStore(store_path, create=False) as store:
        rows = store.sweep_trials(sweep_id)
        assert [r["status"] for r in results] == ["completed"] * len(trials), results
        assert len(store.runs()) == len(trials) == len({r["run_id"] for r in rows})
        accuracy = sum(r["metrics"]["test_accuracy"] for r in rows) / len(rows)
    return wall, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="seeds 0..N-1 (default 16)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sweep_file = folder / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "name": "quickstart-bench", "protocol": str(REPO / "protocols" / "quickstart.yaml"),
            "set": {"training.epochs": args.epochs},
            "grid": {"seed": list(range(args.trials))}}))
        figures = {}
        for label in ("sequential", "cluster"):
            print(f"{label}: {args.trials} trials ...", file=sys.stderr, flush=True)
            figures[label] = one(folder, sweep_file, label, args.workers)
    load = os.getloadavg()
    workers = args.workers or os.cpu_count()
    print(f"{args.trials} trials of protocols/quickstart.yaml, training.epochs={args.epochs}, "
          f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for label, (wall, accuracy) in figures.items():
        what = f"LocalCluster, {workers} workers" if label == "cluster" else "one after another"
        print(f"  {label:10} {wall:8.1f} s   ({what}; mean test accuracy {accuracy:.4f})")
    print(f"  speed-up   {figures['sequential'][0] / figures['cluster'][0]:.2f}x")


if __name__ == "__main__":
    main()
