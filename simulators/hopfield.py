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
clamp (one numba kernel per batch, over the inputs that are not zero: :func:`input_drive`),
and reused by every phase with the same inputs.

Imperfections (``device``, see :mod:`labep.simulators.device`) are off by default: then
parameters are stored exactly and states are read back exactly (averaging ``Settle.readouts``
readouts returns the state itself). With ``device.bits`` set, parameters are written as codes.

``neurons: spiking`` replaces the settle loop by stochastic spiking neurons (StochEP, Bernoulli
spikes of probability rho(h), time-averaged rate traces): :mod:`labep.simulators.spiking`.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from pydantic import Field

from labep.hardware.bench import Nudge, Relaxation, Settle
from labep.models.hopfield import LayeredHopfield
from labep.simulators.device import read_out
from labep.simulators.hopfield_fields import (
    _all_fields,
    _layer_field,
    _output_update,
    _skip_field,
    _state_offsets,
    drive_row,
    input_drive,
)
from labep.simulators.layered import LayeredSimulator, LayeredSimulatorOptions, U
from labep.simulators.spiking import SpikingOptions, spike_phase
from labep.simulators.thermal import ThermalOptions, sample_hopfield

#: the bits of +inf (float64): a non-negative float64 above it is a NaN
_INF_BITS = 0x7FF0000000000000


@numba.njit(cache=True)
def _update(row, start, n, field, output, target, strength, damping, scratch):
    """s <- s + a (rho(h) - s) for one layer's units ``row[start:start + n]``, hard sigmoid
    or, for the output layer, the nudged block update; returns max |rho(h) - s| before the
    move (a NaN change does not count, as with ``max``). Flat unsigned indexing, no views
    (:data:`labep.simulators.layered.U`).

    The hidden layers' loop vectorizes: |rho(h) - s| goes to ``scratch`` (float64, one more
    entry than the layer), and its maximum is taken over the bits as integers (for
    non-negative float64 the same order; NaNs, above +inf, are left out), a reduction the
    compiler vectorizes where a float maximum (NaN-aware) stays one element at a time."""
    first = U(start)
    residual = 0.0
    if output:
        for j in range(U(n)):
            change = _output_update(field[j], target[j], strength) - row[first + j]
            residual = max(residual, abs(change))
            row[first + j] += damping * change
        return residual
    for j in range(U(n)):
        change = min(max(field[j], 0.0), 1.0) - row[first + j]
        scratch[j] = abs(change)
        row[first + j] += damping * change
    bits = scratch.view(np.int64)
    largest = 0
    for j in range(U(n)):
        value = bits[j]
        largest = max(largest, value if value <= _INF_BITS else 0)
    bits[U(n)] = largest
    return scratch[U(n)]


@numba.njit(cache=True)
def _settle_sample(sizes, weights, weight_offsets, transposed, biases, bias_offsets, state_offsets,
                   drive_row, row, target_row, strength, tolerance, max_steps, damping,
                   asynchronous, skip_offsets, skip_lower, skip_upper, field, fields, scratch):
    """Relax one sample's state ``row`` in place; returns (steps used, final residual).
    ``field`` and ``fields`` are scratch buffers (the widest layer, the whole state),
    ``scratch`` float64 of the widest layer plus one (see :func:`_update`)."""
    n_layers = sizes.shape[0] - 1
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
                    _layer_field(layer, sizes, state_offsets, weights, weight_offsets, transposed,
                                 biases, bias_offsets, drive_row, row, field)
                    if skip_lower.shape[0] > 0:
                        _skip_field(layer, sizes, state_offsets, weights, skip_offsets, skip_lower,
                                    skip_upper, row, field)
                    residual = max(residual, _update(row, state_offsets[layer - 1],
                                                     sizes[layer], field, layer == n_layers,
                                                     target_row, strength, damping, scratch))
        else:
            _all_fields(sizes, state_offsets, weights, weight_offsets, transposed, biases,
                        bias_offsets, drive_row, row, skip_offsets, skip_lower, skip_upper,
                        field, fields)
            for layer in range(1, n_layers + 1):
                s0 = state_offsets[layer - 1]
                residual = max(residual, _update(row, s0, sizes[layer], fields[s0:],
                                                 layer == n_layers, target_row,
                                                 strength, damping, scratch))
        steps += 1
        if residual <= tolerance:
            break
    return steps, residual


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
    state_offsets, width = _state_offsets(sizes)
    for sample in numba.prange(state.shape[0]):
        field = np.empty(width, dtype=state.dtype)
        fields = np.empty(state.shape[1], dtype=state.dtype)
        scratch = np.empty(width + 1, dtype=np.float64)
        steps_out[sample], residual_out[sample] = _settle_sample(
            sizes, weights, weight_offsets, transposed, biases, bias_offsets, state_offsets,
            drive[sample], state[sample], target[sample], strength, tolerance, max_steps,
            damping, asynchronous, skip_offsets, skip_lower, skip_upper, field, fields, scratch)


@numba.njit(cache=True, parallel=True)
def settle_step(sizes, weights, weight_offsets, transposed, biases, bias_offsets, inputs,
                input_coupling, input_bias, state, free_tolerance, free_max_steps, strengths,
                targets, nudged, nudged_tolerance, nudged_max_steps, damping, asynchronous,
                steps_out, residual_out, skip_offsets, skip_lower, skip_upper):
    """A training step's phases in one kernel: per sample (in parallel), the clamped input's
    drive (:func:`drive_row` of ``inputs`` with W_1 ``input_coupling`` and b_1 ``input_bias``),
    the free phase of ``state`` (batch, n) from its start, then, if it settled (residual within
    ``free_tolerance``), each nudged phase k at ``strengths[k]`` towards ``targets[k]``
    (batch, n_L) from the free state into ``nudged[k]`` (k, batch, n). ``steps_out`` and
    ``residual_out`` are (1 + k, batch): the free phase's, then each nudged phase's (0 and inf
    where a sample was not nudged). Each phase is exactly :func:`settle_layered`'s loop."""
    state_offsets, width = _state_offsets(sizes)
    for sample in numba.prange(state.shape[0]):
        field = np.empty(width, dtype=state.dtype)
        fields = np.empty(state.shape[1], dtype=state.dtype)
        scratch = np.empty(width + 1, dtype=np.float64)
        drive = np.empty(input_bias.shape[0], dtype=state.dtype)
        drive_row(inputs[sample], input_coupling, input_bias, drive)
        row = state[sample]
        steps_out[0, sample], residual_out[0, sample] = _settle_sample(
            sizes, weights, weight_offsets, transposed, biases, bias_offsets, state_offsets,
            drive, row, targets[0, sample], 0.0, free_tolerance, free_max_steps,
            damping, asynchronous, skip_offsets, skip_lower, skip_upper, field, fields, scratch)
        settled = residual_out[0, sample] <= free_tolerance
        for phase in range(strengths.shape[0]):
            steps_out[1 + phase, sample] = 0
            residual_out[1 + phase, sample] = np.inf
            if settled:
                nudged_row = nudged[phase, sample]
                nudged_row[:] = row
                steps_out[1 + phase, sample], residual_out[1 + phase, sample] = _settle_sample(
                    sizes, weights, weight_offsets, transposed, biases, bias_offsets,
                    state_offsets, drive, nudged_row, targets[phase, sample],
                    strengths[phase], nudged_tolerance, nudged_max_steps, damping,
                    asynchronous, skip_offsets, skip_lower, skip_upper, field, fields,
                    scratch)


class HopfieldSimulatorOptions(LayeredSimulatorOptions, ThermalOptions, SpikingOptions):
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
        # W_1 only feeds the input drive (sums of its rows, :func:`drive_row`): it stays row-major
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
        drive = self._clamped(inputs, self._input_drive)
        if self.options.neurons == "spiking":  # StochEP (labep.simulators.spiking)
            return spike_phase(self, drive, state, strength, target, nudge is not None, settle)
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

    def relax_step(self, inputs: np.ndarray, nudges: list[Nudge], free: Settle,
                   nudged: Settle) -> tuple[Relaxation, list[Relaxation]] | None:
        """A training step's free phase and nudged phases in one kernel call (one parallel
        loop: each sample computes its input drive, relaxes free and, if it settled, is nudged
        from its free state), the same Relaxations as phase by phase
        (:class:`labep.hardware.bench.StepRelaxing`). None (phase by phase) where a phase's
        read-back is not its state (readout noise or resolution), for a thermal or spiking
        bench, for sample sets, and on a subclass that changes :meth:`relax` (a bench built
        on this one, e.g. with its own faults: its phases are its relax calls)."""
        options = self.options
        if (options.temperature > 0.0 or options.neurons == "spiking"
                or not options.device.ideal_readout or free.samples or nudged.samples
                or type(self).relax is not HopfieldSimulator.relax):
            return None
        inputs, state, _, _ = self._prepare(inputs, None, None)
        batch = inputs.shape[0]
        strengths = np.array([float(nudge.strength) for nudge in nudges], dtype=np.float64)
        targets = np.zeros((len(nudges) or 1, batch, self.model.output_size), dtype=self.dtype)
        for index, nudge in enumerate(nudges):
            targets[index] = nudge.target
        phases = np.empty((len(nudges), batch, self.model.state_size), dtype=self.dtype)
        steps = np.zeros((1 + len(nudges), batch), dtype=np.int64)
        residual = np.zeros((1 + len(nudges), batch), dtype=np.float64)
        settle_step(self._sizes, self._weights, self._weight_offsets, self._transposed,
                    self._biases, self._bias_offsets, inputs, self._views["W1"],
                    self._views["b1"], state, float(free.tolerance),
                    int(free.max_steps), strengths, targets, phases, float(nudged.tolerance),
                    int(nudged.max_steps), float(options.damping), bool(options.asynchronous),
                    steps, residual, self._skip_offsets, self._skip_lower, self._skip_upper)
        relaxed = Relaxation(state, residual[0] <= free.tolerance, steps[0], residual[0])
        ok = relaxed.converged & relaxed.finite
        if not ok.any():
            return relaxed, []
        every = ok.all()
        out = []
        for index in range(len(nudges)):
            rows = slice(None) if every else ok
            out.append(Relaxation(phases[index][rows], residual[1 + index][rows]
                                  <= nudged.tolerance, steps[1 + index][rows],
                                  residual[1 + index][rows]))
        return relaxed, out

    def _input_drive(self, inputs: np.ndarray) -> np.ndarray:
        """x W_1 + b_1 (batch, n_1) in the bench's dtype (W_1 is stored row-major)."""
        drive = np.empty((inputs.shape[0], self.model.sizes[1]), dtype=self.dtype)
        input_drive(inputs, self._views["W1"], self._views["b1"], drive)
        return drive

    def mean_field_overrides(self) -> dict[str, Any] | None:
        """The option values of this bench's deterministic mean-field twin (what a spiking
        bench's estimate tends to as tau and the window grow), None if it is deterministic."""
        return {"neurons": "deterministic"} if self.options.neurons == "spiking" else None
