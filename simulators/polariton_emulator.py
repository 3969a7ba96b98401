"""An emulated polariton bench: the polariton simulator behind the SCPI commands of the light
modulator, the camera and the pump laser (:mod:`labep.drivers.visa_instruments`), served on
three loopback TCP ports (the modulator at PORT, the camera at PORT + 1, the laser at
PORT + 2), reached through pyvisa-py as ``TCPIP::127.0.0.1::PORT::SOCKET``.

In-process (``start()`` serves on a thread: tests) or from the command line
(``labep emulate polariton-bench --tcp PORT``).

The emulated physics (:class:`Condensate`): the modulator's grey levels g are the potential
low + g * (high - low) / (G - 1) meV on each site (divided by ``energy_unit_mev`` into model
units); the laser's power p pumps P = ``pump_per_mw`` * p on the pump sites. While the laser is
off there is no condensate; switching it on seeds the simulator's rest field. Every exposure
(``INIT``) lets the field evolve under the current potential and pump, from where it was, until
it is stationary (rotating-frame residual <= ``frame_tolerance``) or ``frame_steps`` RK4 steps
have passed, and records the frame: intensities |psi_i|^2 (camera noise and bit depth if set)
and phases arg psi_i (interferometric noise if set). With the noise off the emulator is
deterministic, so a protocol run through the bench and this emulator ends where the same
protocol ends on the simulator with the same modulator grid (``device.bits``,
``potential_range``, ``margin``).

Instrument behaviour: the modulator refuses a pattern that is not one integer grey level
0 .. G - 1 per pixel (-222 "Data out of range", the pattern unchanged); the laser refuses
emission while the interlock is open (-221 "Settings conflict") and a power outside
0 .. max (-222); opening the interlock (:meth:`PolaritonBenchEmulator.set_interlock`) stops
emission at once. An unknown header is queued as -113 "Undefined header" and gets no reply.
"""

from __future__ import annotations

import contextlib
import math
import selectors
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

import labep
from labep.models.polariton import PolaritonLattice
from labep.simulators.polariton import (
    PolaritonSimulator,
    PolaritonSimulatorOptions,
    rest_field,
)

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class EmulatorConfig(BaseModel):
    """The emulated bench's hardware (``labep emulate polariton-bench`` options)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lattice: list[int] = Field([9], min_length=1, max_length=2,
                               description="[n] chain or [rows, cols] grid of sites.")
    hopping: float = Field(1.0, gt=0.0, description="J (model units).")
    interaction: float = Field(1.0, description="g (model units).")
    loss: float = Field(0.3, gt=0.0, description="gamma (model units).")
    saturation: float = Field(0.3, gt=0.0, description="Gamma (model units).")
    energy_relaxation: float = Field(0.0, ge=0.0, le=10.0, description="eta, the "
                                     "condensate's energy relaxation (model units).")
    pump_sites: list[int] | None = Field(None, description="Sites the pump spot covers "
                                         "(None: every site).")
    energy_unit_mev: float = Field(1.0, gt=0.0, description="The model energy unit (meV).")
    pump_per_mw: float = Field(0.01, gt=0.0, description="P per mW of pump power.")
    max_power_mw: float = Field(500.0, gt=0.0, description="Largest pump power (mW).")
    slm_bits: int = Field(10, ge=1, le=16, description="Grey levels 2^bits.")
    potential_mev: tuple[float, float] = Field(
        (-4.0, 4.0), description="Potential at grey level 0 and at the top level (meV).")
    camera_bits: int | None = Field(None, ge=1, le=24, description="Intensity resolution over "
                                    "[0, full_scale] (None: exact floats).")
    full_scale: float = Field(16.0, gt=0.0, description="Camera full scale (|psi|^2).")
    camera_noise: float = Field(0.0, ge=0.0, description="Std of an intensity readout.")
    phase_noise: float = Field(0.0, ge=0.0, description="Std of a phase readout (rad).")
    pump_noise: float = Field(0.0, ge=0.0, le=0.5,
                              description="Relative std of the pump, drawn per frame.")
    dtype: Literal["float32", "float64"] = "float64"
    dt: float = Field(0.1, gt=0.0, le=1.0, description="RK4 step (1/J).")
    check_every: int = Field(10, ge=1)
    frame_tolerance: float = Field(1e-12, gt=0.0, description="An exposure stops evolving the "
                                   "field once its residual is this small.")
    frame_steps: int = Field(500_000, ge=1, description="Most RK4 steps in one exposure.")
    rest_amplitude: float = Field(0.3, gt=0.0, description="Seed field when the laser goes on.")
    seed: int = Field(0, ge=0, description="Every noise draw.")
    interlock_closed: bool = Field(True, description="The safety interlock at start.")
    serial: str = Field("", max_length=32, description="Serial suffix (default from the seed).")

    @model_validator(mode="after")
    def _consistent(self) -> EmulatorConfig:
        n = math.prod(self.lattice)
        if n < 3:
            raise ValueError("the emulated lattice needs at least 3 sites")
        if self.pump_sites is not None and (min(self.pump_sites) < 0
                                            or max(self.pump_sites) >= n):
            raise ValueError(f"pump_sites must be 0 .. {n - 1}")
        low, high = self.potential_mev
        if not high > low:
            raise ValueError("potential_mev must be increasing")
        return self

    @classmethod
    def from_protocol(cls, protocol: Any, **overrides: Any) -> EmulatorConfig:
        """The hardware a polariton protocol describes: its model's lattice and physics and
        its bench options' units (``energy_unit_mev``, ``pump_per_mw``)."""
        model = protocol.model
        if model.kind != "polariton":
            raise ValueError(f"a polariton bench emulates a polariton model, not {model.kind}")
        options = protocol.bench.options or {}
        values: dict[str, Any] = {
            "lattice": list(model.lattice), "hopping": model.hopping,
            "interaction": model.interaction, "loss": model.loss,
            "saturation": model.saturation, "pump_sites": model.pump_sites,
            "energy_relaxation": model.energy_relaxation,
        }
        for key in ("energy_unit_mev", "pump_per_mw"):
            if key in options:
                values[key] = options[key]
        values.update(overrides)
        return cls(**values)


class _Refused(Exception):  # noqa: N818 - an SCPI error to queue
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Condensate:
    """The emulated physics: the field, the displayed potential and the pump."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        n = math.prod(config.lattice)
        # the simulator's lattice physics; its input and output sites do not matter here
        self.model = PolaritonLattice(
            config.lattice, 1, [0], [n - 2, n - 1], hopping=config.hopping,
            interaction=config.interaction, loss=config.loss, saturation=config.saturation,
            pump_sites=config.pump_sites, energy_relaxation=config.energy_relaxation)
        self.simulator = PolaritonSimulator(self.model, PolaritonSimulatorOptions(
            dtype=config.dtype, dt=config.dt, check_every=config.check_every,
            potential_range=(-1e9, 1e9), margin=0.0, rest_amplitude=config.rest_amplitude))
        self.n_sites = n
        self.levels = 2 ** config.slm_bits
        self.pattern = np.full(n, self.levels // 2, dtype=np.int64)
        self.power = 0.0
        self.emitting = False
        self.field: np.ndarray | None = None
        self.frame = (np.zeros(n), np.zeros(n))
        self.rng = np.random.default_rng([config.seed, 7])
        self.frames = 0
        self.last_steps = 0
        self.last_residual = 0.0

    def potential(self) -> np.ndarray:
        """The potential the pattern displays, model units."""
        low, high = self.config.potential_mev
        lsb = (high - low) / (self.levels - 1)
        return (low + self.pattern * lsb) / self.config.energy_unit_mev

    def pump(self) -> np.ndarray:
        power = self.power
        if self.config.pump_noise:
            power *= 1.0 + self.config.pump_noise * float(self.rng.standard_normal())
        out = np.zeros(self.n_sites)
        sites = (np.arange(self.n_sites) if self.config.pump_sites is None
                 else np.asarray(self.config.pump_sites))
        out[sites] = power * self.config.pump_per_mw
        return out

    def switch(self, on: bool) -> None:
        self.emitting = on
        self.field = None  # off: the condensate decays; on: it forms again from the seed

    def expose(self) -> None:
        """One exposure: evolve the field (if emitting) and record the frame."""
        n = self.n_sites
        self.frames += 1
        if not self.emitting:
            self.frame = (np.zeros(n), np.zeros(n))
            return
        start = (rest_field(n, self.config.rest_amplitude) if self.field is None
                 else self.field)
        field, steps, residual, _ = self.simulator.evolve(
            self.potential()[None, :], start[None, :], self.pump()[None, :],
            self.config.frame_tolerance, self.config.frame_steps)
        self.field = field[0]
        self.last_steps, self.last_residual = int(steps[0]), float(residual[0])
        intensity = np.abs(self.field) ** 2
        phase = np.angle(self.field)
        cfg = self.config
        if cfg.camera_noise:
            intensity = intensity + cfg.camera_noise * self.rng.standard_normal(n)
        if cfg.camera_bits is not None:
            top = 2 ** cfg.camera_bits - 1
            intensity = np.round(np.clip(intensity, 0.0, cfg.full_scale) / cfg.full_scale
                                 * top) * (cfg.full_scale / top)
        intensity = np.maximum(intensity, 0.0)
        if cfg.phase_noise:
            phase = np.angle(np.exp(1j * (phase + cfg.phase_noise * self.rng.standard_normal(n))))
        self.frame = (intensity, phase)


class EmulatedInstrument:
    """Common SCPI behaviour: identification, status, the error queue."""

    role = ""
    model_name = ""

    def __init__(self, condensate: Condensate, serial: str) -> None:
        self.condensate = condensate
        self.serial = serial
        self.errors: deque[tuple[int, str]] = deque(maxlen=32)
        self.commands = 0

    def handle(self, line: str) -> str | None:
        """The reply to one command line (None: no reply)."""
        self.commands += 1
        header, _, argument = line.strip().partition(" ")
        header = header.upper()
        try:
            if header == "*IDN?":
                return f"labep,{self.model_name},{self.serial},{labep.__version__}"
            if header == "*RST":
                self.reset()
                return None
            if header == "*CLS":
                self.errors.clear()
                return None
            if header == "*OPC?":
                return "1"
            if header in ("SYST:ERR?", "SYSTEM:ERROR?", "SYST:ERR:NEXT?"):
                if not self.errors:
                    return '0,"No error"'
                code, message = self.errors.popleft()
                return f'{code},"{message}"'
            return self.command(header, argument.strip())
        except _Refused as refused:
            self.errors.append((refused.code, refused.message))
            return None

    def reset(self) -> None:
        self.errors.clear()

    def command(self, header: str, argument: str) -> str | None:
        raise _Refused(-113, "Undefined header")

    @staticmethod
    def number(argument: str) -> float:
        if not argument:
            raise _Refused(-109, "Missing parameter")
        try:
            value = float(argument)
        except ValueError:
            raise _Refused(-104, "Data type error") from None
        if not math.isfinite(value):
            raise _Refused(-222, "Data out of range")
        return value


class EmulatedSlm(EmulatedInstrument):
    role = "slm"
    model_name = "SLM-EMU"

    def command(self, header: str, argument: str) -> str | None:
        c = self.condensate
        low, high = c.config.potential_mev
        table = {"SLM:SIZE?": str(c.n_sites), "SLM:LEV?": str(c.levels),
                 "SLM:CAL:LOW?": repr(float(low)), "SLM:CAL:HIGH?": repr(float(high))}
        if header in table:
            return table[header]
        if header == "SLM:PATT?":
            return ",".join(str(int(g)) for g in c.pattern)
        if header == "SLM:PATT":
            parts = [part.strip() for part in argument.split(",")] if argument else []
            if len(parts) != c.n_sites:
                raise _Refused(-109, f"Missing parameter; {c.n_sites} grey levels expected")
            try:
                grey = np.array([int(part) for part in parts], dtype=np.int64)
            except ValueError:
                raise _Refused(-104, "Data type error; integer grey levels expected") from None
            if grey.min() < 0 or grey.max() > c.levels - 1:
                raise _Refused(-222, "Data out of range")
            c.pattern = grey
            return None
        return super().command(header, argument)


class EmulatedCamera(EmulatedInstrument):
    role = "camera"
    model_name = "CAM-EMU"

    def __init__(self, condensate: Condensate, serial: str) -> None:
        super().__init__(condensate, serial)
        self.exposure = 1e-3

    def command(self, header: str, argument: str) -> str | None:
        c = self.condensate
        if header == "CAM:SIZE?":
            return str(c.n_sites)
        if header == "CAM:BITS?":
            return str(c.config.camera_bits or 32)
        if header == "CAM:FSC?":
            return repr(float(c.config.full_scale))
        if header == "CAM:EXP?":
            return repr(self.exposure)
        if header == "CAM:EXP":
            value = self.number(argument)
            if not 1e-6 <= value <= 10.0:
                raise _Refused(-222, "Data out of range")
            self.exposure = value
            return None
        if header == "INIT":
            c.expose()
            return None
        if header == "FETC?":
            intensity, phase = c.frame
            return ",".join(repr(float(v)) for v in (*intensity, *phase))
        return super().command(header, argument)


class EmulatedLaser(EmulatedInstrument):
    role = "laser"
    model_name = "PUMP-EMU"

    def __init__(self, condensate: Condensate, serial: str, interlock: bool) -> None:
        super().__init__(condensate, serial)
        self.interlock = interlock

    def reset(self) -> None:
        super().reset()
        self.condensate.switch(False)

    def command(self, header: str, argument: str) -> str | None:
        c = self.condensate
        if header == "SOUR:POW?":
            return repr(float(c.power))
        if header == "SOUR:POW:MAX?":
            return repr(float(c.config.max_power_mw))
        if header == "SOUR:POW":
            value = self.number(argument)
            if not 0.0 <= value <= c.config.max_power_mw:
                raise _Refused(-222, "Data out of range")
            c.power = value
            return None
        if header == "OUTP?":
            return "1" if c.emitting else "0"
        if header == "OUTP":
            word = argument.upper()
            if word in ("1", "ON"):
                if not self.interlock:
                    raise _Refused(-221, "Settings conflict; interlock open")
                if not c.emitting:
                    c.switch(True)
                return None
            if word in ("0", "OFF"):
                c.switch(False)
                return None
            raise _Refused(-104, "Data type error")
        if header == "SYST:INTL?":
            return "1" if self.interlock else "0"
        return super().command(header, argument)


@dataclass
class EmulatorStats:
    connections: int = 0
    commands: dict[str, int] = field(default_factory=dict)


class PolaritonBenchEmulator:
    """Three SCPI instruments over one emulated condensate, on three loopback TCP ports."""

    def __init__(self, config: EmulatorConfig | None = None, *, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.config = config or EmulatorConfig()
        self.condensate = Condensate(self.config)
        suffix = self.config.serial or f"{self.config.seed:04d}"
        self.slm = EmulatedSlm(self.condensate, f"EMU-SLM-{suffix}")
        self.camera = EmulatedCamera(self.condensate, f"EMU-CAM-{suffix}")
        self.laser = EmulatedLaser(self.condensate, f"EMU-LAS-{suffix}",
                                   self.config.interlock_closed)
        self.instruments = (self.slm, self.camera, self.laser)
        self.host = host
        self._listeners = self._bind(host, port)
        self.port = self._listeners[0].getsockname()[1]
        self.stats = EmulatorStats()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _bind(host: str, port: int) -> list[socket.socket]:
        """Three listening sockets on consecutive ports (any free trio for port 0)."""

        def listen(number: int) -> socket.socket:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((host, number))
                listener.listen(4)
            except OSError:
                listener.close()
                raise
            return listener

        for _ in range(50):
            first = listen(port)
            base = first.getsockname()[1]
            sockets = [first]
            try:
                sockets += [listen(base + offset) for offset in (1, 2)]
            except OSError:
                for listener in sockets:
                    listener.close()
                if port:
                    raise
                continue
            return sockets
        raise OSError("no three consecutive free ports on the loopback interface")

    @property
    def url(self) -> str:
        """The bench resource: the modulator's socket (camera and laser on the next ports)."""
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    def set_interlock(self, closed: bool) -> None:
        """Close or open the safety interlock; opening it stops emission at once."""
        with self._lock:
            self.laser.interlock = closed
            if not closed:
                self.condensate.switch(False)

    # -- serving ----------------------------------------------------------------------------

    def start(self) -> PolaritonBenchEmulator:
        """Serve on a background thread (tests); :meth:`close` stops it."""
        self._thread = threading.Thread(target=self.serve_forever, name="polariton-emulator",
                                        daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def serve_forever(self) -> None:
        for listener, instrument in zip(self._listeners, self.instruments, strict=True):
            listener.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ, ("listen", instrument))
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        buffers: dict[socket.socket, bytearray] = {}
        try:
            while not self._stop.is_set():
                for key, _ in self._selector.select(timeout=0.5):
                    kind, instrument = key.data
                    if kind == "wake":
                        continue
                    if kind == "listen":
                        conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        self._selector.register(conn, selectors.EVENT_READ,
                                                ("client", instrument))
                        buffers[conn] = bytearray()
                        self.stats.connections += 1
                        continue
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    try:
                        data = conn.recv(65536)
                        if _QUICKACK is not None:
                            # acknowledge at once: a client that writes a command and then
                            # queries would otherwise wait out our delayed ACK (Nagle, ~40 ms)
                            conn.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                    except OSError:
                        data = b""
                    if not data:
                        self._selector.unregister(conn)
                        conn.close()
                        buffers.pop(conn, None)
                        continue
                    buffer = buffers[conn]
                    buffer.extend(data)
                    while b"\n" in buffer:
                        raw, _, rest = bytes(buffer).partition(b"\n")
                        buffer[:] = rest
                        self._answer(conn, instrument, raw.decode("ascii", "replace"))
        finally:
            for key in list(self._selector.get_map().values()):
                if key.data[0] == "client":
                    with contextlib.suppress(OSError):
                        key.fileobj.close()  # type: ignore[union-attr]
            self._selector.close()

    def _answer(self, conn: socket.socket, instrument: EmulatedInstrument, text: str) -> None:
        for line in filter(None, (part.strip() for part in text.replace("\r", "").split(";"))):
            with self._lock:
                reply = instrument.handle(line)
            header = line.partition(" ")[0].upper()
            self.stats.commands[header] = self.stats.commands.get(header, 0) + 1
            if reply is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(reply.encode("ascii") + b"\n")

    def close(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        for end in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                end.close()

    def __enter__(self) -> PolaritonBenchEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
