"""One training step, and the free-phase evaluation of a labelled set.

A step: (re-sync a bench left out of step by a failed write,) relax the free phase with the
inputs clamped, relax each nudged phase the estimator asks for from the free state (a sample
whose free phase did not settle is not nudged), keep only the samples whose every phase
settled with a finite readout, estimate the gradient through the model, and apply
theta <- theta - lr * estimate through the optimizer and the write path. Every sample of the
step is accounted for (:func:`phase_accounting`), and so is every measurement shot a bench
reports in its phases' ``info["shots"]`` (metric ``shots``: the update's, all phases), and every
spike a spiking bench reports in ``info["spikes"]`` (metrics ``spikes`` and
``spikes_per_sample``, free and nudged phases per sample of the batch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from labep.ep.estimators import Estimator
from labep.ep.optimizers import Optimizer
from labep.hardware.bench import Bench, Nudge, Relaxation, Settle, StepRelaxing
from labep.hardware.faults import FaultPolicy, SkipBatch
from labep.hardware.write_path import WritePath
from labep.models import Model, Params
from labep.protocol.sections import Protocol
from labep.store.files import SAMPLE_COUNTS

#: an event: (kind, message, detail)
Event = tuple[str, str, dict[str, Any]]


class UnsettledPhaseError(RuntimeError):
    """A phase did not settle and the protocol says ``on_unsettled: stop``."""


def evaluate(bench: Bench, model: Model, inputs: np.ndarray, labels: np.ndarray,
             settle: Settle, batch_size: int,
             faults: FaultPolicy | None = None) -> dict[str, float]:
    """Free-phase accuracy and cost on a labelled set (evaluated only: never trained on). A
    sample that read back a non-finite state counts as wrong and costs nothing, and so does
    every sample of a batch the fault policy gave up on; one that did not settle is scored on
    the state it reached. ``unsettled`` counts all three kinds; ``nonfinite`` and ``skipped``
    two of them. A spiking bench's free-phase spikes per evaluated sample are
    ``spikes_per_sample``."""
    correct, cost, unsettled, nonfinite, skipped = 0, 0.0, 0, 0, 0
    spikes: int | None = None  # a spiking bench's free-phase spikes: the inference cost
    for start in range(0, len(labels), batch_size):
        x, y = inputs[start:start + batch_size], labels[start:start + batch_size]
        try:
            free = (bench.relax(x, settle=settle) if faults is None else
                    faults.call("evaluation", bench.relax, x, settle=settle))
        except SkipBatch:
            skipped += len(y)
            continue
        if "spikes" in free.info:
            spikes = (spikes or 0) + int(free.info["spikes"])
        finite = np.all(np.isfinite(free.state), axis=1)
        correct += int(np.sum((model.predict(free.state) == y) & finite))
        cost += float(np.sum(model.cost(free.state[finite], model.encode_target(y[finite]))))
        nonfinite += int(np.count_nonzero(~finite))
        unsettled += int(np.count_nonzero(~(free.converged & finite)))
    n = max(len(labels), 1)
    out = {"accuracy": correct / n, "loss": cost / n, "unsettled": unsettled + skipped,
           "nonfinite": nonfinite, "skipped": skipped}
    if spikes is not None:
        out["spikes_per_sample"] = spikes / max(n - skipped, 1)
    return out


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


def phase_accounting(free: Relaxation, nudged: list[Relaxation]
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The samples whose free phase settled with a finite readout (``free_ok``), those whose
    every phase did (``ok``: the update's), and the step's :data:`SAMPLE_COUNTS`. ``nudged``
    phases ran on the ``free_ok`` samples; a sample is counted once, as non-finite if any
    phase read it back non-finite, else as unsettled if a phase did not converge (free
    first, then nudged)."""
    free_finite = free.finite
    free_ok = free.converged & free_finite
    size = free_ok.shape[0]
    counts = dict.fromkeys(SAMPLE_COUNTS, 0)
    every = bool(free_ok.all())
    if not every:
        counts["samples_free_nonfinite"] = int(np.count_nonzero(~free_finite))
        counts["samples_free_unsettled"] = int(np.count_nonzero(free_ok != free_finite))
    ok = free_ok
    if nudged:
        finite, converged = nudged[0].finite, nudged[0].converged
        for phase in nudged[1:]:
            finite = finite & phase.finite
            converged = converged & phase.converged
        nudged_ok = converged & finite
        if not nudged_ok.all():
            counts["samples_nudged_nonfinite"] = int(np.count_nonzero(~finite))
            counts["samples_nudged_unsettled"] = int(np.count_nonzero(nudged_ok != finite))
            if every:
                ok = nudged_ok
            else:
                ok = free_ok.copy()
                ok[free_ok] = nudged_ok
    counts["samples_used"] = size - sum(counts.values())
    return free_ok, ok, counts


def _mean(values: np.ndarray) -> float:
    """The mean of a small array (what np.mean gives, without its per-call machinery)."""
    return float(values.sum(dtype=np.float64)) / values.size if values.size else float("nan")


@dataclass
class StepPhases:
    """One training step: (re-sync,) free phase, nudged phases, estimate, update, write."""

    bench: Bench
    model: Model
    estimator: Estimator
    optimizer: Optimizer
    writes: WritePath
    faults: FaultPolicy
    free_settle: Settle
    nudged_settle: Settle
    protocol: Protocol

    def __post_init__(self) -> None:
        #: whether the bench runs a step's phases in one call (checked once, not per step)
        self._step_relaxing = isinstance(self.bench, StepRelaxing)

    def run(self, x: np.ndarray, labels: np.ndarray, signs: np.random.Generator | None,
            scale: float, step: int, events: list[Event]
            ) -> tuple[dict[str, float], float, int]:
        """The step's metrics, summed cost and correct predictions (0, 0 for a batch the
        fault policy gave up on). ``events`` collects what the step records."""
        faults, writes, model = self.faults, self.writes, self.model
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
            free, nudged = self._phases(x, target, strengths, correction)
            free_ok, ok, counts = phase_accounting(free, nudged)
            if counts["samples_used"] < len(ok):
                detail = {"samples": len(ok) - counts["samples_used"], **counts,
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
                         if estimator.samples or estimator.needs_params else {})
                if estimator.needs_params:
                    extra["params"] = writes.shadow
                estimate = estimator.estimate(model, *used, strengths,
                                              np.ones(int(ok.sum())), **extra)
                metrics.update(estimate.metrics())
                metrics["lr_scale"] = scale
                metrics.update(self._update(estimate.gradient, scale, events))
        except SkipBatch as gave_up:
            faults.skip(str(gave_up), len(labels))
            return ({"skipped": 1, **dict.fromkeys(SAMPLE_COUNTS, 0),
                     "samples_skipped": len(labels)}, 0.0, 0)
        cost = float(model.cost(free.state, target).sum(dtype=np.float64))
        hits = int(np.count_nonzero(model.predict(free.state) == labels))
        metrics.update(counts)
        # a bench that measures with shots (the quantum bench) reports each phase's
        shots = [int(p.info["shots"]) for p in (free, *nudged) if "shots" in p.info]
        if shots:
            metrics["shots"] = sum(shots)
        # a spiking bench (StochEP) counts its phases' spikes: the hardware cost of the step
        spikes = [int(p.info["spikes"]) for p in (free, *nudged) if "spikes" in p.info]
        if spikes:
            metrics["spikes"] = sum(spikes)
            metrics["spikes_per_sample"] = sum(spikes) / len(labels)
        metrics.update({
            "loss": cost / len(labels),
            "batch_accuracy": hits / len(labels),
            "free_steps": _mean(free.steps),
            # none: thermal_covariance, or no free phase settled
            "nudged_steps": (sum(_mean(p.steps) for p in nudged) / len(nudged)
                             if nudged else 0.0),
            "free_residual": float(free.residual.max()),
            "unsettled": len(labels) - counts["samples_used"],
        })
        return metrics, cost, hits

    def _phases(self, x: np.ndarray, target: np.ndarray, strengths: list[float],
                correction: bool) -> tuple[Relaxation, list[Relaxation]]:
        """The free phase, then the nudged phases of the samples whose free phase settled.

        A sample whose free phase did not settle is left out of the update, so it is not
        nudged either: its nudge, computed from a state that is not steady, could be
        anything (a dark readout's is unbounded). A :class:`StepRelaxing` bench runs them
        all in one call (the same Relaxations)."""
        bench, faults = self.bench, self.faults
        if strengths and self._step_relaxing:
            nudges = [Nudge(s, target, correction) for s in strengths]
            both = faults.call("free and nudged phases", bench.relax_step, x, nudges,
                               self.free_settle, self.nudged_settle)
            if both is not None:
                return both
        free = faults.call("free phase", bench.relax, x, settle=self.free_settle)
        free_ok = free.converged & free.finite  # as phase_accounting has it
        if not strengths or not free_ok.any():
            return free, []
        # the settled samples' inputs, targets and start states, selected once for every
        # nudged phase (the batch itself when all settled; the free state read-only, so a
        # bench that relaxed in place of its start would fail instead of changing it)
        if free_ok.all():
            inputs, targets, start = x, target, free.state.view()
            start.flags.writeable = False
        else:
            inputs, targets, start = x[free_ok], target[free_ok], free.state[free_ok]
        nudged = [faults.call(f"nudged phase (beta {s:+g})", bench.relax, inputs,
                              Nudge(s, targets, correction), start=start,
                              settle=self.nudged_settle)
                  for s in strengths]
        return free, nudged

    def _update(self, gradient: Params, scale: float, events: list[Event]) -> dict[str, float]:
        """theta <- theta - lr * estimate through the optimizer and the write path. A write
        the fault policy gives up on: under ``retry_phase`` the update stays in the shadow
        and the next step writes it; under ``skip`` it is dropped (the optimizer's state
        too) and the batch counts as skipped (:class:`SkipBatch`)."""
        policy = self.faults.config.policy
        saved = _copy_state(self.optimizer) if policy == "skip" else None
        # a linear optimizer's step (sgd: -eta s(t) g) is taken by the write path, in its pass
        # over the parameters; any other's is computed first
        factors = self.optimizer.factors(gradient, scale)
        update = gradient if factors is not None else self.optimizer.step(gradient, scale)
        try:
            report = self.faults.call("write", self.writes.apply, update, factors)
        except SkipBatch:
            if saved is not None:
                self.optimizer.restore(*saved)
                raise
            self.writes.defer(update, factors)
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
