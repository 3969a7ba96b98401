"""A sweep of the quickstart on dask's LocalCluster against the same trials one after another.

What is measured
----------------
16 trials of ``protocols/quickstart.yaml`` as it is (seeds 0..15; ``--epochs N`` shortens
them by a fixed ``set`` override), run three times into fresh stores:

``sequential``    one after another in one process (``labep sweep --serial``): each run's
                  numba kernels use every core (numba's default)
``sequential-1``  the same with numba limited to one thread (``NUMBA_NUM_THREADS=1``): the
                  peer that tells the cluster's parallelism from the single-thread kernels'
                  own speed (on this small network two numba threads can be slower than one)
``cluster``       on a LocalCluster of ``--workers`` processes (default one per core), one
                  thread each, numba limited to cores / workers threads per worker

Each is ``labep sweep`` run in a fresh process, and its wall time covers everything a user
waits for: imports, numba's (cached) kernels, for the cluster starting the LocalCluster and
its workers, the trials, and the shutdown.
All three sweeps must end with 16 completed runs, one per trial; the mean test accuracy of
each is printed (the same trials, so it matches).

    python benchmarks/sweep_local.py
    python benchmarks/sweep_local.py --epochs 1 --workers 2

On a shared machine the load average before and after is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from labep.store.runs import RunStore
from labep.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]


def one(folder: Path, sweep_file: Path, label: str, workers: int | None) -> tuple[float, float]:
    """Wall time of ``labep sweep`` run as a user runs it (a fresh process), and the sweep's
    mean test accuracy, checked to have one completed run per trial."""
    store_path = folder / f"{label}.db"
    command = [sys.executable, "-m", "labep.cli.main", "sweep", str(sweep_file),
               "--store", str(store_path), "--no-progress"]
    env = dict(os.environ)
    env.pop("NUMBA_NUM_THREADS", None)
    if label == "sequential-1":
        env["NUMBA_NUM_THREADS"] = "1"
    if label.startswith("sequential"):
        command.append("--serial")
    elif workers:
        command += ["--workers", str(workers)]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    trials = len(load_sweep(sweep_file).trials)
    with RunStore(store_path, create=False) as store:
        rows = store.sweep_trials("latest")
        assert [r["status"] for r in rows] == ["completed"] * trials, rows
        assert len(store.runs()) == trials == len({r["run_id"] for r in rows})
        accuracy = sum(r["metrics"]["test_accuracy"] for r in rows) / len(rows)
    return wall, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="seeds 0..N-1 (default 16)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training.epochs of every trial (default: the protocol's)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sweep_file = folder / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "name": "quickstart-bench", "protocol": str(REPO / "protocols" / "quickstart.yaml"),
            "set": {} if args.epochs is None else {"training.epochs": args.epochs},
            "grid": {"seed": list(range(args.trials))}}))
        figures = {}
        for label in ("sequential", "sequential-1", "cluster"):
            print(f"{label}: {args.trials} trials ...", file=sys.stderr, flush=True)
            figures[label] = one(folder, sweep_file, label, args.workers)
    load = os.getloadavg()
    workers = args.workers or os.cpu_count()
    epochs = "" if args.epochs is None else f" with training.epochs={args.epochs}"
    print(f"{args.trials} trials of protocols/quickstart.yaml{epochs}, "
          f"{os.cpu_count()} cores, load average (1, 5, 15 min) {before[0]:.2f} {before[1]:.2f} "
          f"{before[2]:.2f} before, {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} after")
    whats = {"sequential": f"one after another, numba {os.cpu_count()} threads",
             "sequential-1": "one after another, numba 1 thread",
             "cluster": f"LocalCluster, {workers} workers"}
    for label, (wall, accuracy) in figures.items():
        print(f"  {label:12} {wall:8.1f} s   ({whats[label]}; mean test accuracy "
              f"{accuracy:.4f})")
    for label in ("sequential", "sequential-1"):
        print(f"  speed-up over {label:12} {figures[label][0] / figures['cluster'][0]:.2f}x")


if __name__ == "__main__":
    main()
