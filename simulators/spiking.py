"""Stochastic spiking neurons on the layered Hopfield simulator (StochEP).

Lin, Jiang and Sengupta, "Stochastic Equilibrium Propagation for Spiking Convergent Recurrent
Neural Networks": every neuron i emits, at each discrete time step t, a spike

    z_i(t) ~ Bernoulli(rho(h_i(t)))

(rho the hard sigmoid clip(., 0, 1); an output neuron in a nudged phase fires with the
probability of the nudged block update, clip((h + beta y) / (1 + beta), 0, 1)). Synapses see
spikes through a rate trace, an exponential average with time constant tau (steps,
``spike_trace``):

    r_i(t + 1) = r_i(t) + (z_i(t) - r_i(t)) / tau,     h(t) = A r(t) + d(x),

so the network's states are the traces r, and under mean-field theory (E z = rho(h(E r)),
exact as tau -> infinity) the stationary mean of r is the deterministic fixed point
s* = rho(h(s*)) of the Hopfield bench: StochEP's estimate tends to deterministic EP.

A phase is a fixed window of T = ``Settle.max_steps`` time steps (the protocol's
``phases.free.max_steps`` / ``phases.nudged.max_steps``: the knob a hardware user pays for).
The first floor(``spike_discard`` * T) steps are a burn-in; the phase's read-back state is the
time average of the traces over the remaining steps,

    s_bar = 1 / (T - B) sum_{t > B} r(t).

Settle criterion: the *running-average residual*, the mean-field residual of the averaged
state max_i |rho(h_i(s_bar)) - s_bar_i| (the deterministic benches' residual, evaluated on the
average), at or below ``Settle.tolerance``. It has a noise floor of order sqrt(tau / T), so a
spiking protocol's tolerance is a confidence bound, not a fixed-point precision; a sample above
it is unsettled and handled like any other bench's (``phases.on_unsettled``). Every phase runs
its T steps (``Relaxation.steps``); ``Relaxation.info["spikes"]`` counts the spikes it emitted
(all units, all T steps) and ``info["spike_counts"]`` the spikes per sample: the hardware cost.

Randomness: the uniform u of each draw z = [u < p] comes from a counter-based generator keyed by
(a key drawn per phase from the bench's seeded generator, sample, step, unit)
(:func:`labep.simulators.thermal._uniform`): deterministic for a seed whatever the number of
threads, and resumable (the key generator is in the bench's ``save_state``).
``common_noise`` (simulator-only, the thermal options' field): the nudged phases reuse the last
free phase's key, so every phase of an update sees the same u for each (sample, step, unit) and
two nudged phases' spikes differ only where u falls between their two probabilities: the
contrast s(+beta) - s(-beta) keeps the nudge's response and loses most of the spike noise (on
MNIST, ``protocols/stochep_mnist.yaml``, independent draws leave the first layer's estimate
mostly noise; ``benchmarks/stochep_diagnose.py``). It assumes a replayable (seeded) spike
generator.
"""

from __future__ import annotations

from typing import Any, Literal

import numba
import numpy as np
from pydantic import BaseModel, Field, model_validator

from labep.hardware.bench import Relaxation, Settle
from labep.protocol.strict import STRICT_CONFIG
from labep.simulators.device import read_out
from labep.simulators.hopfield_fields import (
    _all_fields,
    _layer_field,
    _output_update,
    _skip_field,
    _state_offsets,
)
from labep.simulators.thermal import _uniform


class SpikingOptions(BaseModel):
    """Stochastic spiking neurons of a Hopfield bench (``bench.options``); off by default."""

    model_config = STRICT_CONFIG

    neurons: Literal["deterministic", "spiking"] = Field(
        "deterministic", description="deterministic: rate units relaxed to a fixed point; "
        "spiking: Bernoulli spikes of probability rho(h) every time step, read back as the "
        "time-averaged rate traces (StochEP, Lin, Jiang and Sengupta).")
    spike_trace: float = Field(
        8.0, ge=1.0, le=1e6, description="tau (time steps) of the rate trace "
        "r <- r + (z - r) / tau the synapses see; 1: raw spikes.")
    spike_discard: float = Field(
        0.25, ge=0.0, lt=1.0, description="Fraction of a phase's time steps (burn-in) left "
        "out of the rate average that is its read-back state.")

    @model_validator(mode="after")
    def _spiking_is_not_thermal(self) -> Any:
        if self.neurons == "spiking" and float(getattr(self, "temperature", 0.0)) > 0.0:
            raise ValueError("neurons: spiking is its own noise: set temperature: 0")
        return self


@numba.njit(cache=True)
def _spike(units, field, output, target, strength, rate, chain, step, first):
    """One time step of one layer's neurons (``units``: its traces, a view): z ~ Bernoulli(p),
    p = rho(h) (output: the nudged block update), r <- r + rate (z - r); returns the spikes."""
    count = 0
    for j in range(units.shape[0]):
        if output:
            probability = _output_update(field[j], target[j], strength)
        else:
            probability = min(max(field[j], 0.0), 1.0)
        if _uniform(chain, step, first + j) < probability:
            count += 1
            units[j] += rate * (1.0 - units[j])
        else:
            units[j] -= rate * units[j]
    return count


@numba.njit(cache=True, parallel=True)
def spike_layered(sizes, weights, weight_offsets, transposed, biases, bias_offsets, drive, state,
                  target, strength, steps, discard, trace, asynchronous, key, skip_offsets,
                  skip_lower, skip_upper, spikes_out, residual_out):
    """A spiking phase of a batch of layered Hopfield networks, in place.

    Parameters as :func:`labep.simulators.hopfield.settle_layered`; ``state`` holds the start
    traces r(0) and receives the time-averaged traces s_bar over steps ``discard`` + 1 ..
    ``steps``. ``trace`` is tau; ``asynchronous``: odd layers spike, then even layers (from the
    odd layers' new traces), else all layers from the same r(t). Writes each sample's spike
    count and the mean-field residual max|rho(h(s_bar)) - s_bar| of its average."""
    batch = state.shape[0]
    n_layers = sizes.shape[0] - 1
    state_offsets, width = _state_offsets(sizes)
    n_state = state.shape[1]
    rate = 1.0 / trace
    for sample in numba.prange(batch):
        row = state[sample]
        field = np.empty(width, dtype=state.dtype)
        fields = np.empty(n_state, dtype=state.dtype)
        total = np.zeros(n_state, dtype=np.float64)
        chain = key * 1000003 + sample
        count = 0
        for t in range(steps):
            if asynchronous:
                for parity in (1, 0):
                    for layer in range(1, n_layers + 1):
                        if layer % 2 != parity:
                            continue
                        s0 = state_offsets[layer - 1]
                        _layer_field(layer, sizes, state_offsets, weights, weight_offsets,
                                     transposed, biases, bias_offsets, drive[sample], row,
                                     field)
                        if skip_lower.shape[0] > 0:
                            _skip_field(layer, sizes, state_offsets, weights, skip_offsets,
                                        skip_lower, skip_upper, row, field)
                        count += _spike(row[s0:s0 + sizes[layer]], field, layer == n_layers,
                                        target[sample], strength, rate, chain, t, s0)
            else:
                _all_fields(sizes, state_offsets, weights, weight_offsets, transposed, biases,
                            bias_offsets, drive[sample], row, skip_offsets, skip_lower,
                            skip_upper, field, fields)
                for layer in range(1, n_layers + 1):
                    s0 = state_offsets[layer - 1]
                    count += _spike(row[s0:s0 + sizes[layer]], fields[s0:s0 + sizes[layer]],
                                    layer == n_layers, target[sample], strength, rate, chain,
                                    t, s0)
            if t >= discard:
                for i in range(n_state):
                    total[i] += row[i]
        scale = 1.0 / (steps - discard)
        for i in range(n_state):
            row[i] = total[i] * scale
        residual = 0.0
        for layer in range(1, n_layers + 1):
            s0 = state_offsets[layer - 1]
            _layer_field(layer, sizes, state_offsets, weights, weight_offsets, transposed,
                         biases, bias_offsets, drive[sample], row, field)
            if skip_lower.shape[0] > 0:
                _skip_field(layer, sizes, state_offsets, weights, skip_offsets, skip_lower,
                            skip_upper, row, field)
            for j in range(sizes[layer]):
                if layer == n_layers:
                    value = _output_update(field[j], target[sample][j], strength)
                else:
                    value = min(max(field[j], 0.0), 1.0)
                residual = max(residual, abs(value - row[s0 + j]))
        spikes_out[sample] = count
        residual_out[sample] = residual


def spike_phase(bench: Any, drive: np.ndarray, state: np.ndarray, strength: float,
                target: np.ndarray, nudged: bool, settle: Settle) -> Relaxation:
    """A spiking phase of a Hopfield simulator (``bench.options.neurons: spiking``): T =
    ``settle.max_steps`` time steps from the start traces ``state``, read back as the
    time-averaged traces, settled where their mean-field residual is at most
    ``settle.tolerance`` (see the module's docstring)."""
    options = bench.options
    steps = int(settle.max_steps)
    discard = int(options.spike_discard * steps)
    if options.common_noise:  # simulator-only: nudged phases replay the free phase's noise
        if not nudged or getattr(bench, "_free_key", None) is None:
            bench._free_key = int(bench._readout_rng.integers(2**40))
        key = bench._free_key
    else:
        key = int(bench._readout_rng.integers(2**40))
    batch = state.shape[0]
    spikes = np.zeros(batch, dtype=np.int64)
    residual = np.zeros(batch, dtype=np.float64)
    spike_layered(bench._sizes, bench._weights, bench._weight_offsets, bench._transposed,
                  bench._biases, bench._bias_offsets, drive, state, target, strength, steps,
                  discard, float(options.spike_trace), bool(options.asynchronous), key,
                  bench._skip_offsets, bench._skip_lower, bench._skip_upper, spikes, residual)
    state = read_out(state, options.device, bench._readout_rng, settle.readouts)
    info = {"neurons": "spiking", "spikes": int(spikes.sum()), "spike_counts": spikes,
            "trace": float(options.spike_trace), "window": steps - discard}
    return Relaxation(state, residual <= settle.tolerance, np.full(batch, steps, dtype=np.int64),
                      residual, info)
