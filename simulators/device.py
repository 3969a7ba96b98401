"""Imperfect parameter storage and readout of a simulated bench: the hidden device truth.

Every imperfection is a documented field of :class:`DeviceOptions`, off by default (the ideal
device), and every draw comes from ``seed``, so a simulated device is reproducible and a
calibration of it can be tested against the truth it is meant to find.

With ``bits`` set, a parameter is stored as integer codes k in [0, levels - 1], levels = 2^bits,
nominally spaced over the parameter's physical range [low, high]. Channel i realizes

    p_i(k) = c + g_i (phi(k) - c) + o_i + write noise,       c = (low + high) / 2,

with g_i = 1 + gain_mismatch * N(0, 1), o_i = offset_mismatch * (high - low) * N(0, 1), and
phi the shared monotone response: phi(k) = low + (high - low) * (u + 4 a u (1 - u)),
u = k / (levels - 1), a the ``nonlinearity`` (the bow at mid-range as a fraction of the range).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field, model_validator

from labep.hardware.bench import BenchError, OutOfRangeError, ParameterSpec
from labep.protocol.strict import STRICT_CONFIG


class DeviceOptions(BaseModel):
    """Device imperfections of a simulated bench (``bench.options.device`` in a protocol)."""

    model_config = STRICT_CONFIG

    bits: int | None = Field(
        None, ge=1, le=16,
        description="Parameter resolution: codes 0 .. 2^bits - 1 over the physical range. "
        "None: continuous parameters.")
    gain_mismatch: float = Field(
        0.0, ge=0.0, le=0.5, description="Std of the per-channel gain g_i around 1.")
    offset_mismatch: float = Field(
        0.0, ge=0.0, le=0.5, description="Std of the per-channel offset o_i, fraction of range.")
    nonlinearity: float = Field(
        0.0, ge=-0.2, le=0.2,
        description="Bow a of the shared monotone response at mid-range, fraction of range.")
    write_noise: float = Field(
        0.0, ge=0.0, description="Std of the stored value around its target at each write, LSB.")
    readback_noise: float = Field(
        0.0, ge=0.0, description="Std of a measurement of a stored parameter, in LSB.")
    readout_noise: float = Field(
        0.0, ge=0.0, description="Std of the state readout around the settled state.")
    readout_bits: int | None = Field(
        None, ge=1, le=24,
        description="Resolution of the state readout over the state's range (the detector's "
        "ADC).")
    seed: int = Field(0, ge=0, description="Draws the device truth and every noise sample.")

    @model_validator(mode="after")
    def _codes_needed(self) -> DeviceOptions:
        analog = ("gain_mismatch", "offset_mismatch", "nonlinearity", "write_noise",
                  "readback_noise")
        used = [name for name in analog if getattr(self, name) != 0.0]
        if used and self.bits is None:
            raise ValueError(f"{', '.join(used)} act on stored codes: set 'bits' as well")
        return self

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def ideal_readout(self) -> bool:
        return self.readout_noise == 0.0 and self.readout_bits is None


def nominal_response(spec: ParameterSpec, nonlinearity: float = 0.0) -> np.ndarray:
    """phi(k) for every code k of a quantized parameter (the shared monotone response)."""
    assert spec.levels is not None
    u = np.linspace(0.0, 1.0, spec.levels)
    return spec.low + (spec.high - spec.low) * (u + 4.0 * nonlinearity * u * (1.0 - u))


class ParameterDevice:
    """The stored codes of one parameter and the physical values its channels realize."""

    def __init__(self, spec: ParameterSpec, options: DeviceOptions, rng: np.random.Generator,
                 bench: str) -> None:
        if spec.levels is None:
            raise ValueError("a ParameterDevice stores codes: the spec needs levels")
        self.spec = spec
        self.bench = bench
        self.options = options
        self.rng = rng
        self.lsb = (spec.high - spec.low) / (spec.levels - 1)
        self.center = 0.5 * (spec.low + spec.high)
        span = spec.high - spec.low
        self.gain = 1.0 + options.gain_mismatch * rng.standard_normal(spec.shape)
        self.offset = options.offset_mismatch * span * rng.standard_normal(spec.shape)
        self.response = nominal_response(spec, options.nonlinearity)
        self.codes = np.full(spec.shape, (spec.levels - 1) // 2, dtype=np.int64)
        self.values = self.realize(self.codes)

    def realize(self, codes: np.ndarray) -> np.ndarray:
        """The noiseless physical value of each channel at ``codes``."""
        return self.center + self.gain * (self.response[codes] - self.center) + self.offset

    def check(self, codes: np.ndarray) -> np.ndarray:
        """The codes as int64, or :class:`OutOfRangeError` for non-integers and codes outside
        [0, levels - 1]."""
        codes = np.asarray(codes)
        if codes.shape != self.spec.shape:
            raise BenchError(f"{self.bench}: write {self.spec.name}: shape {codes.shape} != "
                             f"declared {self.spec.shape}")
        as_int = np.rint(codes).astype(np.int64) if codes.dtype.kind == "f" else codes
        if codes.dtype.kind not in "iuf" or (codes.dtype.kind == "f" and (
                not np.all(np.isfinite(codes)) or np.any(as_int != codes))):
            raise OutOfRangeError(f"{self.bench}: write {self.spec.name}: codes must be "
                                  "integers")
        if as_int.size and (as_int.min() < 0 or as_int.max() > self.spec.levels - 1):
            raise OutOfRangeError(
                f"{self.bench}: write {self.spec.name}: codes span [{as_int.min()}, "
                f"{as_int.max()}], outside [0, {self.spec.levels - 1}]; refused")
        return as_int

    def store(self, codes: np.ndarray) -> np.ndarray:
        """Store checked codes; returns the realized values (with write noise)."""
        as_int = self.check(codes)
        values = self.realize(as_int)
        if self.options.write_noise:
            values = values + self.options.write_noise * self.lsb * self.rng.standard_normal(
                self.spec.shape)
        self.codes = as_int.copy()
        self.values = values
        return values

    def measure(self) -> np.ndarray:
        """A measurement of the realized values (with readback noise)."""
        if not self.options.readback_noise:
            return self.values.copy()
        return self.values + self.options.readback_noise * self.lsb * self.rng.standard_normal(
            self.spec.shape)


def read_out(state: np.ndarray, options: DeviceOptions, rng: np.random.Generator,
             readouts: int, low: float = 0.0, high: float = 1.0,
             periodic: bool = False) -> np.ndarray:
    """The state as a detector reports it: the mean of ``readouts`` noisy readouts, each
    quantized to ``readout_bits`` over [low, high]. The ideal readout returns the state.

    ``periodic`` (phases): readouts wrap into [low, high), are quantized to 2^bits steps of
    the period, and are averaged on the circle.
    """
    if options.ideal_readout:
        return state
    span = high - low
    total = np.zeros(state.shape, dtype=np.float64)
    total_sin = np.zeros(state.shape, dtype=np.float64)
    for _ in range(readouts):
        sample = state + options.readout_noise * rng.standard_normal(state.shape)
        if periodic:
            sample = low + np.mod(sample - low, span)
            if options.readout_bits is not None:
                steps = 2 ** options.readout_bits
                sample = low + np.mod(np.round((sample - low) / span * steps), steps) * (
                    span / steps)
            angle = (sample - low) * (2 * np.pi / span)
            total += np.cos(angle)
            total_sin += np.sin(angle)
            continue
        if options.readout_bits is not None:
            top = 2 ** options.readout_bits - 1
            unit = (np.clip(sample, low, high) - low) / span
            sample = low + span * np.round(unit * top) / top
        total += sample
    if periodic:
        mean = np.mod(np.arctan2(total_sin, total), 2 * np.pi) * (span / (2 * np.pi)) + low
        return mean.astype(state.dtype)
    return (total / readouts).astype(state.dtype)
