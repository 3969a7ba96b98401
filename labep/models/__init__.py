"""Models: the physics of a bench, shared by its simulator and its hardware driver.

A model knows the energy E(x, s; theta) of a system, which local measurement of a read-back
state is dE/dtheta, the cost C and how a nudge enters. The host computes every EP update from
read-back states through the model, so a simulator and a driver of the same physics give the
same update for the same states.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

Params = dict[str, np.ndarray]


@runtime_checkable
class Model(Protocol):
    """What the host needs from a physical model."""

    input_size: int
    output_size: int
    state_size: int

    @property
    def output_slice(self) -> tuple[int, int]: ...

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]: ...

    def init_params(self, rng: np.random.Generator) -> Params: ...

    def layer_of(self, name: str) -> int:
        """The coupling layer (1-based) a parameter belongs to: its learning-rate group."""
        ...

    def contrast(
        self,
        inputs: np.ndarray,
        state_a: np.ndarray,
        state_b: np.ndarray,
        weights: np.ndarray | None = None,
        scale: float = 1.0,
    ) -> Params:
        """``scale`` times the sample-weighted mean of dE/dtheta(s_a) - dE/dtheta(s_b), for
        every parameter, as fresh arrays (the caller may modify them in place)."""
        ...

    def cost(self, state: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Per-sample cost C(s, y)."""
        ...

    def encode_target(self, labels: np.ndarray) -> np.ndarray: ...

    def predict(self, state: np.ndarray) -> np.ndarray: ...

    def exact_gradient(
        self, inputs: np.ndarray, state: np.ndarray, target: np.ndarray, params: Params
    ) -> Params:
        """d(mean C)/dtheta at the free steady state by implicit differentiation."""
        ...

    def residual(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """Per-sample fixed-point residual max|rho(h(s)) - s| of a read-back free state."""
        ...
