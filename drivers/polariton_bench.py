"""The exciton-polariton bench: a light modulator, a camera and a pump laser over VISA,
composed into one :class:`labep.hardware.bench.Bench` running :class:`labep.models.polariton.
PolaritonLattice` (the same spec as :class:`labep.simulators.polariton.PolaritonSimulator`
with ``device.bits``).

Resource strings (``bench.resource`` in a protocol):

- ``@sim``: the three instruments of the pyvisa-sim definitions shipped with labep
  (``labep/drivers/polariton_sim.yaml``); ``path/to/file.yaml@sim`` another definition file
  with the same resource names (:data:`SIM_RESOURCES`);
- ``TCPIP::HOST::PORT::SOCKET``: pyvisa-py sockets, the modulator at PORT, the camera at
  PORT + 1 and the laser at PORT + 2 (how ``labep emulate polariton-bench --tcp PORT``
  serves them);
- any instrument can be named on its own in ``bench.options.resources`` (a real bench).

Units: the modulator's calibration is in meV; ``energy_unit_mev`` converts it to the model's
energy unit (J = ``model.hopping`` of them). The pump is P = ``pump_per_mw`` * power.

What a relaxation does, per sample (a hardware bench relaxes one sample at a time):

1. every pattern of the batch, V + U(x) (+ the nudge), is composed in grey levels and validated
   against the modulator's range before anything is sent
   (:class:`labep.hardware.bench.OutOfRangeError`);
2. laser off (the condensate decays), the free pattern displayed and read back, the interlock
   checked, laser on, frames acquired until two consecutive frames' intensities differ by at
   most ``tolerance`` (relative to their mean intensity) or ``max_steps`` frames;
3. nudged phases: the nudge potential beta (n_k - t_k) on the output sites, n_k from the
   ``start`` state (the free state; a condensate cannot be loaded, so the free pattern is
   relaxed again first and the nudge pattern displayed on top, laser on), then frames again;
4. the state read back: the last frame's intensities and interferometric phases.

Safety: the laser is switched off first when the bench opens and before any pattern is
displayed; it is switched on only after the pattern was validated, displayed, read back
identical and error-free and the interlock reports closed; a pattern that does not validate is
never sent. Any error escaping a public method switches the laser off (and confirms it) before
it propagates; ``close()`` switches it off and displays the rest pattern. Instrument errors
(the SCPI error queues) and retried timeouts are logged as :class:`labep.hardware.bench.Fault`
records (:meth:`PolaritonBench.drain_faults`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from importlib import resources as package_files
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from labep.drivers.visa_instruments import Camera, PumpLaser, SpatialLightModulator
from labep.hardware.bench import (
    BenchError,
    BenchIdentity,
    BenchLifecycle,
    BenchSpec,
    Fault,
    Nudge,
    OutOfRangeError,
    ParameterSpec,
    Relaxation,
    Settle,
    check_safe_value,
    safe_values,
)
from labep.models.polariton import PolaritonLattice
from labep.protocol.strict import STRICT_CONFIG

#: the resource names of the shipped pyvisa-sim definitions
SIM_RESOURCES = {
    "slm": "TCPIP0::slm.polariton.sim::5025::SOCKET",
    "camera": "TCPIP0::camera.polariton.sim::5026::SOCKET",
    "laser": "TCPIP0::laser.polariton.sim::5027::SOCKET",
}
ROLES = ("slm", "camera", "laser")


def sim_definitions() -> str:
    """Path of the pyvisa-sim definitions shipped with labep."""
    return str(package_files.files("labep.drivers") / "polariton_sim.yaml")


class InstrumentResources(BaseModel):
    """VISA resource strings of the three instruments (None: derived from bench.resource)."""

    model_config = STRICT_CONFIG

    slm: str | None = None
    camera: str | None = None
    laser: str | None = None


class PolaritonBenchOptions(BaseModel):
    """Options of the VISA polariton bench (``bench.options`` in a protocol)."""

    model_config = STRICT_CONFIG

    resources: InstrumentResources = Field(
        default_factory=InstrumentResources,
        description="Per-instrument VISA resources, overriding what bench.resource implies.")
    timeout: float = Field(5.0, gt=0.0, le=600.0, description="VISA I/O timeout (s).")
    retries: int = Field(2, ge=0, le=20, description="Re-sends of a query that timed out.")
    backoff: float = Field(0.02, ge=0.0, le=10.0,
                           description="Pause before the first re-send (s), then doubled.")
    energy_unit_mev: float = Field(
        1.0, gt=0.0, description="The model's energy unit in meV (the modulator's "
        "calibration is divided by it).")
    pump_per_mw: float = Field(
        0.01, gt=0.0, description="Pump P (model units) per mW of laser power.")
    margin: float = Field(
        1.5, ge=0.0, description="Potential kept free at both ends of the modulator's range "
        "for the input and nudge potentials (model units): V's range is the rest.")
    exposure: float = Field(1e-3, ge=1e-6, le=10.0, description="Camera exposure (s).")
    tolerance: float = Field(
        1e-6, gt=0.0, description="Default settle tolerance: largest change of a site's "
        "intensity between consecutive frames, relative to the mean intensity.")
    max_steps: int = Field(20, ge=2, le=100_000, description="Default cap on frames.")
    dtype: Literal["float32", "float64"] = Field("float64", description="dtype of states.")
    safe_values: dict[str, float] = Field(
        default_factory=dict,
        description="The potential (model units) the modulator displays in the safe state, "
        "{V: value} (default: the middle grey level of V's range): on open, on close and "
        "after any error, once the laser is off. Checked against V's range on open.")


class PolaritonBench(BenchLifecycle):
    """The polariton bench over VISA, as a Bench (see the module docstring)."""

    name = "polariton_bench"
    model_kinds = ("polariton",)
    options_model = PolaritonBenchOptions

    def __init__(self, model: PolaritonLattice, options: PolaritonBenchOptions | None = None,
                 *, resource: str | None = None, transport: Any = None) -> None:
        """``resource``: ``@sim`` (pyvisa-sim), ``TCPIP::HOST::PORT::SOCKET`` (three
        consecutive ports) or a VISA resource with ``options.resources`` naming the others;
        or ``transport``: a pyvisa ResourceManager (the bench opens the instruments named in
        ``options.resources`` from it, and closes those sessions on :meth:`close`) or a
        mapping of ``laser``, ``slm`` and ``camera`` to open pyvisa resources (the caller's:
        :meth:`close` leaves the instruments in their safe state and the sessions open).
        Nothing is opened here."""
        if (resource is None) == (transport is None):
            raise BenchError(f"{self.name}: give exactly one of a resource string or a "
                             "transport (a pyvisa ResourceManager or open resources by role)")
        if isinstance(transport, Mapping) and set(transport) != set(ROLES):
            raise BenchError(f"{self.name}: a transport mapping needs exactly the roles "
                             f"{', '.join(ROLES)}, got {', '.join(map(str, transport))}")
        if np.any(model.input_pump != 0.0):
            raise BenchError(f"{self.name}: the bench pumps with one laser; inputs go to the "
                             "light modulator (model.input_pump must be 0)")
        self.model = model
        self.options = options or PolaritonBenchOptions()
        self.resource = resource if resource is not None else type(transport).__name__
        self._transport = transport
        self.dtype = np.dtype(self.options.dtype)
        v = ParameterSpec("V", (model.n_sites,), unit="J")  # provisional until open()
        self.spec = BenchSpec((v,), model.input_size, model.state_size, model.output_slice,
                              state_unit="sqrt(polaritons per site)")
        self._faults: list[Fault] = []
        #: the protocol-defined safe potential (checked against the range on open)
        self._safe_value = safe_values({"V": (model.n_sites,)}, self.options.safe_values,
                                       bench=self.name).get("V")
        self._safe_codes: np.ndarray | None = None
        self._manager: Any = None
        self._sessions: list[Any] = []
        self.slm: SpatialLightModulator | None = None
        self.camera: Camera | None = None
        self.laser: PumpLaser | None = None
        self._codes = np.zeros(model.n_sites, dtype=np.int64)
        self._opened = False
        self.margin_levels = 0
        self.low = self.lsb = 0.0

    # -- faults -----------------------------------------------------------------------------

    def drain_faults(self) -> list[Fault]:
        """The faults met since the last call, oldest first; the log is emptied."""
        faults, self._faults[:] = list(self._faults), []
        return faults

    def check_instruments(self) -> None:
        """Read every instrument's error queue into the fault log (recovered: nothing
        failed because of them)."""
        for instrument in self._instruments():
            instrument.drain_errors()

    def _instruments(self) -> list[Any]:
        return [i for i in (self.laser, self.slm, self.camera) if i is not None]

    # -- resources --------------------------------------------------------------------------

    def _addresses(self) -> tuple[str, dict[str, str]]:
        """(pyvisa backend, resource string of each instrument)."""
        resource = self.resource.strip()
        chosen = self.options.resources
        if resource.endswith("@sim"):
            path = resource[:-len("@sim")] or sim_definitions()
            names = dict(SIM_RESOURCES)
            backend = f"{path}@sim"
        else:
            parts = resource.split("::")
            names = {}
            if len(parts) == 4 and parts[0].upper().startswith("TCPIP") and (
                    parts[3].upper() == "SOCKET"):
                port = int(parts[2])
                names = {role: "::".join((parts[0], parts[1], str(port + k), parts[3]))
                         for k, role in enumerate(ROLES)}
            backend = "@py"
        for role in ROLES:
            if getattr(chosen, role):
                names[role] = getattr(chosen, role)
        missing = [role for role in ROLES if role not in names]
        if missing:
            raise BenchError(f"{self.name}: no VISA resource for {', '.join(missing)}: give "
                             "bench.resource as @sim or TCPIP::HOST::PORT::SOCKET, or "
                             "bench.options.resources")
        return backend, names

    def _connect(self) -> None:
        import pyvisa

        common = {"faults": self._faults, "retries": self.options.retries,
                  "backoff": self.options.backoff}
        classes = {"slm": SpatialLightModulator, "camera": Camera, "laser": PumpLaser}
        if isinstance(self._transport, Mapping):  # open resources, handed in by role
            self._manager = self._transport
            for role in ("laser", "slm", "camera"):
                session = self._transport[role]
                self._sessions.append(session)
                label = f"{role} {getattr(session, 'resource_name', role)}"
                setattr(self, role, classes[role](session, label=label, **common))
            return
        if self._transport is not None:  # a resource manager: the names from the options
            backend, names = "", {role: getattr(self.options.resources, role) for role in ROLES}
            missing = [role for role, name in names.items() if not name]
            if missing:
                raise BenchError(f"{self.name}: with a resource manager as transport, "
                                 f"bench.options.resources must name {', '.join(missing)}")
            self._manager = self._transport
        else:
            backend, names = self._addresses()
        try:
            if self._manager is None:
                self._manager = pyvisa.ResourceManager(backend)
        except (OSError, ValueError, pyvisa.errors.Error) as err:
            raise BenchError(f"{self.name}: cannot start the VISA backend {backend}: {err}") \
                from err
        # the laser first: it is the one that must be made safe
        for role in ("laser", "slm", "camera"):
            try:
                session = self._manager.open_resource(
                    names[role], read_termination="\n", write_termination="\n",
                    timeout=round(self.options.timeout * 1000))
            except (OSError, ValueError, pyvisa.errors.Error) as err:
                raise BenchError(f"{self.name}: cannot open the {role} at {names[role]}: "
                                 f"{err}") from err
            self._sessions.append(session)
            setattr(self, role, classes[role](session, label=f"{role} {names[role]}",
                                              **common))

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> BenchIdentity:
        """Connect; laser off (first thing, confirmed); identify the three instruments;
        read the modulator's size, levels and calibration and the camera's size (both must be
        the model's site count); set the exposure and the pump power; display the rest
        pattern. Opening an open bench starts over."""
        if self._opened:
            self.close()
        try:
            self._connect()
            assert self.laser is not None and self.slm is not None and self.camera is not None
            self.laser.clear_status(drain=False)  # nothing before the laser is off
            self.laser.off()
            for instrument in self._instruments():
                instrument.clear_status()
            ids = {role: getattr(self, role).identify() for role in ROLES}
            self.slm.configure()
            n = self.model.n_sites
            if self.slm.n_pixels != n:
                raise BenchError(f"{self.name}: the modulator has {self.slm.n_pixels} pixels "
                                 f"but the lattice has {n} sites")
            self.camera.configure(self.options.exposure)
            if self.camera.n_sites != n:
                raise BenchError(f"{self.name}: the camera reads {self.camera.n_sites} regions "
                                 f"but the lattice has {n} sites")
            self._configure_potential()
            self.laser.power_limit = float(self.laser.max_power)
            self.laser.power = self.model.pump / self.options.pump_per_mw
            self.laser.check("SOUR:POW")
            self._safe_codes = self._resolve_safe_codes()
            self._opened = True
            self._codes = self._safe_codes.copy()
            with self._guarded():
                self.slm.display(self._codes + self.margin_levels)
        except BaseException:
            self._opened = False
            self._release()
            raise
        return BenchIdentity(
            ids["slm"].vendor, "polariton-bench",
            "/".join(f"{role}:{ids[role].serial}" for role in ROLES),
            "/".join(f"{role}:{ids[role].model} {ids[role].firmware}".strip() for role in ROLES))

    def _configure_potential(self) -> None:
        """V's levels and range from the modulator's grey levels and calibration."""
        assert self.slm is not None and self.slm.n_levels is not None
        unit = self.options.energy_unit_mev
        self.low = float(self.slm.potential_low) / unit
        high = float(self.slm.potential_high) / unit
        levels = self.slm.n_levels
        if not high > self.low:
            raise BenchError(f"{self.name}: the modulator's calibration is not increasing")
        self.lsb = (high - self.low) / (levels - 1)
        self.margin_levels = round(self.options.margin / self.lsb)
        v_levels = levels - 2 * self.margin_levels
        if v_levels < 2:
            raise BenchError(f"{self.name}: the margin leaves V fewer than 2 grey levels")
        v_low = self.low + self.margin_levels * self.lsb
        v_high = self.low + (levels - 1 - self.margin_levels) * self.lsb
        spec = ParameterSpec("V", (self.model.n_sites,), v_low, v_high, "J", v_levels)
        self.spec = BenchSpec((spec,), self.model.input_size, self.model.state_size,
                              self.model.output_slice, state_unit="sqrt(polaritons per site)")

    def _resolve_safe_codes(self) -> np.ndarray:
        """V's codes in the safe state: the protocol's safe value (nearest level; it must lie
        in V's range) or the middle level."""
        spec = self.spec.parameters[0]
        assert spec.levels is not None
        if self._safe_value is None:
            code = spec.levels // 2
        else:
            check_safe_value(spec, self._safe_value, bench=self.name)
            code = round((self._safe_value - spec.low) / self.lsb)
        return np.full(spec.shape, code, dtype=np.int64)

    def close(self) -> None:
        """Laser off (confirmed, best effort), the safe pattern, and release the sessions.
        Idempotent."""
        if self._manager is None:
            return
        try:
            self._safe_state("close")
        finally:
            self._opened = False
            self._release()

    def _release(self) -> None:
        """Close the bench's own sessions. The resource manager stays open: pyvisa shares one
        per backend, and closing it would close every other user's sessions too."""
        if not isinstance(self._transport, Mapping):  # the caller's sessions stay open
            for session in self._sessions:
                with contextlib.suppress(Exception):
                    session.close()
        self._sessions = []
        self._manager = None

    def _safe_state(self, what: str) -> None:
        """Laser off and confirmed, then (laser off only) the safe pattern on the modulator;
        a fault is logged for what could not be confirmed."""
        if self.laser is None:
            return
        try:
            self.laser.off()
        except BenchError as err:
            self._faults.append(Fault("safe_state", self.laser.label, "OUTP 0",
                                      f"could not confirm the laser off on {what}: {err}",
                                      recovered=False))
            return
        if self._safe_codes is None or self.slm is None:
            return
        try:
            self.slm.display(self._safe_codes + self.margin_levels)
        except BenchError as err:
            self._faults.append(Fault("safe_state", self.slm.label, "SLM:PATT",
                                      f"could not display the safe pattern on {what}: {err}",
                                      recovered=False))

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """Whatever escapes switches the laser off first."""
        try:
            yield
        except BaseException as err:
            self._safe_state(f"error ({type(err).__name__})")
            raise

    def _require_open(self) -> None:
        if not self._opened:
            raise BenchError(f"{self.name}: not open (call open() first)")

    # -- parameters -------------------------------------------------------------------------

    def _check_codes(self, values: np.ndarray) -> np.ndarray:
        spec = self.spec.parameters[0]
        assert spec.levels is not None
        codes = np.asarray(values)
        if codes.shape != spec.shape:
            raise BenchError(f"{self.name}: write V: shape {codes.shape} != {spec.shape}")
        if codes.dtype.kind not in "iuf" or (codes.dtype.kind == "f" and (
                not np.all(np.isfinite(codes)) or np.any(np.rint(codes) != codes))):
            raise OutOfRangeError(f"{self.name}: write V: codes must be integers")
        codes = codes.astype(np.int64)
        if codes.min() < 0 or codes.max() > spec.levels - 1:
            raise OutOfRangeError(f"{self.name}: write V: codes span [{codes.min()}, "
                                  f"{codes.max()}], outside [0, {spec.levels - 1}]; refused")
        return codes

    def write(self, params: dict[str, np.ndarray]) -> None:
        """Write V as integer codes 0 .. levels - 1 (grey level = code + margin): checked,
        then displayed (laser off) and read back."""
        self._require_open()
        if set(params) - {"V"}:
            raise BenchError(f"{self.name}: write: the bench has only V, got {sorted(params)}")
        if "V" not in params:
            return
        codes = self._check_codes(params["V"])
        assert self.slm is not None and self.laser is not None
        with self._guarded():
            self.laser.off()
            self.slm.display(codes + self.margin_levels)
        self._codes = codes

    def read_params(self) -> dict[str, np.ndarray]:
        """The codes the modulator displays between relaxations (grey level - margin)."""
        self._require_open()
        assert self.slm is not None
        with self._guarded():
            grey = self.slm.read_pattern()
        return {"V": grey - self.margin_levels}

    # -- relaxation -------------------------------------------------------------------------

    def patterns(self, inputs: np.ndarray, nudge: Nudge | None,
                 start: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Grey-level patterns (batch, n) of the free phase and of the nudge (or None),
        every one validated against the modulator's limits. Nothing is sent."""
        model = self.model
        x = np.asarray(inputs, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != model.input_size or not np.all(np.isfinite(x)):
            raise ValueError(f"{self.name}: inputs must be finite, (batch, "
                             f"{model.input_size}), got {x.shape}")
        base = self._codes[None, :] + self.margin_levels
        free = base + np.rint(model.input_potentials(x) / self.lsb).astype(np.int64)
        nudged = None
        if nudge is not None and nudge.strength != 0.0:
            if not math.isfinite(float(nudge.strength)):
                raise ValueError(f"{self.name}: nudge strength must be finite")
            target = np.asarray(nudge.target, dtype=np.float64)
            if start is None:
                raise BenchError(f"{self.name}: a nudged phase needs its start (free) state: "
                                 "the nudge is computed from its intensities")
            start = np.asarray(start, dtype=np.float64)
            if (target.shape != (len(x), model.output_size) or start.shape
                    != (len(x), model.state_size) or not np.all(np.isfinite(target))
                    or not np.all(np.isfinite(start))):
                raise ValueError(f"{self.name}: nudge target ({len(x)}, {model.output_size}) "
                                 f"and start ({len(x)}, {model.state_size}) must be finite")
            offsets = model.input_potentials(x) + model.nudge_potential(
                float(nudge.strength), target, start)
            nudged = base + np.rint(offsets / self.lsb).astype(np.int64)
        assert self.slm is not None
        for pattern in (free, nudged):
            if pattern is not None:
                for row in pattern:
                    self.slm.validate(row)
        return free, nudged

    def relax(
        self,
        inputs: np.ndarray,
        nudge: Nudge | None = None,
        start: np.ndarray | None = None,
        settle: Settle | None = None,
    ) -> Relaxation:
        """Relax each sample in turn (see the module docstring); ``steps`` counts frames,
        ``residual`` is the last relative frame-to-frame intensity change."""
        self._require_open()
        settle = settle or Settle(self.options.tolerance, self.options.max_steps)
        if settle.max_steps < 2 or not settle.tolerance > 0 or settle.readouts < 1:
            raise ValueError(f"{self.name}: settle needs max_steps >= 2 (frames), tolerance "
                             f"> 0 and readouts >= 1, got {settle}")
        free, nudged = self.patterns(inputs, nudge, start)
        batch = free.shape[0]
        state = np.empty((batch, self.model.state_size), dtype=self.dtype)
        converged = np.zeros(batch, dtype=bool)
        steps = np.zeros(batch, dtype=np.int64)
        residual = np.zeros(batch)
        assert self.laser is not None and self.slm is not None
        with self._guarded():
            for sample in range(batch):
                self.laser.off()
                self.slm.display(free[sample])
                self.laser.on()
                field, frames, change = self._settle(settle)
                if nudged is not None:
                    self.slm.display(nudged[sample])
                    field, more, change = self._settle(settle)
                    frames += more
                state[sample] = self.model.pack(field[None, :], self.dtype)[0]
                steps[sample], residual[sample] = frames, change
                converged[sample] = change <= settle.tolerance
                if not converged[sample]:
                    self._faults.append(Fault(
                        "unsettled", self.camera.label if self.camera else self.name, "FETC?",
                        f"sample {sample}: intensities still changing by {change:.3g} after "
                        f"{frames} frames", recovered=False, sample=sample))
            self.laser.off()
            self.slm.display(self._codes + self.margin_levels)
            self.check_instruments()
        return Relaxation(state, converged, steps, residual)

    def _settle(self, settle: Settle) -> tuple[np.ndarray, int, float]:
        """Frames until two consecutive ones agree; (field, frames, relative change). With
        ``readouts`` > 1, that many settled frames are averaged (phases on the circle)."""
        assert self.camera is not None
        previous: np.ndarray | None = None
        change = math.inf
        frames = 0
        intensity = phase = np.zeros(self.model.n_sites)
        while frames < settle.max_steps:
            intensity, phase = self.camera.acquire()
            frames += 1
            if previous is not None:
                scale = float(np.mean(intensity))
                change = (float(np.max(np.abs(intensity - previous))) / scale
                          if scale > 1e-12 else math.inf)
                if change <= settle.tolerance:
                    break
            previous = intensity
        if settle.readouts > 1:
            total, cos, sin = intensity.copy(), np.cos(phase), np.sin(phase)
            for _ in range(settle.readouts - 1):
                more, angle = self.camera.acquire()
                total += more
                cos, sin = cos + np.cos(angle), sin + np.sin(angle)
            intensity, phase = total / settle.readouts, np.arctan2(sin, cos)
        return np.sqrt(intensity) * np.exp(1j * phase), frames, change


__all__ = ["SIM_RESOURCES", "PolaritonBench", "PolaritonBenchOptions", "sim_definitions"]
