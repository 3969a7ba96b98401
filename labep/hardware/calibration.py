"""Calibration of a bench's parameter channels: sweep codes, measure, fit, record.

For each quantized parameter the routine writes the same code to every channel at a sweep of
codes from 0 to levels - 1, measures what each channel realizes (averaging ``repeats``
measurements), and fits the model of :class:`labep.hardware.write_path.CodeMap`:

    m_ij = c + g_i (phi_j - c) + o_i

(channel i, sweep code j): per-channel gain g_i and offset o_i and a shared monotone response
phi, by a rank-one factorization of the row-centred sweep (normalized so that the mean gain is 1
and the mean offset 0), phi made monotone and interpolated to every code. The record keeps the
raw sweep, the fitted map and its residual in LSB; records are never overwritten, a newer one for
the same bench supersedes the older.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from labep.hardware.bench import Bench, BenchIdentity, ParameterSpec
from labep.hardware.write_path import CodeMap, Measurable


class CalibrationError(RuntimeError):
    """A calibration cannot be run, fitted, or used with this bench."""


@dataclass
class ParameterCalibration:
    """The sweep and fit of one parameter."""

    codes: np.ndarray  # (S,) swept codes
    measured: np.ndarray  # (S, *shape) mean measured value per channel and code
    gain: np.ndarray  # (*shape)
    offset: np.ndarray  # (*shape)
    response: np.ndarray  # (levels,) shared monotone response phi
    residual_rms_lsb: float
    residual_max_lsb: float

    def code_map(self, spec: ParameterSpec) -> CodeMap:
        return CodeMap(spec, self.gain, self.offset, self.response)


@dataclass
class CalibrationRecord:
    """Which bench, when, what was measured, the fitted maps and their residuals."""

    bench_name: str
    identity: dict[str, str]
    parameters: dict[str, ParameterCalibration]
    points: int
    repeats: int
    id: str = ""
    created: str = ""
    superseded_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def residual_rms_lsb(self) -> float:
        values = [p.residual_rms_lsb for p in self.parameters.values()]
        return float(np.sqrt(np.mean(np.square(values)))) if values else 0.0

    def matches(self, identity: BenchIdentity | dict[str, str]) -> bool:
        """Same vendor, model and serial as the bench that answered ``open()``."""
        other = identity.as_dict() if isinstance(identity, BenchIdentity) else identity
        return all(self.identity.get(k) == other.get(k) for k in ("vendor", "model", "serial"))

    def code_maps(self, bench: Bench) -> dict[str, CodeMap]:
        maps = {}
        for name, cal in self.parameters.items():
            spec = bench.spec.parameter(name)
            if spec.levels != len(cal.response) or tuple(cal.gain.shape) != spec.shape:
                raise CalibrationError(
                    f"calibration {self.id}: parameter {name} was calibrated with "
                    f"{len(cal.response)} levels and shape {cal.gain.shape}, the bench has "
                    f"{spec.levels} levels and shape {spec.shape}")
            maps[name] = cal.code_map(spec)
        return maps

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "bench": self.bench_name,
            "identity": self.identity,
            "parameters": {name: {"channels": int(p.gain.size),
                                  "residual_rms_lsb": p.residual_rms_lsb,
                                  "residual_max_lsb": p.residual_max_lsb,
                                  "gain_range": [float(p.gain.min()), float(p.gain.max())],
                                  "offset_range": [float(p.offset.min()),
                                                   float(p.offset.max())]}
                           for name, p in self.parameters.items()},
            "points": self.points,
            "repeats": self.repeats,
            "residual_rms_lsb": self.residual_rms_lsb,
            "superseded_by": self.superseded_by,
        }


def fit_channels(spec: ParameterSpec, codes: np.ndarray,
                 measured: np.ndarray) -> ParameterCalibration:
    """Fit g_i, o_i and phi from a sweep (codes (S,), measured (S, *shape))."""
    assert spec.levels is not None
    lsb = (spec.high - spec.low) / (spec.levels - 1)
    center = 0.5 * (spec.low + spec.high)
    rows = measured.reshape(len(codes), -1).T.astype(np.float64) - center  # (channels, S)
    row_mean = rows.mean(axis=1, keepdims=True)
    u, s, vt = np.linalg.svd(rows - row_mean, full_matrices=False)
    gain = u[:, 0] * s[0]
    shape_phi = vt[0]
    scale = gain.mean()
    if abs(scale) < 1e-12:
        raise CalibrationError(f"{spec.name}: the channels do not respond to their codes")
    gain, shape_phi = gain / scale, shape_phi * scale  # mean gain 1
    mean_phi = float(rows.mean())  # mean offset 0
    phi = shape_phi - shape_phi.mean() + mean_phi  # centred response at the swept codes
    offset = row_mean[:, 0] - gain * phi.mean()
    model = gain[:, None] * phi[None, :] + offset[:, None]
    residual = (rows - model) / lsb
    increasing = phi[-1] >= phi[0]
    monotone = np.maximum.accumulate(phi) if increasing else np.minimum.accumulate(phi)
    response = np.interp(np.arange(spec.levels), codes, monotone) + center
    return ParameterCalibration(
        codes=np.asarray(codes), measured=np.asarray(measured, dtype=np.float32),
        gain=gain.reshape(spec.shape), offset=offset.reshape(spec.shape), response=response,
        residual_rms_lsb=float(np.sqrt(np.mean(residual ** 2))),
        residual_max_lsb=float(np.max(np.abs(residual))),
    )


def calibrate(bench: Bench, identity: BenchIdentity, bench_name: str, *,
              points: int = 17, repeats: int = 1, names: list[str] | None = None,
              progress: bool = True) -> CalibrationRecord:
    """Sweep, measure and fit every quantized parameter of an open bench. The bench is left
    holding the code nearest the middle of each range."""
    if not isinstance(bench, Measurable):
        raise CalibrationError(f"bench {bench_name} cannot measure its parameters: "
                               "nothing to calibrate against")
    specs = [s for s in bench.spec.parameters if s.levels is not None
             and (names is None or s.name in names)]
    if not specs:
        raise CalibrationError(f"bench {bench_name} has no quantized parameters to calibrate "
                               "(its parameters are continuous)")
    if points < 3:
        raise CalibrationError("a calibration sweep needs at least 3 points")
    results = {}
    total = sum(min(points, s.levels or 0) for s in specs)
    with tqdm(total=total, unit="code", disable=not progress, desc="calibrate") as bar:
        for spec in specs:
            assert spec.levels is not None
            codes = np.unique(np.rint(np.linspace(0, spec.levels - 1, points)).astype(int))
            sweep = np.empty((len(codes), *spec.shape))
            for j, code in enumerate(codes):
                bench.write({spec.name: np.full(spec.shape, code, dtype=np.int64)})
                sweep[j] = np.mean([bench.measure_params([spec.name])[spec.name]
                                    for _ in range(repeats)], axis=0)
                bar.update(1)
            bench.write({spec.name: np.full(spec.shape, (spec.levels - 1) // 2, dtype=np.int64)})
            results[spec.name] = fit_channels(spec, codes, sweep)
    return CalibrationRecord(bench_name, identity.as_dict(), results, points, repeats)
