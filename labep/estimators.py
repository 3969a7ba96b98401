"""EP gradient estimators, computed from read-back states through the model.

Each estimator names the nudge strengths it needs (besides the free phase, always relaxed
first) and turns the read-back steady states into a gradient estimate of the cost:

- ``one_sided`` (Scellier and Bengio 2017): (dE/dtheta(s^beta) - dE/dtheta(s^0)) / beta;
- ``symmetric`` (Laborieux et al. 2021): (dE/dtheta(s^+beta) - dE/dtheta(s^-beta)) / (2 beta),
  whose bias is O(beta^2) instead of O(beta).

The update is minus the learning rate times the estimate. Samples whose phases did not settle
are left out (``weights``); the estimate reports how many samples it rests on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from labep.bench import Relaxation
from labep.models import Model, Params


@dataclass
class Estimate:
    """A gradient estimate of the mean cost, with the number of samples it rests on."""

    gradient: Params
    samples: int


class Estimator(ABC):
    """Base: ``strengths(beta, rng)`` lists the nudged phases, ``estimate`` combines them."""

    name = ""
    #: whether ``strengths`` draws from its random stream (the engine skips making one if not)
    random = False

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


class OneSided(Estimator):
    """(dE/dtheta(s^beta) - dE/dtheta(s^0)) / beta; optionally a random sign of beta per batch."""

    name = "one_sided"

    def __init__(self, random_sign: bool = False) -> None:
        self.random_sign = random_sign
        self.random = random_sign

    def strengths(self, beta: float, rng: np.random.Generator | None) -> list[float]:
        assert rng is not None or not self.random_sign
        sign = rng.choice((-1.0, 1.0)) if self.random_sign else 1.0
        return [sign * beta]

    def estimate(self, model, inputs, free, nudged, strengths, weights):
        (beta,) = strengths
        gradient = model.contrast(inputs, nudged[0].state, free.state, weights, 1.0 / beta)
        return Estimate(gradient, int(np.count_nonzero(weights)))


class Symmetric(Estimator):
    """(dE/dtheta(s^+beta) - dE/dtheta(s^-beta)) / (2 beta)."""

    name = "symmetric"

    def strengths(self, beta: float, rng: np.random.Generator) -> list[float]:
        return [beta, -beta]

    def estimate(self, model, inputs, free, nudged, strengths, weights):
        beta = strengths[0]
        gradient = model.contrast(inputs, nudged[0].state, nudged[1].state, weights,
                                  1.0 / (2.0 * beta))
        return Estimate(gradient, int(np.count_nonzero(weights)))


def make_estimator(name: str, random_sign: bool = False) -> Estimator:
    if name == "one_sided":
        return OneSided(random_sign)
    if name == "symmetric":
        return Symmetric()
    raise ValueError(f"unknown estimator {name!r}; known: one_sided, symmetric")
