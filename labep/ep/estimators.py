"""EP gradient estimators, computed from read-back states through the model.

Each estimator names the nudge strengths it needs (besides the free phase, always relaxed
first) and turns the read-back steady states into a gradient estimate of the cost:

- ``one_sided`` (Scellier and Bengio 2017): (dE/dtheta(s^beta) - dE/dtheta(s^0)) / beta;
- ``symmetric`` (Laborieux et al. 2021): (dE/dtheta(s^+beta) - dE/dtheta(s^-beta)) / (2 beta),
  whose bias is O(beta^2) instead of O(beta).
- ``finite_nudge`` (Litman): (<dE/dtheta>_beta - <dE/dtheta>_0) / beta over Boltzmann samples,
  the exact gradient of (F_beta - F_0) / beta at any finite beta;
- ``thermal_covariance`` (Massar and Mognetti): -(1/T) Cov(C, dE/dtheta) + <dC/dtheta> over
  free-phase samples only: no nudged phase.
- ``low_temperature`` (Massar and Mognetti's low-temperature expansion): the gradient of
  (F_beta - F_0) / beta to order 0 or 1 in T from the deterministic fixed points and the
  model's Hessian (:mod:`labep.ep.low_temperature`).

The update is minus the learning rate times the estimate. Samples whose phases did not settle
are left out (``weights``); the estimate reports how many samples it rests on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from labep.ep.low_temperature import low_temperature_gradient, missing_methods
from labep.ep.thermal import block_stderr, finite_nudge, relative_stderr, thermal_covariance
from labep.hardware.bench import Relaxation
from labep.models import Model, Params
from labep.protocol.sections import EstimatorSection


@dataclass
class Estimate:
    """A gradient estimate of the mean cost, with the number of samples it rests on.

    Estimators over sample sets (thermal benches) also report ``readouts`` (the readouts per
    sample) and ``stderr``, the standard error of each parameter's estimate (batch means over
    blocks of readouts), summarized by :meth:`metrics`."""

    gradient: Params
    samples: int
    readouts: int = 1
    stderr: Params | None = None

    def metrics(self) -> dict[str, float]:
        """``estimate_readouts`` and ``estimate_rel_stderr`` (|stderr| / |gradient|) of an
        estimate over sample sets; nothing for a deterministic one."""
        if self.stderr is None:
            return {}
        return {"estimate_readouts": float(self.readouts),
                "estimate_rel_stderr": float(relative_stderr(self.gradient, self.stderr))}


class OneSidedConfig(EstimatorSection):
    """``one_sided``: one nudged phase at +beta (or a random sign, ``random_sign``)."""

    name: Literal["one_sided"]


class SymmetricConfig(EstimatorSection):
    """``symmetric`` (the default): nudged phases at +beta and -beta."""

    name: Literal["symmetric"]


class FiniteNudgeConfig(EstimatorSection):
    """``finite_nudge``: Boltzmann sample sets (``phases.readout_average`` readouts a phase)
    from a bench at temperature T > 0, free and nudged at beta."""

    name: Literal["finite_nudge"]


class ThermalCovarianceConfig(EstimatorSection):
    """``thermal_covariance``: Boltzmann sample sets of the free phase only (``beta`` unused)
    from a bench at temperature T > 0."""

    name: Literal["thermal_covariance"]


class LowTemperatureConfig(EstimatorSection):
    """``low_temperature``: deterministic free and nudged fixed points (a bench at T = 0) and
    the model's Hessian; the expansion's temperature is ``temperature``."""

    name: Literal["low_temperature"]
    order: int = Field(1, description="0: deterministic EP (the T -> 0 limit); 1: plus the "
                       "O(T) Hessian term (T/2) d/dtheta [log det H_beta - log det H_0] / beta.")
    temperature: float = Field(description="T of the thermal free energy being expanded "
                               "(>= 0; at 0 order 1 is order 0).")

    @field_validator("order")
    @classmethod
    def _order(cls, order: int) -> int:
        if order not in (0, 1):
            raise ValueError(f"the expansion is implemented to order 0 or 1 in T, not {order}")
        return order

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, temperature: float) -> float:
        if not 0.0 <= temperature <= 1e6:
            raise ValueError(f"the temperature T of the expansion must be >= 0 (and at most "
                             f"1e6), got {temperature}")
        return temperature


class Estimator(ABC):
    """Base: ``strengths(beta, rng)`` lists the nudged phases, ``estimate`` combines them.

    Registered in the ``labep.ep.estimators`` entry-point group under its ``name``; its
    protocol section is ``config_model``."""

    name: ClassVar[str] = ""
    config_model: ClassVar[type[EstimatorSection]] = EstimatorSection
    #: whether ``strengths`` draws from its random stream (the engine skips making one if not)
    random = False
    #: whether it takes sample sets (``Settle.samples``, the readouts of a thermal bench); the
    #: engine then also passes ``target=`` (the batch's targets) to ``estimate``
    samples: ClassVar[bool] = False
    #: whether it estimates from deterministic steady states, so that the non-conservative
    #: correction (``estimator.correction``) applies to its nudged phases
    deterministic: ClassVar[bool] = False
    #: whether it differentiates the model beyond dE/dtheta (Hessians): the engine then also
    #: passes ``target=`` and ``params=`` (the parameters the host wrote) to ``estimate``
    needs_params: ClassVar[bool] = False

    @classmethod
    def check_protocol(cls, protocol: Any, model_class: Any, bench_options: Any
                       ) -> list[tuple[tuple[Any, ...], str]]:
        """Problems (location, message) of a protocol for this estimator that its section
        alone cannot show: the model (``model_class``) or the bench (its validated options,
        None if they did not validate). Called at protocol validation, before a bench opens."""
        return []

    @classmethod
    def from_config(cls, config: EstimatorSection) -> Estimator:
        """The estimator a protocol's section asks for."""
        return cls()

    @abstractmethod
    def strengths(self, beta: float, rng: np.random.Generator) -> list[float]:
        """The signed nudge strengths of the nudged phases, in the order they are relaxed."""

    @abstractmethod
    def estimate(
        self,
        model: Model,
        inputs: np.ndarray,
        free: Relaxation,
        nudged: list[Relaxation],
        strengths: list[float],
        weights: np.ndarray,
    ) -> Estimate:
        """Combine the free and nudged read-back states; ``weights`` masks unsettled samples."""


class NudgesOnce(Estimator):
    """An estimator with one nudged phase, at +beta or, with ``random_sign``, at a sign of
    beta drawn per batch from the engine's stream (+beta when no stream is given, as in
    ``labep gradcheck``)."""

    @classmethod
    def from_config(cls, config: EstimatorSection) -> Estimator:
        return cls(config.random_sign)

    def __init__(self, random_sign: bool = False) -> None:
        self.random_sign = random_sign
        self.random = random_sign

    def strengths(self, beta: float, rng: np.random.Generator | None) -> list[float]:
        sign = rng.choice((-1.0, 1.0)) if self.random_sign and rng is not None else 1.0
        return [sign * beta]


class OneSided(NudgesOnce):
    """(dE/dtheta(s^beta) - dE/dtheta(s^0)) / beta; optionally a random sign of beta per batch."""

    name = "one_sided"
    config_model = OneSidedConfig
    deterministic = True

    def estimate(self, model, inputs, free, nudged, strengths, weights):
        (beta,) = strengths
        gradient = model.contrast(inputs, nudged[0].state, free.state, weights, 1.0 / beta)
        return Estimate(gradient, int(np.count_nonzero(weights)))


class Symmetric(Estimator):
    """(dE/dtheta(s^+beta) - dE/dtheta(s^-beta)) / (2 beta)."""

    name = "symmetric"
    config_model = SymmetricConfig
    deterministic = True

    def strengths(self, beta: float, rng: np.random.Generator) -> list[float]:
        return [beta, -beta]

    def estimate(self, model, inputs, free, nudged, strengths, weights):
        beta = strengths[0]
        gradient = model.contrast(inputs, nudged[0].state, nudged[1].state, weights,
                                  1.0 / (2.0 * beta))
        return Estimate(gradient, int(np.count_nonzero(weights)))


class FiniteNudge(NudgesOnce):
    """(<dE/dtheta>_beta - <dE/dtheta>_0) / beta over Gibbs-Boltzmann samples (Litman, "EP
    without limits"): for any finite beta the exact gradient of (F_beta - F_0) / beta,
    F = -T log Z the free energy; as beta -> 0, the gradient of the expected cost <C>_0.
    Needs a bench at temperature T > 0 that returns samples (:mod:`labep.ep.thermal`)."""

    name = "finite_nudge"
    config_model = FiniteNudgeConfig
    samples = True

    def estimate(self, model, inputs, free, nudged, strengths, weights, target=None):
        (beta,) = strengths
        free_samples, nudged_samples = _samples(self.name, free), _samples(self.name, nudged[0])
        gradient = finite_nudge(model, inputs, free_samples, nudged_samples, beta, weights)
        stderr = block_stderr(lambda part: finite_nudge(
            model, inputs, free_samples[part], nudged_samples[part], beta, weights),
            free_samples.shape[0])
        return Estimate(gradient, int(np.count_nonzero(weights)), free_samples.shape[0],
                        stderr)


class ThermalCovariance(Estimator):
    """-(1/T) Cov(C, dE/dtheta) + <dC/dtheta> over free-phase samples at temperature T
    (Massar and Mognetti, "EP: the quantum and the thermal cases"): the gradient of the
    expected cost <C>, with no nudged phase at all (``strengths`` is empty: no output is ever
    clamped or nudged). The explicit term <dC/dtheta> comes from the model's
    ``explicit_cost_gradient`` if it has one (none: C does not depend on theta, as for the
    Hopfield and OIM models). T is the one the bench reports (``Relaxation.info``)."""

    name = "thermal_covariance"
    config_model = ThermalCovarianceConfig
    samples = True

    def strengths(self, beta: float, rng: np.random.Generator | None) -> list[float]:
        return []

    def estimate(self, model, inputs, free, nudged, strengths, weights, target=None):
        if target is None:
            raise ValueError("thermal_covariance needs the targets of the batch")
        samples = _samples(self.name, free)
        temperature = float(free.info.get("temperature", 0.0))
        if not temperature > 0.0:
            raise ValueError(f"{self.name}: the bench reported no temperature T > 0 with its "
                             "samples; the covariance estimate needs Boltzmann samples at T")
        explicit_of = getattr(model, "explicit_cost_gradient", None)

        def estimate(part: slice) -> Params:
            part_samples = samples[part]
            explicit = None if explicit_of is None else explicit_of(inputs, part_samples,
                                                                    target, weights)
            return thermal_covariance(model, inputs, part_samples, target, temperature,
                                      weights, explicit)

        gradient = estimate(slice(None))
        stderr = block_stderr(estimate, samples.shape[0])
        return Estimate(gradient, int(np.count_nonzero(weights)), samples.shape[0], stderr)


class LowTemperature(NudgesOnce):
    """The low-temperature expansion of thermal EP (Massar and Mognetti, "EP: the quantum and
    the thermal cases"): the gradient of (F_beta - F_0) / beta, F_beta = -T log Z_beta, to
    ``order`` 0 or 1 in T, from the deterministic fixed points s*_0 (free) and s*_beta
    (nudged at beta) and the Hessian H_beta = d^2(E + beta C)/ds^2:

        order 0: (dE/dtheta(s*_beta) - dE/dtheta(s*_0)) / beta (deterministic EP),
        order 1: + (T / 2) [Tr(H_beta^-1 dH_beta/dtheta) - Tr(H_0^-1 dH_0/dtheta)] / beta
                 (+ the saturated units' term, below),

    dH/dtheta the total derivative along s*(theta). Saturated units (at a wall of [0, 1],
    clipped by rho) are treated as clamped at the wall and left out of H; each contributes
    T log |dE_beta/ds_i| to F_beta (its density decays as exp(-|g_i| delta / T) away from the
    wall), differentiated along s* too (:mod:`labep.ep.low_temperature`). Order 1 is exact
    to O(T^2) where the interior units sit O(sqrt T) or more inside the box; for the layered
    Hopfield energy (quadratic in s) its error is then exponentially small. It needs a bench
    that settles deterministically (T = 0: the states are the fixed points) and a model with
    the Hessian methods (``state_gradient``, ``hessian``, ``hessian_gradient``,
    ``field_gradient``: the layered Hopfield network); ``temperature`` is the T of the
    thermal free energy it approximates."""

    name = "low_temperature"
    config_model = LowTemperatureConfig
    deterministic = True
    needs_params = True

    @classmethod
    def from_config(cls, config: EstimatorSection) -> Estimator:
        return cls(config.temperature, config.order, config.random_sign)

    def __init__(self, temperature: float, order: int = 1, random_sign: bool = False) -> None:
        super().__init__(random_sign)
        LowTemperatureConfig(name="low_temperature", temperature=temperature, order=order)
        self.temperature, self.order = float(temperature), int(order)

    @classmethod
    def check_protocol(cls, protocol, model_class, bench_options):
        problems = []
        if model_class is not None and missing_methods(model_class):
            problems.append((("model", "kind"), f"low_temperature needs the model's Hessian "
                             f"and its derivatives; {protocol.model.kind} has no "
                             f"{', '.join(missing_methods(model_class))}"))
        bench_temperature = float(getattr(bench_options, "sampling_temperature", 0.0) or 0.0)
        if bench_temperature > 0.0:
            problems.append((("bench", "options"), "low_temperature expands around the "
                             "deterministic fixed points; bench "
                             f"{protocol.bench.name!r} is at T = {bench_temperature:g} and "
                             "returns Boltzmann samples: run it at temperature 0 and give "
                             f"the expansion's T as estimator.temperature ({bench_temperature:g}"
                             " here)"))
        return problems

    def estimate(self, model, inputs, free, nudged, strengths, weights, target=None,
                 params=None):
        if target is None or params is None:
            raise ValueError("low_temperature needs the batch's targets and the parameters "
                             "(target=, params=)")
        (beta,) = strengths
        gradient = low_temperature_gradient(model, inputs, free.state, nudged[0].state,
                                            params, target, beta, self.temperature,
                                            self.order, weights)
        return Estimate(gradient, int(np.count_nonzero(weights)))


def _samples(name: str, phase: Relaxation) -> np.ndarray:
    """The sample set of a phase, or a clear error if the bench returned none."""
    if phase.samples is None:
        raise ValueError(f"the {name} estimator needs sample sets: a bench at temperature "
                         "T > 0 asked for readouts with Settle(samples=True)")
    return phase.samples

