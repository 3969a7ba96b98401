"""Where a Hopfield training step's time goes: a per-part breakdown in microseconds per step.

What is measured
----------------
The protocol's training run (default ``protocols/hopfield_mnist.yaml``, 1 epoch: 400 steps of
20 samples of the 784-500-10 network) through ``Trainer.run`` exactly as ``labep run`` trains,
with a wall-clock timer (time.perf_counter) around each part of a step:

``step``             ``StepPhases.run``: everything of one training step but its commit
``  free relax``     the free phase (``bench.relax`` without a nudge), of which
``    drive``        the clamped input drive x W_1 + b_1 (computed, or found in the cache)
``    kernel``       the numba settle kernel
``  nudged relax``   both nudged phases, with their own ``drive`` and ``kernel``
``  free + nudged``  a bench that relaxes a step's phases in one call (``relax_step``): all
``                   of them, with their ``drive`` and ``kernel``
``  estimate``       the estimator (the contrast dE/dtheta(s+) - dE/dtheta(s-))
``  optimizer``      the optimizer's step, where it has one (Adam); SGD's -lr times the
``                   estimate is taken by the write path in its addition (``Sgd.factors``)
``  write``          the write path's ``apply`` (theta + step), of which ``bench write`` is
``                   the bench's ``write`` (range check and storage)
``commit``           the run store's ``commit_step`` (metrics, events, checkpoints), of which
``  at checkpoints`` the commits of the steps with a parameter snapshot and resume point
``checkpoint state`` the engine gathering a resume point (every ``checkpoint_every`` steps)
``engine``           the rest of ``Trainer._epoch`` (its loop, metrics, progress)

Each part is reported as its inclusive mean over the run's steps; ``(rest)`` rows are the
part's own time outside the parts listed under it (Python glue). ``--repeats N`` runs N times
and reports each figure's median over the runs. Compilation is excluded (a 40-sample warm-up
run first); test evaluation is not part of a step. The same script profiles any checkout of
labep (it patches only names that exist), so a branch and main can be profiled in one session
by two interpreters.

    python benchmarks/hopfield_step_profile.py
    python benchmarks/hopfield_step_profile.py --repeats 3 --json
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from machine import load_average, log

import labep
from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

#: the timer: wall time, or with ``--clock cpu`` the calling thread's CPU time
clock = time.perf_counter

DEFAULT_PROTOCOL = Path(__file__).resolve().parents[1] / "protocols" / "hopfield_mnist.yaml"

#: (row label, timer key, parent key) in the order printed
ROWS = [
    ("step", "step", None),
    ("  free relax", "relax.free", "step"),
    ("    drive", "drive.free", "relax.free"),
    ("    kernel", "kernel.free", "relax.free"),
    ("  nudged relax (both)", "relax.nudged", "step"),
    ("    drive", "drive.nudged", "relax.nudged"),
    ("    kernel", "kernel.nudged", "relax.nudged"),
    ("  free + nudged (one call)", "relax.step", "step"),
    ("    drive", "drive.step", "relax.step"),
    ("    kernel", "kernel.step", "relax.step"),
    ("  estimate", "estimate", "step"),
    ("  optimizer", "optimizer", "step"),
    ("  write", "write", "step"),
    ("    bench write", "bench_write", "write"),
    ("commit", "commit", "epoch"),
    ("  at checkpoints", "commit.checkpoint", "commit"),
    ("checkpoint state", "checkpoint", "epoch"),
]


class Timers:
    """Inclusive wall time per key; ``phase`` tells a free relaxation from a nudged one."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.phase = "free"
        #: inside ``Trainer._epoch`` (the test evaluation's relaxations are not counted)
        self.active = False

    def wrap(self, owner: Any, name: str, key: str | None = None, phased: bool = False) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        timers = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            label = f"{key or name}.{timers.phase}" if phased else key or name
            began = clock()
            try:
                return original(*args, **kwargs)
            finally:
                if timers.active:
                    timers.total[label] += clock() - began

        setattr(owner, name, timed)


def instrument(timers: Timers) -> None:
    """Wrap the parts of a step (only those this checkout of labep has)."""
    import labep.simulators.hopfield as hopfield
    from labep.ep import estimators, optimizers
    from labep.hardware import write_path
    from labep.run import engine, step
    from labep.simulators import layered

    relax = hopfield.HopfieldSimulator.relax

    def relax_phase(self: Any, inputs: Any, nudge: Any = None, *args: Any, **kwargs: Any) -> Any:
        timers.phase = "free" if nudge is None else "nudged"
        began = clock()
        try:
            return relax(self, inputs, nudge, *args, **kwargs)
        finally:
            if timers.active:
                timers.total[f"relax.{timers.phase}"] += clock() - began

    hopfield.HopfieldSimulator.relax = relax_phase
    relax_step = getattr(hopfield.HopfieldSimulator, "relax_step", None)
    if relax_step is not None:
        def relax_whole_step(self: Any, *args: Any, **kwargs: Any) -> Any:
            timers.phase = "step"
            began = clock()
            try:
                return relax_step(self, *args, **kwargs)
            finally:
                if timers.active:
                    timers.total["relax.step"] += clock() - began

        hopfield.HopfieldSimulator.relax_step = relax_whole_step
    timers.wrap(layered.LayeredSimulator, "_clamped", "drive", phased=True)
    for kernel in ("settle_layered", "settle_step"):
        timers.wrap(hopfield, kernel, "kernel", phased=True)
    timers.wrap(step.StepPhases, "run", "step")
    timers.wrap(estimators.Symmetric, "estimate", "estimate")
    timers.wrap(optimizers.Sgd, "step", "optimizer")
    timers.wrap(write_path.WritePath, "apply", "write")
    timers.wrap(layered.LayeredSimulator, "write", "bench_write")
    commit = RunStore.commit_step

    def commit_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        began = clock()
        try:
            return commit(self, *args, **kwargs)
        finally:
            if timers.active:
                spent = clock() - began
                timers.total["commit"] += spent
                if kwargs.get("arrays") is not None:
                    timers.total["commit.checkpoint"] += spent

    RunStore.commit_step = commit_step
    timers.wrap(engine.Trainer, "_resume_state", "checkpoint")
    epoch = engine.Trainer._epoch

    def timed_epoch(*args: Any, **kwargs: Any) -> Any:
        timers.active = True
        began = clock()
        try:
            return epoch(*args, **kwargs)
        finally:
            timers.total["epoch"] += clock() - began
            timers.active = False

    engine.Trainer._epoch = timed_epoch


def profile_once(protocol: str, overrides: list[str], folder: Path, index: int,
                 timers: Timers) -> dict[str, float]:
    """One timed run: microseconds per step of every part, and the run's figures."""
    timers.total.clear()
    store = RunStore(folder / f"run{index}.db")
    try:
        result = Trainer(load_protocol(protocol, overrides), store, progress=False).run()
        _, rates = store.metric_series(result.run_id, "samples_per_second")
    finally:
        store.close()
    steps = max(result.steps, 1)
    out = {key: 1e6 * value / steps for key, value in timers.total.items()}
    out["samples_per_second"] = float(rates[-1])
    out["test_accuracy"] = float(result.test_accuracy or 0.0)
    out["steps"] = float(result.steps)
    return out


def table(figures: dict[str, float]) -> list[str]:
    lines = [f"{'part':<26}{'us/step':>10}{'share':>8}"]
    epoch = figures.get("epoch", 0.0)
    children: dict[str, float] = defaultdict(float)
    for _, key, parent in ROWS:
        if parent is not None and key in figures:
            children[parent] += figures[key]
    for label, key, _ in ROWS:
        if key not in figures:
            continue
        value = figures[key]
        lines.append(f"{label:<26}{value:>10.1f}{100 * value / max(epoch, 1e-12):>7.1f}%")
        if key in children and key != "epoch":
            rest = value - children[key]
            pad = " " * (len(label) - len(label.lstrip()) + 2)
            lines.append(f"{pad + '(rest)':<26}{rest:>10.1f}"
                         f"{100 * rest / max(epoch, 1e-12):>7.1f}%")
    engine = epoch - children["epoch"] - figures.get("step", 0.0)
    lines.append(f"{'engine (rest)':<26}{engine:>10.1f}{100 * engine / max(epoch, 1e-12):>7.1f}%")
    lines.append(f"{'training step, total':<26}{epoch:>10.1f}{100.0:>7.1f}%")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--protocol", default=str(DEFAULT_PROTOCOL))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="protocol override (repeatable)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2,
                        help="numba threads (at most NUMBA_NUM_THREADS, default 2)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: the main thread's CPU time "
                        "(time.thread_time), the work itself whatever else loads the cores, "
                        "meaningful with --threads 1 (then every part runs on that thread)")
    parser.add_argument("--blas-threads", type=int, default=None, metavar="N",
                        help="let numpy's BLAS use N threads during the run (the engine pins "
                        "it to 1 beside numba's pool): how a BLAS product fares next to numba")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        from labep.run import engine
        count = args.blas_threads
        engine.threadpool_limits = lambda **_: threadpool_limits(limits=count, user_api="blas")
    global clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    import numba
    numba.set_num_threads(args.threads)
    overrides = [f"training.epochs={args.epochs}", *args.overrides]
    loaded = load_protocol(args.protocol, overrides)
    dataset = loaded.protocol.dataset
    load_before = load_average()
    timers = Timers()
    instrument(timers)
    runs = []
    with tempfile.TemporaryDirectory(prefix="labep-profile-") as tmp:
        folder = Path(tmp)
        warm = [*overrides, "training.epochs=1", f"dataset.train.stop={dataset.train.start + 40}",
                f"dataset.test.stop={dataset.test.start + 40}"]
        log("warming up the numba JIT ...")
        profile_once(args.protocol, warm, folder, -1, timers)
        for index in range(args.repeats):
            log(f"run {index + 1}/{args.repeats} ...")
            runs.append(profile_once(args.protocol, overrides, folder, index, timers))
    keys = sorted({key for run in runs for key in run})
    figures = {key: statistics.median(run.get(key, 0.0) for run in runs) for key in keys}
    report = {"labep": str(Path(labep.__file__).resolve().parents[1]), "figures": figures,
              "runs": runs, "load_average_1min": {"start": load_before, "end": load_average()},
              "command": " ".join(["python", *sys.argv])}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"labep from {report['labep']}; {int(figures['steps'])} steps; median of "
          f"{args.repeats} run(s); {args.clock} clock, {args.threads} numba thread(s), BLAS "
          f"{args.blas_threads or 1} thread(s)")
    print("\n".join(table(figures)))
    print(f"samples/s (engine's train_seconds): {figures['samples_per_second']:.0f}; "
          f"test accuracy {figures['test_accuracy']:.4f}")
    print(f"load average (1 min) at start / end: {load_before} / {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
