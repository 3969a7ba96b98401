"""Optimizers: how an EP gradient estimate becomes a parameter step.

The engine hands every step's gradient estimate g (a dict of arrays, one per parameter) to an
optimizer, which returns the step delta-theta the write path then applies:

- ``sgd``: delta-theta = -eta g, eta the parameter's learning rate (``training.learning_rates``);
- ``adam`` (Kingma and Ba 2015): m <- beta1 m + (1 - beta1) g, v <- beta2 v + (1 - beta2) g^2,
  t <- t + 1, delta-theta = -eta m_hat / (sqrt(v_hat) + epsilon) with m_hat = m / (1 - beta1^t),
  v_hat = v / (1 - beta2^t). Adam rescales every parameter by its own gradient history, so
  parameters whose gradients differ by orders of magnitude (the local potentials of a
  polariton lattice near a double well and far from it) train at comparable rates.

A learning-rate schedule (``training.schedule``) scales every rate by a factor s(t) of the
training step t = 0 .. T - 1 (T = epochs x batches per epoch):

- ``constant``: s = 1;
- ``cosine``: s(t) = f + (1 - f) (1 + cos(pi t / T)) / 2, from 1 down towards the floor
  f = ``final_fraction``;
- ``step``: s(t) = ``factor`` ** (number of ``every_epochs``-epoch periods completed).

s depends on the step alone, and an optimizer's state (Adam's moments and step count) is part
of every resume point, so a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from labep.models import Params


class Sgd:
    """Plain gradient descent: delta-theta = -eta g."""

    name = "sgd"

    def __init__(self, rates: dict[str, float]) -> None:
        self.rates = dict(rates)

    def factors(self, gradient: Params, scale: float = 1.0) -> dict[str, float]:
        """-eta s(t) per parameter (``scale`` the schedule's s(t)): the step is the gradient
        times these, so the write path can take it in its own pass over the parameters
        (:meth:`labep.hardware.write_path.WritePath.apply`) instead of a pass here."""
        return {name: -self.rates[name] * scale for name in gradient}

    def step(self, gradient: Params, scale: float = 1.0) -> Params:
        """The step for one gradient estimate, every rate times ``scale`` (the schedule's
        s(t)); the arrays of ``gradient`` are reused."""
        for name, factor in self.factors(gradient, scale).items():
            gradient[name] *= factor
        return gradient

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"name": self.name}, {}

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        _check_name(self.name, meta)


class Adam:
    """Adam with bias correction; first and second moments per parameter element."""

    name = "adam"

    def __init__(self, rates: dict[str, float], beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8) -> None:
        self.rates = dict(rates)
        self.beta1, self.beta2, self.epsilon = float(beta1), float(beta2), float(epsilon)
        self.steps = 0
        self.first: dict[str, np.ndarray] = {}
        self.second: dict[str, np.ndarray] = {}

    def factors(self, gradient: Params, scale: float = 1.0) -> None:
        """None: Adam's step is not a fixed multiple of the gradient (see :meth:`Sgd.factors`)."""
        return None

    def step(self, gradient: Params, scale: float = 1.0) -> Params:
        """The step for one gradient estimate, every rate times ``scale`` (the schedule's
        s(t)); float64 moments, the update in the gradient's dtype."""
        self.steps += 1
        bias1 = 1.0 - self.beta1 ** self.steps
        bias2 = 1.0 - self.beta2 ** self.steps
        out: Params = {}
        for name, values in gradient.items():
            g = np.asarray(values, dtype=np.float64)
            first = self.first.setdefault(name, np.zeros_like(g))
            second = self.second.setdefault(name, np.zeros_like(g))
            first *= self.beta1
            first += (1.0 - self.beta1) * g
            second *= self.beta2
            second += (1.0 - self.beta2) * g * g
            delta = -self.rates[name] * scale * (first / bias1) / (np.sqrt(second / bias2)
                                                           + self.epsilon)
            out[name] = delta.astype(np.asarray(values).dtype)
        return out

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {f"first.{k}": v.copy() for k, v in self.first.items()}
        arrays.update({f"second.{k}": v.copy() for k, v in self.second.items()})
        return {"name": self.name, "steps": self.steps}, arrays

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        _check_name(self.name, meta)
        self.steps = int(meta["steps"])
        self.first = {k[len("first."):]: np.array(v, dtype=np.float64)
                      for k, v in arrays.items() if k.startswith("first.")}
        self.second = {k[len("second."):]: np.array(v, dtype=np.float64)
                       for k, v in arrays.items() if k.startswith("second.")}


Optimizer = Sgd | Adam


def _check_name(name: str, meta: dict[str, Any]) -> None:
    if meta.get("name", "sgd") != name:
        raise ValueError(f"the resume point holds a {meta.get('name')!r} optimizer state; the "
                         f"protocol asks for {name!r}")


def schedule_scale(config: Any, step: int, steps_per_epoch: int, epochs: int) -> float:
    """s(t), the factor a ``training.schedule`` puts on every learning rate at step t."""
    if config.name == "cosine":
        progress = step / max(steps_per_epoch * epochs, 1)
        return config.final_fraction + (1.0 - config.final_fraction) * 0.5 * (
            1.0 + math.cos(math.pi * progress))
    if config.name == "step":
        return config.factor ** (step // (steps_per_epoch * config.every_epochs))
    return 1.0


def make_optimizer(config: Any, rates: dict[str, float]) -> Optimizer:
    """The optimizer a protocol's ``training.optimizer`` names, with per-parameter rates."""
    if config.name == "sgd":
        return Sgd(rates)
    return Adam(rates, config.beta1, config.beta2, config.epsilon)
