"""The Lagrangian bench's simulator: stationary trajectories of the discretized action.

Physics: :class:`labep.models.lagrangian.LagrangianOscillators` (Massar). A phase finds the
trajectory q on the time grid where dS/dq = 0 (for a nudged phase: d(S - beta C)/dq = 0) by
Newton's method on the gradient, with the sparse Hessian (banded in time, periodic or with
fixed ends) solved by ``scipy.sparse.linalg.spsolve`` and a backtracking step on |dS/dq|. The
stationary point is generally a saddle of S, so the step is judged by the gradient's size, not
by S. A phase starts from ``start`` (a nudged phase from its free trajectory) or from rest
(q = 0). It has settled when max |dS/dq| / dt <= tolerance within ``max_steps`` Newton steps;
a singular Hessian (a drive harmonic meeting a normal mode: resonance) or a step that cannot
reduce the gradient leaves the sample unsettled.

Everything is exact float64: no imperfection is modelled (a hardware oscillator network would
read back its trajectory with a detector's noise; none is simulated here).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg
from pydantic import BaseModel, Field

from labep.hardware.bench import (
    BenchError,
    BenchIdentity,
    Nudge,
    Relaxation,
    Settle,
)
from labep.models.lagrangian import LagrangianOscillators
from labep.protocol.strict import STRICT_CONFIG
from labep.simulators.exact_parameters import ExactParameters

#: halvings of a Newton step before a sample is given up as unsettled
MAX_BACKTRACKS = 30


class LagrangianSimulatorOptions(BaseModel):
    """Options of the ``lagrangian`` simulator bench (``bench.options`` in a protocol)."""

    model_config = STRICT_CONFIG

    tolerance: float = Field(1e-9, gt=0.0, description="Default settle tolerance on "
                             "max |dS/dq| / dt.")
    max_steps: int = Field(50, ge=1, le=10_000, description="Default cap on Newton steps.")
    spring_range: float | None = Field(
        None, gt=0.0, description="|J| <= spring_range; writes outside are refused.")
    stiffness_range: float | None = Field(
        None, gt=0.0, description="|k|, |u| <= stiffness_range; writes outside are refused.")
    dtype: Literal["float64"] = Field(
        "float64", description="The precision of the trajectories (always float64; named so "
        "that `labep gradcheck` can ask for it as on every simulator).")


class LagrangianSimulator(ExactParameters):
    """Coupled nonlinear oscillators as a Bench: a phase is a Newton solve of dS/dq = 0."""

    name = "lagrangian"
    model_kinds = ("lagrangian_oscillators",)
    options_model = LagrangianSimulatorOptions

    def __init__(self, model: LagrangianOscillators,
                 options: LagrangianSimulatorOptions | None = None) -> None:
        self.model = model
        self.options = options or LagrangianSimulatorOptions()
        options = self.options
        self._store_parameters(model, lambda name: options.spring_range
                               if name.startswith("J") else options.stiffness_range,
                               "displacement")

    def open(self) -> BenchIdentity:
        sizes = "-".join(map(str, self.model.sizes))
        return BenchIdentity("labep", "lagrangian-simulator",
                             f"{self.name}-{sizes}-{self.model.boundary}", "newton")

    def save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The parameters (the solver keeps no other state)."""
        return {}, self.read_params()

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        for name in self._params:
            self._params[name] = np.array(arrays[name], dtype=np.float64)

    def relax(self, inputs: np.ndarray, nudge: Nudge | None = None,
              start: np.ndarray | None = None, settle: Settle | None = None) -> Relaxation:
        """The stationary trajectory of every sample (Newton on dE_beta/dq, E = -S)."""
        if settle is not None and settle.samples:
            raise BenchError(f"{self.name}: a deterministic bench has no sample sets")
        if nudge is not None and nudge.correction:
            raise BenchError(f"{self.name}: the non-conservative correction does not apply")
        settle = settle or Settle(self.options.tolerance, self.options.max_steps)
        inputs = np.asarray(inputs, dtype=np.float64)
        batch = len(inputs)
        state = (np.zeros((batch, self.model.state_size)) if start is None
                 else np.array(start, dtype=np.float64).reshape(batch, -1))
        strength = 0.0 if nudge is None else float(nudge.strength)
        steps = np.zeros(batch, dtype=np.int64)
        residual = np.empty(batch)
        converged = np.zeros(batch, dtype=bool)
        for index in range(batch):
            target = None if nudge is None else np.asarray(nudge.target[index:index + 1])
            state[index], steps[index], residual[index], converged[index] = self._solve(
                inputs[index:index + 1], state[index], strength, target, settle)
        return Relaxation(state, converged, steps, residual, {"solver": "newton"})

    def _solve(self, x: np.ndarray, q: np.ndarray, strength: float, target: np.ndarray | None,
               settle: Settle) -> tuple[np.ndarray, int, float, bool]:
        """Damped Newton for one sample: (trajectory, Newton steps, residual, settled)."""
        model = self.model
        scale = 1.0 / model.dt

        def gradient(row: np.ndarray) -> np.ndarray:
            return model.gradient_q(x, row[None], self._params, strength, target).ravel()

        current = gradient(q)
        size = float(np.max(np.abs(current))) * scale
        for step in range(settle.max_steps):
            if size <= settle.tolerance:
                return q, step, size, True
            hessian = model.hessian(x, q, self._params, strength)
            with warnings.catch_warnings():
                warnings.simplefilter("error", sparse_linalg.MatrixRankWarning)
                try:
                    move = sparse_linalg.spsolve(sparse.csc_matrix(hessian), -current)
                except (sparse_linalg.MatrixRankWarning, RuntimeError):
                    return q, step, size, False
            if not np.all(np.isfinite(move)):
                return q, step, size, False
            fraction = 1.0
            norm = float(np.linalg.norm(current))
            for _ in range(MAX_BACKTRACKS):
                trial = q + fraction * move
                trial_gradient = gradient(trial)
                if float(np.linalg.norm(trial_gradient)) < norm:
                    break
                fraction *= 0.5
            else:
                return q, step, size, False
            q, current = trial, trial_gradient
            size = float(np.max(np.abs(current))) * scale
        return q, settle.max_steps, size, size <= settle.tolerance
