"""Compare an EP estimate with the exact gradient on a simulator (``labep gradcheck``).

The exact gradient of the mean cost at the free steady state comes from implicit
differentiation through the fixed point (the model's ``exact_gradient``, float64). Both sides
are computed at states that settled to a tight tolerance in float64; a free state whose
residual is above tolerance is refused, never compared. For an estimator over Boltzmann sample
sets (its class's ``samples``) the reference is the exact gradient it targets, by enumeration
of every binary state (:mod:`labep.ep.thermal`).

The check runs on the parts :func:`labep.run.assembly.assemble` builds for a run (the bench
in float64, the estimator as asked), not on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from labep import registry
from labep.ep.thermal import exact_reference
from labep.hardware.bench import Nudge, Settle
from labep.models import Model, Params
from labep.protocol.sections import Protocol
from labep.run.assembly import RunParts, assemble, stream


class GradcheckError(RuntimeError):
    """The comparison was refused (states did not settle, or the bench is not a simulator)."""


@dataclass
class Comparison:
    cosine: float
    relative_error: float

    def as_dict(self) -> dict[str, float]:
        return {"cosine": self.cosine, "relative_error": self.relative_error}


def compare(estimate: np.ndarray, exact: np.ndarray) -> Comparison:
    """Cosine similarity and relative error |estimate - exact| / |exact|."""
    estimate, exact = np.ravel(estimate), np.ravel(exact)
    norm_e, norm_x = np.linalg.norm(estimate), np.linalg.norm(exact)
    if norm_x == 0.0:
        cosine = 1.0 if norm_e == 0.0 else 0.0
        return Comparison(cosine, 0.0 if norm_e == 0.0 else float("inf"))
    cosine = float(estimate @ exact / (norm_e * norm_x)) if norm_e > 0 else 0.0
    return Comparison(cosine, float(np.linalg.norm(estimate - exact) / norm_x))


def gradcheck_batch(parts: RunParts, samples: int | None, seed: int,
                    params: Params | None) -> tuple[Model, np.ndarray, np.ndarray, Params]:
    """What every gradient check compares on: the model, ``samples`` training inputs (default
    a batch) and their targets drawn from ``seed``, and ``params`` (default: fresh ones from
    ``seed``, as a run with that seed starts)."""
    data, model = parts.data, parts.model
    count = min(samples or parts.protocol.training.batch_size, len(data.train_labels))
    rows = stream(seed, 3).choice(len(data.train_labels), size=count, replace=False)
    x, labels = data.train_inputs[rows], data.train_labels[rows]
    params = parts.initial_params(seed) if params is None else params
    return model, x, model.encode_target(labels), params


def gradcheck(
    protocol: Protocol,
    *,
    beta: float | None = None,
    estimator: str | None = None,
    samples: int | None = None,
    seed: int | None = None,
    tolerance: float = 1e-10,
    max_steps: int = 100_000,
    params: Params | None = None,
    correction: bool | None = None,
    repeats: int = 8,
) -> dict[str, Any]:
    """EP estimate vs. exact gradient for one batch of training data on fresh parameters
    (drawn from ``seed``; or ``params`` given). ``correction`` (default: the protocol's
    ``estimator.correction``) runs the corrected nudge of non-conservative EP. On a bench
    with stochastic states (``mean_field_overrides``: spiking neurons) ``repeats`` estimates
    are compared (:func:`stochastic_gradcheck`). Returns a JSON-ready dict."""
    if protocol.bench.kind != "simulator":
        raise GradcheckError("gradcheck needs a simulator bench: the exact gradient is computed "
                             "from the model, and compared at states the simulator settles")
    seed = protocol.seed if seed is None else seed
    beta = protocol.estimator.beta if beta is None else beta
    name = estimator or protocol.estimator.name
    # the protocol's own estimator keeps its other settings (e.g. low_temperature's T)
    given = protocol.estimator.model_dump() if name == protocol.estimator.name else {}
    section = registry.load("estimator", name).config_model(**{**given, "name": name,
                                                               "beta": beta})
    cls = registry.bench_class(protocol.bench.kind, protocol.bench.name)
    # exact numerics: float64 on a bench with a precision option (a bench without one is
    # taken at its own arithmetic), and whatever else the bench names (e.g. no shot noise)
    precision = {"dtype": "float64"} if "dtype" in cls.options_model.model_fields else {}
    parts = assemble(protocol, estimator=section, **precision, **cls.exact_options)
    mean_field = getattr(parts.bench, "mean_field_overrides", lambda: None)()
    if mean_field is not None:  # stochastic spiking states vs their mean-field limit
        twin = assemble(protocol, estimator=section, **precision, **cls.exact_options,
                        **mean_field)
        return stochastic_gradcheck(parts, twin, beta=beta, samples=samples, seed=seed,
                                    tolerance=tolerance, max_steps=max_steps, params=params,
                                    repeats=repeats)
    if parts.estimator.samples:  # Boltzmann samples vs exact enumeration
        return thermal_gradcheck(parts, beta=beta, samples=samples, seed=seed, params=params)
    correction = protocol.estimator.correction if correction is None else correction
    model, x, target, params = gradcheck_batch(parts, samples, seed, params)
    count = len(x)
    settle = Settle(tolerance, max_steps)
    with parts.bench as bench:
        if correction and not bench.supports_correction:
            raise GradcheckError(f"bench {protocol.bench.name!r} cannot apply the "
                                 "non-conservative correction (J^T - J)(s - s0)")
        bench.write(params)
        free = bench.relax(x, settle=settle)
        host_residual = model.residual(x, free.state, params)
        worst = float(max(free.residual.max(), host_residual.max()))
        if not free.all_converged or worst > max(tolerance, 1e-9):
            raise GradcheckError(
                f"free phase did not settle: residual {worst:.3g} > tolerance {tolerance:.3g} "
                f"on {int(np.count_nonzero(~free.converged))} of {count} samples after "
                f"{int(free.steps.max())} steps; refusing to compare a gradient at a state "
                "that is not a fixed point (see the bench's settle options: more steps, damping, "
                "asynchronous order, a smaller step)"
            )
        est = parts.estimator
        strengths = est.strengths(beta, stream(seed, 2))
        nudged = [bench.relax(x, Nudge(s, target, correction), start=free.state,
                              settle=settle)
                  for s in strengths]
        for phase, strength in zip(nudged, strengths, strict=True):
            if not phase.all_converged:
                raise GradcheckError(
                    f"nudged phase (beta={strength:g}) did not settle: residual "
                    f"{phase.residual.max():.3g} > {tolerance:.3g}; refusing to compare")
        extra = {"target": target, "params": params} if est.needs_params else {}
        estimate = est.estimate(model, x, free, nudged, strengths, np.ones(count),
                                **extra).gradient
    exact = model.exact_gradient(x, free.state, target, params)
    names = list(exact)
    overall = compare(np.concatenate([estimate[k].ravel() for k in names]),
                      np.concatenate([exact[k].ravel() for k in names]))
    return {
        "estimator": name,
        "correction": correction,
        "beta": beta,
        "samples": count,
        "seed": seed,
        **overall.as_dict(),
        "free_residual": float(free.residual.max()),
        "free_steps": int(free.steps.max()),
        "parameters": {k: compare(estimate[k], exact[k]).as_dict() for k in names},
    }



def thermal_gradcheck(parts: RunParts, *, beta: float, samples: int | None, seed: int,
                      params: Params | None = None) -> dict[str, Any]:
    """``labep gradcheck`` for a thermal estimator: the estimate from the bench's samples
    (``phases.readout_average`` readouts a phase) vs the exact gradient it targets, by
    enumeration of every binary state (``units: binary``, at most 20 free units)."""
    protocol, est = parts.protocol, parts.estimator
    estimator = est.name
    model, x, target, params = gradcheck_batch(parts, samples, seed, params)
    count = len(x)
    options = protocol.bench.options
    if options.get("units") != "binary" or model.state_size > 20:
        raise GradcheckError("an exact thermal gradient is computed by enumerating every "
                             "state: it needs bench.options.units: binary and at most 20 free "
                             f"units (this model has {model.state_size})")
    settle = Settle(1.0, 1, readouts=protocol.phases.readout_average, samples=True)
    with parts.bench as bench:
        bench.write(params)
        free = bench.relax(x, settle=settle)
        strengths = est.strengths(beta, None)
        nudged = [bench.relax(x, Nudge(s, target), start=free.state, settle=settle)
                  for s in strengths]
        estimate = est.estimate(model, x, free, nudged, strengths, np.ones(count),
                                target=target)
    temperature = float(free.info["temperature"])
    exact = exact_reference(estimator, model, params, x, target, beta, temperature)
    names = list(exact)
    overall = compare(np.concatenate([estimate.gradient[k].ravel() for k in names]),
                      np.concatenate([exact[k].ravel() for k in names]))
    return {
        "estimator": estimator, "beta": beta, "samples": count, "seed": seed,
        "correction": False, "temperature": temperature,
        "readouts": estimate.readouts, **overall.as_dict(), **estimate.metrics(),
        "parameters": {k: compare(estimate.gradient[k], exact[k]).as_dict() for k in names},
    }


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        return float(array.mean()), 0.0
    return float(array.mean()), float(array.std(ddof=1) / np.sqrt(array.size))


def _flat(gradient: Params, names: list[str]) -> np.ndarray:
    return np.concatenate([np.ravel(gradient[k]) for k in names])


def stochastic_gradcheck(parts: RunParts, twin: RunParts, *, beta: float, samples: int | None,
                         seed: int, tolerance: float, max_steps: int, params: Params | None,
                         repeats: int) -> dict[str, Any]:
    """``labep gradcheck`` on a bench with stochastic states (StochEP's spiking neurons):
    ``repeats`` EP estimates, each from phases of the protocol's own length
    (``phases.free`` / ``phases.nudged``: T time steps, a fresh noise key per phase), against
    the exact gradient and against deterministic EP on the bench's mean-field ``twin`` (same
    parameters, fixed points settled to ``tolerance``). Every sample enters the stochastic
    estimate, settled or not (``unsettled`` counts those a run would leave out); the cosines
    are reported as mean and standard error over the repeats."""
    est = parts.estimator
    model, x, target, params = gradcheck_batch(twin, samples, seed, params)
    count = len(x)
    settle = Settle(tolerance, max_steps)
    strengths = est.strengths(beta, stream(seed, 2))
    with twin.bench as bench:
        bench.write(params)
        free = bench.relax(x, settle=settle)
        nudged = [bench.relax(x, Nudge(s, target), start=free.state, settle=settle)
                  for s in strengths]
        if not all(phase.all_converged for phase in (free, *nudged)):
            raise GradcheckError("the mean-field (deterministic) twin did not settle to "
                                 f"{tolerance:.3g}; refusing to compare")
        deterministic = est.estimate(model, x, free, nudged, strengths, np.ones(count)).gradient
    exact = model.exact_gradient(x, free.state, target, params)
    names = list(exact)
    flat_exact, flat_det = _flat(exact, names), _flat(deterministic, names)
    to_exact, to_ep, errors, spikes, unsettled, steps = [], [], [], [], 0, 0
    per_parameter: dict[str, list[Comparison]] = {k: [] for k in names}
    with parts.bench as bench:
        bench.write(params)
        for _ in range(repeats):
            sfree = bench.relax(x, settle=parts.free_settle)
            snudged = [bench.relax(x, Nudge(s, target), start=sfree.state,
                                   settle=parts.nudged_settle) for s in strengths]
            gradient = est.estimate(model, x, sfree, snudged, strengths, np.ones(count)).gradient
            for k in names:
                per_parameter[k].append(compare(gradient[k], exact[k]))
            estimate = _flat(gradient, names)
            overall = compare(estimate, flat_exact)
            to_exact.append(overall.cosine)
            errors.append(overall.relative_error)
            to_ep.append(compare(estimate, flat_det).cosine)
            phases = (sfree, *snudged)
            spikes.append(sum(int(p.info.get("spikes", 0)) for p in phases) / count)
            unsettled += int(sum(np.count_nonzero(~p.converged) for p in phases))
            steps = int(sum(int(p.steps.max()) for p in phases))
    cosine, cosine_se = _mean_stderr(to_exact)
    ep_cosine, ep_se = _mean_stderr(to_ep)
    return {
        "estimator": est.name, "correction": False, "beta": beta, "samples": count,
        "seed": seed, "repeats": repeats, "cosine": cosine, "cosine_stderr": cosine_se,
        "relative_error": float(np.mean(errors)),
        "cosine_to_deterministic_ep": ep_cosine, "cosine_to_deterministic_ep_stderr": ep_se,
        "deterministic_ep_cosine": compare(flat_det, flat_exact).cosine,
        "steps_per_estimate": steps, "spikes_per_sample": float(np.mean(spikes)),
        "unsettled_phases": unsettled,
        "parameters": {k: {"cosine": float(np.mean([c.cosine for c in cmps])),
                           "relative_error": float(np.mean([c.relative_error for c in cmps]))}
                       for k, cmps in per_parameter.items()},
    }
