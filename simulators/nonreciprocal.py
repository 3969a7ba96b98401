"""Numba simulator of the non-reciprocal layered network (a non-conservative EP bench).

Physics: :class:`labep.models.nonreciprocal.NonreciprocalLayered`. The settle loop integrates

    ds/dt = f(s) - beta dC/ds [+ (J^T - J)(s - s0)]

per sample with Euler steps of ``step_size`` dt (dt = 1 is the fixed-point iteration
s <- rho'(s) h(s); dt < 1 damps it, with the same fixed points), all layers at once; with
``integrator: adaptive`` (the default) unit k steps dt / max(1, -J_kk): a unit saturated by a
large field decays fast on its own (-J_kk = 1 - rho''(s_k) h_k reaches 10 and more on trained
MNIST networks) and plain Euler at dt = 0.5 overshoots it forever, although the dynamics are
stable. Each sample stops as soon as its residual, the largest component of the whole vector
field above, is at or below tolerance.

The nudge is vector-field EP (``Nudge.correction`` false: the cost gradient added to the same
dynamics) or the corrected nudge of Scurria et al. (2026) (``Nudge.correction`` true): the
term (J^T - J)(s - s0), J = df/ds at the free state s0 (the ``start`` of the nudged phase), is
computed matrix-free in the kernel, D (A^T - A) D (s - s0) with D = diag(rho'(s0)) evaluated
once per sample and A^T - A the antisymmetric part of the couplings, (M_l^T - W_l) between
layers l-1 and l.

The clamped input's drive x W_1 + b_1 is constant during a phase: computed once per clamp.
Parameter storage and device imperfections are those of
:class:`labep.simulators.layered.LayeredSimulator`; the effective backward couplings
M_l = (1 - a)((1 - a) W_l^T + a B_l) are formed from the values the device realizes.
"""

from __future__ import annotations

import math
from typing import Literal

import numba
import numpy as np
from pydantic import Field

from labep.hardware.bench import BenchError, Nudge, Relaxation, Settle
from labep.models.nonreciprocal import NonreciprocalLayered
from labep.simulators.device import read_out
from labep.simulators.layered import (
    LayeredSimulator,
    LayeredSimulatorOptions,
    coupling_block,
)


@numba.njit(cache=True, inline="always")
def _rate(value):
    """rho(u) = sigmoid(4u - 2)."""
    return 0.5 * (1.0 + math.tanh(2.0 * value - 1.0))


@numba.njit(cache=True)
def _add_row_times(vector, block, out, sign):
    """out += sign * vector @ block (block row-major (len(vector), len(out)))."""
    for i in range(vector.shape[0]):
        v = sign * vector[i]
        if v != 0.0:
            row = block[i]
            for j in range(out.shape[0]):
                out[j] += v * row[j]


@numba.njit(cache=True)
def _add_block_times(block, vector, out, sign):
    """out += sign * block @ vector (block row-major (len(out), len(vector)))."""
    for i in range(out.shape[0]):
        row = block[i]
        acc = 0.0
        for j in range(vector.shape[0]):
            acc += row[j] * vector[j]
        out[i] += sign * acc


@numba.njit(cache=True)
def field_row(sizes, offsets, forward, forward_offsets, backward, backward_offsets,
              antisymmetric, biases, drive, row, target, strength, correction, reference_slope,
              reference, rates, work, stiffness, out):
    """The vector field of one sample into ``out``; returns max |out|.

    f_l = -s_l + rho'(s_l) (W_l^T rho(s_{l-1}) + M_{l+1}^T rho(s_{l+1}) + b_l), the drive of
    layer 1 being ``drive`` = x W_1 + b_1; minus beta (s_L - y) on the outputs; plus, when
    ``correction``, D (A^T - A) D (s - s0) with ``reference_slope`` = rho'(s0).
    ``forward`` holds W_l (l >= 2, (n_{l-1}, n_l) row-major), ``backward`` M_l ((n_l, n_{l-1})),
    ``antisymmetric`` N_l = M_l^T - W_l ((n_{l-1}, n_l)); ``rates`` and ``work`` are scratch.
    ``stiffness`` gets max(1, -J_kk), the decay rate of each unit on its own:
    -J_kk = 1 - rho''(s_k) h_k (+ beta on the outputs; the correction has no diagonal).
    """
    n_layers = sizes.shape[0] - 1
    n_state = row.shape[0]
    for k in range(n_state):
        rates[k] = _rate(row[k])
    for layer in range(1, n_layers + 1):
        lo, n_here = offsets[layer - 1], sizes[layer]
        field = out[lo:lo + n_here]
        if layer == 1:
            field[:] = drive[:n_here]
        else:
            lo_b, n_below = offsets[layer - 2], sizes[layer - 1]
            field[:] = biases[lo:lo + n_here]
            block = coupling_block(forward, forward_offsets[layer - 2], n_below, n_here)
            _add_row_times(rates[lo_b:lo_b + n_below], block, field, 1.0)
        if layer < n_layers:
            lo_a, n_above = offsets[layer], sizes[layer + 1]
            block = coupling_block(backward, backward_offsets[layer - 1], n_above, n_here)
            _add_row_times(rates[lo_a:lo_a + n_above], block, field, 1.0)
    for k in range(n_state):
        r = rates[k]
        slope = 4.0 * r * (1.0 - r)
        stiffness[k] = max(1.0, 1.0 - 4.0 * slope * (1.0 - 2.0 * r) * out[k])
        out[k] = -row[k] + slope * out[k]
    lo_out = offsets[n_layers - 1]
    for j in range(sizes[n_layers]):
        out[lo_out + j] -= strength * (row[lo_out + j] - target[j])
        stiffness[lo_out + j] = max(1.0, stiffness[lo_out + j] + strength)
    if correction:
        # work = D (s - s0); then out += D [(A^T - A) work], layer by layer through N_l
        for k in range(n_state):
            work[k] = reference_slope[k] * (row[k] - reference[k])
        for k in range(n_state):
            rates[k] = 0.0  # reused as the accumulator of (A^T - A) work
        for layer in range(2, n_layers + 1):
            lo_b, n_below = offsets[layer - 2], sizes[layer - 1]
            lo, n_here = offsets[layer - 1], sizes[layer]
            block = coupling_block(antisymmetric, forward_offsets[layer - 2], n_below, n_here)
            # layer l gets work_{l-1} @ N_l, layer l-1 gets -N_l @ work_l
            _add_row_times(work[lo_b:lo_b + n_below], block, rates[lo:lo + n_here], 1.0)
            _add_block_times(block, work[lo:lo + n_here], rates[lo_b:lo_b + n_below], -1.0)
        for k in range(n_state):
            out[k] += reference_slope[k] * rates[k]
    residual = 0.0
    for k in range(n_state):
        residual = max(residual, abs(out[k]))
    return residual


@numba.njit(cache=True, parallel=True)
def settle_nonreciprocal(sizes, forward, forward_offsets, backward, backward_offsets,
                         antisymmetric, biases, drive, state, target, strength, correction,
                         reference, step_size, adaptive, tolerance, max_steps, steps_out,
                         residual_out, field_out):
    """Relax a batch in place by Euler steps s <- s + dt F(s), F the vector field of
    :func:`field_row`; writes each sample's steps, its final residual max |F(s)| and F at the
    final state (``field_out``; with ``max_steps`` 0, the field at the start).

    ``adaptive``: unit k steps dt / max(1, -J_kk) instead, so that a unit whose own decay is
    fast (a saturated sigmoid with a large field) does not overshoot; the fixed points are the
    same."""
    n_layers = sizes.shape[0] - 1
    offsets = np.zeros(n_layers, dtype=np.int64)
    for layer in range(1, n_layers):
        offsets[layer] = offsets[layer - 1] + sizes[layer]
    n_state = state.shape[1]
    for sample in numba.prange(state.shape[0]):
        row = state[sample]
        rates = np.empty(n_state, dtype=state.dtype)
        work = np.empty(n_state, dtype=state.dtype)
        slope = np.empty(n_state, dtype=state.dtype)
        field = np.empty(n_state, dtype=state.dtype)
        stiffness = np.empty(n_state, dtype=state.dtype)
        if correction:
            for k in range(n_state):
                r = _rate(reference[sample, k])
                slope[k] = 4.0 * r * (1.0 - r)
        residual = np.inf
        steps = 0
        fresh = False  # whether ``field`` is the field at the current state
        for _ in range(max_steps):
            residual = field_row(sizes, offsets, forward, forward_offsets, backward,
                                 backward_offsets, antisymmetric, biases, drive[sample], row,
                                 target[sample], strength, correction, slope, reference[sample],
                                 rates, work, stiffness, field)
            fresh = True
            if residual <= tolerance or not residual < np.inf:
                break
            if adaptive:
                for k in range(n_state):
                    row[k] += step_size * field[k] / stiffness[k]
            else:
                for k in range(n_state):
                    row[k] += step_size * field[k]
            fresh = False
            steps += 1
        if not fresh:  # the last step moved the state (or none was taken): measure it
            residual = field_row(sizes, offsets, forward, forward_offsets, backward,
                                 backward_offsets, antisymmetric, biases, drive[sample], row,
                                 target[sample], strength, correction, slope, reference[sample],
                                 rates, work, stiffness, field)
        steps_out[sample] = steps
        residual_out[sample] = residual
        field_out[sample, :] = field


class NonreciprocalSimulatorOptions(LayeredSimulatorOptions):
    """Options of the non-reciprocal simulator bench (``bench.options`` in a protocol)."""

    step_size: float = Field(
        0.5, gt=0.0, le=1.0,
        description="dt of the Euler step s <- s + dt f(s) (units of the unit time constant); "
        "1 is the undamped fixed-point iteration s <- rho'(s) h(s).")
    integrator: Literal["euler", "adaptive"] = Field(
        "adaptive",
        description="euler: every unit steps dt; adaptive: unit k steps dt / max(1, -J_kk) "
        "(its own decay rate), the same fixed points without overshooting saturated units.")


class NonreciprocalSimulator(LayeredSimulator):
    """The non-reciprocal layered network as a Bench; runs vector-field and corrected nudges."""

    name = "nonreciprocal"
    identity_model = "nonreciprocal-simulator"
    model_kinds = ("nonreciprocal",)
    options_model = NonreciprocalSimulatorOptions
    #: the bench applies the corrected nudge (J^T - J)(s - s0) when ``Nudge.correction``
    supports_correction = True
    transpose_from = 1 << 30  # every block row-major in its declared shape
    #: the range a readout's ``readout_bits`` cover: at a fixed point s = rho'(s) h, so |s|
    #: stays small (s = 2 needs a field h of about 200)
    readout_range = (-1.0, 2.0)

    def __init__(self, model: NonreciprocalLayered,
                 options: NonreciprocalSimulatorOptions | None = None) -> None:
        super().__init__(model, options or NonreciprocalSimulatorOptions())
        self._derived: tuple[int, tuple[np.ndarray, ...]] | None = None

    def _couplings(self) -> tuple[np.ndarray, ...]:
        """Flat buffers the kernel reads, rebuilt after every write: W_l, M_l and
        N_l = M_l^T - W_l for l = 2..L, with the offsets of W_l (shared by N_l) and M_l."""
        if self._derived is not None and self._derived[0] == self._version:
            return self._derived[1]
        model: NonreciprocalLayered = self.model
        params = {name: view for name, view in self._views.items()}
        backward = model.backward_couplings(params)
        layers = range(2, model.n_layers + 1)
        forward_blocks = [np.ravel(params[f"W{i}"]) for i in layers]
        backward_blocks = [np.ravel(backward[i]) for i in layers]
        anti_blocks = [np.ravel(backward[i].T - params[f"W{i}"]) for i in layers]
        sizes = [block.size for block in forward_blocks]
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64) if sizes else (
            np.zeros(0, dtype=np.int64))

        def flat(blocks: list[np.ndarray]) -> np.ndarray:
            if not blocks:
                return np.zeros(1, dtype=self.dtype)
            return np.ascontiguousarray(np.concatenate(blocks), dtype=self.dtype)

        derived = (flat(forward_blocks), offsets, flat(backward_blocks), offsets.copy(),
                   flat(anti_blocks))
        self._derived = (self._version, derived)
        return derived

    def _drive(self, inputs: np.ndarray) -> np.ndarray:
        return self._clamped(inputs, lambda x: np.ascontiguousarray(
            x @ self._views["W1"] + self._views["b1"], dtype=self.dtype))

    def _arguments(self, inputs: np.ndarray, nudge: Nudge | None, start: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, bool, np.ndarray]:
        inputs, state, strength, target = self._prepare(inputs, nudge, start)
        correction = bool(getattr(nudge, "correction", False)) if nudge is not None else False
        if correction:
            if start is None:
                raise BenchError(f"{self.name}: relax: the corrected nudge needs the free "
                                 "state s0 as its start (J is taken at s0)")
            reference = state.copy()
        else:
            reference = np.zeros_like(state)
        return inputs, state, strength, target, correction, reference

    def field(self, inputs: np.ndarray, state: np.ndarray, nudge: Nudge | None = None,
              reference: np.ndarray | None = None) -> np.ndarray:
        """The kernel's vector field at ``state``, the nudge included and, when
        ``nudge.correction``, the correction around the free state ``reference`` (for tests)."""
        inputs, _, strength, target, correction, ref = self._arguments(
            inputs, nudge, state if reference is None else reference)
        state = np.array(state, dtype=self.dtype, order="C", copy=True)
        return self._settle(inputs, state, strength, target, correction, ref,
                            Settle(0.0, 0))[2]

    def _settle(self, inputs: np.ndarray, state: np.ndarray, strength: float,
                target: np.ndarray, correction: bool, reference: np.ndarray, settle: Settle
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the kernel on ``state`` in place: (steps, residual, final vector field)."""
        forward, f_off, backward, b_off, anti = self._couplings()
        batch = inputs.shape[0]
        steps = np.zeros(batch, dtype=np.int64)
        residual = np.zeros(batch, dtype=np.float64)
        field = np.empty_like(state)
        settle_nonreciprocal(self._sizes, forward, f_off, backward, b_off, anti, self._biases,
                             self._drive(inputs), state, target, strength, correction,
                             reference, float(self.options.step_size),
                             self.options.integrator == "adaptive", float(settle.tolerance),
                             int(settle.max_steps), steps, residual, field)
        return steps, residual, field

    def relax(
        self,
        inputs: np.ndarray,
        nudge: Nudge | None = None,
        start: np.ndarray | None = None,
        settle: Settle | None = None,
    ) -> Relaxation:
        settle = settle or Settle(self.options.tolerance, self.options.max_steps)
        inputs, state, strength, target, correction, reference = self._arguments(
            inputs, nudge, start)
        steps, residual, _ = self._settle(inputs, state, strength, target, correction,
                                          reference, settle)
        state = read_out(state, self.options.device, self._readout_rng, settle.readouts,
                         *self.readout_range)
        return Relaxation(state, residual <= settle.tolerance, steps, residual)
