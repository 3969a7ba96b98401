"""The one assembly step: from a validated protocol and the registry, everything a run needs.

:func:`assemble` reads the protocol once and builds the data, the model (its encoding fitted
on the training inputs), the bench (not opened), the estimator, the optimizer with one
learning rate per parameter, the write policy, the fault policy and the settle criteria of
every phase, into one :class:`RunParts`. The engine runs it; ``labep gradcheck`` and the
benchmarks' sweeps assemble the same parts (with a bench option or an estimator overridden);
``labep calibrate`` builds the model and bench alone (:func:`build_bench_of`). Nothing here
reads a protocol section the others read again.

Random streams are derived from (seed, purpose, ...) (:func:`stream`): 0 initial parameters,
1 data order, 2 nudge signs, 3 gradient-check batch, 4 the write path's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from labep import registry
from labep.data.loaders import Split
from labep.ep.estimators import Estimator
from labep.ep.optimizers import Optimizer, make_optimizer
from labep.hardware.bench import Bench, BenchIdentity, Settle
from labep.hardware.calibration import CalibrationError
from labep.hardware.faults import FaultPolicy
from labep.hardware.write_path import CodeMap, WritePath, WritePolicy
from labep.models import Model, Params
from labep.protocol.sections import (
    BenchConfig,
    BenchDocument,
    EstimatorSection,
    ModelSection,
    Protocol,
)
from labep.store.runs import RunStore


def stream(seed: int, *purpose: int) -> np.random.Generator:
    """An independent random stream for (seed, purpose...): 0 init, 1 data order, 2 nudge
    sign, 3 gradient-check batch, 4 write rounding."""
    return np.random.default_rng([seed, *purpose])


def build_model(section: ModelSection, data: Split | None = None) -> Model:
    """The model of a ``model`` section; with ``data``, an encoding fitted on the training
    inputs (a model's ``fit_encoding``, e.g. the polariton lattice's pca) is fitted there."""
    model = registry.model_class(section.kind)(**section.model_arguments())
    fit = getattr(model, "fit_encoding", None)
    if data is not None and fit is not None:
        fit(data.train_inputs)
    return model


def build_bench(section: BenchConfig, model: Model, **overrides: Any) -> Bench:
    """The bench of a ``bench`` section, not opened; ``overrides`` replace option fields.
    A driver gets its ``resource`` (it opens its transport from it in ``open()``)."""
    cls = registry.bench_class(section.kind, section.name)
    options = cls.options_model.model_validate({**section.options, **overrides})
    if section.kind == "driver":
        return cls(model, options, resource=section.resource)
    return cls(model, options)


def build_bench_of(document: Protocol | BenchDocument, **overrides: Any) -> tuple[Model, Bench]:
    """The model and the bench of a bench file or protocol (``labep calibrate``)."""
    model = build_model(document.model)
    return model, build_bench(document.bench, model, **overrides)


def build_estimator(section: EstimatorSection) -> Estimator:
    """The estimator an ``estimator`` section names, configured by it."""
    return registry.load("estimator", section.name).from_config(section)


def learning_rates(protocol: Protocol, model: Model) -> dict[str, float]:
    """One rate per coupling layer l, shared by W_l and b_l (``model.layer_of``)."""
    rates = protocol.training.learning_rates
    return {name: rates[0] if len(rates) == 1 else rates[model.layer_of(name) - 1]
            for name in model.parameter_shapes()}


@dataclass
class RunParts:
    """Everything a run of one protocol needs, built once by :func:`assemble`.

    ``free_settle``/``nudged_settle`` are the protocol's settle criteria (evaluation uses
    the free one); ``train_free``/``train_nudged`` the training phases', which also keep
    their readouts (``Settle.samples``) when the estimator takes sample sets."""

    protocol: Protocol
    data: Split
    model: Model
    bench: Bench
    estimator: Estimator
    optimizer: Optimizer
    write_policy: WritePolicy
    faults: FaultPolicy
    free_settle: Settle
    nudged_settle: Settle
    train_free: Settle
    train_nudged: Settle

    def initial_params(self, seed: int | None = None) -> Params:
        """Fresh parameters, as a run with ``seed`` (default the protocol's) starts."""
        return self.model.init_params(stream(self.protocol.seed if seed is None else seed, 0))

    def write_path(self, params: Params, maps: dict[str, CodeMap]) -> WritePath:
        """The write path from ``params`` through ``maps`` (its rounding stream seeded)."""
        return WritePath(self.bench, params, self.write_policy, maps,
                         stream(self.protocol.seed, 4))

    def calibration(self, store: RunStore, identity: BenchIdentity
                    ) -> tuple[dict[str, CodeMap], str | None]:
        """The code maps a new run writes through, and the calibration record they come from
        (``writes.calibration``: newest, none, or a record id refused if another bench's)."""
        choice = self.protocol.writes.calibration
        if choice == "none" or not any(s.levels for s in self.bench.spec.parameters):
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
        return record.code_maps(self.bench), record.id


def write_policy(protocol: Protocol) -> WritePolicy:
    cfg = protocol.writes
    return WritePolicy(cfg.rounding, cfg.out_of_range, cfg.accumulate, cfg.verify,
                       cfg.verify_tolerance_lsb, cfg.verify_stop_fraction, cfg.write_budget,
                       cfg.shadow)


def assemble(protocol: Protocol, *, estimator: EstimatorSection | None = None,
             **bench_overrides: Any) -> RunParts:
    """Build a run's parts from a validated protocol: ``estimator`` replaces the protocol's
    section, ``bench_overrides`` replace bench option fields (e.g. ``dtype="float64"``)."""
    data = protocol.dataset.load()
    model = build_model(protocol.model, data)
    bench = build_bench(protocol.bench, model, **bench_overrides)
    chosen = build_estimator(estimator or protocol.estimator)
    phases = protocol.phases
    free = Settle(phases.free.tolerance, phases.free.max_steps, phases.readout_average)
    nudged = Settle(phases.nudged.tolerance, phases.nudged.max_steps, phases.readout_average)
    # an estimator over sample sets (thermal bench) keeps the training phases' readouts
    train_free, train_nudged = ((replace(free, samples=True), replace(nudged, samples=True))
                                if chosen.samples else (free, nudged))
    optimizer = make_optimizer(protocol.training.optimizer, learning_rates(protocol, model))
    return RunParts(protocol, data, model, bench, chosen, optimizer, write_policy(protocol),
                    FaultPolicy(protocol.faults, bench), free, nudged, train_free,
                    train_nudged)
