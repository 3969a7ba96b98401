"""The run engine: epochs over mini-batches of free and nudged phases on a bench.

Per training step: relax the free phase with the inputs clamped, relax each nudged phase the
estimator asks for (starting from the free state; a sample whose free phase did not settle is
not nudged), keep only the samples whose every phase settled with a finite readout, estimate
the gradient through the model, and apply
theta <- theta - lr * estimate through the write path. Every step is committed to the run store
in one transaction; parameter snapshots are stored every ``checkpoint_every`` steps and at the end
of each epoch. Random streams are derived from (seed, purpose, epoch, batch), so the data order
and nudge signs of any step are known without replaying the run.
"""

from __future__ import annotations

import contextlib
import copy
import time
import traceback as tb
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

import labep
from labep import registry
from labep.bench import (
    Bench,
    BenchIdentity,
    LinkReporting,
    Nudge,
    Relaxation,
    Resumable,
    Settle,
)
from labep.calibration import CalibrationError
from labep.datasets import Split, load_digits, load_idx_pair, load_xor
from labep.estimators import make_estimator
from labep.faults import FaultPolicy, SkipBatch
from labep.interrupts import deferred_interrupt, terminate_as_interrupt
from labep.interrupts import reason as interrupt_reason
from labep.models import Model, Params
from labep.optimizers import Optimizer, make_optimizer, schedule_scale
from labep.protocol import (
    DigitsConfig,
    IdxConfig,
    LoadedProtocol,
    Protocol,
    XorConfig,
    load_protocol,
)
from labep.store import SAMPLE_COUNTS, RunStore, StoreError
from labep.write_path import CodeMap, WritePath, WritePolicy

#: an event: (kind, message, detail)
Event = tuple[str, str, dict[str, Any]]


class UnsettledPhaseError(RuntimeError):
    """A phase did not settle and the protocol says ``on_unsettled: stop``."""


@dataclass
class RunResult:
    run_id: str
    status: str
    test_accuracy: float | None
    train_loss: float | None
    steps: int


# -- building blocks from a validated protocol ----------------------------------------------


def build_model(protocol: Protocol, data: Split | None = None) -> Model:
    """The protocol's model; with ``data``, an encoding fitted on the training inputs (a
    model's ``fit_encoding``, e.g. the polariton lattice's pca) is fitted on its training
    split."""
    cfg = protocol.model
    cls = registry.load_model_class(cfg.kind)
    model = cls(**cfg.model_dump(exclude={"kind", "activation"}))
    fit = getattr(model, "fit_encoding", None)
    if data is not None and fit is not None:
        fit(data.train_inputs)
    return model


def build_bench(protocol: Protocol, model: Model, **overrides: Any) -> Bench:
    """The protocol's bench (simulator or driver); ``overrides`` replace option fields."""
    cfg = protocol.bench
    cls = registry.BENCHES[cfg.name].load()
    options = cls.options_model.model_validate({**cfg.options, **overrides})
    if cfg.kind == "driver":
        return cls(model, options, resource=cfg.resource)
    return cls(model, options)


def load_dataset(protocol: Protocol) -> Split:
    data = protocol.dataset
    if isinstance(data, DigitsConfig):
        return load_digits(data.test_fraction, data.split_seed)
    if isinstance(data, XorConfig):
        return load_xor(data.repeats)
    assert isinstance(data, IdxConfig)
    train = load_idx_pair(data.path, data.train.images, data.train.labels, data.train.start,
                          data.train.stop)
    test = load_idx_pair(data.path, data.test.images, data.test.labels, data.test.start,
                         data.test.stop)
    n_classes = int(max(train[1].max(), test[1].max())) + 1
    return Split(train[0], train[1], test[0], test[1], n_classes)


def stream(seed: int, *purpose: int) -> np.random.Generator:
    """An independent random stream for (seed, purpose...): 0 init, 1 data order, 2 nudge sign."""
    return np.random.default_rng([seed, *purpose])


def settles(protocol: Protocol) -> tuple[Settle, Settle]:
    phases = protocol.phases
    return (
        Settle(phases.free.tolerance, phases.free.max_steps, phases.readout_average),
        Settle(phases.nudged.tolerance, phases.nudged.max_steps, phases.readout_average),
    )


def learning_rates(protocol: Protocol, model: Model) -> dict[str, float]:
    """One rate per coupling layer l, shared by W_l and b_l."""
    rates = protocol.training.learning_rates
    return {name: rates[0] if len(rates) == 1 else rates[model.layer_of(name) - 1]
            for name in model.parameter_shapes()}


def evaluate(bench: Bench, model: Model, inputs: np.ndarray, labels: np.ndarray,
             settle: Settle, batch_size: int,
             faults: FaultPolicy | None = None) -> dict[str, float]:
    """Free-phase accuracy and cost on a labelled set (evaluated only: never trained on). A
    sample that read back a non-finite state counts as wrong and costs nothing, and so does
    every sample of a batch the fault policy gave up on; one that did not settle is scored on
    the state it reached. ``unsettled`` counts all three kinds; ``nonfinite`` and ``skipped``
    two of them."""
    correct, cost, unsettled, nonfinite, skipped = 0, 0.0, 0, 0, 0
    for start in range(0, len(labels), batch_size):
        x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
        try:
            free = (bench.relax(x, settle=settle) if faults is None else
                    faults.call("evaluation", bench.relax, x, settle=settle))
        except SkipBatch:
            skipped += len(y)
            continue
        finite = np.all(np.isfinite(free.state), axis=1)
        correct += int(np.sum((model.predict(free.state) == y) & finite))
        cost += float(np.sum(model.cost(free.state[finite], model.encode_target(y[finite]))))
        nonfinite += int(np.count_nonzero(~finite))
        unsettled += int(np.count_nonzero(~(free.converged & finite)))
    n = max(len(labels), 1)
    return {"accuracy": correct / n, "loss": cost / n, "unsettled": unsettled + skipped,
            "nonfinite": nonfinite, "skipped": skipped}


def write_policy(protocol: Protocol) -> WritePolicy:
    cfg = protocol.writes
    return WritePolicy(cfg.rounding, cfg.out_of_range, cfg.accumulate, cfg.verify,
                       cfg.verify_tolerance_lsb, cfg.verify_stop_fraction, cfg.write_budget,
                       cfg.shadow)


def choose_calibration(protocol: Protocol, store: RunStore, bench: Bench,
                       identity: BenchIdentity) -> tuple[dict[str, CodeMap], str | None]:
    """The code maps a run writes through, and the calibration record they come from."""
    choice = protocol.writes.calibration
    if choice == "none" or not any(s.levels for s in bench.spec.parameters):
        return {}, None
    if choice == "newest":
        record = store.newest_calibration(identity.as_dict())
        if record is None:
            return {}, None
    else:
        record = store.calibration(choice)
        if not record.matches(identity):
            raise CalibrationError(
                f"calibration {record.id} belongs to {record.identity}, not to this bench "
                f"{identity.as_dict()}; refused")
    return record.code_maps(bench), record.id


def code_snapshot(writes: WritePath) -> dict[str, dict[str, np.ndarray]]:
    """Arrays stored with a checkpoint: the shadow, and the codes the bench holds."""
    arrays = {"checkpoint": writes.shadow}
    if writes.codes:
        arrays["codes"] = writes.codes
    return arrays


def write_totals(writes: WritePath) -> dict[str, float]:
    """Per-parameter write counts and code changes per channel (max), as metrics."""
    out: dict[str, float] = {"writes_clipped": writes.clipped_total}
    for name, count in writes.writes.items():
        out[f"writes_{name}"] = count
    for name, changes in writes.changes.items():
        out[f"code_changes_max_{name}"] = int(changes.max(initial=0))
    return out


def settled_mask(phases: list[Relaxation]) -> np.ndarray:
    """Samples whose every phase converged and read back finite states."""
    ok = np.ones(phases[0].state.shape[0], dtype=bool)
    for phase in phases:
        ok &= phase.converged & np.all(np.isfinite(phase.state), axis=1)
    return ok


def _bad(phases: list[Relaxation], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(non-finite, unsettled but finite) masks over ``size`` samples, across ``phases``."""
    nonfinite = np.zeros(size, dtype=bool)
    unsettled = np.zeros(size, dtype=bool)
    for phase in phases:
        nonfinite |= ~np.all(np.isfinite(phase.state), axis=1)
        unsettled |= ~phase.converged
    return nonfinite, unsettled & ~nonfinite


def sample_counts(free: Relaxation, free_ok: np.ndarray,
                  nudged: list[Relaxation]) -> dict[str, int]:
    """One step's :data:`SAMPLE_COUNTS` (``nudged`` phases ran on the ``free_ok`` samples)."""
    free_nonfinite, free_unsettled = _bad([free], len(free_ok))
    nudged_nonfinite, nudged_unsettled = _bad(nudged, int(free_ok.sum()))
    counts = {"samples_free_nonfinite": int(free_nonfinite.sum()),
              "samples_free_unsettled": int(free_unsettled.sum()),
              "samples_nudged_nonfinite": int(nudged_nonfinite.sum()),
              "samples_nudged_unsettled": int(nudged_unsettled.sum()),
              "samples_skipped": 0}
    counts["samples_used"] = len(free_ok) - sum(counts.values())
    return counts


# -- the run --------------------------------------------------------------------------------


class Trainer:
    """Runs a validated protocol on its bench, recording everything in a run store."""

    def __init__(self, loaded: LoadedProtocol, store: RunStore, *, progress: bool = True,
                 on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.loaded = loaded
        self.protocol = loaded.protocol
        self.store = store
        self.progress = progress
        self.on_epoch = on_epoch

    def run(self) -> RunResult:
        """A new run of the protocol."""
        protocol = self.protocol
        run_id = self.store.create_run(protocol.name, self.loaded.document, protocol.bench.name,
                                       protocol.seed, labep.__version__)
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

    def _execute(self, run_id: str, point: tuple[int, dict[str, Any]] | None) -> RunResult:
        protocol = self.protocol
        #: the step in progress's events, and the fault policy: committed whatever ends a run
        self._events: list[Event] = []
        self._faults: FaultPolicy | None = None
        self._step = 0 if point is None else point[0]
        bench: Bench | None = None
        try:
            with terminate_as_interrupt():  # SIGTERM ends a run like Ctrl-C
                data = load_dataset(protocol)
                model = build_model(protocol, data)
                bench = build_bench(protocol, model)
                # numba kernels parallelize over the samples of a batch; a BLAS pool spinning
                # on the same cores between kernel calls costs several times the work, so
                # BLAS runs on one thread during a run.
                with threadpool_limits(limits=1, user_api="blas"):
                    identity = bench.open()
                    try:
                        self.store.set_bench_identity(run_id, identity.as_dict())
                        result = self._train(run_id, bench, identity, model, data, point)
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

    def _restore(self, run_id: str, point: tuple[int, dict[str, Any]], bench: Bench,
                 identity: BenchIdentity, faults: FaultPolicy,
                 optimizer: Optimizer) -> WritePath:
        """The write path, the optimizer and the bench as they were at a resume point: the
        same calibration (refused if it belongs to another bench), the shadow, the codes, the
        counters, the optimizer's moments; a simulator's whole state, or a hardware bench's
        parameters written again."""
        step, state = point
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
        writes = WritePath(bench, found[1], write_policy(self.protocol), maps,
                           stream(self.protocol.seed, 4))
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

    def _train(self, run_id: str, bench: Bench, identity: BenchIdentity, model: Model,
               data: Split, point: tuple[int, dict[str, Any]] | None) -> RunResult:
        protocol = self.protocol
        training = protocol.training
        estimator = make_estimator(protocol.estimator.name, protocol.estimator.random_sign)
        free_settle, nudged_settle = settles(protocol)
        # an estimator over sample sets (thermal bench) keeps the training phases' readouts
        train_free, train_nudged = ((replace(free_settle, samples=True),
                                     replace(nudged_settle, samples=True))
                                    if estimator.samples else (free_settle, nudged_settle))
        optimizer = make_optimizer(training.optimizer, learning_rates(protocol, model))
        faults = self._faults = FaultPolicy(protocol.faults, bench)
        position: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0,
                                    "correct": 0, "seen": 0, "test": {}}
        if point is None:
            maps, calibration_id = choose_calibration(protocol, self.store, bench, identity)
            self.store.set_calibration(run_id, calibration_id)
            writes = WritePath(bench, model.init_params(stream(protocol.seed, 0)),
                               write_policy(protocol), maps, stream(protocol.seed, 4))
            # given up on: the bench is out of step, and the first step writes it (resync)
            with contextlib.suppress(SkipBatch):
                faults.call("write", writes.write_all)
            state, arrays = self._resume_state(position, writes, faults, bench, optimizer)
            self.store.save_start(run_id, {**code_snapshot(writes), "resume": arrays}, state)
            self.store.record_events(run_id, 0, faults.take_events())
        else:
            writes = self._restore(run_id, point, bench, identity, faults, optimizer)
            position = {key: point[1][key] for key in position}
        step_phases = _StepPhases(bench, model, estimator, optimizer, writes, faults,
                                  train_free, train_nudged, protocol)

        n_train = len(data.train_labels)
        batches = -(-n_train // training.batch_size)
        step = self._step = position["step"]
        test: dict[str, float] = position["test"]
        epoch_loss = float("nan")
        bar = tqdm(total=training.epochs * batches, initial=step, unit="step",
                   disable=not self.progress, dynamic_ncols=True, desc=protocol.name)
        try:
            for epoch in range(position["epoch"], training.epochs):
                order = stream(protocol.seed, 1, epoch).permutation(n_train)
                first = position["batch"] if epoch == position["epoch"] else 0
                loss_sum, correct, seen = ((position["loss_sum"], position["correct"],
                                            position["seen"]) if first else (0.0, 0, 0))
                started = time.perf_counter()
                for index in range(first, batches):
                    rows = order[index * training.batch_size:(index + 1) * training.batch_size]
                    events = self._events = []
                    scale = schedule_scale(training.schedule, step, batches, training.epochs)
                    signs = stream(protocol.seed, 2, epoch, index) if estimator.random else None
                    metrics, cost, hits = step_phases.run(
                        data.train_inputs[rows], data.train_labels[rows], signs, scale, step,
                        events)
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
                            {"epoch": epoch, "batch": index + 1, "step": step,
                             "loss_sum": loss_sum, "correct": correct, "seen": seen,
                             "test": test}, writes, faults, bench, optimizer)
                        snapshot = {**code_snapshot(writes), "resume": resume_arrays}
                    self.store.commit_step(run_id, step, epoch, metrics, arrays=snapshot,
                                           events=events, resume=resume)
                    self._events = []
                    self._step = step
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / max(seen, 1):.4f}",
                                    acc=f"{correct / max(seen, 1):.3f}",
                                    test=f"{test['accuracy']:.3f}" if test else "-")
                train_seconds = time.perf_counter() - started
                # evaluate what the shadow holds (after the epoch's last resume point); if the
                # policy gives up, the pending updates stay in the shadow for the next write
                with contextlib.suppress(SkipBatch):
                    faults.call("write", writes.flush)
                epoch_loss = loss_sum / max(seen, 1)
                epoch_metrics = {"train_loss": epoch_loss,
                                 "train_accuracy": correct / max(seen, 1),
                                 "train_seconds": train_seconds,
                                 "samples_per_second": seen / max(train_seconds, 1e-12)}
                final = epoch == training.epochs - 1
                if (epoch + 1) % protocol.evaluation.every_epochs == 0 or final:
                    test = self._evaluate(bench, model, data, free_settle, writes, faults)
                    self.store.record_events(run_id, step, faults.take_events())
                    if test:
                        epoch_metrics.update({"test_accuracy": test["accuracy"],
                                              "test_loss": test["loss"],
                                              "test_unsettled": test["unsettled"],
                                              "test_nonfinite": test["nonfinite"],
                                              "test_skipped": test["skipped"],
                                              "test_samples": len(data.test_labels)})
                epoch_metrics["epoch"] = epoch + 1
                epoch_metrics.update(write_totals(writes))
                if faults.total:
                    epoch_metrics.update({"faults_total": faults.total,
                                          "skipped_batches": faults.skipped_batches})
                if isinstance(bench, LinkReporting):
                    epoch_metrics.update({f"link_{name}": value for name, value
                                          in bench.link_quality().items()})
                self.store.record_metrics(run_id, step, epoch_metrics)
                if self.on_epoch is not None:
                    self.on_epoch(epoch, epoch_metrics)
        finally:
            bar.close()
        return RunResult(run_id, "completed", test.get("accuracy"), epoch_loss, step)

    def _evaluate(self, bench: Bench, model: Model, data: Split, settle: Settle,
                  writes: WritePath, faults: FaultPolicy) -> dict[str, float]:
        """The test set's free phase, on a bench that holds the shadow's parameters: a bench
        left out of step by a failed write is written first; if that is given up on too, no
        evaluation (an event says so) rather than one of parameters the run does not hold."""
        try:
            if writes.unsynced:
                faults.call("write (resync)", writes.resync)
        except SkipBatch:
            faults.events.append(("evaluation_skipped", "the bench does not hold the shadow's "
                                  "parameters (a write was given up on): no evaluation",
                                  {"unsynced": sorted(writes.unsynced)}))
            return {}
        return evaluate(bench, model, data.test_inputs, data.test_labels, settle,
                        self.protocol.evaluation.batch_size, faults)


@dataclass
class _StepPhases:
    """One training step: (re-sync,) free phase, nudged phases, estimate, update, write."""

    bench: Bench
    model: Model
    estimator: Any
    optimizer: Optimizer
    writes: WritePath
    faults: FaultPolicy
    free_settle: Settle
    nudged_settle: Settle
    protocol: Protocol

    def run(self, x: np.ndarray, labels: np.ndarray, signs: np.random.Generator | None,
            scale: float, step: int, events: list[Event]
            ) -> tuple[dict[str, float], float, int]:
        """The step's metrics, summed cost and correct predictions (0, 0 for a batch the
        fault policy gave up on). ``events`` collects what the step records."""
        faults, writes, bench, model = self.faults, self.writes, self.bench, self.model
        estimator = self.estimator
        target = model.encode_target(labels)
        strengths = estimator.strengths(self.protocol.estimator.beta, signs)
        correction = self.protocol.estimator.correction
        metrics: dict[str, float] = {}
        try:
            if writes.unsynced:  # a write failed: re-read the bench, write what differs
                report = faults.call("write (resync)", writes.resync)
                events.append(("resynced", "after a failed write: re-read the bench and wrote "
                               "what differed from the shadow",
                               {"changed": report.changed}))
            free = faults.call("free phase", bench.relax, x, settle=self.free_settle)
            # a sample whose free phase did not settle is left out of the update, so it is
            # not nudged either: its nudge, computed from a state that is not steady, could be
            # anything (a dark readout's is unbounded)
            free_ok = settled_mask([free])
            nudged = ([faults.call(f"nudged phase (beta {s:+g})", bench.relax, x[free_ok],
                                   Nudge(s, target[free_ok], correction),
                                   start=free.state[free_ok], settle=self.nudged_settle)
                       for s in strengths] if free_ok.any() else [])
            ok = free_ok.copy()
            if nudged:
                ok[free_ok] = settled_mask(nudged)
            counts = sample_counts(free, free_ok, nudged)
            if not ok.all():
                detail = {"samples": int(np.count_nonzero(~ok)), **counts,
                          "free_residual": float(np.max(free.residual)),
                          "nudged_residual": max((float(np.max(p.residual))
                                                  for p in nudged), default=0.0)}
                if self.protocol.phases.on_unsettled == "stop":
                    raise UnsettledPhaseError(
                        f"step {step}: {detail['samples']} sample(s) did not settle "
                        f"(residuals {detail}); protocol says on_unsettled: stop")
                events.append(("unsettled", "samples left out of the update", detail))
            if ok.any():
                # only settled, finite samples enter the estimate (a zero weight would still
                # carry a NaN readout into the contrast: 0 * NaN)
                used = (x, free, nudged) if ok.all() else (
                    x[ok], free.rows(ok), [p.rows(ok[free_ok]) for p in nudged])
                extra = ({"target": target if ok.all() else target[ok]}
                         if estimator.samples else {})
                estimate = estimator.estimate(model, *used, strengths,
                                              np.ones(int(ok.sum())), **extra)
                metrics.update(estimate.metrics())
                metrics["lr_scale"] = scale
                metrics.update(self._update(estimate.gradient, scale, events))
        except SkipBatch as gave_up:
            faults.skip(str(gave_up), len(labels))
            return ({"skipped": 1, **dict.fromkeys(SAMPLE_COUNTS, 0),
                     "samples_skipped": len(labels)}, 0.0, 0)
        cost = model.cost(free.state, target)
        hits = int(np.sum(model.predict(free.state) == labels))
        metrics.update(counts)
        metrics.update({
            "loss": float(cost.mean()),
            "batch_accuracy": hits / len(labels),
            "free_steps": float(np.mean(free.steps)),
            # none: thermal_covariance, or no free phase settled
            "nudged_steps": (float(np.mean([p.steps.mean() for p in nudged]))
                             if nudged else 0.0),
            "free_residual": float(np.max(free.residual)),
            "unsettled": int(np.count_nonzero(~ok)),
        })
        return metrics, float(cost.sum()), hits

    def _update(self, gradient: Params, scale: float, events: list[Event]) -> dict[str, float]:
        """theta <- theta - lr * estimate through the optimizer and the write path. A write
        the fault policy gives up on: under ``retry_phase`` the update stays in the shadow
        and the next step writes it; under ``skip`` it is dropped (the optimizer's state
        too) and the batch counts as skipped (:class:`SkipBatch`)."""
        policy = self.faults.config.policy
        saved = _copy_state(self.optimizer) if policy == "skip" else None
        update = self.optimizer.step(gradient, scale)
        try:
            report = self.faults.call("write", self.writes.apply, update)
        except SkipBatch:
            if saved is not None:
                self.optimizer.restore(*saved)
                raise
            self.writes.defer(update)
            events.append(("deferred", "write given up on: the update stays in the shadow and "
                           "the next step re-reads the bench and writes it",
                           {"unsynced": sorted(self.writes.unsynced)}))
            return {"write_deferred": 1}
        if report.clipped:
            events.append(("clipped", "parameter values clipped to the range "
                           "(writes.out_of_range: clip)", {"channels": report.clipped}))
        return report.metrics()


def _copy_state(optimizer: Optimizer) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta, arrays = optimizer.state()
    return copy.deepcopy(meta), {name: np.array(value) for name, value in arrays.items()}


def final_params(store: RunStore, run_id: str) -> Params:
    """The newest parameter snapshot of a run."""
    found = store.arrays(run_id, "checkpoint")
    if found is None:
        raise KeyError(f"run {run_id} has no parameter snapshot")
    return found[1]
