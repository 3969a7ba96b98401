"""The run engine: epochs over mini-batches of free and nudged phases on a bench.

Per training step: relax the free phase with the inputs clamped, relax each nudged phase the
estimator asks for (starting from the free state), keep only the samples whose every phase
settled with a finite readout, estimate the gradient through the model, and apply
theta <- theta - lr * estimate through the write path. Every step is committed to the run store
in one transaction; parameter snapshots are stored every ``checkpoint_every`` steps and at the end
of each epoch. Random streams are derived from (seed, purpose, epoch, batch), so the data order
and nudge signs of any step are known without replaying the run.
"""

from __future__ import annotations

import time
import traceback as tb
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

import labep
from labep import registry
from labep.bench import Bench, BenchIdentity, Nudge, Relaxation, Settle
from labep.calibration import CalibrationError
from labep.datasets import Split, load_digits, load_idx_pair, load_xor
from labep.estimators import make_estimator
from labep.faults import FaultPolicy, SkipBatch
from labep.models import Model, Params
from labep.protocol import DigitsConfig, IdxConfig, LoadedProtocol, Protocol, XorConfig
from labep.store import RunStore
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


def build_model(protocol: Protocol) -> Model:
    cfg = protocol.model
    cls = registry.load_model_class(cfg.kind)
    return cls(**cfg.model_dump(exclude={"kind", "activation"}))


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
        protocol = self.protocol
        data = load_dataset(protocol)
        model = build_model(protocol)
        bench = build_bench(protocol, model)
        run_id = self.store.create_run(protocol.name, self.loaded.document, protocol.bench.name,
                                       protocol.seed, labep.__version__)
        try:
            # numba kernels parallelize over the samples of a batch; a BLAS pool spinning on
            # the same cores between kernel calls costs several times the work, so BLAS runs
            # on one thread during a run.
            with threadpool_limits(limits=1, user_api="blas"):
                identity = bench.open()
                try:
                    self.store.set_bench_identity(run_id, identity.as_dict())
                    result = self._train(run_id, bench, identity, model, data)
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

    def _train(self, run_id: str, bench: Bench, identity: BenchIdentity, model: Model,
               data: Split) -> RunResult:
        protocol = self.protocol
        training = protocol.training
        estimator = make_estimator(protocol.estimator.name, protocol.estimator.random_sign)
        free_settle, nudged_settle = settles(protocol)
        rates = learning_rates(protocol, model)
        maps, calibration_id = choose_calibration(protocol, self.store, bench, identity)
        self.store.set_calibration(run_id, calibration_id)
        writes = WritePath(bench, model.init_params(stream(protocol.seed, 0)),
                           write_policy(protocol), maps, stream(protocol.seed, 4))
        faults = FaultPolicy(protocol.faults, bench)
        faults.call("write", writes.write_all)
        for kind, named in code_snapshot(writes).items():
            self.store.save_arrays(run_id, 0, kind, named)

        n_train = len(data.train_labels)
        batches = -(-n_train // training.batch_size)
        step = 0
        test: dict[str, float] = {}
        epoch_loss = float("nan")
        bar = tqdm(total=training.epochs * batches, unit="step", disable=not self.progress,
                   dynamic_ncols=True, desc=protocol.name)
        try:
            for epoch in range(training.epochs):
                order = stream(protocol.seed, 1, epoch).permutation(n_train)
                loss_sum, correct, seen = 0.0, 0, 0
                started = time.perf_counter()
                for index in range(batches):
                    rows = order[index * training.batch_size:(index + 1) * training.batch_size]
                    x, labels = data.train_inputs[rows], data.train_labels[rows]
                    target = model.encode_target(labels)
                    signs = stream(protocol.seed, 2, epoch, index) if estimator.random else None
                    strengths = estimator.strengths(protocol.estimator.beta, signs)
                    events: list[tuple[str, str, dict[str, Any]]] = []
                    metrics: dict[str, float] = {}
                    try:
                        free = faults.call("free phase", bench.relax, x, settle=free_settle)
                        nudged = [faults.call(f"nudged phase (beta {s:+g})", bench.relax, x,
                                              Nudge(s, target), start=free.state,
                                              settle=nudged_settle) for s in strengths]
                        ok = settled_mask([free, *nudged])
                        if not ok.all():
                            detail = {"samples": int(np.count_nonzero(~ok)),
                                      "free_residual": float(np.max(free.residual)),
                                      "nudged_residual": max(float(np.max(p.residual))
                                                             for p in nudged)}
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
                                x[ok], free.rows(ok), [p.rows(ok) for p in nudged])
                            estimate = estimator.estimate(model, *used, strengths,
                                                          np.ones(int(ok.sum())))
                            update = estimate.gradient
                            for name, gradient in update.items():
                                gradient *= -rates[name]  # in place: theta <- theta - lr * g
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
                            "nudged_steps": float(np.mean([p.steps.mean() for p in nudged])),
                            "free_residual": float(np.max(free.residual)),
                            "unsettled": int(np.count_nonzero(~ok)),
                        })
                    except SkipBatch:
                        metrics["skipped"] = 1
                    step += 1
                    last = index == batches - 1
                    snapshot = code_snapshot(writes) if (step % training.checkpoint_every == 0
                                                         or last) else None
                    events += faults.take_events()
                    if faults.total:
                        metrics["faults"] = sum(1 for kind, _, _ in events if kind == "fault")
                    self.store.commit_step(run_id, step, epoch, metrics, arrays=snapshot,
                                           events=events)
                    if last:
                        writes.flush()  # evaluate what the shadow holds
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / max(seen, 1):.4f}",
                                    acc=f"{correct / max(seen, 1):.3f}",
                                    test=f"{test['accuracy']:.3f}" if test else "-")
                train_seconds = time.perf_counter() - started
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
