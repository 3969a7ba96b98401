"""The run engine: a validated protocol's epochs of training steps on its bench, recorded.

The engine runs what :func:`labep.run.assembly.assemble` built (it reads no protocol section
to build anything): it opens the bench, starts the run (calibration, initial write) or
restores it from a resume point, runs the epochs' steps (:class:`labep.run.step.StepPhases`),
evaluates, and closes the bench in its safe state however the run ends. Every step is
committed to the run store whole in one transaction (steps between checkpoints are grouped,
at least every ``HOLD_SECONDS``; a checkpoint commits every step before it with its resume
point); parameter snapshots are stored every ``checkpoint_every`` steps and at the end of each
epoch. Random streams are derived from
(seed, purpose, epoch, batch), so the data order and nudge signs of any step are known without
replaying the run.

Size: just over 400 lines, kept whole: what a checkpoint saves, what a resume restores and what
a run commits on each way out are one invariant (exact resume, nothing lost) read together.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback as tb
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

import labep
from labep.ep.optimizers import Optimizer, schedule_scale
from labep.hardware.bench import (
    Bench,
    BenchIdentity,
    LinkReporting,
    Resumable,
    ShotCounting,
)
from labep.hardware.calibration import CalibrationError
from labep.hardware.faults import FaultPolicy, SkipBatch
from labep.hardware.interrupts import deferred_interrupt, terminate_as_interrupt
from labep.hardware.interrupts import reason as interrupt_reason
from labep.hardware.write_path import CodeMap, WritePath
from labep.models import Params
from labep.run.assembly import RunParts, assemble, stream
from labep.run.step import Event, StepPhases, code_snapshot, evaluate, write_totals
from labep.run.validate import LoadedProtocol, load_protocol
from labep.store.files import StoreError
from labep.store.runs import RunStore


def epoch_line(epoch: int, epochs: int, step: int, loss: float, accuracy: float,
               test: dict[str, float], test_epoch: int) -> str:
    """One epoch's summary as a person reads it; the test accuracy names the epoch it was
    evaluated at (evaluation runs every ``evaluation.every_epochs`` epochs and at the end)."""
    tested = (f"test {test['accuracy']:.4f} (epoch {test_epoch})" if test
              else "test -")
    return (f"epoch {epoch}/{epochs}: step {step}, loss {loss:.4f}, train {accuracy:.4f}, "
            f"{tested}")


@dataclass
class RunResult:
    run_id: str
    status: str
    test_accuracy: float | None
    train_loss: float | None
    steps: int


class Trainer:
    """Runs a validated protocol on its bench, recording everything in a run store."""

    def __init__(self, loaded: LoadedProtocol, store: RunStore, *, progress: bool = True,
                 on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.loaded = loaded
        self.protocol = loaded.protocol
        self.store = store
        self.progress = progress
        self.on_epoch = on_epoch
        #: when the progress bar's figures were last set (time.monotonic)
        self._shown = -float("inf")

    def run(self, *, trial: tuple[str, int] | None = None) -> RunResult:
        """A new run of the protocol; ``trial`` (sweep id, index): as that sweep trial's one
        run (refused if it has one)."""
        protocol = self.protocol
        run_id = self.store.create_run(protocol.name, self.loaded.document, protocol.bench.name,
                                       protocol.seed, labep.__version__, trial=trial)
        return self._execute(run_id, None)

    @classmethod
    def resume(cls, store: RunStore, run_id: str, *, progress: bool = True,
               on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
        """Continue a run from its newest resume point (its last checkpoint), with the
        protocol as it was run. Steps committed after that point are removed and run again:
        on a simulator they come out identical, so a run killed and resumed any number of
        times ends bit-identical to one never interrupted (checkpoint_every: 1 re-runs
        nothing). Refused while another live process writes the run."""
        claimed = store.claim(run_id)
        run_id = claimed["id"]
        point = store.resume_point(run_id)
        if point is None:
            raise StoreError(f"run {run_id} has no resume point (it stopped before its "
                             "first checkpoint): start it again with labep run")
        step, state = point
        removed = store.truncate_after(run_id, step)
        store.record_events(run_id, step, [(
            "resumed", f"resumed at step {step} (was {claimed['status']}); {removed} later "
            "step(s) run again", {"from_step": step, "rerun_steps": removed,
                                  "previous_owner": claimed["owner"]})])
        trainer = cls(load_protocol(claimed["protocol"]), store, progress=progress,
                      on_epoch=on_epoch)
        return trainer._execute(run_id, (step, state))

    @classmethod
    def restart(cls, store: RunStore, run_id: str, *, progress: bool = True) -> RunResult:
        """Run again from its start a run that stopped before its first resume point (killed
        while opening its bench), under the same run id: what it had written is removed
        (except the ``run_ended`` events). Refused like :meth:`resume`."""
        claimed = store.claim(run_id)
        store.truncate_after(claimed["id"], -1)
        trainer = cls(load_protocol(claimed["protocol"]), store, progress=progress)
        return trainer._execute(claimed["id"], None)

    def _execute(self, run_id: str, point: tuple[int, dict[str, Any]] | None) -> RunResult:
        #: the step in progress's events, and the fault policy: committed whatever ends a run
        self._events: list[Event] = []
        self._faults: FaultPolicy | None = None
        self._step = 0 if point is None else point[0]
        bench: Bench | None = None
        try:
            with terminate_as_interrupt():  # SIGTERM ends a run like Ctrl-C
                parts = assemble(self.protocol)
                bench = parts.bench
                # numba kernels parallelize over the samples of a batch; a BLAS pool spinning
                # on the same cores between kernel calls costs several times the work, so
                # BLAS runs on one thread during a run.
                with threadpool_limits(limits=1, user_api="blas"):
                    identity = bench.open()
                    try:
                        self.store.set_bench_identity(run_id, identity.as_dict())
                        result = self._train(run_id, parts, identity, point)
                    finally:
                        with deferred_interrupt():  # a signal never cuts the safe state short
                            bench.close()  # the safe state, on success and on every error
        except KeyboardInterrupt as err:
            message = interrupt_reason(err)
            self._salvage(run_id, bench, "interrupted", message)
            self.store.finish(run_id, "interrupted", message, tb.format_exc())
            raise
        except BaseException as err:
            message = f"{type(err).__name__}: {err}"
            self._salvage(run_id, bench, "failed", message)
            self.store.finish(run_id, "failed", message, tb.format_exc())
            raise
        self._record_link(run_id, bench, self._step)
        self.store.finish(run_id, "completed")
        return result

    def _salvage(self, run_id: str, bench: Bench | None, status: str, message: str) -> None:
        """Commit what a run that is ending early had not committed yet: the events of the
        step in progress, the faults the bench logged, the link-quality counters, and one
        ``run_ended`` event with the reason (kept when a resume re-runs the step)."""
        events = list(self._events)
        if self._faults is not None:
            with contextlib.suppress(Exception):
                events += self._faults.take_events()
        faults = sum(1 for kind, _, _ in events if kind == "fault")
        events.append(("run_ended", f"run {status} during step {self._step + 1}: {message}",
                       {"status": status, "reason": message, "step": self._step + 1,
                        "faults_in_step": faults}))
        self._events = []
        with contextlib.suppress(Exception):  # a broken store must not hide the first error
            self.store.record_events(run_id, self._step + 1, events)
            self._record_link(run_id, bench, self._step)

    def _record_link(self, run_id: str, bench: Bench | None, step: int) -> None:
        """The bench's link-quality counters (:class:`LinkReporting`) as ``link_*`` metrics."""
        if isinstance(bench, LinkReporting):
            self.store.record_metrics(run_id, step, {f"link_{name}": value for name, value
                                                     in bench.link_quality().items()})

    def _restore(self, run_id: str, point: tuple[int, dict[str, Any]], parts: RunParts,
                 identity: BenchIdentity) -> WritePath:
        """The write path, the optimizer and the bench as they were at a resume point: the
        same calibration (refused if it belongs to another bench), the shadow, the codes, the
        counters, the optimizer's moments; a simulator's whole state, or a hardware bench's
        parameters written again."""
        step, state = point
        bench, faults, optimizer = parts.bench, parts.faults, parts.optimizer
        summary = self.store.summary(run_id, with_protocol=False)
        maps: dict[str, CodeMap] = {}
        if summary["calibration"] is not None:
            record = self.store.calibration(summary["calibration"])
            if not record.matches(identity):
                raise CalibrationError(
                    f"run {run_id} was calibrated with {record.id} of {record.identity}; the "
                    f"bench now answering is {identity.as_dict()}: refused")
            maps = record.code_maps(bench)
        found = self.store.arrays(run_id, "checkpoint", step=step)
        codes = self.store.arrays(run_id, "codes", step=step)
        extra = self.store.arrays(run_id, "resume", step=step)
        if found is None or not found[1] or extra is None:
            raise StoreError(f"run {run_id}: the resume point at step {step} lacks its arrays")
        writes = parts.write_path(found[1], maps)
        prefix = "writes."
        writes.restore(state["writes"],
                       {k[len(prefix):]: v for k, v in extra[1].items() if k.startswith(prefix)},
                       {} if codes is None else codes[1])
        faults.total = int(state["faults"]["total"])
        faults.skipped_batches = int(state["faults"]["skipped_batches"])
        prefix = "optimizer."
        optimizer.restore(state.get("optimizer", {"name": "sgd"}),
                          {k[len(prefix):]: v for k, v in extra[1].items()
                           if k.startswith(prefix)})
        if isinstance(bench, Resumable) and "bench" in state:
            prefix = "bench."
            bench.load_state(state["bench"], {k[len(prefix):]: v for k, v in extra[1].items()
                                              if k.startswith(prefix)})
        else:  # a bench that lost its state: the first step writes again what failed here
            with contextlib.suppress(SkipBatch):
                faults.call("write (resume)", writes.rewrite_held)
        return writes

    def _resume_state(self, position: dict[str, Any], writes: WritePath, faults: FaultPolicy,
                      bench: Bench, optimizer: Optimizer
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The JSON state and arrays of a resume point."""
        write_meta, write_arrays = writes.state()
        optimizer_meta, optimizer_arrays = optimizer.state()
        state: dict[str, Any] = {**position, "writes": write_meta, "optimizer": optimizer_meta,
                                 "faults": {"total": faults.total,
                                            "skipped_batches": faults.skipped_batches}}
        arrays = {f"writes.{k}": v for k, v in write_arrays.items()}
        arrays.update({f"optimizer.{k}": v for k, v in optimizer_arrays.items()})
        if isinstance(bench, Resumable):
            bench_meta, bench_arrays = bench.save_state()
            state["bench"] = bench_meta
            arrays.update({f"bench.{k}": v for k, v in bench_arrays.items()})
        return state, arrays

    def _train(self, run_id: str, parts: RunParts, identity: BenchIdentity,
               point: tuple[int, dict[str, Any]] | None) -> RunResult:
        """Every epoch from the start (or the resume point) to the protocol's last."""
        training = self.protocol.training
        faults = self._faults = parts.faults
        writes, position = self._start(run_id, parts, identity, point)
        step_phases = StepPhases(parts.bench, parts.model, parts.estimator, parts.optimizer,
                                 writes, faults, parts.train_free, parts.train_nudged,
                                 self.protocol)
        batches = -(-len(parts.data.train_labels) // training.batch_size)
        self._step = position["step"]
        test: dict[str, float] = position["test"]
        epoch_loss = float("nan")
        # on a terminal a live bar; in a log file (stderr not a terminal) one line per epoch
        interactive = self.progress and sys.stderr.isatty()
        bar = tqdm(total=training.epochs * batches, initial=self._step, unit="step",
                   disable=not interactive, dynamic_ncols=True, desc=self.protocol.name)
        try:
            for epoch in range(position["epoch"], training.epochs):
                first = position["batch"] if epoch == position["epoch"] else 0
                totals = ((position["loss_sum"], position["correct"], position["seen"])
                          if first else (0.0, 0, 0))
                started = time.perf_counter()
                loss_sum, correct, seen = self._epoch(run_id, parts, step_phases, writes,
                                                      epoch, first, batches, totals, test, bar)
                test = self._end_epoch(run_id, parts, writes, epoch, loss_sum, correct, seen,
                                       time.perf_counter() - started, test)
                epoch_loss = loss_sum / max(seen, 1)
                line = epoch_line(epoch + 1, training.epochs, self._step, epoch_loss,
                                  correct / max(seen, 1), test, self._test_epoch)
                if interactive:
                    bar.set_postfix_str(line.split(": ", 1)[1], refresh=True)
                elif self.progress:
                    print(f"{self.protocol.name}: {line}", file=sys.stderr, flush=True)
        finally:
            bar.close()
        return RunResult(run_id, "completed", test.get("accuracy"), epoch_loss, self._step)

    #: the epoch (1-based) whose evaluation the newest test accuracy is
    _test_epoch = 0

    def _start(self, run_id: str, parts: RunParts, identity: BenchIdentity,
               point: tuple[int, dict[str, Any]] | None
               ) -> tuple[WritePath, dict[str, Any]]:
        """The write path and the position in the run: a new run chooses its calibration,
        writes its initial parameters and stores its start; a resumed one is restored."""
        position: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0,
                                    "correct": 0, "seen": 0, "test": {}}
        if point is not None:
            writes = self._restore(run_id, point, parts, identity)
            return writes, {key: point[1][key] for key in position}
        faults = parts.faults
        maps, calibration_id = parts.calibration(self.store, identity)
        self.store.set_calibration(run_id, calibration_id)
        writes = parts.write_path(parts.initial_params(), maps)
        # given up on: the bench is out of step, and the first step writes it (resync)
        with contextlib.suppress(SkipBatch):
            faults.call("write", writes.write_all)
        state, arrays = self._resume_state(position, writes, faults, parts.bench,
                                           parts.optimizer)
        self.store.save_start(run_id, {**code_snapshot(writes), "resume": arrays}, state)
        self.store.record_events(run_id, 0, faults.take_events())
        return writes, position

    def _epoch(self, run_id: str, parts: RunParts, step_phases: StepPhases, writes: WritePath,
               epoch: int, first: int, batches: int, totals: tuple[float, int, int],
               test: dict[str, float], bar: Any) -> tuple[float, int, int]:
        """The batches ``first`` .. of one epoch, each step committed with its events (and a
        resume point every ``checkpoint_every`` steps and at the epoch's end); returns the
        epoch's summed cost, correct predictions and samples seen."""
        protocol, training, data, faults = self.protocol, self.protocol.training, parts.data, \
            parts.faults
        order = stream(protocol.seed, 1, epoch).permutation(len(data.train_labels))
        loss_sum, correct, seen = totals
        step = self._step
        for index in range(first, batches):
            rows = order[index * training.batch_size:(index + 1) * training.batch_size]
            events = self._events = []
            scale = schedule_scale(training.schedule, step, batches, training.epochs)
            signs = stream(protocol.seed, 2, epoch, index) if parts.estimator.random else None
            metrics, cost, hits = step_phases.run(
                data.train_inputs[rows], data.train_labels[rows], signs, scale, step, events)
            loss_sum += cost
            correct += hits
            seen += len(rows) if "skipped" not in metrics else 0
            step += 1
            last = index == batches - 1
            events += faults.take_events()
            if faults.total:
                metrics["faults"] = sum(1 for kind, _, _ in events if kind == "fault")
            snapshot, resume = None, None
            if step % training.checkpoint_every == 0 or last:
                resume, resume_arrays = self._resume_state(
                    {"epoch": epoch, "batch": index + 1, "step": step, "loss_sum": loss_sum,
                     "correct": correct, "seen": seen, "test": test}, writes, faults,
                    parts.bench, parts.optimizer)
                snapshot = {**code_snapshot(writes), "resume": resume_arrays}
            # the store may hold a step back and commit it with the next checkpoint (or
            # within RunStore's HOLD_SECONDS): a kill loses only steps after the newest
            # resume point, which a resume runs again anyway; a step with a fault is
            # committed at once
            self.store.commit_step(run_id, step, epoch, metrics, arrays=snapshot,
                                   events=events, resume=resume,
                                   hold=not any(kind == "fault" for kind, _, _ in events))
            self._events = []
            self._step = step
            # the figures beside the bar, shown with its next redraw (tqdm redraws at most
            # every mininterval; formatting them every step cost more than some steps)
            if not bar.disable and (last or time.monotonic() - self._shown >= bar.mininterval):
                self._shown = time.monotonic()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / max(seen, 1):.4f}",
                                acc=f"{correct / max(seen, 1):.3f}",
                                test=f"{test['accuracy']:.3f} (epoch {self._test_epoch})"
                                if test else "-", refresh=False)
            bar.update(1)
        return loss_sum, correct, seen

    def _end_epoch(self, run_id: str, parts: RunParts, writes: WritePath, epoch: int,
                   loss_sum: float, correct: int, seen: int, train_seconds: float,
                   test: dict[str, float]) -> dict[str, float]:
        """Flush the pending updates, evaluate when due, record the epoch's metrics (and the
        link counters); returns the newest test result."""
        faults, bench, step = parts.faults, parts.bench, self._step
        # evaluate what the shadow holds (after the epoch's last resume point); if the
        # policy gives up, the pending updates stay in the shadow for the next write
        with contextlib.suppress(SkipBatch):
            faults.call("write", writes.flush)
        epoch_metrics = {"train_loss": loss_sum / max(seen, 1),
                         "train_accuracy": correct / max(seen, 1),
                         "train_seconds": train_seconds,
                         "samples_per_second": seen / max(train_seconds, 1e-12)}
        final = epoch == self.protocol.training.epochs - 1
        if (epoch + 1) % self.protocol.evaluation.every_epochs == 0 or final:
            test = self._evaluate(parts, writes)
            self._test_epoch = epoch + 1
            self.store.record_events(run_id, step, faults.take_events())
            if test:
                epoch_metrics.update({"test_accuracy": test["accuracy"],
                                      "test_loss": test["loss"],
                                      "test_unsettled": test["unsettled"],
                                      "test_nonfinite": test["nonfinite"],
                                      "test_skipped": test["skipped"],
                                      "test_samples": len(parts.data.test_labels)})
                if "spikes_per_sample" in test:  # a spiking bench's inference cost
                    epoch_metrics["test_spikes_per_sample"] = test["spikes_per_sample"]
        epoch_metrics["epoch"] = epoch + 1
        epoch_metrics.update(write_totals(writes))
        if faults.total:
            epoch_metrics.update({"faults_total": faults.total,
                                  "skipped_batches": faults.skipped_batches})
        if isinstance(bench, LinkReporting):
            epoch_metrics.update({f"link_{name}": value for name, value
                                  in bench.link_quality().items()})
        if isinstance(bench, ShotCounting):
            # a measuring bench's every shot since it was built (training and evaluation)
            epoch_metrics["shots_total"] = bench.shots_used
        self.store.record_metrics(run_id, step, epoch_metrics)
        if self.on_epoch is not None:
            self.on_epoch(epoch, epoch_metrics)
        return test

    def _evaluate(self, parts: RunParts, writes: WritePath) -> dict[str, float]:
        """The test set's free phase, on a bench that holds the shadow's parameters: a bench
        left out of step by a failed write is written first; if that is given up on too, no
        evaluation (an event says so) rather than one of parameters the run does not hold."""
        faults = parts.faults
        try:
            if writes.unsynced:
                faults.call("write (resync)", writes.resync)
        except SkipBatch:
            faults.events.append(("evaluation_skipped", "the bench does not hold the shadow's "
                                  "parameters (a write was given up on): no evaluation",
                                  {"unsynced": sorted(writes.unsynced)}))
            return {}
        return evaluate(parts.bench, parts.model, parts.data.test_inputs,
                        parts.data.test_labels, parts.free_settle,
                        self.protocol.evaluation.batch_size, faults)


def final_params(store: RunStore, run_id: str) -> Params:
    """The newest parameter snapshot of a run."""
    found = store.arrays(run_id, "checkpoint")
    if found is None:
        raise KeyError(f"run {run_id} has no parameter snapshot")
    return found[1]
