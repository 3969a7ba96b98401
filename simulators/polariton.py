"""Numba simulator of an exciton-polariton lattice (the physics of the VISA polariton bench).

Physics: :class:`labep.models.polariton.PolaritonLattice`, the discretized driven-dissipative
Gross-Pitaevskii equation on a 1-D chain or a 2-D grid,

    i d(psi_i)/dt = -J sum_{j in nn(i)} psi_j + (V_i + U_i + g |psi_i|^2) psi_i
                    + (i/2) (P - gamma - Gamma |psi_i|^2) psi_i,

integrated with classical fourth-order Runge-Kutta steps of size ``dt`` (units of 1/J) in a
frame rotating at Omega: d(psi)/dt = -i (h - Omega psi). The frame is a gauge transformation
(the physics is unchanged); Omega follows the frame frequency mu estimated from the state at
every residual check, so a stationary state is a true fixed point of the discrete steps (in the
lab frame RK4 would damp the rotation exp(-i mu t) by O((mu dt)^6) per step and leave a
residual floor). Every ``check_every`` steps the rotating-frame residual
max_i |h_i - mu psi_i| / sqrt(N / n) (units of J; see the model) is measured; a sample stops
when it is at or below tolerance (each sample on its own), or after ``max_steps``.

What a relaxation displays on the (simulated) light modulator: the pattern V + U(x) + nudge,
with the input potential U(x) on the input sites and the nudge potential beta (n_k - t_k) on
the output sites (n_k from the ``start`` state, the free state; without a start the free phase
is relaxed first to get it). The pattern must lie within ``potential_range``; a relaxation whose
pattern does not is refused before anything runs (:class:`labep.hardware.bench.OutOfRangeError`).
The trainable range of V is ``potential_range`` less ``margin`` at both ends, which leaves room
for the inputs and the nudge.

Imperfections (all off by default; every draw from ``device.seed``):

- potential resolution, the light modulator's grey levels: ``device.bits`` quantizes the
  whole range into 2^bits levels; V is then written as codes (levels 2^bits - 2 m, m the margin
  in grey levels) and the input and nudge potentials are rounded to whole grey levels too;
- per-channel mismatch and a bowed response: ``device.gain_mismatch``, ``offset_mismatch``,
  ``nonlinearity``, ``write_noise``, ``readback_noise`` (:mod:`labep.simulators.device`);
  a channel's gain scales the input and nudge potentials it displays as well;
- camera noise and bit depth: ``device.readout_noise`` (std of an intensity readout, units of
  |psi|^2) and ``device.readout_bits`` (intensities quantized over [0, ``intensity_full_scale``]);
  ``phase_noise`` (std of the interferometric phase, rad); ``readouts`` are averaged;
- pump fluctuations: ``pump_noise``, the relative std of the pump P, drawn per relaxation and
  sample (the pulse-to-pulse or shot-to-shot fluctuation of the laser).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numba
import numpy as np
from pydantic import BaseModel, Field, model_validator

from labep.hardware.bench import (
    BenchError,
    BenchIdentity,
    BenchLifecycle,
    BenchSpec,
    Nudge,
    OutOfRangeError,
    ParameterSpec,
    Relaxation,
    Settle,
)
from labep.models.polariton import PolaritonLattice
from labep.protocol.strict import STRICT_CONFIG
from labep.simulators.device import DeviceOptions, ParameterDevice, read_out
from labep.simulators.settle_loop import integrate

# -- kernels ---------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _derivative(re, im, neighbours, potential, frame, pump, hopping, interaction, loss,
                saturation, relaxation, out_re, out_im):
    """d(psi)/dt = -i [(1 - i eta)(h_E - Omega psi) + (i/2)(P_i - gamma - Gamma |psi|^2) psi]
    for every site of one sample (``frame`` is Omega, ``relaxation`` eta, ``pump`` P_i)."""
    for i in range(re.shape[0]):
        sum_re = 0.0
        sum_im = 0.0
        for k in range(neighbours.shape[1]):
            j = neighbours[i, k]
            if j < 0:
                break
            sum_re += re[j]
            sum_im += im[j]
        density = re[i] * re[i] + im[i] * im[i]
        real_part = potential[i] - frame + interaction * density
        gain = 0.5 * (pump[i] - loss - saturation * density)
        c_re = -hopping * sum_re + real_part * re[i]
        c_im = -hopping * sum_im + real_part * im[i]
        # (1 - i eta)(c_re + i c_im) + i gain psi
        h_re = c_re + relaxation * c_im - gain * im[i]
        h_im = c_im - relaxation * c_re + gain * re[i]
        out_re[i] = h_im
        out_im[i] = -h_re


@numba.njit(cache=True)
def _residual(re, im, neighbours, potential, frame, pump, hopping, interaction, loss,
              saturation, relaxation, a_re, a_im):
    """(rotating-frame residual, mu) of one sample. With F(mu) = A - mu B, A = (1 - i eta) h_E
    + (i/2) D psi and B = (1 - i eta) psi, mu = Re(B^dagger A) / |B|^2 (least squares) and the
    residual is max_i |F_i(mu)| / sqrt(N / n); infinite if N / n < 1e-12."""
    _derivative(re, im, neighbours, potential, frame, pump, hopping, interaction, loss,
                saturation, relaxation, a_re, a_im)
    n = re.shape[0]
    norm = 0.0
    overlap = 0.0
    for i in range(n):
        b_re = re[i] + relaxation * im[i]
        b_im = im[i] - relaxation * re[i]
        # i d(psi)/dt = A - Omega B
        x = -a_im[i] + frame * b_re
        y = a_re[i] + frame * b_im
        a_re[i] = x
        a_im[i] = y
        norm += b_re * b_re + b_im * b_im
        overlap += b_re * x + b_im * y
    if norm / (n * (1.0 + relaxation * relaxation)) < 1e-12:
        return math.inf, frame
    mu = overlap / norm
    worst = 0.0
    for i in range(n):
        x = a_re[i] - mu * (re[i] + relaxation * im[i])
        y = a_im[i] - mu * (im[i] - relaxation * re[i])
        worst = max(worst, math.sqrt(x * x + y * y))
    return worst / math.sqrt(norm / (n * (1.0 + relaxation * relaxation))), mu


@numba.njit(cache=True)
def _polariton_measure(work):
    """The rotating-frame residual of one sample; mu lands in ``mu[0]`` and, if finite, becomes
    the frame Omega (``frame[0]``) of the next steps; infinite once the field is not
    finite."""
    (x_re, x_im, neighbours, pot, p, hopping, interaction, loss, saturation, relaxation,
     frame, mu, k1r, k1i, _, _, _, _, _, _, _, _, _) = work
    residual, mu[0] = _residual(x_re, x_im, neighbours, pot, frame[0], p, hopping,
                                interaction, loss, saturation, relaxation, k1r, k1i)
    if math.isfinite(mu[0]):
        frame[0] = mu[0]
    if not (math.isfinite(x_re[0]) and math.isfinite(x_im[0])):
        return math.inf
    return residual


@numba.njit(cache=True)
def _polariton_step(work, step):
    """One classical RK4 step of size dt of one sample's field, in the frame ``frame[0]``."""
    (x_re, x_im, neighbours, pot, p, hopping, interaction, loss, saturation, relaxation,
     frame_at, _, k1r, k1i, k2r, k2i, k3r, k3i, k4r, k4i, t_re, t_im, dt) = work
    n = x_re.shape[0]
    frame = frame_at[0]
    half = 0.5 * dt
    sixth = dt / 6.0
    _derivative(x_re, x_im, neighbours, pot, frame, p, hopping, interaction, loss,
                saturation, relaxation, k1r, k1i)
    for i in range(n):
        t_re[i] = x_re[i] + half * k1r[i]
        t_im[i] = x_im[i] + half * k1i[i]
    _derivative(t_re, t_im, neighbours, pot, frame, p, hopping, interaction, loss,
                saturation, relaxation, k2r, k2i)
    for i in range(n):
        t_re[i] = x_re[i] + half * k2r[i]
        t_im[i] = x_im[i] + half * k2i[i]
    _derivative(t_re, t_im, neighbours, pot, frame, p, hopping, interaction, loss,
                saturation, relaxation, k3r, k3i)
    for i in range(n):
        t_re[i] = x_re[i] + dt * k3r[i]
        t_im[i] = x_im[i] + dt * k3i[i]
    _derivative(t_re, t_im, neighbours, pot, frame, p, hopping, interaction, loss,
                saturation, relaxation, k4r, k4i)
    for i in range(n):
        x_re[i] += sixth * (k1r[i] + 2.0 * k2r[i] + 2.0 * k3r[i] + k4r[i])
        x_im[i] += sixth * (k1i[i] + 2.0 * k2i[i] + 2.0 * k3i[i] + k4i[i])


@numba.njit(cache=True, parallel=True)
def settle_polariton(re, im, neighbours, potential, pump, hopping, interaction, loss,
                     saturation, relaxation, dt, tolerance, max_steps, check_every, steps_out,
                     residual_out, mu_out):
    """Integrate a batch of fields (``re``, ``im``: (batch, n), in place) with RK4 steps in
    the rotating frame until each sample's residual is at or below ``tolerance`` (checked
    every ``check_every`` steps) or ``max_steps`` steps; the step loop is
    :func:`labep.simulators.settle_loop.integrate`. ``potential`` (batch, n) is what the
    light modulator displays, ``pump`` (batch, n) the pump P_i."""
    batch, n = re.shape
    for sample in numba.prange(batch):
        frame = np.zeros(1)
        mu = np.zeros(1)
        work = (re[sample], im[sample], neighbours, potential[sample], pump[sample], hopping,
                interaction, loss, saturation, relaxation, frame, mu, np.empty(n),
                np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n),
                np.empty(n), np.empty(n), np.empty(n), dt)
        steps, residual = integrate(_polariton_step, _polariton_measure, work, tolerance,
                                    max_steps, check_every)
        steps_out[sample] = steps
        residual_out[sample] = residual
        mu_out[sample] = mu[0]


# -- the bench -------------------------------------------------------------------------------


def rest_field(n_sites: int, amplitude: float) -> np.ndarray:
    """The field every relaxation without a start begins from: a weak, fixed, deliberately
    asymmetric seed a (1 + 0.2 cos(2.3 i + 0.4)) exp(0.5 i sin(1.7 i)) (a condensate forms
    from noise; a fixed seed keeps runs deterministic, and breaking the lattice's mirror
    symmetries keeps it off symmetric unstable states)."""
    i = np.arange(n_sites)
    return amplitude * (1.0 + 0.2 * np.cos(2.3 * i + 0.4)) * np.exp(0.5j * np.sin(1.7 * i))


class PolaritonSimulatorOptions(BaseModel):
    """Options of the polariton simulator bench (``bench.options`` in a protocol)."""

    model_config = STRICT_CONFIG

    dtype: Literal["float32", "float64"] = Field(
        "float64", description="Arithmetic precision of the field (float32 leaves a residual "
        "floor near 1e-6).")
    dt: float = Field(0.1, gt=0.0, le=1.0, description="RK4 step (units of 1/J).")
    check_every: int = Field(
        10, ge=1, le=100_000,
        description="Steps between residual checks (and frame-frequency updates).")
    tolerance: float = Field(1e-6, gt=0.0, description="Default settle tolerance (units of J).")
    max_steps: int = Field(20_000, ge=1, description="Default cap on RK4 steps.")
    potential_range: tuple[float, float] = Field(
        (-4.0, 4.0), strict=False, description="What the light modulator can display, [low, "
        "high] (units of J; a YAML list): V + input + nudge must stay inside.")
    margin: float = Field(
        1.5, ge=0.0, description="Kept free at both ends of potential_range for the input and "
        "nudge potentials: V is trainable in [low + margin, high - margin].")
    rest_amplitude: float = Field(
        0.3, gt=0.0, description="Amplitude of the seed field a relaxation starts from.")
    pump_noise: float = Field(
        0.0, ge=0.0, le=0.5, description="Relative std of the pump P per relaxation and sample.")
    phase_noise: float = Field(
        0.0, ge=0.0, le=math.pi, description="Std of the interferometric phase readout (rad).")
    intensity_full_scale: float = Field(
        16.0, gt=0.0, description="Camera full scale (|psi|^2) for device.readout_bits.")
    device: DeviceOptions = Field(
        default_factory=DeviceOptions,
        description="Light-modulator resolution (bits) and mismatch, camera noise and bit depth "
        "(readout_noise, readout_bits), all off.")

    @model_validator(mode="after")
    def _room_for_v(self) -> PolaritonSimulatorOptions:
        low, high = self.potential_range
        if not high - low > 2.0 * self.margin:
            raise ValueError("potential_range must be wider than twice the margin")
        return self


class SlmGrid:
    """The light modulator's grey levels over ``potential_range`` and where V's codes sit.

    With 2^bits grey levels g = 0 .. 2^bits - 1 the displayed potential is low + g * lsb; V's
    code k is grey level k + m (m = round(margin / lsb)), so V has 2^bits - 2m levels over
    [low + m lsb, high - m lsb]."""

    def __init__(self, potential_range: tuple[float, float], margin: float, bits: int) -> None:
        self.low, self.high = (float(v) for v in potential_range)
        self.levels = 2 ** int(bits)
        self.lsb = (self.high - self.low) / (self.levels - 1)
        self.margin_levels = round(margin / self.lsb)
        if self.levels - 2 * self.margin_levels < 2:
            raise ValueError("the margin leaves V fewer than 2 grey levels")

    @property
    def v_levels(self) -> int:
        return self.levels - 2 * self.margin_levels

    @property
    def v_range(self) -> tuple[float, float]:
        return (self.low + self.margin_levels * self.lsb,
                self.low + (self.levels - 1 - self.margin_levels) * self.lsb)

    def offset_levels(self, offsets: np.ndarray) -> np.ndarray:
        """Potential offsets (input, nudge) in whole grey levels (rounded half to even)."""
        return np.rint(np.asarray(offsets, dtype=np.float64) / self.lsb).astype(np.int64)


class PolaritonSimulator(BenchLifecycle):
    """The polariton lattice as a Bench, integrated by a numba kernel."""

    name = "polariton"
    model_kinds = ("polariton",)
    options_model = PolaritonSimulatorOptions

    def __init__(self, model: PolaritonLattice,
                 options: PolaritonSimulatorOptions | None = None) -> None:
        self.model = model
        self.options = options or PolaritonSimulatorOptions()
        self.dtype = np.dtype(self.options.dtype)
        device = self.options.device
        low, high = self.options.potential_range
        self.grid: SlmGrid | None = None
        if device.quantized:
            assert device.bits is not None
            self.grid = SlmGrid((low, high), self.options.margin, device.bits)
            v_low, v_high = self.grid.v_range
            spec = ParameterSpec("V", (model.n_sites,), v_low, v_high, "J", self.grid.v_levels)
        else:
            spec = ParameterSpec("V", (model.n_sites,), low + self.options.margin,
                                 high - self.options.margin, "J")
        self.spec = BenchSpec((spec,), model.input_size, model.state_size, model.output_slice,
                              state_unit="sqrt(polaritons per site)")
        self.device: ParameterDevice | None = None
        self.potential = np.zeros(model.n_sites)  # V as realized (float64)
        if self.grid is not None:
            self.device = ParameterDevice(spec, device, np.random.default_rng([device.seed, 0]),
                                          self.name)
            self.potential = np.array(self.device.values, dtype=np.float64)
        self._readout_rng = np.random.default_rng([device.seed, 1])
        self._pump_rng = np.random.default_rng([device.seed, 2])
        self._neighbours = np.ascontiguousarray(model.neighbours)
        self._rest = rest_field(model.n_sites, self.options.rest_amplitude)

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> BenchIdentity:
        shape = "x".join(str(n) for n in self.model.lattice)
        return BenchIdentity("labep", "polariton-simulator",
                             f"polariton-{shape}-device{self.options.device.seed}",
                             "numba-" + numba.__version__)

    def close(self) -> None:
        """Nothing to release: the simulated pump is off between relaxations."""

    # -- parameters -------------------------------------------------------------------------

    def write(self, params: dict[str, np.ndarray]) -> None:
        """Continuous storage: V in units of J within the trainable range. Quantized storage
        (``device.bits``): V as integer codes 0 .. levels - 1. Checked before storing."""
        for name, values in params.items():
            if name != "V":
                raise BenchError(f"{self.name}: write: no parameter {name!r}; the bench has V")
            if self.device is None:
                self.spec.parameter("V").check_range(values, bench=self.name)
            else:
                self.device.check(values)
        if "V" in params:
            if self.device is None:
                self.potential = np.array(params["V"], dtype=np.float64)
            else:
                self.potential = np.array(self.device.store(params["V"]), dtype=np.float64)

    def read_params(self) -> dict[str, np.ndarray]:
        """What the bench holds: codes (quantized storage) or values (continuous)."""
        if self.device is not None:
            return {"V": self.device.codes.copy()}
        return {"V": self.potential.copy()}

    def measure_params(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """A measurement of the potentials the channels realize (with readback noise)."""
        if self.device is not None:
            return {"V": self.device.measure()}
        return {"V": self.potential.copy()}

    # -- relaxation -------------------------------------------------------------------------

    def display(self, offsets: np.ndarray) -> np.ndarray:
        """The potential (batch, n_sites) the modulator realizes for V plus ``offsets`` (input
        and nudge potentials), after checking that the pattern lies within its range.

        Quantized: the offsets are rounded to whole grey levels, the pattern's grey levels
        (V code + margin + offset levels) must lie in [0, 2^bits - 1], and each channel
        realizes V's value plus its gain times the rounded offset."""
        if self.grid is None:
            low, high = self.options.potential_range
            pattern = self.potential[None, :] + offsets
            lo, hi = float(pattern.min()), float(pattern.max())
            if not (low <= lo and hi <= high):
                raise OutOfRangeError(
                    f"{self.name}: the pattern V + input + nudge spans [{lo:.6g}, {hi:.6g}] J, "
                    f"outside the modulator's range [{low:g}, {high:g}] J; refused")
            return pattern
        assert self.device is not None
        shift = self.grid.offset_levels(offsets)
        grey = self.device.codes[None, :] + self.grid.margin_levels + shift
        if grey.min() < 0 or grey.max() > self.grid.levels - 1:
            raise OutOfRangeError(
                f"{self.name}: the pattern's grey levels span [{grey.min()}, {grey.max()}], "
                f"outside [0, {self.grid.levels - 1}]; refused")
        return self.potential[None, :] + self.device.gain[None, :] * (shift * self.grid.lsb)

    def _check_inputs(self, inputs: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.model.input_size or not np.all(np.isfinite(x)):
            raise ValueError(f"{self.name}: inputs must be finite, (batch, "
                             f"{self.model.input_size}), got {x.shape}")
        return x

    def relax(
        self,
        inputs: np.ndarray,
        nudge: Nudge | None = None,
        start: np.ndarray | None = None,
        settle: Settle | None = None,
    ) -> Relaxation:
        """Display V + U(x) (+ the nudge potential), pump, and integrate to a steady state
        from ``start`` (or the rest seed); the state read back through the camera."""
        settle = settle or Settle(self.options.tolerance, self.options.max_steps)
        x = self._check_inputs(inputs)
        batch = x.shape[0]
        offsets = self.model.input_potentials(x)
        if nudge is not None and nudge.strength != 0.0:
            target = np.asarray(nudge.target, dtype=np.float64)
            if target.shape != (batch, self.model.output_size):
                raise ValueError(f"{self.name}: nudge target must be ({batch}, "
                                 f"{self.model.output_size}), got {target.shape}")
            reference = start if start is not None else self.relax(x, settle=settle).state
            offsets = offsets + self.model.nudge_potential(float(nudge.strength), target,
                                                           np.asarray(reference, np.float64))
        potential = self.display(offsets)
        if start is None:
            field = np.repeat(self._rest[None, :], batch, axis=0)
        else:
            start = np.asarray(start, dtype=np.float64)
            if start.shape != (batch, self.model.state_size):
                raise ValueError(f"{self.name}: start must be ({batch}, "
                                 f"{self.model.state_size}), got {start.shape}")
            field = self.model.field(start)
        return self.integrate(potential, field, self.pumps(x), settle)

    def pumps(self, inputs: np.ndarray) -> np.ndarray:
        """The pump P_i (batch, n_sites) of each sample (the model's, with the input pump),
        times 1 + the pump fluctuation of that sample if any."""
        pump = self.model.pumps(inputs)
        if self.options.pump_noise:
            pump *= 1.0 + self.options.pump_noise * self._pump_rng.standard_normal(
                (len(pump), 1))
        return pump

    def evolve(self, potential: np.ndarray, field: np.ndarray, pump: np.ndarray,
               tolerance: float, max_steps: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Run the kernel on a displayed ``potential`` (batch, n) from the complex ``field``
        (batch, n) with ``pump`` (batch, n): (field, steps, residual, mu) afterwards, the
        field complex128 whatever the bench's dtype."""
        model = self.model
        batch = field.shape[0]
        re = np.ascontiguousarray(field.real, dtype=self.dtype)
        im = np.ascontiguousarray(field.imag, dtype=self.dtype)
        steps = np.zeros(batch, dtype=np.int64)
        residual = np.zeros(batch, dtype=np.float64)
        mu = np.zeros(batch, dtype=np.float64)
        settle_polariton(re, im, self._neighbours,
                         np.ascontiguousarray(potential, dtype=self.dtype),
                         np.ascontiguousarray(pump, dtype=self.dtype),
                         model.hopping, model.interaction, model.loss, model.saturation,
                         model.energy_relaxation, float(self.options.dt), float(tolerance),
                         int(max_steps),
                         int(self.options.check_every), steps, residual, mu)
        return re.astype(np.float64) + 1j * im, steps, residual, mu

    def integrate(self, potential: np.ndarray, field: np.ndarray, pump: np.ndarray,
                  settle: Settle) -> Relaxation:
        """:meth:`evolve` to the settle criterion, read out through the camera."""
        field, steps, residual, mu = self.evolve(potential, field, pump, settle.tolerance,
                                                 settle.max_steps)
        state = self.read_out(field, settle.readouts)
        converged = residual <= settle.tolerance
        return Relaxation(state, converged, steps, residual, {"frame_frequency": mu})

    def read_out(self, field: np.ndarray, readouts: int) -> np.ndarray:
        """State rows of ``field`` as the camera reports them: intensities with readout noise
        and bit depth, phases with interferometric noise, ``readouts`` averaged."""
        device = self.options.device
        if device.ideal_readout and not self.options.phase_noise:
            return self.model.pack(field, self.dtype)
        intensity = read_out(np.abs(field) ** 2, device, self._readout_rng, readouts,
                             0.0, self.options.intensity_full_scale)
        phase = np.angle(field)
        if self.options.phase_noise:
            draws = phase[None] + self.options.phase_noise * self._readout_rng.standard_normal(
                (readouts, *phase.shape))
            phase = np.arctan2(np.sin(draws).sum(0), np.cos(draws).sum(0))
        measured = np.sqrt(np.maximum(intensity, 0.0)) * np.exp(1j * phase)
        return self.model.pack(measured, self.dtype)

    # -- resume (labep.hardware.bench.Resumable) ----------------------------------------------

    def save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The realized potentials, the codes, and every generator's state."""
        meta: dict[str, Any] = {"readout_rng": self._readout_rng.bit_generator.state,
                                "pump_rng": self._pump_rng.bit_generator.state}
        arrays = {"potential": self.potential.copy()}
        if self.device is not None:
            meta["truth_rng"] = self.device.rng.bit_generator.state
            arrays["codes"] = self.device.codes.copy()
            arrays["values"] = np.asarray(self.device.values, dtype=np.float64)
        return meta, arrays

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.potential = np.array(arrays["potential"], dtype=np.float64)
        self._readout_rng.bit_generator.state = meta["readout_rng"]
        self._pump_rng.bit_generator.state = meta["pump_rng"]
        if self.device is not None:
            self.device.codes = np.array(arrays["codes"], dtype=np.int64)
            self.device.values = np.array(arrays["values"], dtype=np.float64)
            self.device.rng.bit_generator.state = meta["truth_rng"]
