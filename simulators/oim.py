"""Numba simulator of a layered oscillator Ising machine (the physics of the FPGA OIM boards).

Physics: :class:`labep.models.oim.LayeredOIM` (the biases h, g act as A += h, B += g).
Each sample integrates the gradient flow d(phi)/dt = -dE/dphi - beta dC/dphi + sqrt(2 T) xi
with Euler or Heun steps of size ``dt``, until the residual max |dE/dphi + beta dC/dphi| is
at or below tolerance (each sample stops on its own). Coupling forces use
cos(a - b) = cos a cos b + sin a sin b: per unit the fields A = sum J cos(phi_nb) and
B = sum J sin(phi_nb) give -dE/dphi = cos(phi) B - sin(phi) A - K_s sin(2 phi),
so no n x n tensor is ever formed; the clamped input layer's contribution to layer 1,
cos(phi_0) J_1 and sin(phi_0) J_1, is computed once per clamp (:func:`phase_drive`) and reused
by every phase. The float64 sums may be reassociated (SIMD) and use fused multiply-adds; a
float32 bench takes cos and sin accurate to float32 (:func:`labep.simulators.sincos.sincos_single`)
and sums in float64.

Phase noise (``phase_noise``, the temperature T) comes from a counter-based generator keyed by
(device seed, relaxation, sample, step, unit): deterministic given the seed, whatever the
number of threads. Readout noise and resolution (``device.readout_noise``,
``device.readout_bits``) act on the read-back phases, averaged on the circle.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numba
import numpy as np
from pydantic import Field, model_validator

from labep.hardware.bench import Nudge, Relaxation, Settle
from labep.models.dense_oim import DenseOIM
from labep.models.oim import LayeredOIM
from labep.simulators.device import read_out
from labep.simulators.layered import LayeredSimulator, LayeredSimulatorOptions, U
from labep.simulators.settle_loop import integrate, max_abs
from labep.simulators.sincos import sincos, sincos_like
from labep.simulators.thermal import SamplingOptions, sample_oim

TWO_PI = 2.0 * math.pi


@numba.njit(cache=True, inline="always")
def _mix(value):
    """splitmix64 finaliser: a well-mixed 64-bit word from a counter."""
    value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return value ^ (value >> np.uint64(31))


@numba.njit(cache=True)
def _gauss(key, step, unit):
    """A standard normal sample for (key, step, unit) by Box-Muller on two hashed uniforms."""
    base = _mix(np.uint64(key) ^ _mix(np.uint64(step) * np.uint64(0x9E3779B97F4A7C15)
                                      + np.uint64(unit)))
    u1 = (float(base >> np.uint64(11)) + 0.5) / 9007199254740992.0
    u2 = (float(_mix(base) >> np.uint64(11)) + 0.5) / 9007199254740992.0
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(TWO_PI * u2)


#: rows of a coupling block one pass over the larger layer takes (see :func:`_add_rows`)
_ROWS = 5
#: rows of a coupling block one pass of dot products takes (see :func:`_dot_rows`)
_DOTS = 4
#: float64 sums may be reassociated (SIMD) and multiply-adds fused (FMA)
_FAST = {"reassoc", "contract"}


@numba.njit(cache=True, inline="always")
def _row(first, offset, count):
    """Row ``first + offset`` of a group, or ``first`` past the last of ``count`` rows (the
    padding rows of a short group, given a zero coefficient or a discarded result)."""
    return first + offset if offset < count else first


@numba.njit(cache=True, inline="always")
def _five(values, first, count):
    """values[first .. first + 4], 0 past the ``count`` rows of a short group (their padding
    rows then add nothing)."""
    return (values[first],
            values[first + 1] if count > 1 else 0.0,
            values[first + 2] if count > 2 else 0.0,
            values[first + 3] if count > 3 else 0.0,
            values[first + 4] if count > 4 else 0.0)


@numba.njit(cache=True, fastmath=_FAST)
def _add_rows(weights, offset, n, first, count, cos, sin, base, a_out, b_out):
    """A += sum_k cos(phi_k) J_k and B += sum_k sin(phi_k) J_k over rows k = first ..
    first + count - 1 (count <= _ROWS) of the row-major (rows, n) coupling block at ``offset``
    of the flat ``weights``, phi_k being unit ``base + k`` of ``cos``, ``sin``; A and B are
    the first n entries of ``a_out``, ``b_out``. One pass over A and B (one load and store of
    each for up to _ROWS rows); flat unsigned indexing, no views (see :func:`_forces`)."""
    o0 = U(offset + first * n)
    o1 = U(offset + _row(first, 1, count) * n)
    o2 = U(offset + _row(first, 2, count) * n)
    o3 = U(offset + _row(first, 3, count) * n)
    o4 = U(offset + _row(first, 4, count) * n)
    c0, c1, c2, c3, c4 = _five(cos, base + first, count)
    # A and B in separate loops: a loop over more arrays does not vectorize (numba cannot
    # tell LLVM they do not overlap, and LLVM gives up on that many run-time checks)
    for i in range(U(n)):
        a_out[i] += (c0 * weights[o0 + i] + c1 * weights[o1 + i] + c2 * weights[o2 + i]
                     + c3 * weights[o3 + i] + c4 * weights[o4 + i])
    s0, s1, s2, s3, s4 = _five(sin, base + first, count)
    for i in range(U(n)):
        b_out[i] += (s0 * weights[o0 + i] + s1 * weights[o1 + i] + s2 * weights[o2 + i]
                     + s3 * weights[o3 + i] + s4 * weights[o4 + i])


@numba.njit(cache=True, fastmath=_FAST)
def _dot_rows(weights, offset, width, first, count, cos, sin, base, a_out, b_out):
    """A_j += J_j . cos(phi) and B_j += J_j . sin(phi) for rows j = first .. first + count - 1
    (count <= _DOTS) of the row-major (rows, width) coupling block at ``offset`` of the flat
    ``weights``, phi the ``width`` units from ``base`` of ``cos``, ``sin``: one pass over
    cos(phi), sin(phi) for all of them (flat unsigned indexing, see :func:`_forces`)."""
    o0 = U(offset + first * width)
    o1 = U(offset + _row(first, 1, count) * width)
    o2 = U(offset + _row(first, 2, count) * width)
    o3 = U(offset + _row(first, 3, count) * width)
    start = U(base)
    a0 = a1 = a2 = a3 = 0.0
    b0 = b1 = b2 = b3 = 0.0
    for i in range(U(width)):
        c = cos[start + i]
        s = sin[start + i]
        w0, w1, w2, w3 = weights[o0 + i], weights[o1 + i], weights[o2 + i], weights[o3 + i]
        a0 += w0 * c
        a1 += w1 * c
        a2 += w2 * c
        a3 += w3 * c
        b0 += w0 * s
        b1 += w1 * s
        b2 += w2 * s
        b3 += w3 * s
    a_out[first] += a0
    b_out[first] += b0
    if count > 1:
        a_out[first + 1] += a1
        b_out[first + 1] += b1
    if count > 2:
        a_out[first + 2] += a2
        b_out[first + 2] += b2
    if count > 3:
        a_out[first + 3] += a3
        b_out[first + 3] += b3


@numba.njit(cache=True, fastmath=_FAST)
def _forces(sizes, offsets, weights, weight_offsets, transposed, biases, drive_a, drive_b,
            phases, cos, sin, field_a, field_b, shil, strength, target, out, stiffness):
    """-dE/dphi - beta dC/dphi for every free unit of one sample into ``out``, and each unit's
    local stiffness |A + iB| + 2 K_s + |beta| into ``stiffness`` (the adaptive integrator's;
    an empty array skips it); returns the largest force magnitude (the residual).

    Per layer l the fields start at A = h_l (+ cos(phi_0) J_1 for layer 1, the clamp's
    ``drive_a``), B = g_l (+ ``drive_b``), and gather J_l from below and J_{l+1} from above, a
    few coupling rows a pass (:func:`_add_rows`, :func:`_dot_rows`); float32 phases take
    :func:`sincos_single` (accurate to float32), float64 ones :func:`sincos`.

    Indexing: the kernels index the flat buffers (weights, biases, the state-shaped cos, sin,
    out) directly with unsigned indices (:data:`labep.simulators.layered.U`) and make no
    array views; every sum has the shape it had with views."""
    n_layers = sizes.shape[0] - 1
    n_state = phases.shape[0]
    for unit in range(n_state):
        cos[unit], sin[unit] = sincos_like(phases, phases[unit])
    for layer in range(1, n_layers + 1):
        n_here = sizes[layer]
        here = U(offsets[layer - 1])
        quadrature = U(n_state + offsets[layer - 1])  # h_l lies like the state, then g_l
        if layer == 1:
            for j in range(U(n_here)):
                field_a[j] = drive_a[j] + biases[here + j]
            for j in range(U(n_here)):
                field_b[j] = drive_b[j] + biases[quadrature + j]
        else:
            for j in range(U(n_here)):
                field_a[j] = biases[here + j]
            for j in range(U(n_here)):
                field_b[j] = biases[quadrature + j]
            n_below = sizes[layer - 1]
            below = offsets[layer - 2]
            offset = weight_offsets[layer - 1]
            if transposed[layer - 1]:  # (n_here, n_below)
                for j in range(0, n_here, _DOTS):
                    _dot_rows(weights, offset, n_below, j, min(_DOTS, n_here - j), cos, sin,
                              below, field_a, field_b)
            else:  # (n_below, n_here)
                for i in range(0, n_below, _ROWS):
                    _add_rows(weights, offset, n_here, i, min(_ROWS, n_below - i), cos, sin,
                              below, field_a, field_b)
        if layer < n_layers:
            n_above = sizes[layer + 1]
            above = offsets[layer]
            offset = weight_offsets[layer]
            if transposed[layer]:  # (n_above, n_here)
                for k in range(0, n_above, _ROWS):
                    _add_rows(weights, offset, n_here, k, min(_ROWS, n_above - k), cos, sin,
                              above, field_a, field_b)
            else:  # (n_here, n_above)
                for i in range(0, n_here, _DOTS):
                    _dot_rows(weights, offset, n_above, i, min(_DOTS, n_here - i), cos, sin,
                              above, field_a, field_b)
        for j in range(U(n_here)):
            c = cos[here + j]
            s = sin[here + j]
            out[here + j] = c * field_b[j] - s * field_a[j] - 2.0 * shil * s * c
        if layer == n_layers and strength != 0.0:
            for j in range(U(n_here)):
                out[here + j] += strength * (cos[here + j] - target[j]) * sin[here + j]
        if stiffness.shape[0]:  # the adaptive integrator's step sizes
            for j in range(U(n_here)):
                stiffness[here + j] = (math.sqrt(field_a[j] * field_a[j]
                                                 + field_b[j] * field_b[j])
                                       + 2.0 * shil + abs(strength))
    return max_abs(out)


@numba.njit(cache=True, fastmath={"reassoc"})
def _dense_forces(sizes, offsets, weights, weight_offsets, transposed, biases, drive_a,
                  drive_b, phases, cos, sin, field_a, field_b, shil, strength, target, out,
                  stiffness):
    """:func:`_forces` for an all-to-all machine (:class:`labep.models.dense_oim.DenseOIM`):
    J, the second coupling block (after the input couplings K), is (N, N) row-major and
    A_i = sum_{j != i} J_ij cos(phi_j) + (K^T cos phi_0)_i + h_i (B likewise with sin, g); the
    outputs are the last n_out oscillators. Same signature, so one settle loop runs both."""
    n = phases.shape[0]
    for unit in range(n):
        cos[unit], sin[unit] = sincos(phases[unit])
    offset = weight_offsets[1]
    first_output = n - sizes[sizes.shape[0] - 1]
    for i in range(n):
        row = U(offset + i * n)  # J_i, flat unsigned indexing as in _forces
        acc_a = 0.0
        acc_b = 0.0
        for j in range(U(n)):
            acc_a += weights[row + j] * cos[j]
            acc_b += weights[row + j] * sin[j]
        # no self-coupling, even if a quantized diagonal does not store exactly 0
        diagonal = weights[U(offset + i * n + i)]
        a = acc_a - diagonal * cos[i] + drive_a[i] + biases[i]
        b = acc_b - diagonal * sin[i] + drive_b[i] + biases[n + i]
        c = cos[i]
        s = sin[i]
        force = c * b - s * a - 2.0 * shil * s * c
        if i >= first_output and strength != 0.0:
            force += strength * (c - target[i - first_output]) * s
        out[i] = force
        if stiffness.shape[0]:
            stiffness[i] = math.sqrt(a * a + b * b) + 2.0 * shil + abs(strength)
    return max_abs(out)


@numba.njit(cache=True, inline="always")
def _any_forces(dense, sizes, offsets, weights, weight_offsets, transposed, biases, drive_a,
                drive_b, phases, cos, sin, field_a, field_b, shil, strength, target, out,
                stiffness):
    if dense:
        return _dense_forces(sizes, offsets, weights, weight_offsets, transposed, biases,
                             drive_a, drive_b, phases, cos, sin, field_a, field_b, shil,
                             strength, target, out, stiffness)
    return _forces(sizes, offsets, weights, weight_offsets, transposed, biases, drive_a,
                   drive_b, phases, cos, sin, field_a, field_b, shil, strength, target, out,
                   stiffness)


@numba.njit(cache=True)
def _oim_measure(work):
    """The residual max |dphi/dt| of one sample; the forces land in ``first`` (the next
    step's)."""
    (dense, sizes, offsets, weights, weight_offsets, transposed, biases, drive_a, drive_b,
     phases, cos, sin, field_a, field_b, shil, strength, target, first, _, _, stiffness,
     _, _, _, _) = work
    return _any_forces(dense, sizes, offsets, weights, weight_offsets, transposed, biases,
                       drive_a, drive_b, phases, cos, sin, field_a, field_b, shil, strength,
                       target, first, stiffness)


@numba.njit(cache=True)
def _oim_step(work, step):
    """One Euler, Heun or adaptive step of one sample from the forces in ``first``, plus the
    phase noise of step ``step``."""
    (dense, sizes, offsets, weights, weight_offsets, transposed, biases, drive_a, drive_b,
     phases, cos, sin, field_a, field_b, shil, strength, target, first, second, trial,
     stiffness, method, dt, kick, key) = work
    n_state = phases.shape[0]
    if method == 1:
        for u in range(n_state):
            trial[u] = phases[u] + dt * first[u]
        _any_forces(dense, sizes, offsets, weights, weight_offsets, transposed, biases,
                    drive_a, drive_b, trial, cos, sin, field_a, field_b, shil, strength,
                    target, second, stiffness)
        for u in range(n_state):
            phases[u] += 0.5 * dt * (first[u] + second[u])
    elif method == 2:
        for u in range(n_state):
            phases[u] += dt * first[u] / max(stiffness[u], 1e-3)
    else:
        for u in range(n_state):
            phases[u] += dt * first[u]
    if kick > 0.0:
        for u in range(n_state):
            phases[u] += kick * _gauss(key, step, u)


@numba.njit(cache=True, parallel=True)
def settle_oim(sizes, weights, weight_offsets, transposed, biases, drive_a, drive_b, state,
               target, strength, shil, dt, method, temperature, noise_key, tolerance, max_steps,
               steps_out, residual_out, dense=False):
    """Integrate a batch of OIM phases in place until each sample's residual max |dphi/dt| is
    at or below tolerance (or ``max_steps`` steps); phases are returned wrapped to [0, 2 pi).
    The step loop is :func:`labep.simulators.settle_loop.integrate`.

    ``method`` 0: Euler; 1: Heun; 2: adaptive (each unit steps dt / stiffness, a diagonal
    preconditioner: the same fixed points, reached at a rate independent of the coupling
    scale; noiseless only). ``dense``: an all-to-all machine (:func:`_dense_forces`)."""
    batch, n_state = state.shape
    n_layers = sizes.shape[0] - 1
    offsets = np.zeros(n_layers, dtype=np.int64)
    width = 0
    for layer in range(1, n_layers + 1):
        width = max(width, sizes[layer])
        if layer < n_layers:
            offsets[layer] = offsets[layer - 1] + sizes[layer]
    if dense:
        width = n_state
    kick = math.sqrt(2.0 * temperature * dt) if temperature > 0.0 else 0.0
    for sample in numba.prange(batch):
        phases = state[sample]
        work = (dense, sizes, offsets, weights, weight_offsets, transposed, biases,
                drive_a[sample], drive_b[sample], phases, np.empty(n_state),
                np.empty(n_state), np.empty(width), np.empty(width), shil, strength,
                target[sample], np.empty(n_state), np.empty(n_state), np.empty(n_state),
                np.empty(n_state if method == 2 else 0), method, dt, kick,
                noise_key * 1000003 + sample)
        steps, residual = integrate(_oim_step, _oim_measure, work, tolerance, max_steps, 1,
                                   math.inf)
        for u in range(n_state):
            phases[u] = phases[u] % TWO_PI
        steps_out[sample] = steps
        residual_out[sample] = residual


@numba.njit(cache=True, parallel=True, fastmath={"reassoc"})
def phase_drive(phases, coupling, drive_a, drive_b):
    """The clamped inputs' pull per sample: ``drive_a`` = cos(phi_0) K and ``drive_b`` =
    sin(phi_0) K for the input phases phi_0 (batch, n_in) and the input coupling K
    (n_in, n_out: J_1, or K of a dense machine), accumulated in float64 and stored in the
    drives' dtype; two input rows a pass over the output row."""
    batch, n_in = phases.shape
    n_out = coupling.shape[1]
    pairs = n_in - n_in % 2
    for sample in numba.prange(batch):
        acc_a = np.zeros(n_out)
        acc_b = np.zeros(n_out)
        row_phases = phases[sample]
        for i in range(0, pairs, 2):
            c_i, s_i = sincos(row_phases[i])
            c_k, s_k = sincos(row_phases[i + 1])
            row_i = coupling[i]
            row_k = coupling[i + 1]
            for j in range(n_out):
                acc_a[j] += c_i * row_i[j] + c_k * row_k[j]
                acc_b[j] += s_i * row_i[j] + s_k * row_k[j]
        for i in range(pairs, n_in):
            c_i, s_i = sincos(row_phases[i])
            row_i = coupling[i]
            for j in range(n_out):
                acc_a[j] += c_i * row_i[j]
                acc_b[j] += s_i * row_i[j]
        for j in range(n_out):
            drive_a[sample, j] = acc_a[j]
            drive_b[sample, j] = acc_b[j]


class OIMSimulatorOptions(LayeredSimulatorOptions, SamplingOptions):
    """Options of the OIM simulator bench (``bench.options`` in a protocol)."""

    tolerance: float = Field(1e-4, gt=0.0, description="Settle tolerance on max |dphi/dt|.")
    max_steps: int = Field(2000, ge=1, description="Default cap on integration steps.")
    dt: float = Field(0.2, gt=0.0, le=10.0, description="Integration step (units of 1/J).")
    integrator: Literal["euler", "heun", "adaptive"] = Field(
        "euler", description="euler: first order; heun: second order (two forces a step); "
        "adaptive: each unit steps dt / (|A + iB| + 2 K_s + |beta|), dt then a fraction "
        "(same fixed points, fast whatever the coupling scale; not with phase_noise).")
    phase_noise: float = Field(
        0.0, ge=0.0, description="Temperature T of the phase noise sqrt(2 T) xi (off: 0).")
    rest_phase: float = Field(
        math.pi / 2, description="Phase every oscillator starts from when no start is given.")

    @property
    def sampling_temperature(self) -> float:
        """T of the samples a phase asked for them returns: the phase noise."""
        return float(self.phase_noise)

    @model_validator(mode="after")
    def _adaptive_is_noiseless(self) -> OIMSimulatorOptions:
        if self.integrator == "adaptive" and self.phase_noise > 0:
            raise ValueError("the adaptive integrator changes the noise's stationary "
                             "distribution: use euler or heun with phase_noise")
        return self


class OIMSimulator(LayeredSimulator):
    """The layered oscillator Ising machine as a Bench, integrated by a numba kernel."""

    name = "oim"
    identity_model = "oim-simulator"
    model_kinds = ("layered_oim", "dense_oim")
    options_model = OIMSimulatorOptions

    def __init__(self, model: LayeredOIM, options: OIMSimulatorOptions | None = None):
        super().__init__(model, options or OIMSimulatorOptions())
        self._relaxations = 0
        self._dense = isinstance(model, DenseOIM)
        #: the couplings from the clamped inputs: J1 (layered) or K (dense)
        self._input_coupling = "K" if self._dense else "J1"

    def save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = super().save_state()
        meta["relaxations"] = self._relaxations  # keys the phase noise of the next relax
        return meta, arrays

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super().load_state(meta, arrays)
        self._relaxations = int(meta["relaxations"])

    def _input_fields(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_phase_fields` of the inputs' phases phi_0 = ``model.input_phases(inputs)``."""
        return self._phase_fields(self.model.input_phases(inputs))

    def _phase_fields(self, phases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos(phi_0) J_1 and sin(phi_0) J_1 (K for a dense machine): the clamped inputs'
        constant pull on the oscillators they couple to.

        Computed in float64 whatever the bench's dtype: it is summed over every input once per
        clamp and then acts on every step, so its rounding error would bias the whole phase.
        A numba kernel on numba's threads (:func:`phase_drive`), not BLAS: BLAS runs on one
        thread beside numba's pool (two pools on two cores fight)."""
        coupling = self._views[self._input_coupling]
        drive_a = np.empty((phases.shape[0], coupling.shape[1]), dtype=self.dtype)
        drive_b = np.empty_like(drive_a)
        phase_drive(np.ascontiguousarray(phases, dtype=np.float64), coupling, drive_a, drive_b)
        return drive_a, drive_b

    def relax(
        self,
        inputs: np.ndarray,
        nudge: Nudge | None = None,
        start: np.ndarray | None = None,
        settle: Settle | None = None,
    ) -> Relaxation:
        inputs, state, strength, target = self._prepare(inputs, nudge, start,
                                                        rest=self.options.rest_phase)
        drive = self._clamped(inputs, self._input_fields)
        return self._settle(drive, state, strength, target, settle)

    def relax_phases(
        self,
        input_phases: np.ndarray,
        nudge: Nudge | None = None,
        start: np.ndarray | None = None,
        settle: Settle | None = None,
    ) -> Relaxation:
        """:meth:`relax` with the input oscillators clamped at given phases phi_0 (radians,
        shape (batch, input_size), float64) instead of pixels: what an oscillator board
        receives (see :mod:`labep.simulators.oim_board_emulator`). ``relax(x)`` equals
        ``relax_phases(model.input_phases(x))`` for x in the bench's dtype, bit for bit.
        The clamp's drive is not cached (a board relaxes one sample at a time)."""
        phases = np.ascontiguousarray(input_phases, dtype=np.float64)
        if phases.ndim != 2 or phases.shape[1] != self.model.input_size:
            raise ValueError(f"{self.name}: input phases must be (batch, "
                             f"{self.model.input_size}), got {phases.shape}")
        state, strength, target = self._start_and_nudge(phases.shape[0], nudge, start,
                                                        rest=self.options.rest_phase)
        return self._settle(self._phase_fields(phases), state, strength, target, settle)

    def _settle(self, drive: tuple[np.ndarray, np.ndarray], state: np.ndarray,
                strength: float, target: np.ndarray, settle: Settle | None) -> Relaxation:
        """Integrate ``state`` in place with the clamped inputs' ``drive`` and read it out."""
        settle = settle or Settle(self.options.tolerance, self.options.max_steps)
        if settle.samples and self.options.phase_noise > 0.0:  # Boltzmann samples at T
            return sample_oim(self, drive, state, strength, target, settle)
        drive_a, drive_b = drive
        batch = state.shape[0]
        steps = np.zeros(batch, dtype=np.int64)
        residual = np.zeros(batch, dtype=np.float64)
        self._relaxations += 1
        settle_oim(self._sizes, self._weights, self._weight_offsets, self._transposed,
                   self._biases, drive_a, drive_b, state, target, strength, self.model.shil,
                   float(self.options.dt),
                   ("euler", "heun", "adaptive").index(self.options.integrator),
                   float(self.options.phase_noise),
                   self.options.device.seed * 1_000_003 + self._relaxations,
                   float(settle.tolerance), int(settle.max_steps), steps, residual,
                   self._dense)
        state = read_out(state, self.options.device, self._readout_rng, settle.readouts,
                         0.0, TWO_PI, periodic=True)
        return Relaxation(state, residual <= settle.tolerance, steps, residual)
