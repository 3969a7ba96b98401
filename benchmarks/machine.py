"""What the throughput benchmarks share: the machine's threads and load, progress logging,
the best of repeated runs, and the closing lines every report prints.

threadpoolctl comes with labep (it pins BLAS during runs), so it is imported plainly here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits


class Timed(Protocol):
    samples_per_second: float
    details: dict[str, Any]


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table (or the JSON)."""
    print(message, file=sys.stderr, flush=True)


def blas_threads(count: int) -> threadpool_limits:
    """Limit numpy's BLAS to ``count`` threads."""
    return threadpool_limits(limits=count, user_api="blas")


def blas_thread_counts() -> list[str]:
    """Threads of numpy's own BLAS (other copies, e.g. scipy's, are not on the hot path)."""
    return [f"{pool['internal_api']} {pool['num_threads']}" for pool in threadpool_info()
            if pool["user_api"] == "blas" and "numpy" in Path(pool["filepath"]).parent.name]


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the cores), if known."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


T = TypeVar("T", bound=Timed)


def best_of(runs: list[T]) -> T:
    """The fastest of repeated runs, with every run's throughput and the median attached."""
    rates = [r.samples_per_second for r in runs]
    best = runs[int(np.argmax(rates))]
    best.details["runs_samples_per_second"] = rates
    best.details["median_samples_per_second"] = float(np.median(rates))
    return best


def print_machine(report: dict[str, Any], blas_note: str = "") -> None:
    """Threads, load average (flagging a busy machine), versions and the command line."""
    threads = report["threads"]
    blas = ", ".join(threads["numpy_blas"]) or "not known"
    print(f"threads: numba {threads['numba']} ({threads['numba_layer']} layer, "
          f"NUMBA_NUM_THREADS={threads['numba_env']}), torch {threads['torch']}, numpy BLAS "
          f"{blas}{blas_note}; {threads['cpus']} CPU(s)")
    load = report["load_average_1min"]
    if load["start"] is not None:
        busy = load["start"] > (threads["cpus"] or 1) / 2  # "end" includes this benchmark
        print(f"load average (1 min) at start / end: {load['start']:.2f} / {load['end']:.2f}"
              + ("  (the machine was busy: figures are noisy)" if busy else ""))
    print(f"versions: {report['versions']}")
    print(f"command: {report['command']}")
