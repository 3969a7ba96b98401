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

The update is minus the learning rate times the estimate. Samples whose phases did not settle
are left out (``weights``); the estimate reports how many samples it rests on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

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


def _samples(name: str, phase: Relaxation) -> np.ndarray:
    """The sample set of a phase, or a clear error if the bench returned none."""
    if phase.samples is None:
        raise ValueError(f"the {name} estimator needs sample sets: a bench at temperature "
                         "T > 0 asked for readouts with Settle(samples=True)")
    return phase.samples

