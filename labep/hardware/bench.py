"""The Bench contract: everything labep can train is a Bench.

A simulator and a hardware driver of the same physics implement this one contract and declare
the same :class:`BenchSpec`, so a protocol switches between them by one field. The host never
reaches into a bench's internals: it writes parameters, relaxes the physics with inputs clamped
(and optionally a nudge), and reads back steady states. Everything EP computes is computed from
those read-back states through the bench's *model* (see :mod:`labep.models`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from pydantic import BaseModel


class BenchError(RuntimeError):
    """A bench refused a request or failed; the message names the bench and the command."""


class OutOfRangeError(BenchError, ValueError):
    """A write asked for a value outside a parameter's physical range. Never clipped silently."""


@dataclass(frozen=True)
class Fault:
    """One fault a bench met: which instrument, which command, what happened, and whether the
    bench recovered by itself (a retried frame, a reconnect) or gave up (raised
    :class:`BenchFaultError`). The engine records every one in the run store."""

    kind: str  # e.g. timeout, crc, garbled, error_frame, link_closed, reconnect, unsettled
    instrument: str
    command: str
    message: str
    recovered: bool
    detail: dict[str, Any] = field(default_factory=dict)

    def as_event(self) -> dict[str, Any]:
        return {"instrument": self.instrument, "command": self.command,
                "recovered": self.recovered, **self.detail}


class BenchFaultError(BenchError):
    """A bench could not complete a command, after its own bounded retries. The bench is left
    in its safe state; the engine's fault policy decides (retry the phase, skip, stop)."""

    def __init__(self, message: str, *, kind: str, instrument: str, command: str) -> None:
        super().__init__(f"{instrument}: {command}: {message}")
        self.fault = Fault(kind, instrument, command, message, recovered=False)


@runtime_checkable
class Resumable(Protocol):
    """A bench whose whole state can be saved and restored (simulators): what it stores,
    its counters and every random generator's state. A resumed run then continues exactly as
    if never interrupted. A bench without it (hardware) gets its parameters written again."""

    def save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-ready metadata and named arrays."""
        ...

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        ...


@runtime_checkable
class FaultReporting(Protocol):
    """A bench that keeps a log of the faults it met (drivers); the engine drains it after
    every phase and stores each fault as an event."""

    def drain_faults(self) -> list[Fault]:
        """The faults met since the last call, oldest first; the log is emptied."""
        ...


@runtime_checkable
class LinkReporting(Protocol):
    """A bench behind a communication link (drivers) that counts how the link behaved; the
    engine records the counters with every epoch and when a run ends, and ``labep show``
    prints them as the run's link-quality summary."""

    def link_quality(self) -> dict[str, float]:
        """Cumulative counters since the bench was constructed, at least ``frames`` (request
        frames sent), ``retries`` (requests re-sent), ``bytes_resent`` and ``reconnects``;
        any other entry is a number too (e.g. the measured error rate, the frame size in
        use)."""
        ...


@runtime_checkable
class StepRelaxing(Protocol):
    """A bench that relaxes a training step's free phase and its nudged phases in one go
    (the OIM board of protocol 3: one RELAX_STEP request a step instead of one a phase, so a
    run on a slow or unreliable link waits on a third as many replies; the Hopfield
    simulator: one kernel call and one parallel loop a step instead of three)."""

    def relax_step(self, inputs: np.ndarray, nudges: list[Nudge], free: Settle,
                   nudged: Settle) -> tuple[Relaxation, list[Relaxation]] | None:
        """The free phase of ``inputs`` from rest and, for the samples whose free phase
        converged, each nudged phase (``nudges``: targets of the whole batch) started from
        that free state: exactly the Relaxations of ``relax(inputs)`` and then
        ``relax(inputs[ok], Nudge(beta, target[ok]), start=free.state[ok])`` for each
        nudge (none if no sample converged). None when it cannot for these arguments: the
        engine then runs the phases one by one."""
        ...


@runtime_checkable
class ShotCounting(Protocol):
    """A bench that measures with shots (a quantum processor); the engine records the count
    with every epoch (``shots_total``)."""

    #: every measurement shot since the bench was constructed (training and evaluation)
    shots_used: int


@dataclass(frozen=True)
class ParameterSpec:
    """One named, writable parameter of a bench.

    ``low``/``high`` are the physical range in ``unit``; ``levels`` is the write resolution
    (number of distinct codes the hardware stores), ``None`` for a continuous (float) parameter.
    """

    name: str
    shape: tuple[int, ...]
    low: float = -math.inf
    high: float = math.inf
    unit: str = ""
    levels: int | None = None

    def check_range(self, values: np.ndarray, *, bench: str) -> None:
        """Raise :class:`OutOfRangeError` if any value lies outside [low, high] or is not finite."""
        values = np.asarray(values)
        if values.shape != self.shape:
            raise BenchError(
                f"{bench}: write {self.name}: shape {values.shape} != declared {self.shape}"
            )
        if not values.size:
            return
        # (array methods and math on Python floats: a training step checks its small
        # parameters every write, and numpy's function wrappers cost more than the checks)
        if self.low == -math.inf and self.high == math.inf and math.isfinite(values.sum()):
            return  # unbounded: a finite sum means every value is finite (one pass)
        lo, hi = float(values.min()), float(values.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN, or +-inf even in an open range
            raise OutOfRangeError(f"{bench}: write {self.name}: non-finite value refused")
        if not (self.low <= lo and hi <= self.high):
            raise OutOfRangeError(
                f"{bench}: write {self.name}: values span [{lo:.6g}, {hi:.6g}] {self.unit}, "
                f"outside the physical range [{self.low:.6g}, {self.high:.6g}] {self.unit}; "
                "refused (labep never clips silently on a bench)"
            )


@dataclass(frozen=True)
class BenchSpec:
    """What a bench exposes: its parameters, its input and readout channels, its state.

    ``state_size`` is the width of the read-back state vector (one row per sample);
    ``output_slice`` selects the readout channels the cost is measured on.
    """

    parameters: tuple[ParameterSpec, ...]
    input_size: int
    state_size: int
    output_slice: tuple[int, int]
    state_unit: str = ""

    def parameter(self, name: str) -> ParameterSpec:
        for spec in self.parameters:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)


def safe_values(names: dict[str, tuple[int, ...]], requested: dict[str, float], *,
                bench: str) -> dict[str, float]:
    """The protocol-defined safe value of each parameter a driver puts its hardware in on
    open, on close and after any error (``bench.options.safe_values``).

    A key is a parameter name (``J1``) or a name without its layer number (``J``: every
    coupling layer); an exact name wins over its prefix. Parameters no key names keep the
    driver's own safe value (its zero code) and are left out of the result. A key naming no
    parameter raises :class:`BenchError` (checked before a bench is opened); each driver
    checks the values against its physical range once it has read it from the instrument."""
    unknown = [key for key in requested
               if key not in names and not any(_prefix(name) == key for name in names)]
    if unknown:
        raise BenchError(f"{bench}: bench.options.safe_values: no parameter "
                         f"{', '.join(map(repr, unknown))}; the parameters are "
                         f"{', '.join(names)} (or a name without its layer number)")
    resolved = {}
    for name in names:
        for key in (name, _prefix(name)):
            if key in requested:
                resolved[name] = float(requested[key])
                break
    return resolved


def check_safe_value(spec: ParameterSpec, value: float, *, bench: str) -> None:
    """:class:`OutOfRangeError` (naming ``bench.options.safe_values``) unless a safe value
    lies in the parameter's physical range."""
    try:
        spec.check_range(np.full(spec.shape, value), bench=bench)
    except OutOfRangeError as err:
        raise OutOfRangeError(f"{err} (bench.options.safe_values)") from None


def _prefix(name: str) -> str:
    """A parameter name without its layer number: ``J12`` -> ``J``."""
    return name.rstrip("0123456789") or name


@dataclass(frozen=True)
class Nudge:
    """The nudge of an EP phase: strength beta (signed) and the target the cost pulls towards.

    ``correction``: the non-conservative correction of Scurria et al. (2026): the bench adds
    (J^T - J)(s - s0) to its dynamics, J = df/ds at the free state s0 (the phase's ``start``),
    so that the response solves the adjoint equation. Only benches with
    ``supports_correction = True`` apply it; protocols asking for it elsewhere are refused."""

    strength: float
    target: np.ndarray
    correction: bool = False


@dataclass(frozen=True)
class Settle:
    """When a phase counts as settled: residual (max |rho(h(s)) - s|) at or below ``tolerance``
    within ``max_steps`` steps of the physics; ``readouts`` settled-state readouts are averaged
    (a noiseless readout averages to itself).

    ``samples``: also return the ``readouts`` readouts themselves, as
    :attr:`Relaxation.samples`. A stochastic bench (a simulator at temperature T > 0, see
    :mod:`labep.simulators.thermal`) then draws them from its stationary distribution
    p(s) ~ exp(-(E + beta C) / T), after its burn-in and ``thin`` steps apart, for the
    estimators that take expectations and covariances over sample sets."""

    tolerance: float
    max_steps: int
    readouts: int = 1
    samples: bool = False


@dataclass
class Relaxation:
    """A read-back steady state and how it settled, one entry per sample.

    ``state`` has shape (batch, state_size); ``converged``, ``steps`` and ``residual`` have
    shape (batch,). A phase whose residual is above tolerance is a fault, never a gradient.
    ``samples`` (when :attr:`Settle.samples` asked for them) has shape
    (readouts, batch, state_size): the readouts whose mean is ``state``. ``info`` may carry
    ``temperature`` (T of a sampling bench), ``burn_in`` and ``thin``.
    """

    state: np.ndarray
    converged: np.ndarray
    steps: np.ndarray
    residual: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    samples: np.ndarray | None = None

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    @functools.cached_property
    def finite(self) -> np.ndarray:
        """Per sample: whether every unit of its state read back finite (computed once;
        ``logical_and.reduce`` is ``np.all`` without its per-call wrapping, half the time on
        a training batch)."""
        return np.logical_and.reduce(np.isfinite(self.state), axis=1)

    def rows(self, mask: np.ndarray) -> Relaxation:
        """The samples selected by a boolean ``mask`` (e.g. the settled ones)."""
        return Relaxation(self.state[mask], self.converged[mask], self.steps[mask],
                          self.residual[mask], self.info,
                          None if self.samples is None else self.samples[:, mask])


@dataclass(frozen=True)
class BenchIdentity:
    """Who answered ``open()``: the ``*IDN?`` of an instrument, or a simulator's own."""

    vendor: str
    model: str
    serial: str
    firmware: str

    def as_dict(self) -> dict[str, str]:
        return {
            "vendor": self.vendor,
            "model": self.model,
            "serial": self.serial,
            "firmware": self.firmware,
        }


class BenchLifecycle:
    """Mixin for a class with ``open()`` and ``close()``: ``with bench:`` opens it (connect,
    identify, safe state) and always closes it, on error too. Gives the Bench contract's
    optional declarations their defaults: no non-conservative correction, no exact options,
    no limits on a model section of its own."""

    supports_correction: ClassVar[bool] = False
    exact_options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def check_model(cls, section: Any, options: Any) -> list[tuple[tuple[Any, ...], str]]:
        """No limits of the bench's own on the model section it is given."""
        return []

    def __enter__(self) -> BenchLifecycle:
        self.open()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # type: ignore[attr-defined]


@runtime_checkable
class Bench(Protocol):
    """The one contract for simulators and drivers (docs/writing-a-driver.md).

    A bench class is registered under ``name`` in the ``labep.simulators`` or ``labep.drivers``
    entry-point group and built as ``cls(model, options)``; a driver as ``cls(model, options,
    resource=..., transport=...)`` (a resource string it opens in :meth:`open`, or a transport
    object already open: a pyserial port, a pyvisa resource). Construction never touches
    hardware. The class attributes are what the registry, ``labep benches`` and the protocol's
    cross-checks read before anything is built."""

    #: the name a protocol's ``bench.simulator`` or ``bench.driver`` gives it
    name: ClassVar[str]
    #: the model kinds (``model.kind``) it runs
    model_kinds: ClassVar[tuple[str, ...]]
    #: the Pydantic model of its ``bench.options`` (strict; validated before it is built)
    options_model: ClassVar[type[BaseModel]]
    #: whether it applies the non-conservative correction (:attr:`Nudge.correction`)
    supports_correction: ClassVar[bool]
    #: option values that make a simulator exact for ``labep gradcheck`` (e.g. no shots)
    exact_options: ClassVar[dict[str, Any]]

    @classmethod
    def check_model(cls, section: Any, options: Any) -> list[tuple[tuple[Any, ...], str]]:
        """Problems ((location, message) pairs) of a model section on this bench with these
        options, found at validation before anything is built: the bench's own limits (a
        simulator's memory, an instrument's channel count)."""
        ...

    spec: BenchSpec

    def open(self) -> BenchIdentity:
        """Connect, identify and put the bench in a known, safe state."""
        ...

    def close(self) -> None:
        """Leave the bench in its safe state and release the transport. Idempotent."""
        ...

    def write(self, params: dict[str, np.ndarray]) -> None:
        """Write parameter values (already quantized and calibrated by the write path).

        Refuses any value outside the declared range with :class:`OutOfRangeError`, before
        writing anything. The bench copies the values; it keeps no reference to the arrays.
        """
        ...

    def read_params(self) -> dict[str, np.ndarray]:
        """Read back what the bench holds, for write-verify."""
        ...

    def relax(
        self,
        inputs: np.ndarray,
        nudge: Nudge | None = None,
        start: np.ndarray | None = None,
        settle: Settle | None = None,
    ) -> Relaxation:
        """Clamp ``inputs`` (batch, input_size), apply the optional nudge, let the physics
        settle from ``start`` (or the bench's rest state) and return the read-back state."""
        ...

    def __enter__(self) -> Bench: ...

    def __exit__(self, *exc: object) -> None: ...
