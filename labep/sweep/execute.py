"""Running a sweep's trials: one task per trial, each an ordinary labep run, on
dask.distributed (a LocalCluster by default, or an existing scheduler) or one after another
in this process.

A task is :func:`run_trial` (store path, sweep id, trial index). It reads its protocol from
the store and finds out what its trial has: no run yet -> a new run, created and linked to the
trial in one transaction (``sweep_trials`` has one row per (sweep_id, trial), so a trial never
gets two runs); a completed run -> nothing to do; a run that stopped (a killed worker, a
failure, an interrupt) -> resumed from its newest checkpoint (run again from its start, same
run id, if it had none). A task that dask reschedules after its worker died therefore
continues the trial's run instead of starting a second one.

Workers share the one SQLite file (WAL): they take turns, each write transaction retried
(tenacity, random exponential backoff) while another holds the lock, on top of SQLite's busy
timeout. The store must be on a filesystem every worker reaches (with a remote scheduler).

Hardware benches: a trial whose protocol names a ``bench.driver`` holds a
``distributed.Lock`` named ``labep-bench:DRIVER:RESOURCE`` for the whole trial, so two trials
never drive the same instrument at once; simulators take no lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from labep.store.files import StoreError
from labep.store.runs import RunStore

#: how long a worker keeps retrying a write transaction the others hold the lock of
RETRY_SECONDS = 600.0


class DaskMissingError(RuntimeError):
    """dask.distributed or tenacity is not installed."""


def require_dask() -> None:
    """Raise :class:`DaskMissingError` unless dask.distributed and tenacity import."""
    try:
        import distributed  # noqa: F401
        import tenacity  # noqa: F401
    except ImportError as err:
        raise DaskMissingError("sweeps on dask need the dask extra: "
                               "pip install 'labep[dask]'") from err


def _locked(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, sqlite3.OperationalError | StoreError) and (
        "locked" in text or "busy" in text)


def _retrying() -> Any:
    try:
        from tenacity import (
            Retrying,
            retry_if_exception,
            stop_after_delay,
            wait_random_exponential,
        )
    except ImportError as err:  # pragma: no cover - the dask extra
        raise DaskMissingError("sweeps need the dask extra: pip install 'labep[dask]'") from err
    return Retrying(retry=retry_if_exception(_locked), stop=stop_after_delay(RETRY_SECONDS),
                    wait=wait_random_exponential(multiplier=0.05, max=2.0), reraise=True)


class SharedStore(RunStore):
    """A run store written by many processes at once: every write transaction waits its
    turn (BEGIN IMMEDIATE retried while another process holds the write lock)."""

    def _begin(self) -> None:
        for attempt in _retrying():
            with attempt:
                super()._begin()


def open_shared(path: str | Path) -> SharedStore:
    """The existing store at ``path`` for one more writer (opening retried while locked)."""
    for attempt in _retrying():
        with attempt:
            return SharedStore(path, create=False, check_pages=False)
    raise AssertionError("unreachable")  # pragma: no cover


def bench_resource(doc: dict[str, Any]) -> str | None:
    """The lock name of a trial's hardware bench, or None for a simulator."""
    bench = doc.get("bench") or {}
    if not bench.get("driver"):
        return None
    return f"labep-bench:{bench['driver']}:{bench.get('resource') or ''}"


@contextmanager
def holding(resource: str | None) -> Iterator[None]:
    """Hold the cluster-wide lock of a hardware resource (none for a simulator, or when not
    running inside a dask worker: trials in one process already run one at a time)."""
    if resource is None:
        yield
        return
    try:
        from distributed import Lock, get_worker
        get_worker()
    except (ImportError, ValueError):
        yield
        return
    lock = Lock(resource)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def run_trial(store_path: str, sweep_id: str, trial: int,
              numba_threads: int | None = None, *, shared: bool = True) -> dict[str, Any]:
    """Run (or continue) one trial of a sweep; never raises for a failed run (it is recorded
    failed and the result says so). ``shared``: other processes write the store at the same
    time (a dask task: writes retried, needs tenacity); a serial sweep opens it plainly.
    Returns trial, run_id, status, action, error."""
    from labep.run.engine import Trainer
    from labep.run.validate import load_protocol

    if numba_threads:
        import numba

        numba.set_num_threads(max(1, min(numba_threads, numba.config.NUMBA_NUM_THREADS)))
    store = (open_shared(store_path) if shared
             else RunStore(store_path, create=False, check_pages=False))
    try:
        row = store.sweep_trial(sweep_id, trial)
        out: dict[str, Any] = {"trial": trial, "run_id": row["run_id"], "error": None}
        with holding(bench_resource(row["protocol"])):
            try:
                if row["run_id"] is None:
                    out["action"] = "run"
                    trainer = Trainer(load_protocol(row["protocol"]), store, progress=False)
                    result = trainer.run(trial=(sweep_id, trial))
                elif row["status"] == "completed":
                    out.update(action="none", status="completed")
                    return out
                elif store.resume_point(row["run_id"]) is None:
                    out["action"] = "restart"
                    result = Trainer.restart(store, row["run_id"], progress=False)
                else:
                    out["action"] = "resume"
                    result = Trainer.resume(store, row["run_id"], progress=False)
            except Exception as err:
                out.update(status="failed", error=f"{type(err).__name__}: {err}",
                           run_id=store.sweep_trial(sweep_id, trial)["run_id"])
                return out
        out.update(run_id=result.run_id, status=result.status)
        return out
    finally:
        store.close()


class Progress:
    """One bar for the sweep (trials done / running / failed, ETA) on a terminal; one plain
    line per change otherwise; nothing when ``enabled`` is false."""

    def __init__(self, sweep_id: str, total: int, done: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.sweep_id, self.enabled = sweep_id, enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=done, unit="trial", desc=sweep_id,
                        disable=not self.interactive, dynamic_ncols=True)
        self.done, self.total = done, total
        self.last: tuple[int, int, int] | None = None

    def update(self, counts: dict[str, int]) -> None:
        now = (counts["completed"], counts["running"], counts["failed"])
        if now == self.last:
            return
        self.last = now
        if self.interactive:
            self.bar.update(max(0, counts["completed"] - self.done))
            self.bar.set_postfix(running=counts["running"], failed=counts["failed"])
        elif self.enabled:
            print(f"{self.sweep_id}: {counts['completed']}/{self.total} done, "
                  f"{counts['running']} running, {counts['failed']} failed, "
                  f"{counts['pending']} waiting", file=sys.stderr, flush=True)
        self.done = counts["completed"]

    def close(self) -> None:
        self.bar.close()


def pending_trials(store: RunStore, sweep_id: str) -> list[int]:
    """The trials of a sweep whose run did not complete (or that have none)."""
    return [row["trial"] for row in store.sweep_trials(sweep_id, metrics=False)
            if row["status"] != "completed"]


def _counts(store_path: str | Path, sweep_id: str) -> dict[str, int]:
    """The sweep's counts read on a fresh connection: the newest commits of every writer."""
    with RunStore(store_path, create=False, check_pages=False) as store:
        return store.sweep_counts(sweep_id)


def run_serial(store_path: str | Path, sweep_id: str, trials: list[int], *,
               progress: bool = True) -> list[dict[str, Any]]:
    """The trials one after another in this process (no dask)."""
    with RunStore(store_path, create=False, check_pages=False) as store:
        total = store.sweep(sweep_id)["trials"]
    bar = Progress(sweep_id, total, _counts(store_path, sweep_id)["completed"], progress)
    results = []
    for trial in trials:
        results.append(run_trial(str(store_path), sweep_id, trial, shared=False))
        bar.update(_counts(store_path, sweep_id))
    bar.close()
    return results


def local_cluster(workers: int | None = None) -> tuple[Any, int]:
    """A LocalCluster of ``workers`` processes (default one per core), one thread each, and
    the numba threads each trial may use (cores / workers, at least 1)."""
    try:
        from distributed import LocalCluster
    except ImportError as err:
        raise DaskMissingError("sweeps need the dask extra: pip install 'labep[dask]'") from err
    cores = os.cpu_count() or 1
    workers = workers or cores
    threads = max(1, cores // workers)
    # one worker process per core: numba's and the BLAS pools limited to the worker's share
    env = {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # no statistical profiler in the workers: it samples sys._current_frames() every 10 ms,
    # and on CPython 3.11 a garbage collection inside that call that frees a threading.local
    # deadlocks the worker on the interpreter's own lock (cpython gh-106883): the trial hangs
    # for good. The worker spec carries it, so a worker started again after a crash has it too.
    import dask.config

    # (the nanny merges this over the current config one level deep: give it all of it)
    no_profiler = dask.config.merge(
        dask.config.config, {"distributed": {"worker": {"profile": {"enabled": False}}}})
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR, env=env,
                           config=no_profiler)
    return cluster, threads


def submit(client: Any, store_path: str | Path, sweep_id: str, trials: list[int],
           numba_threads: int | None) -> list[Any]:
    """One task per trial (keys ``labep-SWEEP-TRIAL``)."""
    path = str(Path(store_path).resolve())
    return [client.submit(run_trial, path, sweep_id, trial, numba_threads, pure=False,
                          key=f"labep-{sweep_id}-{trial}") for trial in trials]


def follow(futures: list[Any], store_path: str | Path, sweep_id: str, *,
           progress: bool = True, poll: float = 0.5) -> list[dict[str, Any]]:
    """Wait for the tasks, showing the sweep's progress read from the store; a task dask
    gave up on (its workers kept dying) is a failed trial."""
    from distributed import wait

    def counts() -> dict[str, int]:
        return _counts(store_path, sweep_id)

    with RunStore(store_path, create=False, check_pages=False) as store:
        total = store.sweep(sweep_id)["trials"]
    bar = Progress(sweep_id, total, counts()["completed"], progress)
    remaining = list(futures)
    while remaining:
        with contextlib.suppress(Exception):
            wait(remaining, timeout=poll, return_when="FIRST_COMPLETED")
        remaining = [future for future in remaining if not future.done()]
        with contextlib.suppress(sqlite3.OperationalError, StoreError):
            bar.update(counts())
    bar.update(counts())
    bar.close()
    results = []
    for future, trial in zip(futures, (int(f.key.rsplit("-", 1)[1]) for f in futures),
                             strict=True):
        try:
            results.append(future.result())
        except Exception as err:
            results.append({"trial": trial, "run_id": None, "status": "failed",
                            "action": "lost", "error": f"{type(err).__name__}: {err}"})
    return results


def run_dask(store_path: str | Path, sweep_id: str, trials: list[int], *,
             scheduler: str | None = None, workers: int | None = None,
             progress: bool = True) -> list[dict[str, Any]]:
    """The trials on dask: the cluster at ``scheduler``, else a LocalCluster."""
    try:
        from distributed import Client
    except ImportError as err:
        raise DaskMissingError("sweeps need the dask extra: pip install 'labep[dask]'") from err
    if not trials:
        return []
    if scheduler:
        with Client(scheduler) as client:
            return follow(submit(client, store_path, sweep_id, trials, None), store_path,
                          sweep_id, progress=progress)
    cluster, threads = local_cluster(workers)
    with cluster, Client(cluster) as client:
        return follow(submit(client, store_path, sweep_id, trials, threads), store_path,
                      sweep_id, progress=progress)
