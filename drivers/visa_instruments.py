"""SCPI instruments of the polariton bench over pyvisa: a spatial light modulator (the
potential controller), a camera, and the pump laser.

Each driver receives an open pyvisa message-based resource (a pyvisa-sim definition, a
pyvisa-py socket to ``labep emulate polariton-bench``, or the real instrument): it never opens
hardware by itself. Settings are declared once, as :class:`Setting` descriptors carrying their
SCPI header, type, unit and limits; a value outside its limits is refused before anything is
sent. Every command goes through :meth:`ScpiInstrument.query` or :meth:`ScpiInstrument.write`,
which retry a timed-out query (bounded, with back-off, each retry logged as a
:class:`labep.hardware.bench.Fault`) and raise :class:`labep.hardware.bench.BenchFaultError` naming
the instrument and the command when the retries are spent. :meth:`ScpiInstrument.drain_errors`
empties the instrument's SCPI error queue (``SYST:ERR?``) into fault records.

Command tables (the pyvisa-sim definitions ``polariton_sim.yaml`` and the emulator implement
exactly these; every instrument also answers ``*IDN?``, ``*RST``, ``*CLS``, ``*OPC?`` and
``SYST:ERR?`` -> ``<code>,"<message>"``, 0 when the queue is empty):

==========================  =================================================================
spatial light modulator
``SLM:SIZE?``               pixels, one per lattice site
``SLM:LEV?``                grey levels G (a pixel holds 0 .. G - 1)
``SLM:CAL:LOW?``/``HIGH?``  potential (meV) at grey level 0 and G - 1 (linear in between)
``SLM:PATT g0,g1,...``      display a pattern of grey levels; ``SLM:PATT?`` reads it back
camera
``CAM:SIZE?``               regions of interest, one per lattice site
``CAM:BITS?``               bit depth;  ``CAM:FSC?`` full-scale intensity (|psi|^2 units)
``CAM:EXP <s>``/``CAM:EXP?``  exposure time, 1 us .. 10 s
``INIT``                    expose one frame (``*OPC?`` answers 1 when it is done)
``FETC?``                   the last frame: n intensities, then n interferometric phases (rad)
pump laser
``SOUR:POW <mW>``/``?``     pump power, 0 .. ``SOUR:POW:MAX?``
``OUTP 1``/``OUTP 0``/``?``  emission on or off
``SYST:INTL?``              1 while the safety interlock is closed (emission allowed)
==========================  =================================================================
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from labep.hardware.bench import BenchError, BenchFaultError, Fault, OutOfRangeError


@dataclass(frozen=True)
class Identification:
    """What ``*IDN?`` answered: manufacturer, model, serial number, firmware."""

    vendor: str
    model: str
    serial: str
    firmware: str

    @classmethod
    def parse(cls, text: str) -> Identification:
        parts = [part.strip() for part in text.split(",")]
        parts += [""] * (4 - len(parts))
        return cls(*parts[:3], ",".join(parts[3:]))


class Setting:
    """One SCPI setting: ``HEADER?`` reads it, ``HEADER value`` writes it.

    ``kind`` is float, int or bool (bool travels as 1 / 0); ``low`` and ``high`` are the
    limits in ``unit`` (None: unbounded); a read-only setting is a measurement."""

    def __init__(self, header: str, kind: type = float, unit: str = "", *,
                 low: float | None = None, high: float | None = None, readonly: bool = False,
                 doc: str = "") -> None:
        self.header = header
        self.kind = kind
        self.unit = unit
        self.low = low
        self.high = high
        self.readonly = readonly
        self.__doc__ = doc
        self.name = header

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instrument: ScpiInstrument | None, owner: type) -> Any:
        if instrument is None:
            return self
        return self.parse(instrument.query(f"{self.header}?"), instrument)

    def __set__(self, instrument: ScpiInstrument, value: Any) -> None:
        if self.readonly:
            raise AttributeError(f"{instrument.label}: {self.name} ({self.header}) is read-only")
        instrument.write(f"{self.header} {self.format(value, instrument)}")

    def parse(self, text: str, instrument: ScpiInstrument) -> Any:
        try:
            if self.kind is bool:
                return bool(int(float(text)))
            if self.kind is int:
                return int(float(text))
            value = float(text)
        except ValueError:
            raise instrument.fault("garbled", f"{self.header}?",
                                   f"expected a number, got {text[:60]!r}") from None
        if not math.isfinite(value):
            raise instrument.fault("garbled", f"{self.header}?", f"non-finite value {text!r}")
        return value

    def format(self, value: Any, instrument: ScpiInstrument) -> str:
        """The value as sent, after checking its type and limits (refused, never clipped)."""
        if self.kind is bool:
            return "1" if bool(value) else "0"
        number = float(value)
        if not math.isfinite(number):
            raise OutOfRangeError(f"{instrument.label}: {self.name}: non-finite value refused")
        low, high = instrument.limits(self)
        if (low is not None and number < low) or (high is not None and number > high):
            raise OutOfRangeError(
                f"{instrument.label}: {self.name} = {number:g} {self.unit} is outside "
                f"[{low}, {high}] {self.unit}; refused before sending")
        if self.kind is int:
            if number != round(number):
                raise OutOfRangeError(f"{instrument.label}: {self.name} must be an integer")
            return str(round(number))
        return repr(number)  # the shortest text that reads back as the same float


class ScpiInstrument:
    """An SCPI instrument behind a pyvisa resource (handed in, already open).

    ``faults`` is the log the bench drains (shared by the bench's instruments); ``history``
    keeps the last commands sent, for diagnostics."""

    role = "instrument"

    def __init__(self, resource: Any, *, faults: list[Fault] | None = None, retries: int = 2,
                 backoff: float = 0.02, label: str | None = None) -> None:
        self.resource = resource
        self.faults = [] if faults is None else faults
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.label = label or f"{self.role} {getattr(resource, 'resource_name', resource)}"
        self.history: deque[str] = deque(maxlen=256)

    # -- limits and faults ------------------------------------------------------------------

    def limits(self, setting: Setting) -> tuple[float | None, float | None]:
        """The limits a value of ``setting`` must respect (the declared ones by default)."""
        return setting.low, setting.high

    def fault(self, kind: str, command: str, message: str) -> BenchFaultError:
        return BenchFaultError(message, kind=kind, instrument=self.label, command=command)

    def _log(self, kind: str, command: str, message: str, recovered: bool, **detail: Any) -> None:
        self.faults.append(Fault(kind, self.label, command, message, recovered, detail))

    # -- transport --------------------------------------------------------------------------

    def write(self, command: str) -> None:
        """Send one command (no reply expected)."""
        import pyvisa

        self.history.append(command)
        try:
            self.resource.write(command)
        except (pyvisa.errors.VisaIOError, OSError) as err:
            raise self.fault("link", command, f"write failed: {err}") from err

    def query(self, command: str) -> str:
        """Send ``command`` and return its reply (stripped). A timed-out or failed attempt is
        retried (the resource's buffers cleared first) at most ``retries`` times after a
        doubling back-off; each retry is logged as a recovered fault."""
        import pyvisa

        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self._log("timeout", command, f"no reply ({last}); retrying", True,
                          attempt=attempt)
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 1.0))
                self._flush()
            self.history.append(command)
            try:
                return str(self.resource.query(command)).strip()
            except (pyvisa.errors.VisaIOError, OSError) as err:
                last = err
        raise self.fault("timeout", command, f"no reply after {self.retries + 1} attempt(s): "
                         f"{last}")

    def _flush(self) -> None:
        """Drop a late reply still in flight (best effort)."""
        import pyvisa

        # not every session can flush; a late reply is then read and discarded by the retry
        with contextlib.suppress(Exception):
            self.resource.flush(pyvisa.constants.BufferOperation.discard_read_buffer)

    def query_values(self, command: str, count: int | None = None) -> np.ndarray:
        """A comma-separated list of finite numbers (``count`` of them, if given)."""
        text = self.query(command)
        try:
            values = np.array([float(part) for part in text.split(",")], dtype=np.float64)
        except ValueError:
            raise self.fault("garbled", command, f"not a list of numbers: {text[:60]!r}") from None
        if count is not None and values.size != count:
            raise self.fault("garbled", command, f"expected {count} values, got {values.size}")
        if not np.all(np.isfinite(values)):
            raise self.fault("garbled", command, "non-finite values in the reply")
        return values

    # -- common commands --------------------------------------------------------------------

    def identify(self) -> Identification:
        return Identification.parse(self.query("*IDN?"))

    def clear_status(self, *, drain: bool = True) -> None:
        """``*CLS``, then (``drain``) empty the error queue: not every instrument (nor
        pyvisa-sim) clears it on ``*CLS``, and errors left from an earlier session must not be
        taken for this session's. They are logged as recovered ``instrument_error`` faults."""
        self.write("*CLS")
        if drain:
            self.drain_errors("left from before *CLS")

    def wait(self) -> None:
        """``*OPC?``: block until the instrument finished every pending operation."""
        reply = self.query("*OPC?")
        if reply != "1":
            raise self.fault("garbled", "*OPC?", f"expected 1, got {reply[:60]!r}")

    def drain_errors(self, context: str = "SYST:ERR?", *, recovered: bool = True
                     ) -> list[tuple[int, str]]:
        """Empty the SCPI error queue; every error is logged as an ``instrument_error`` fault
        (``context``: the command it most likely belongs to). At most 32 are read."""
        errors: list[tuple[int, str]] = []
        for _ in range(32):
            text = self.query("SYST:ERR?")
            code_text, _, message = text.partition(",")
            try:
                code = int(code_text.strip())
            except ValueError:
                raise self.fault("garbled", "SYST:ERR?", f"not an error entry: {text[:60]!r}")\
                    from None
            if code == 0:
                break
            message = message.strip().strip('"')
            errors.append((code, message))
            self._log("instrument_error", context, f"{code}: {message}", recovered, code=code)
        return errors

    def check(self, command: str) -> None:
        """Raise :class:`BenchFaultError` if the error queue holds anything after
        ``command`` (every entry is logged as a fault first)."""
        errors = self.drain_errors(command, recovered=False)
        if errors:
            text = "; ".join(f"{code}: {message}" for code, message in errors)
            raise self.fault("instrument_error", command, f"instrument reported {text}")


class SpatialLightModulator(ScpiInstrument):
    """The potential controller: a light modulator shaping the non-resonant beam that
    writes a potential on every lattice site, one pixel per site, in grey levels."""

    role = "slm"
    sites = Setting("SLM:SIZE", int, "pixels", readonly=True, doc="Pixels (lattice sites).")
    levels = Setting("SLM:LEV", int, "levels", readonly=True, doc="Grey levels G.")
    potential_low = Setting("SLM:CAL:LOW", float, "meV", readonly=True,
                            doc="Potential at grey level 0.")
    potential_high = Setting("SLM:CAL:HIGH", float, "meV", readonly=True,
                             doc="Potential at grey level G - 1.")

    def __init__(self, resource: Any, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.n_pixels: int | None = None
        self.n_levels: int | None = None

    def configure(self) -> None:
        """Read the pixel count and grey levels (needed to validate patterns)."""
        self.n_pixels = int(self.sites)
        self.n_levels = int(self.levels)
        if self.n_pixels < 1 or self.n_levels < 2:
            raise self.fault("garbled", "SLM:SIZE?", f"{self.n_pixels} pixels, "
                             f"{self.n_levels} levels")

    def validate(self, grey: np.ndarray) -> np.ndarray:
        """The pattern as int64, or :class:`OutOfRangeError` if it is not integer grey
        levels 0 .. G - 1, one per pixel. Nothing is sent."""
        if self.n_pixels is None or self.n_levels is None:
            raise BenchError(f"{self.label}: not configured (call configure() first)")
        grey = np.asarray(grey)
        if grey.shape != (self.n_pixels,):
            raise BenchError(f"{self.label}: a pattern has {self.n_pixels} grey levels, got "
                             f"shape {grey.shape}")
        if grey.dtype.kind == "f":
            if not np.all(np.isfinite(grey)) or np.any(np.rint(grey) != grey):
                raise OutOfRangeError(f"{self.label}: grey levels must be integers")
        elif grey.dtype.kind not in "iu":
            raise OutOfRangeError(f"{self.label}: grey levels must be integers")
        grey = grey.astype(np.int64)
        if grey.min() < 0 or grey.max() > self.n_levels - 1:
            raise OutOfRangeError(
                f"{self.label}: pattern spans grey levels [{grey.min()}, {grey.max()}], "
                f"outside [0, {self.n_levels - 1}]; refused before sending")
        return grey

    def display(self, grey: np.ndarray) -> np.ndarray:
        """Validate, send and read back a pattern; :class:`BenchFaultError` unless the
        modulator holds exactly that pattern and reported no error."""
        grey = self.validate(grey)
        command = "SLM:PATT " + ",".join(str(int(g)) for g in grey)
        self.write(command)
        self.check("SLM:PATT")
        held = self.read_pattern()
        if not np.array_equal(held, grey):
            bad = int(np.count_nonzero(held != grey))
            raise self.fault("verify", "SLM:PATT?", f"the modulator holds a different pattern "
                             f"({bad} of {grey.size} pixels differ)")
        return grey

    def read_pattern(self) -> np.ndarray:
        """The grey levels the modulator displays (validated against its limits)."""
        values = self.query_values("SLM:PATT?", self.n_pixels)
        if np.any(np.rint(values) != values):
            raise self.fault("garbled", "SLM:PATT?", "non-integer grey levels")
        grey = values.astype(np.int64)
        assert self.n_levels is not None
        if grey.min() < 0 or grey.max() > self.n_levels - 1:
            raise self.fault("limits", "SLM:PATT?", f"the modulator holds grey levels "
                             f"[{grey.min()}, {grey.max()}] outside [0, {self.n_levels - 1}]")
        return grey


class Camera(ScpiInstrument):
    """An imaging camera binned to one region per lattice site, with an interferometric
    reference arm: each frame gives the intensity and the phase of every site."""

    role = "camera"
    sites = Setting("CAM:SIZE", int, "regions", readonly=True, doc="Regions (lattice sites).")
    bits = Setting("CAM:BITS", int, "bit", readonly=True, doc="Bit depth.")
    full_scale = Setting("CAM:FSC", float, "|psi|^2", readonly=True,
                         doc="Intensity at full scale (saturation).")
    exposure = Setting("CAM:EXP", float, "s", low=1e-6, high=10.0, doc="Exposure time.")

    def __init__(self, resource: Any, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.n_sites: int | None = None

    def configure(self, exposure: float) -> None:
        self.n_sites = int(self.sites)
        self.exposure = exposure
        self.check("CAM:EXP")

    def acquire(self) -> tuple[np.ndarray, np.ndarray]:
        """Expose one frame and fetch it: (intensities, phases), one per site."""
        assert self.n_sites is not None
        self.write("INIT")
        self.wait()
        values = self.query_values("FETC?", 2 * self.n_sites)
        intensity, phase = values[:self.n_sites], values[self.n_sites:]
        if np.any(intensity < 0):
            raise self.fault("garbled", "FETC?", "negative intensities")
        return intensity, phase


class PumpLaser(ScpiInstrument):
    """The non-resonant pump laser: power, emission on/off, and the safety interlock."""

    role = "laser"
    power = Setting("SOUR:POW", float, "mW", low=0.0, doc="Pump power.")
    max_power = Setting("SOUR:POW:MAX", float, "mW", readonly=True, doc="Largest power.")
    output = Setting("OUTP", bool, doc="Emission on (1) or off (0).")
    interlock = Setting("SYST:INTL", bool, readonly=True,
                        doc="1 while the interlock is closed (emission allowed).")

    def __init__(self, resource: Any, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.power_limit: float | None = None

    def limits(self, setting: Setting) -> tuple[float | None, float | None]:
        if setting is PumpLaser.__dict__["power"]:
            return 0.0, self.power_limit
        return super().limits(setting)

    def off(self) -> None:
        """Emission off, confirmed by ``OUTP?`` (:class:`BenchFaultError` otherwise)."""
        self.output = False
        if self.output:
            raise self.fault("safe_state", "OUTP 0", "the laser still reports emission on")

    def on(self) -> None:
        """Emission on: refused (:class:`BenchFaultError`) unless the interlock is closed;
        confirmed by ``OUTP?`` and an empty error queue."""
        if not self.interlock:
            raise self.fault("interlock", "OUTP 1", "the safety interlock is open; emission "
                             "refused")
        self.output = True
        self.check("OUTP 1")
        if not self.output:
            raise self.fault("verify", "OUTP 1", "the laser did not turn on")
