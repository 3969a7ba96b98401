"""Thermal sampling for the simulators: Gibbs-Boltzmann states instead of a fixed point.

At temperature T > 0 a bench's states follow p(s) ~ exp(-(E(s) + beta C(s)) / T) (the nudged
energy in a nudged phase) instead of settling on a minimum of E + beta C. The estimators of
Litman ("EP without limits") and Massar and Mognetti ("EP: the quantum and the thermal cases")
take expectations and covariances over such samples (:mod:`labep.ep.thermal`,
:mod:`labep.ep.estimators`). The samplers here run one chain per sample of a batch, ``burn_in``
steps from the start state and then ``readouts`` readouts ``thin`` steps apart:

- Hopfield, continuous units in [0, 1]: overdamped Langevin
  s <- s - dt dE_beta/ds + sqrt(2 T dt) xi, reflected at the box walls (the reflected process
  keeps exp(-E_beta / T) restricted to the box stationary, up to O(dt));
- Hopfield, binary units s in {0, 1} (``units: binary``): heat-bath (Gibbs) sweeps, each unit
  drawn from its conditional p(s_i = 1 | rest) = 1 / (1 + exp(dE_i / T)), a Metropolis-Hastings
  move that is always accepted: exact detailed balance, no step-size bias;
- OIM phases (no box): the OIM simulator's own Euler or Heun integration with phase noise
  sqrt(2 T dt) xi, T = its ``phase_noise`` (:func:`sample_oim`).

For the Hopfield sampler, the energy is written as a quadratic form taken from the model:
h(s) = A s + d(x) (the model's ``local_fields``, linear in s with symmetric A), so
E(s) = |s|^2 / 2 - s^T A s / 2 - d^T s (up to a constant in s), and any coupling pattern the
model's fields express (skip couplings included) is sampled. The nudge adds
beta / 2 |s_L - y|^2. Noise comes from counter-based generators keyed by (a key drawn from the
bench's seeded generator, sample, step, unit): deterministic given the seed, whatever the
number of threads, and resumable (the key generator is part of the bench's saved state).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numba
import numpy as np
from pydantic import BaseModel, Field, model_validator

from labep.hardware.bench import Nudge, Relaxation, Settle
from labep.protocol.strict import STRICT_CONFIG
from labep.simulators.device import read_out


class SamplingOptions(BaseModel):
    """How a stochastic bench draws samples when asked for readouts (``bench.options``)."""

    model_config = STRICT_CONFIG

    burn_in: int = Field(
        200, ge=0, le=10_000_000,
        description="Steps (Langevin) or sweeps (heat bath) before the first readout.")
    thin: int = Field(
        2, ge=1, le=1_000_000, description="Steps or sweeps between two readouts.")

    @property
    def sampling_temperature(self) -> float:
        """T of the Boltzmann samples the bench returns when asked (0: it does not sample)."""
        return 0.0


class ThermalOptions(SamplingOptions):
    """Temperature and sampler of a Hopfield bench (``bench.options``); T = 0 is the
    deterministic settle, unchanged."""

    temperature: float = Field(
        0.0, ge=0.0, le=1e6,
        description="T of p(s) ~ exp(-E / T); 0: deterministic relaxation to a fixed point.")
    units: Literal["continuous", "binary"] = Field(
        "continuous", description="continuous: s in [0, 1], Langevin; binary: s in {0, 1}, "
        "heat-bath sweeps (needs temperature > 0).")
    langevin_step: float = Field(
        0.05, gt=0.0, le=1.0, description="dt of the overdamped Langevin step (continuous).")
    common_noise: bool = Field(
        False, description="Simulator-only variance reduction: every nudged phase starts from "
        "the rest state and replays the noise of the last free phase (common random numbers), "
        "so <dE/dtheta>_beta - <dE/dtheta>_0 is measured on coupled chains. With spiking "
        "neurons: the nudged phases (from the free rates) replay the free phase's spike draws.")

    @property
    def sampling_temperature(self) -> float:
        return float(self.temperature)

    @model_validator(mode="after")
    def _binary_is_thermal(self) -> Any:
        if self.units == "binary" and self.temperature == 0.0:
            raise ValueError("units: binary samples a Boltzmann distribution: set "
                             "temperature > 0")
        return self


# -- kernels ---------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _mix(value):
    """splitmix64 finaliser: a well-mixed 64-bit word from a counter."""
    value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return value ^ (value >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def _word(key, step, unit):
    """A hashed 64-bit word for (key, step, unit)."""
    return _mix(np.uint64(key) ^ _mix(np.uint64(step) * np.uint64(0x9E3779B97F4A7C15)
                                      + np.uint64(unit)))


@numba.njit(cache=True, inline="always")
def _uniform(key, step, unit):
    """A uniform sample in (0, 1) for (key, step, unit)."""
    return (float(_word(key, step, unit) >> np.uint64(11)) + 0.5) / 9007199254740992.0


@numba.njit(cache=True, inline="always")
def _gauss(key, step, unit):
    """A standard normal sample for (key, step, unit), Box-Muller on two hashed uniforms."""
    base = _word(key, step, unit)
    u1 = (float(base >> np.uint64(11)) + 0.5) / 9007199254740992.0
    u2 = (float(_mix(base) >> np.uint64(11)) + 0.5) / 9007199254740992.0
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@numba.njit(cache=True, parallel=True)
def langevin_box(coupling, drive, state, target, first_output, strength, temperature, step,
                 burn_in, thin, key, samples):
    """Overdamped Langevin on E_beta(s) = |s|^2/2 - s^T A s/2 - d^T s + beta/2 |s_L - y|^2
    with s in [0, 1] (reflecting walls), one chain per sample, in place.

    ``coupling`` A (n, n) symmetric, ``drive`` d (batch, n), ``target`` y (batch, n_L) for the
    units from ``first_output`` on, ``strength`` beta, ``temperature`` T, ``step`` dt. After
    ``burn_in`` steps, ``samples.shape[0]`` readouts ``thin`` steps apart go to ``samples``
    (readouts, batch, n)."""
    batch, n = state.shape
    readouts = samples.shape[0]
    kick = math.sqrt(2.0 * temperature * step)
    total = burn_in + readouts * thin
    for sample in numba.prange(batch):
        s = state[sample]
        d = drive[sample]
        y = target[sample]
        field = np.empty(n)
        chain = key * 1000003 + sample
        for t in range(total):
            for i in range(n):
                acc = d[i]
                row = coupling[i]
                for j in range(n):
                    acc += row[j] * s[j]
                field[i] = acc
            for i in range(n):
                force = field[i] - s[i]
                if i >= first_output:
                    force -= strength * (s[i] - y[i - first_output])
                value = s[i] + step * force + kick * _gauss(chain, t, i)
                value = value % 2.0  # reflect into [0, 1]: fold the period-2 extension
                if value > 1.0:
                    value = 2.0 - value
                s[i] = value
            done = t + 1 - burn_in
            if done > 0 and done % thin == 0:
                samples[done // thin - 1, sample, :] = s


@numba.njit(cache=True, parallel=True)
def heat_bath_binary(coupling, drive, state, target, first_output, strength, temperature,
                     burn_in, thin, key, samples):
    """Heat-bath (Gibbs, Glauber) sweeps over binary units s in {0, 1} for E_beta as in
    :func:`langevin_box` (s^2 = s), one chain per sample, in place.

    Unit i is drawn from its conditional p(s_i = 1 | rest) = 1 / (1 + exp(dE_i / T)), with
    dE_i = E_beta(s_i = 1) - E_beta(s_i = 0) = (1 - A_ii) / 2 - h_i^0 (+ beta (1/2 - y_i) on an
    output unit), h^0 the field without unit i's self-term; h = A s + d is kept up to date.
    A Metropolis-Hastings move with the conditional as proposal (always accepted): exact
    detailed balance. Its draw is monotone in one uniform per (step, unit), so chains that
    share their noise (``common_noise``) coalesce and stay together."""
    batch, n = state.shape
    readouts = samples.shape[0]
    total = burn_in + readouts * thin
    for sample in numba.prange(batch):
        s = state[sample]
        d = drive[sample]
        y = target[sample]
        field = np.empty(n)
        for i in range(n):
            s[i] = 1.0 if s[i] > 0.5 else 0.0
        for i in range(n):
            acc = d[i]
            for j in range(n):
                acc += coupling[i, j] * s[j]
            field[i] = acc
        chain = key * 1000003 + sample
        for t in range(total):
            for i in range(n):
                change = 0.5 * (1.0 - coupling[i, i]) - (field[i] - coupling[i, i] * s[i])
                if i >= first_output:
                    change += strength * (0.5 - y[i - first_output])
                exponent = change / temperature
                probability = 0.0 if exponent > 700.0 else 1.0 / (1.0 + math.exp(exponent))
                value = 1.0 if _uniform(chain, t, i) < probability else 0.0
                delta = value - s[i]
                if delta != 0.0:
                    s[i] = value
                    column = coupling[i]  # A is symmetric: row i is column i
                    for j in range(n):
                        field[j] += delta * column[j]
            done = t + 1 - burn_in
            if done > 0 and done % thin == 0:
                samples[done // thin - 1, sample, :] = s


# -- the Hopfield sampler ---------------------------------------------------------------------


def coupling_matrix(model: Any, params: dict[str, np.ndarray]) -> np.ndarray:
    """A of the model's local fields h(s) = A s + d(x), (n, n) float64, from n + 1 field
    evaluations. Refuses a model whose fields are not those of a symmetric coupling (it has
    no energy to sample)."""
    n = model.state_size
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    silent = np.zeros((1, model.input_size))
    bias = model.local_fields(silent, np.zeros((1, n)), params)
    coupling = model.local_fields(np.repeat(silent, n, axis=0), np.eye(n), params) - bias
    if not np.allclose(coupling, coupling.T, rtol=1e-9, atol=1e-12):
        raise ValueError("thermal sampling needs symmetric couplings (fields h = A s + d with "
                         "A = A^T): this model has no energy to sample")
    return np.ascontiguousarray(coupling)


def input_drive(model: Any, params: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
    """d(x) = h(s = 0) of the model's local fields: the clamped inputs' drive (and the
    biases), (batch, n) float64."""
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    return np.ascontiguousarray(model.local_fields(
        np.asarray(inputs, dtype=np.float64), np.zeros((len(inputs), model.state_size)),
        params))


def drift(samples: np.ndarray) -> np.ndarray:
    """Per sample, max over units of |mean of the first half of the readouts - mean of the
    second half|: a cheap stationarity diagnostic of a chain (0 with fewer than 2 readouts)."""
    half = samples.shape[0] // 2
    if half == 0:
        return np.zeros(samples.shape[1])
    first = samples[:half].mean(axis=0, dtype=np.float64)
    second = samples[half:2 * half].mean(axis=0, dtype=np.float64)
    return np.max(np.abs(first - second), axis=1)


def sample_hopfield(bench: Any, inputs: np.ndarray, nudge: Nudge | None,
                    start: np.ndarray | None, settle: Settle) -> Relaxation:
    """A thermal phase of a Hopfield simulator (``bench.options.temperature`` > 0).

    Runs ``burn_in + readouts * thin`` Langevin steps or heat-bath sweeps per sample and
    returns the mean of the readouts as ``state`` (and the readouts themselves as ``samples``
    when ``settle.samples``). ``tolerance`` and ``max_steps`` do not apply to a sampling phase:
    ``converged`` means every readout is finite, ``residual`` is :func:`drift`."""
    options = bench.options
    inputs, state, strength, target = bench._prepare(inputs, nudge, start)
    params = dict(bench._views)  # the values the bench realizes
    cached = getattr(bench, "_thermal_coupling", None)
    if cached is None or cached[0] != bench._version:  # A changes only with a write
        bench._thermal_coupling = cached = (bench._version, coupling_matrix(bench.model, params))
    coupling = cached[1]
    drive = input_drive(bench.model, params, inputs)
    state = np.ascontiguousarray(state, dtype=np.float64)
    target = np.ascontiguousarray(target, dtype=np.float64)
    readouts = int(settle.readouts)
    samples = np.empty((readouts, *state.shape))
    first_output = bench.model.output_slice[0]
    if options.common_noise:
        if nudge is None or getattr(bench, "_free_key", None) is None:
            bench._free_key = int(bench._readout_rng.integers(2**40))
        key = bench._free_key
        state[...] = 0.0  # every phase's chain starts at rest, driven by the same noise
    else:
        key = int(bench._readout_rng.integers(2**40))
    temperature = float(options.temperature)
    if options.units == "binary":
        heat_bath_binary(coupling, drive, state, target, first_output, strength, temperature,
                          int(options.burn_in), int(options.thin), key, samples)
    else:
        langevin_box(coupling, drive, state, target, first_output, strength, temperature,
                     float(options.langevin_step), int(options.burn_in), int(options.thin),
                     key, samples)
    return _sampled(bench, samples, settle, low=0.0, high=1.0,
                    info={"temperature": temperature, "units": options.units})


def _sampled(bench: Any, samples: np.ndarray, settle: Settle, *, low: float, high: float,
             info: dict[str, Any], periodic: bool = False) -> Relaxation:
    """The Relaxation of a sampling phase: readouts through the bench's detector, their mean,
    finiteness as ``converged``, :func:`drift` as ``residual``."""
    options = bench.options
    dtype = bench.dtype
    if not options.device.ideal_readout:
        samples = np.stack([read_out(s, options.device, bench._readout_rng, 1, low, high,
                                     periodic=periodic) for s in samples])
    samples = samples.astype(dtype, copy=False)
    readouts = samples.shape[0]
    if periodic:
        mean = np.mod(np.arctan2(np.sin(samples).mean(axis=0), np.cos(samples).mean(axis=0)),
                      2 * np.pi).astype(dtype)
        residual = drift(np.concatenate([np.cos(samples), np.sin(samples)], axis=2))
    else:
        mean = samples.mean(axis=0).astype(dtype)
        residual = drift(samples)
    finite = np.all(np.isfinite(samples), axis=(0, 2))
    steps = np.full(samples.shape[1], options.burn_in + readouts * options.thin, dtype=np.int64)
    info = {**info, "burn_in": int(options.burn_in), "thin": int(options.thin),
            "readouts": readouts}
    return Relaxation(mean, finite, steps, residual, info, samples if settle.samples else None)


# -- the OIM sampler --------------------------------------------------------------------------


def sample_oim(bench: Any, drive: tuple[np.ndarray, np.ndarray], state: np.ndarray,
               strength: float, target: np.ndarray, settle: Settle) -> Relaxation:
    """A thermal phase of an OIM simulator: its integrator with phase noise T
    (``phase_noise``) for ``burn_in`` steps, then ``readouts`` readouts ``thin`` steps apart
    (the stationary density of the phases is exp(-(E + beta C) / T), up to O(dt))."""
    from labep.simulators.oim import settle_oim

    options = bench.options
    drive_a, drive_b = drive
    batch = state.shape[0]
    steps = np.zeros(batch, dtype=np.int64)
    residual = np.zeros(batch, dtype=np.float64)
    samples = np.empty((settle.readouts, *state.shape), dtype=np.float64)
    method = ("euler", "heun", "adaptive").index(options.integrator)

    def run(count: int) -> None:
        bench._relaxations += 1  # a fresh noise key for every stretch of the chain
        settle_oim(bench._sizes, bench._weights, bench._weight_offsets, bench._transposed,
                   bench._biases, drive_a, drive_b, state, target, strength, bench.model.shil,
                   float(options.dt), method, float(options.phase_noise),
                   options.device.seed * 1_000_003 + bench._relaxations, 0.0, count, steps,
                   residual, bench._dense)

    if options.burn_in:
        run(int(options.burn_in))
    for index in range(settle.readouts):
        run(int(options.thin))
        samples[index] = state
    return _sampled(bench, samples, settle, low=0.0, high=2 * np.pi, periodic=True,
                    info={"temperature": float(options.phase_noise)})
