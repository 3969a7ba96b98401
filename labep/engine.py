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
from labep.bench import Bench, BenchIdentity, Nudge, Relaxation, Resumable, Settle
from labep.calibration import CalibrationError
from labep.datasets import Split, load_digits, load_idx_pair, load_xor
from labep.estimators import make_estimator
from labep.faults import FaultPolicy, SkipBatch
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
from labep.store import RunStore, StoreError
from labep.write_path import CodeMap, WritePath, WritePolicy


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
    """Free-phase accuracy and cost on a labelled set. A batch the fault policy gave up on
    counts as wrong and unsettled."""
    correct, cost, unsettled = 0, 0.0, 0
    for start in range(0, len(labels), batch_size):
        x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
        try:
            free = (bench.relax(x, settle=settle) if faults is None else
                    faults.call("evaluation", bench.relax, x, settle=settle))
        except SkipBatch:
            unsettled += len(y)
            continue
        correct += int(np.sum(model.predict(free.state) == y))
        cost += float(np.sum(model.cost(free.state, model.encode_target(y))))
        unsettled += int(np.count_nonzero(~free.converged))
    n = max(len(labels), 1)
    return {"accuracy": correct / n, "loss": cost / n, "unsettled": unsettled}


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
        try:
            data = load_dataset(protocol)
            model = build_model(protocol, data)
            bench = build_bench(protocol, model)
            # numba kernels parallelize over the samples of a batch; a BLAS pool spinning on
            # the same cores between kernel calls costs several times the work, so BLAS runs
            # on one thread during a run.
            with threadpool_limits(limits=1, user_api="blas"):
                identity = bench.open()
                try:
                    self.store.set_bench_identity(run_id, identity.as_dict())
                    result = self._train(run_id, bench, identity, model, data, point)
                finally:
                    bench.close()  # the bench's safe state, on success and on every error
        except KeyboardInterrupt:
            self.store.finish(run_id, "interrupted", "interrupted by the user (SIGINT)",
                              tb.format_exc())
            raise
        except BaseException as err:
            self.store.finish(run_id, "failed", f"{type(err).__name__}: {err}", tb.format_exc())
            raise
        self.store.finish(run_id, "completed")
        return result

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
        else:
            faults.call("write", writes.rewrite_held)
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
        faults = FaultPolicy(protocol.faults, bench)
        position: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "loss_sum": 0.0,
                                    "correct": 0, "seen": 0, "test": {}}
        if point is None:
            maps, calibration_id = choose_calibration(protocol, self.store, bench, identity)
            self.store.set_calibration(run_id, calibration_id)
            writes = WritePath(bench, model.init_params(stream(protocol.seed, 0)),
                               write_policy(protocol), maps, stream(protocol.seed, 4))
            faults.call("write", writes.write_all)
            state, arrays = self._resume_state(position, writes, faults, bench, optimizer)
            self.store.save_start(run_id, {**code_snapshot(writes), "resume": arrays}, state)
        else:
            writes = self._restore(run_id, point, bench, identity, faults, optimizer)
            position = {key: point[1][key] for key in position}

        n_train = len(data.train_labels)
        batches = -(-n_train // training.batch_size)
        step = position["step"]
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
                    x, labels = data.train_inputs[rows], data.train_labels[rows]
                    target = model.encode_target(labels)
                    signs = stream(protocol.seed, 2, epoch, index) if estimator.random else None
                    strengths = estimator.strengths(protocol.estimator.beta, signs)
                    correction = protocol.estimator.correction
                    events: list[tuple[str, str, dict[str, Any]]] = []
                    metrics: dict[str, float] = {}
                    try:
                        free = faults.call("free phase", bench.relax, x, settle=train_free)
                        # a sample whose free phase did not settle is left out of the update,
                        # so it is not nudged either: its nudge, computed from a state that is
                        # not steady, could be anything (a dark readout's is unbounded)
                        free_ok = settled_mask([free])
                        nudged = ([faults.call(f"nudged phase (beta {s:+g})", bench.relax,
                                               x[free_ok], Nudge(s, target[free_ok],
                                                                 correction),
                                               start=free.state[free_ok], settle=train_nudged)
                                   for s in strengths] if free_ok.any() else [])
                        ok = free_ok.copy()
                        if nudged:
                            ok[free_ok] = settled_mask(nudged)
                        if not ok.all():
                            detail = {"samples": int(np.count_nonzero(~ok)),
                                      "free_unsettled": int(np.count_nonzero(~free_ok)),
                                      "free_residual": float(np.max(free.residual)),
                                      "nudged_residual": max((float(np.max(p.residual))
                                                              for p in nudged), default=0.0)}
                            if protocol.phases.on_unsettled == "stop":
                                raise UnsettledPhaseError(
                                    f"step {step}: {detail['samples']} sample(s) did not "
                                    f"settle (residuals {detail}); protocol says "
                                    "on_unsettled: stop")
                            events.append(("unsettled", "samples left out of the update",
                                           detail))
                        if ok.any():
                            # only settled, finite samples enter the estimate (a zero weight
                            # would still carry a NaN readout into the contrast: 0 * NaN)
                            used = (x, free, nudged) if ok.all() else (
                                x[ok], free.rows(ok), [p.rows(ok[free_ok]) for p in nudged])
                            extra = ({"target": target if ok.all() else target[ok]}
                                     if estimator.samples else {})
                            estimate = estimator.estimate(model, *used, strengths,
                                                          np.ones(int(ok.sum())), **extra)
                            metrics.update(estimate.metrics())
                            scale = schedule_scale(training.schedule, step, batches,
                                                   training.epochs)
                            metrics["lr_scale"] = scale
                            update = optimizer.step(estimate.gradient, scale)
                            report = faults.call("write", writes.apply, update)
                            metrics.update(report.metrics())
                            if report.clipped:
                                events.append(("clipped", "parameter values clipped to the "
                                               "range (writes.out_of_range: clip)",
                                               {"channels": report.clipped}))
                        cost = model.cost(free.state, target)
                        hits = int(np.sum(model.predict(free.state) == labels))
                        loss_sum += float(cost.sum())
                        correct += hits
                        seen += len(rows)
                        metrics.update({
                            "loss": float(cost.mean()),
                            "batch_accuracy": hits / len(rows),
                            "free_steps": float(np.mean(free.steps)),
                            # none: thermal_covariance, or no free phase settled
                            "nudged_steps": (float(np.mean([p.steps.mean() for p in nudged]))
                                             if nudged else 0.0),
                            "free_residual": float(np.max(free.residual)),
                            "unsettled": int(np.count_nonzero(~ok)),
                        })
                    except SkipBatch:
                        metrics["skipped"] = 1
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
                    test = evaluate(bench, model, data.test_inputs, data.test_labels, free_settle,
                                    protocol.evaluation.batch_size, faults)
                    self.store.record_events(run_id, step, faults.take_events())
                    epoch_metrics.update({"test_accuracy": test["accuracy"],
                                          "test_loss": test["loss"],
                                          "test_unsettled": test["unsettled"]})
                epoch_metrics["epoch"] = epoch + 1
                epoch_metrics.update(write_totals(writes))
                if faults.total:
                    epoch_metrics.update({"faults_total": faults.total,
                                          "skipped_batches": faults.skipped_batches})
                self.store.record_metrics(run_id, step, epoch_metrics)
                if self.on_epoch is not None:
                    self.on_epoch(epoch, epoch_metrics)
        finally:
            bar.close()
        return RunResult(run_id, "completed", test.get("accuracy"), epoch_loss, step)


def final_params(store: RunStore, run_id: str) -> Params:
    """The newest parameter snapshot of a run."""
    found = store.arrays(run_id, "checkpoint")
    if found is None:
        raise KeyError(f"run {run_id} has no parameter snapshot")
    return found[1]
