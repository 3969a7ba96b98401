"""Numba simulator of a layered continuous Hopfield network (the classic EP bench).

Physics: :class:`labep.models.hopfield.LayeredHopfield`. The settle loop runs the fixed-point
update s_l <- (1 - a) s_l + a rho(h_l) per sample, either layer by layer in even/odd order
(asynchronous: exact block coordinate descent on E, converges without 2-cycles) or all layers
at once (synchronous: can fall into a 2-cycle on a symmetric network unless damped, a < 1).
Skip couplings S_{l,m} (Hopfield-ResNet) add to the fields of both their layers; a skip of even
span joins two layers of the same parity, and the even/odd sweep stays block coordinate descent
because it updates the layers of one parity one after another, in place.
Each sample stops as soon as its residual max|rho(h(s)) - s| is at or below tolerance.

The clamped input's drive x W_1 + b_1 is constant during a phase: it is computed once per
clamp (one BLAS product per batch), and reused by every phase with the same inputs.

Imperfections (``device``, see :mod:`labep.simulators.device`) are off by default: then
parameters are stored exactly and states are read back exactly (averaging ``Settle.readouts``
readouts returns the state itself). With ``device.bits`` set, parameters are written as codes.
"""

from __future__ import annotations

import numba
import numpy as np
from pydantic import Field

from labep.hardware.bench import Nudge, Relaxation, Settle
from labep.models.hopfield import LayeredHopfield
from labep.simulators.device import read_out
from labep.simulators.layered import (
    LayeredSimulator,
    LayeredSimulatorOptions,
    coupling_block,
)
from labep.simulators.thermal import ThermalOptions, sample_hopfield


@numba.njit(cache=True, inline="always")
def _output_update(field: float, target: float, strength: float) -> float:
    """argmin over s in [0, 1] of (1 + beta)/2 s^2 - (h + beta y) s: the output unit's
    exact block update under the nudged energy E + beta C (rho(h + beta (y - s)) at the
    fixed point; also correct for beta <= -1, where the block energy is concave)."""
    curvature = 1.0 + strength
    drive = field + strength * target
    if curvature > 0.0:
        value = drive / curvature
        if value < 0.0:
            return 0.0
        if value > 1.0:
            return 1.0
        return value
    return 1.0 if 0.5 * curvature - drive < 0.0 else 0.0


@numba.njit(cache=True)
def _update(units, field, output, target, strength, damping):
    """s <- s + a (rho(h) - s) for one layer's ``units`` (a view), hard sigmoid or, for the
    output layer, the nudged block update; returns max |rho(h) - s| before the move."""
    residual = 0.0
    if output:
        for j in range(units.shape[0]):
            change = _output_update(field[j], target[j], strength) - units[j]
            residual = max(residual, abs(change))
            units[j] += damping * change
    else:
        for j in range(units.shape[0]):
            change = min(max(field[j], 0.0), 1.0) - units[j]
            residual = max(residual, abs(change))
            units[j] += damping * change
    return residual


@numba.njit(cache=True, fastmath={"reassoc"})
def _layer_field(layer, sizes, state_offsets, weights, weight_offsets, transposed, biases,
                 bias_offsets, drive_row, row, out):
    """h_l for one sample into ``out``: input drive (l = 1) or b_l + W_l^T s_{l-1}, plus
    W_{l+1} s_{l+1} from the layer above.

    W_l is stored row-major (n_{l-1}, n_l), or transposed (n_l, n_{l-1}) where n_{l-1} > n_l,
    so that every inner loop runs over the larger of the two layers. Inner loops index views
    from zero (see :func:`coupling_block`); ``reassoc`` lets the dot products vectorize (it
    reorders sums only: NaN and inf still propagate).
    """
    n_here = sizes[layer]
    n_layers = sizes.shape[0] - 1
    if layer == 1:
        out[:n_here] = drive_row[:n_here]
    else:
        n_below = sizes[layer - 1]
        bias = biases[bias_offsets[layer - 1]:bias_offsets[layer - 1] + n_here]
        below = row[state_offsets[layer - 2]:state_offsets[layer - 2] + n_below]
        if transposed[layer - 1]:
            block = coupling_block(weights, weight_offsets[layer - 1], n_here, n_below)
            for j in range(n_here):
                coupling = block[j]
                acc = bias[j]
                for i in range(n_below):
                    acc += coupling[i] * below[i]
                out[j] = acc
        else:
            block = coupling_block(weights, weight_offsets[layer - 1], n_below, n_here)
            for j in range(n_here):
                out[j] = bias[j]
            for i in range(n_below):
                s_i = below[i]
                if s_i != 0.0:
                    coupling = block[i]
                    for j in range(n_here):
                        out[j] += s_i * coupling[j]
    if layer < n_layers:
        n_above = sizes[layer + 1]
        above = row[state_offsets[layer]:state_offsets[layer] + n_above]
        if transposed[layer]:
            block = coupling_block(weights, weight_offsets[layer], n_above, n_here)
            for j in range(n_above):
                s_j = above[j]
                if s_j != 0.0:
                    coupling = block[j]
                    for i in range(n_here):
                        out[i] += s_j * coupling[i]
        else:
            block = coupling_block(weights, weight_offsets[layer], n_here, n_above)
            for i in range(n_here):
                coupling = block[i]
                acc = 0.0
                for j in range(n_above):
                    acc += coupling[j] * above[j]
                out[i] += acc


@numba.njit(cache=True, fastmath={"reassoc"})
def _skip_field(layer, sizes, state_offsets, weights, skip_offsets, skip_lower, skip_upper, row,
                out):
    """Add the skip terms of layer l to its field ``out``: S_{l,m} s_m for every skip (l, m)
    above it, S_{k,l}^T s_k for every skip (k, l) below it. Each S_{l,m} is stored row-major
    (n_l, n_m) at ``skip_offsets[k]`` of the weight buffer; loops index views from zero."""
    for k in range(skip_lower.shape[0]):
        low = skip_lower[k]
        high = skip_upper[k]
        if low != layer and high != layer:
            continue
        n_low = sizes[low]
        n_high = sizes[high]
        block = coupling_block(weights, skip_offsets[k], n_low, n_high)
        if low == layer:
            above = row[state_offsets[high - 1]:state_offsets[high - 1] + n_high]
            for i in range(n_low):
                coupling = block[i]
                acc = 0.0
                for j in range(n_high):
                    acc += coupling[j] * above[j]
                out[i] += acc
        else:
            below = row[state_offsets[low - 1]:state_offsets[low - 1] + n_low]
            for i in range(n_low):
                s_i = below[i]
                if s_i != 0.0:
                    coupling = block[i]
                    for j in range(n_high):
                        out[j] += s_i * coupling[j]


@numba.njit(cache=True, parallel=True)
def settle_layered(sizes, weights, weight_offsets, transposed, biases, bias_offsets, drive, state,
                   target, strength, tolerance, max_steps, damping, asynchronous, steps_out,
                   residual_out, skip_offsets, skip_lower, skip_upper):
    """Relax a batch of layered Hopfield states in place (one kernel for every phase).

    ``weights``/``biases`` are the flat parameter buffers (W_l at ``weight_offsets[l-1]``,
    row-major or, where ``transposed[l-1]``, transposed; b_l at ``bias_offsets[l-1]``),
    ``drive`` the clamped input's drive x W_1 + b_1 (batch, n_1), ``target`` y (batch, n_L),
    ``strength`` the nudge beta. Skip couplings S_{l,m} (Hopfield-ResNet): pair k joins layers
    ``skip_lower[k]`` < ``skip_upper[k]``, stored row-major at ``skip_offsets[k]`` of ``weights``
    (empty arrays: no skips, and the plain network's loop, step for step).
    Writes each sample's steps used and final residual max|rho(h(s)) - s|.
    """
    batch = state.shape[0]
    n_layers = sizes.shape[0] - 1
    state_offsets = np.zeros(n_layers, dtype=np.int64)
    for layer in range(1, n_layers):
        state_offsets[layer] = state_offsets[layer - 1] + sizes[layer]
    width = 0
    for layer in range(1, n_layers + 1):
        width = max(width, sizes[layer])
    n_state = state.shape[1]
    has_skips = skip_lower.shape[0] > 0
    for sample in numba.prange(batch):
        row = state[sample]
        field = np.empty(width, dtype=state.dtype)
        fields = np.empty(n_state, dtype=state.dtype)
        residual = np.inf
        steps = 0
        for _ in range(max_steps):
            residual = 0.0
            if asynchronous:
                # odd layers, then even layers: each block update minimises E exactly
                for parity in (1, 0):
                    for layer in range(1, n_layers + 1):
                        if layer % 2 != parity:
                            continue
                        _layer_field(layer, sizes, state_offsets, weights, weight_offsets,
                                     transposed, biases, bias_offsets, drive[sample], row,
                                     field)
                        if has_skips:
                            _skip_field(layer, sizes, state_offsets, weights, skip_offsets,
                                        skip_lower, skip_upper, row, field)
                        units = row[state_offsets[layer - 1]:
                                    state_offsets[layer - 1] + sizes[layer]]
                        residual = max(residual, _update(units, field, layer == n_layers,
                                                         target[sample], strength, damping))
            else:
                for layer in range(1, n_layers + 1):
                    s0 = state_offsets[layer - 1]
                    _layer_field(layer, sizes, state_offsets, weights, weight_offsets,
                                 transposed, biases, bias_offsets, drive[sample], row, field)
                    if has_skips:
                        _skip_field(layer, sizes, state_offsets, weights, skip_offsets,
                                    skip_lower, skip_upper, row, field)
                    fields[s0:s0 + sizes[layer]] = field[:sizes[layer]]
                for layer in range(1, n_layers + 1):
                    s0 = state_offsets[layer - 1]
                    residual = max(residual, _update(row[s0:s0 + sizes[layer]],
                                                     fields[s0:s0 + sizes[layer]],
                                                     layer == n_layers, target[sample],
                                                     strength, damping))
            steps += 1
            if residual <= tolerance:
                break
        steps_out[sample] = steps
        residual_out[sample] = residual


class HopfieldSimulatorOptions(LayeredSimulatorOptions, ThermalOptions):
    """Options of the Hopfield simulator bench (``bench.options`` in a protocol)."""

    asynchronous: bool = Field(
        True, description="Even/odd layer order (block coordinate descent); False: all at once."
    )
    damping: float = Field(
        1.0, gt=0.0, le=1.0, description="a in s <- (1 - a) s + a rho(h); 1 is undamped."
    )


class HopfieldSimulator(LayeredSimulator):
    """The layered Hopfield network as a Bench, relaxed by a numba kernel."""

    name = "hopfield"
    identity_model = "hopfield-simulator"
    model_kinds = ("layered_hopfield",)
    options_model = HopfieldSimulatorOptions

    def __init__(self, model: LayeredHopfield, options: HopfieldSimulatorOptions | None = None):
        # W_1 only feeds the input drive (a BLAS product), so it stays row-major
        super().__init__(model, options or HopfieldSimulatorOptions())
        # skip couplings S_{l,m} (row-major blocks of the weight buffer, after W_1 .. W_L)
        skips = getattr(model, "skips", ())
        self._skip_lower = np.array([low for low, _ in skips], dtype=np.int64)
        self._skip_upper = np.array([high for _, high in skips], dtype=np.int64)
        self._skip_offsets = np.array(
            [self._weight_offsets[self._coupling_index[model.skip_name(low, high)]]
             for low, high in skips], dtype=np.int64)

    def relax(
        self,
        inputs: np.ndarray,
        nudge: Nudge | None = None,
        start: np.ndarray | None = None,
        settle: Settle | None = None,
    ) -> Relaxation:
        settle = settle or Settle(self.options.tolerance, self.options.max_steps)
        if self.options.temperature > 0.0:  # Boltzmann samples (labep.simulators.thermal)
            return sample_hopfield(self, inputs, nudge, start, settle)
        inputs, state, strength, target = self._prepare(inputs, nudge, start)
        # x W_1 + b_1: constant during a phase, computed once per clamp
        drive = self._clamped(inputs, lambda x: np.ascontiguousarray(
            x @ self._views["W1"] + self._views["b1"]))
        batch = inputs.shape[0]
        steps = np.zeros(batch, dtype=np.int64)
        residual = np.zeros(batch, dtype=np.float64)
        settle_layered(self._sizes, self._weights, self._weight_offsets, self._transposed,
                       self._biases, self._bias_offsets, drive, state, target, strength,
                       float(settle.tolerance), int(settle.max_steps),
                       float(self.options.damping), bool(self.options.asynchronous),
                       steps, residual, self._skip_offsets, self._skip_lower, self._skip_upper)
        state = read_out(state, self.options.device, self._readout_rng, settle.readouts)
        return Relaxation(state, residual <= settle.tolerance, steps, residual)
