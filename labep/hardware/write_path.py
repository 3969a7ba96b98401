"""The one write path from the host's parameters to a bench, for every bench.

The host keeps full-precision *shadow* parameters theta (float64) (or, with ``shadow: false``,
only what the bench's codes realize). An update changes the shadow; a write maps each logical
value to what the bench stores:

- continuous parameters (``ParameterSpec.levels is None``): the value itself;
- quantized parameters: a hardware code, through the active calibration (:class:`CodeMap`:
  per-channel gain and offset and a shared monotone response), rounded ``nearest``,
  ``stochastic``, or with ``error_feedback`` (the rounding residue of each channel is carried
  into its next write).

A value outside what a channel can realize is refused with a clear error (the ``refuse``
policy); the ``clip`` policy clips and counts every clipped channel. Where the bench can measure
its parameters, a write can be verified: the realized values are compared with the requested
ones, in LSB, and too large a mismatch stops the run. Writes are counted per parameter and
code changes per channel (a write budget: some devices wear out).

Size: just over 400 lines, kept whole on purpose: labep has one write path, and its rounding,
calibration, verify and retry rules are read (and reviewed for hardware safety) together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numba
import numpy as np

from labep.hardware.bench import Bench, OutOfRangeError, ParameterSpec
from labep.hardware.interrupts import deferred_interrupt
from labep.models import Params


@numba.njit(cache=True, parallel=True)
def _add_flat(theta, delta, factor, out):  # pragma: no cover - compiled
    for i in numba.prange(theta.size):
        out[i] = theta[i] + delta[i] * factor


def add_update(theta: np.ndarray, delta: np.ndarray, out: np.ndarray,
               factor: float = 1.0) -> np.ndarray:
    """out = theta + factor * delta (float64), in one parallel pass when the arrays are
    contiguous. ``factor * delta`` is rounded in ``delta``'s dtype before the addition, as
    numpy's ``delta *= factor`` would (a linear optimizer's step -eta s(t) g, taken here
    instead of in a pass of its own).

    numpy adds a float32 delta to a float64 shadow through a buffered casting loop at a third
    of the memory bandwidth; this is the per-step cost of every update. Below 65,536 values
    numpy's loop is cheaper than waking numba's threads (a parallel region is a wait for
    every thread, long when another process holds a core); the sums are the same.
    """
    scale = delta.dtype.type(factor) if delta.dtype.kind == "f" else factor
    if (theta.shape == delta.shape == out.shape and theta.flags.c_contiguous
            and delta.flags.c_contiguous and out.flags.c_contiguous and theta.size >= 1 << 16):
        _add_flat(theta.reshape(-1), delta.reshape(-1), scale, out.reshape(-1))
        return out
    return np.add(theta, delta if factor == 1.0 else delta * scale, out=out)


Rounding = Literal["nearest", "stochastic", "error_feedback"]


class WriteVerifyError(RuntimeError):
    """Realized parameter values missed the requested ones by more than the protocol allows."""


class WriteBudgetError(RuntimeError):
    """A channel would be written more often than the protocol's write budget."""


@runtime_checkable
class Measurable(Protocol):
    """A bench that can measure the physical values its parameter channels realize."""

    def measure_params(self, names: list[str] | None = None) -> dict[str, np.ndarray]: ...


@dataclass
class CodeMap:
    """Logical value <-> code of one quantized parameter.

    Channel i realizes v = c + g_i (phi(k) - c) + o_i for code k, with c the range center,
    ``gain`` g_i and ``offset`` o_i per channel and ``response`` phi(k) shared (monotone,
    one entry per code). The ideal map has g = 1, o = 0 and phi evenly spaced over the range.
    """

    spec: ParameterSpec
    gain: np.ndarray
    offset: np.ndarray
    response: np.ndarray

    @classmethod
    def ideal(cls, spec: ParameterSpec) -> CodeMap:
        assert spec.levels is not None
        return cls(spec, np.ones(spec.shape), np.zeros(spec.shape),
                   np.linspace(spec.low, spec.high, spec.levels))

    @property
    def center(self) -> float:
        return 0.5 * (self.spec.low + self.spec.high)

    @property
    def lsb(self) -> float:
        assert self.spec.levels is not None
        return (self.spec.high - self.spec.low) / (self.spec.levels - 1)

    def fractional_code(self, values: np.ndarray) -> np.ndarray:
        """The (real-valued) code at which each channel realizes ``values``; outside
        [0, levels - 1] where the channel cannot realize the value."""
        c = self.center
        target = c + (values - c - self.offset) / self.gain
        phi = self.response
        if phi[-1] < phi[0]:  # a decreasing response: mirror it
            return (len(phi) - 1) - self._invert(phi[::-1], target)
        return self._invert(phi, target)

    @staticmethod
    def _invert(phi: np.ndarray, target: np.ndarray) -> np.ndarray:
        index = np.arange(len(phi), dtype=np.float64)
        inside = np.interp(target, phi, index)
        low_slope = max(phi[1] - phi[0], 1e-300)
        high_slope = max(phi[-1] - phi[-2], 1e-300)
        below = (target - phi[0]) / low_slope
        above = (len(phi) - 1) + (target - phi[-1]) / high_slope
        return np.where(target < phi[0], below, np.where(target > phi[-1], above, inside))

    def value(self, codes: np.ndarray) -> np.ndarray:
        """What each channel realizes at ``codes`` according to this map."""
        return self.center + self.gain * (self.response[codes] - self.center) + self.offset


@dataclass
class WritePolicy:
    """How the write path treats values (the protocol's ``writes`` section).

    ``shadow=False`` models a bench that holds the only copy of a quantized parameter (a
    device trained by pulses): after each write the host's value snaps to what the written code
    realizes, so an update smaller than half an LSB survives only through ``stochastic``
    rounding or ``error_feedback``; with ``nearest`` it is lost.
    """

    rounding: Rounding = "nearest"
    out_of_range: Literal["refuse", "clip"] = "refuse"
    accumulate: int = 1
    verify: bool = False
    verify_tolerance_lsb: float = 1.0
    verify_stop_fraction: float | None = None
    write_budget: int | None = None
    shadow: bool = True


@dataclass
class WriteReport:
    """What one write did: channels clipped and changed, and (verified) mismatch in LSB."""

    written: bool = False
    clipped: int = 0
    changed: int = 0
    mismatch_mean_lsb: float | None = None
    mismatch_max_lsb: float | None = None
    miss_fraction: float | None = None

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.written:
            out["write_clipped"] = self.clipped
            out["write_changed"] = self.changed
        if self.mismatch_mean_lsb is not None:
            out["write_mismatch_mean_lsb"] = self.mismatch_mean_lsb
            out["write_mismatch_max_lsb"] = float(self.mismatch_max_lsb or 0.0)
            out["write_miss_fraction"] = float(self.miss_fraction or 0.0)
        return out


@dataclass
class WritePath:
    """Shadow parameters theta (float64), their maps to the bench, and the write log."""

    bench: Bench
    shadow: Params
    policy: WritePolicy = field(default_factory=WritePolicy)
    maps: dict[str, CodeMap] = field(default_factory=dict)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def __post_init__(self) -> None:
        self.shadow = {k: np.array(v, dtype=np.float64) for k, v in self.shadow.items()}
        self.specs = {name: self.bench.spec.parameter(name) for name in self.shadow}
        for name, spec in self.specs.items():
            if spec.levels is not None and name not in self.maps:
                self.maps[name] = CodeMap.ideal(spec)
        self.residue = {name: np.zeros(spec.shape) for name, spec in self.specs.items()
                        if spec.levels is not None}
        self.codes: dict[str, np.ndarray] = {}
        #: writes per parameter, and code changes per channel (the write budget)
        self.writes = dict.fromkeys(self.shadow, 0)
        self.changes = {name: np.zeros(spec.shape, dtype=np.int64)
                        for name, spec in self.specs.items() if spec.levels is not None}
        self.clipped_total = 0
        self.pending = 0
        #: parameters the bench may not hold as the shadow says (a write that failed part
        #: way); :meth:`resync` re-reads the bench and writes them again
        self.unsynced: set[str] = set()
        self._spare = {k: np.empty_like(v) for k, v in self.shadow.items()}

    @property
    def quantized(self) -> bool:
        return bool(self.maps)

    # -- mapping ----------------------------------------------------------------------------

    def encode(self, name: str, values: np.ndarray) -> tuple[np.ndarray, int]:
        """What the bench stores for ``values`` of ``name``, and how many channels were
        clipped. Raises :class:`OutOfRangeError` under the ``refuse`` policy."""
        spec = self.specs[name]
        if spec.levels is None and self.policy.out_of_range == "refuse":
            return values, 0  # the bench itself refuses non-finite and out-of-range values
        if not np.all(np.isfinite(values)):
            raise OutOfRangeError(f"write {name}: non-finite value(s) refused "
                                  f"({int(np.count_nonzero(~np.isfinite(values)))} channels)")
        if spec.levels is None:
            outside = (values < spec.low) | (values > spec.high)
            count = int(np.count_nonzero(outside))
            if count:
                return np.clip(values, spec.low, spec.high), count
            return values, 0
        fractional = self.maps[name].fractional_code(values)
        if self.policy.rounding == "error_feedback":
            fractional = fractional + self.residue[name]
        if self.policy.rounding == "stochastic":
            floor = np.floor(fractional)
            codes = floor + (self.rng.random(fractional.shape) < fractional - floor)
        else:
            codes = np.rint(fractional)
        top = spec.levels - 1
        outside = (codes < 0) | (codes > top)
        count = int(np.count_nonzero(outside))
        if count:
            if self.policy.out_of_range == "refuse":
                worst = float(np.max(np.abs(values[outside])))
                raise OutOfRangeError(
                    f"write {name}: {count} channel(s) asked for values their calibrated range "
                    f"cannot realize (|value| up to {worst:.6g} {spec.unit}, codes beyond "
                    f"[0, {top}]); refused (set writes.out_of_range: clip to clip and log)"
                )
            codes = np.clip(codes, 0, top)
        if self.policy.rounding == "error_feedback":
            self.residue[name] = np.clip(fractional - codes, -0.5, 0.5)
        return codes.astype(np.int64), count

    # -- writing ----------------------------------------------------------------------------

    def write_all(self) -> WriteReport:
        """Write every shadow parameter (at start, after a resume)."""
        return self._write(list(self.shadow))

    def apply(self, update: Params, factors: dict[str, float] | None = None) -> WriteReport:
        """theta <- theta + update (times ``factors[name]`` where given: a linear optimizer's
        step -eta s(t) g, :meth:`labep.ep.optimizers.Sgd.factors`, taken in the same pass over
        the parameters as the addition); every ``accumulate`` updates, write the changed
        parameters. The shadow changes only once the write was accepted (or deferred)."""
        # the candidate goes into a spare buffer; the buffers swap roles once accepted
        candidate = {name: add_update(self.shadow[name], delta, self._spare[name],
                                      1.0 if factors is None else factors[name])
                     for name, delta in update.items()}
        previous = {name: self.shadow[name] for name in candidate}
        self.shadow.update(candidate)
        report = WriteReport()
        if self.pending + 1 < self.policy.accumulate:
            self.pending += 1
        else:
            try:
                report = self._write(list(candidate))
            except BaseException:
                self.shadow.update(previous)
                raise
            self.pending = 0
        self._spare.update(previous)
        return report

    def flush(self) -> WriteReport:
        """Write updates still accumulating in the shadow (before an evaluation, at the end)."""
        if not self.pending:
            return WriteReport()
        report = self._write(list(self.shadow))
        self.pending = 0
        return report

    def _write(self, names: list[str]) -> WriteReport:
        report = WriteReport(written=True)
        payload: dict[str, np.ndarray] = {}
        residues = {name: r.copy() for name, r in self.residue.items()}
        # only stochastic rounding draws from the generator
        rng_state = (self.rng.bit_generator.state if self.policy.rounding == "stochastic"
                     else None)
        try:
            for name in names:
                payload[name], clipped = self.encode(name, self.shadow[name])
                report.clipped += clipped
        except BaseException:
            self.residue = residues
            raise
        changes: dict[str, np.ndarray] = {}
        for name in names:
            if name in self.changes:
                before = self.codes.get(name)
                changed = (np.ones(payload[name].shape, dtype=bool) if before is None
                           else payload[name] != before)
                changes[name] = changed
                report.changed += int(np.count_nonzero(changed))
                budget = self.policy.write_budget
                if budget is not None and np.any(self.changes[name] + changed > budget):
                    self.residue = residues
                    raise WriteBudgetError(
                        f"write {name}: a channel would exceed the write budget of {budget} "
                        "code changes; stopping before the write")
        try:
            with deferred_interrupt():  # Ctrl-C never leaves half a block on the bench
                self.bench.write(payload)
        except BaseException:
            # the bench may hold part of the block: encode the same again on the next try
            self.residue = residues
            if rng_state is not None:
                self.rng.bit_generator.state = rng_state
            self.unsynced.update(names)
            raise
        self.unsynced.difference_update(names)
        for name in names:
            self.writes[name] += 1
            if name in changes:
                self.changes[name] += changes[name]
                self.codes[name] = payload[name]
                if not self.policy.shadow:
                    self.shadow[name] = self.maps[name].value(payload[name])
        self.clipped_total += report.clipped
        if self.policy.verify:
            self._verify(names, report)
        return report

    def _verify(self, names: list[str], report: WriteReport) -> None:
        """Compare what the bench realized with what was requested. Quantized parameters:
        mismatch in LSB (measured values where the bench can measure them, else the distance
        between the codes read back and the codes written). Continuous parameters: the value
        read back against the value written, in float32 ULPs (their storage resolution)."""
        measured = (self.bench.measure_params(names) if isinstance(self.bench, Measurable)
                    else None)
        held = self.bench.read_params()
        errors = []
        for name in names:
            if self.specs[name].levels is None:  # the LSB of float storage: a float32 ULP
                ulp = np.spacing(np.abs(self.shadow[name]).astype(np.float32)).astype(float)
                errors.append((np.abs(held[name] - self.shadow[name]) / ulp).ravel())
            elif measured is not None:
                lsb = self.maps[name].lsb
                errors.append(np.abs(measured[name] - self.shadow[name]).ravel() / lsb)
            else:
                errors.append(np.abs(held[name] - self.codes[name]).astype(float).ravel())
        error = np.concatenate(errors)
        report.mismatch_mean_lsb = float(error.mean())
        report.mismatch_max_lsb = float(error.max())
        report.miss_fraction = float(np.mean(error > self.policy.verify_tolerance_lsb))
        stop = self.policy.verify_stop_fraction
        if stop is not None and report.miss_fraction > stop:
            raise WriteVerifyError(
                f"write-verify: {report.miss_fraction:.1%} of channels missed their value by "
                f"more than {self.policy.verify_tolerance_lsb:g} LSB (mean "
                f"{report.mismatch_mean_lsb:.3g}, max {report.mismatch_max_lsb:.3g} LSB); "
                f"the protocol stops above {stop:.1%}. Calibrate the bench (labep calibrate)."
            )

    # -- resume -----------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """Everything besides the shadow and the codes (stored with every checkpoint) that a
        resumed run needs: counters, the rounding residues, the rounding generator's state."""
        meta: dict[str, object] = {"writes": dict(self.writes), "pending": self.pending,
                                   "clipped_total": self.clipped_total,
                                   "rng": self.rng.bit_generator.state,
                                   "unsynced": sorted(self.unsynced)}
        arrays = {f"residue.{n}": r for n, r in self.residue.items()}
        arrays.update({f"changes.{n}": c for n, c in self.changes.items()})
        return meta, arrays

    def restore(self, meta: dict[str, object], arrays: dict[str, np.ndarray],
                codes: dict[str, np.ndarray]) -> None:
        """Take back a state from :meth:`state` and the codes the bench held."""
        self.writes = {name: int(count) for name, count in meta["writes"].items()}  # type: ignore[attr-defined]
        self.pending = int(meta["pending"])  # type: ignore[arg-type]
        self.clipped_total = int(meta["clipped_total"])  # type: ignore[arg-type]
        self.rng.bit_generator.state = meta["rng"]
        self.unsynced = set(meta.get("unsynced", ()))  # type: ignore[call-overload]
        for name in self.residue:
            self.residue[name] = np.array(arrays[f"residue.{name}"], dtype=np.float64)
        for name in self.changes:
            self.changes[name] = np.array(arrays[f"changes.{name}"], dtype=np.int64)
        self.codes = {name: np.array(held, dtype=np.int64) for name, held in codes.items()}

    def rewrite_held(self) -> None:
        """Write again what the bench held at the checkpoint (its codes, or for continuous
        parameters the shadow values), e.g. after a resume on a bench that lost its state.
        Not counted as writes: no code changes. If it fails, every parameter is unsynced."""
        # a quantized parameter whose codes were never written has nothing held to restore
        missing = {name for name, spec in self.specs.items()
                   if spec.levels is not None and name not in self.codes}
        payload = {name: self.codes[name] if name in self.codes else self.shadow[name]
                   for name in self.shadow if name not in missing}
        self.unsynced.update(missing)
        try:
            with deferred_interrupt():
                self.bench.write(payload)
        except BaseException:
            self.unsynced.update(self.shadow)
            raise
        self.unsynced.difference_update(payload)

    def defer(self, update: Params, factors: dict[str, float] | None = None) -> None:
        """theta <- theta + update (times ``factors``, as in :meth:`apply`) without writing:
        the update whose write the fault policy gave up on stays in the shadow, and the next
        :meth:`resync` writes it."""
        for name, delta in update.items():
            self.shadow[name] = add_update(self.shadow[name], delta,
                                           np.empty_like(self.shadow[name]),
                                           1.0 if factors is None else factors[name])
        self.unsynced.update(update)
        self.pending = 0

    def resync(self) -> WriteReport:
        """After a write that failed (:attr:`unsynced`): re-read what the bench holds, take
        its codes as the truth (so code changes and the write budget count what the channels
        really went through), and write the shadow's parameters that are unsynced or differ.
        Afterwards the bench holds what the shadow says, as after any write."""
        if not self.unsynced:
            return WriteReport()
        held = self.bench.read_params()
        names = set(self.unsynced)
        for name in self.codes:
            if name in held:
                codes = np.asarray(held[name]).astype(np.int64)
                if not np.array_equal(codes, self.codes[name]):
                    names.add(name)
                self.codes[name] = codes
        return self._write([name for name in self.shadow if name in names])

    def summary(self) -> dict[str, object]:
        """Write counts per parameter, code changes per channel, clipped channels."""
        return {
            "writes": dict(self.writes),
            "clipped": self.clipped_total,
            "code_changes": {name: {"max": int(c.max(initial=0)), "mean": float(c.mean())}
                             for name, c in self.changes.items()},
        }
