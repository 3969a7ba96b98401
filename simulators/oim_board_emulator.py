"""An emulated FPGA oscillator Ising board: the OIM simulator behind the board's wire protocol.

:class:`EmulatedBoard` holds the registers of a board (``docs/oim-board-protocol.md``) and
answers one request at a time; its physics is a :class:`labep.simulators.oim.OIMSimulator`
with quantized storage (``device.bits`` = the board's coupling and bias bits, ``weight_range``
and ``bias_range`` = the board's ranges, ``device.readout_bits`` = 16 for the phases) relaxing
one sample per RUN through :meth:`~labep.simulators.oim.OIMSimulator.relax_phases`. A start
loaded as codes k is the phase k * 2 pi / 65536 exactly, so a run through the driver and this
emulator matches the same protocol on that simulator (batch relaxations included).

:class:`BoardEmulator` serves a board on a pseudo-terminal or a loopback TCP port
(:mod:`labep.simulators.emulator_links`), in-process (``start()`` runs it on a thread) or from
the command line (``labep emulate oim-board``), with a wire time model and fault injection.

Emulator behaviour a real board would not show (documented in the protocol document):
the integration runs in the serving loop right after RUN's reply is sent, so a request that
arrives during it is answered when it ends, and RESET cannot cut a run short.

Fault injection (:class:`FaultSpec`, ``--faults``; every draw from ``seed``):

``garble=P``      each byte, either direction, is replaced by a different byte with prob. P
``drop=P``        each byte, either direction, is lost with probability P
``delay=P:S``     each reply is held back S seconds (beyond a client's timeout) with prob. P
``close_every=N`` every N-th request frame is not answered: the link is dropped and the board
                  power-cycled (codes to the zero code, not configured), as a board powered
                  through its USB link would be
``never_settle=P`` a RUN reports UNSETTLED (steps = max_steps, residual >= 10 x tolerance)
``nan=P``         a READ_PHASES marks one oscillator's readout invalid (code 0xFFFF, bit set)
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numba
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

import labep
from labep.drivers import oim_wire as wire
from labep.hardware.bench import Nudge, Settle
from labep.models.oim import LayeredOIM
from labep.simulators.device import DeviceOptions
from labep.simulators.emulator_links import PtyLink, TcpLink
from labep.simulators.oim import OIMSimulator, OIMSimulatorOptions

Command = wire.Command
ErrorCode = wire.ErrorCode
REST_CODE = 16384  # pi / 2


class BoardConfig(BaseModel):
    """What the emulated board is built for (``labep emulate oim-board`` options)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sizes: tuple[int, ...] = Field(
        (2, 8, 2), description="Layer sizes n_0 (clamped inputs), n_1 .. n_L.")
    bits: int = Field(8, ge=1, le=16, description="Resolution of couplings and biases (codes "
                      "0 .. 2^bits - 1; the simulator's device.bits).")
    coupling_range: float = Field(2.0, gt=0.0, description="J_max: coupling codes span "
                                  "[-J_max, J_max].")
    bias_range: float = Field(2.0, gt=0.0, description="Bias codes span [-range, range].")
    dt: float = Field(0.2, gt=0.0, le=10.0, description="Integration step (units of 1/J).")
    integrator: Literal["euler", "heun", "adaptive"] = Field(
        "euler", description="The simulator's integrator.")
    dtype: Literal["float32", "float64"] = Field("float32", description="Arithmetic precision.")
    seed: int = Field(0, ge=0, description="Device seed and every fault draw.")
    serial: str = Field("", max_length=16, description="Serial number (default from sizes "
                        "and seed).")
    protocol: Literal[1, 2, 3] = Field(
        wire.PROTOCOL, description="The protocol version it speaks: 3 (RELAX_STEP), 2 "
        "(RELAX_BATCH and READ_BATCH, no RELAX_STEP), or 1 (a board of the first firmware: "
        "none of those).")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if not 2 <= len(sizes) <= 32 or any(not 1 <= n <= 65535 for n in sizes):
            raise ValueError("give 2 to 32 layer sizes, each 1 .. 65535")
        return sizes

    @classmethod
    def parse_sizes(cls, text: str) -> tuple[int, ...]:
        """'2-8-2' -> (2, 8, 2)."""
        try:
            return tuple(int(part) for part in text.replace(",", "-").split("-"))
        except ValueError:
            raise ValueError(f"sizes like 2-8-2, got {text!r}") from None


class FaultSpec(BaseModel):
    """Faults the emulator injects (see the module docstring for the SPEC syntax)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    garble: float = Field(0.0, ge=0.0, le=1.0)
    drop: float = Field(0.0, ge=0.0, le=1.0)
    delay: float = Field(0.0, ge=0.0, le=1.0)
    delay_seconds: float = Field(0.5, ge=0.0, le=600.0)
    close_every: int = Field(0, ge=0)
    never_settle: float = Field(0.0, ge=0.0, le=1.0)
    nan: float = Field(0.0, ge=0.0, le=1.0)

    @classmethod
    def parse(cls, spec: str) -> FaultSpec:
        """``garble=0.01,drop=0.01,delay=0.01:0.5,close_every=200,never_settle=0,nan=0``
        (any subset; empty: no faults)."""
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"fault {item!r}: write NAME=VALUE")
            if key == "delay":
                probability, _, seconds = value.partition(":")
                values["delay"] = probability
                if seconds:
                    values["delay_seconds"] = seconds
            else:
                values[key] = value
        return cls.model_validate(values)

    @property
    def bytes_faulty(self) -> bool:
        return self.garble > 0 or self.drop > 0


@contextmanager
def one_numba_thread() -> Iterator[None]:
    """numba kernels launched from this thread use one thread (a board relaxes one sample: a
    parallel launch only costs, and on a busy machine many times the work). The setting is
    numba's thread-local one, restored on exit."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


class _Refused(Exception):  # noqa: N818 - a board's ERROR reply
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _check_block(offset: int, count: int, size: int, what: str) -> slice:
    if count < 1 or offset + count > size:
        raise _Refused(ErrorCode.BAD_BLOCK, f"{what}[{offset}:{offset + count}] outside "
                       f"[0, {size})")
    return slice(offset, offset + count)


def _check_reply_room(command: Command, count: int) -> None:
    room = wire.COMMANDS[command].reply.max_count()
    if count > room:
        raise _Refused(ErrorCode.BAD_BLOCK, f"at most {room} values fit one reply")


class EmulatedBoard:
    """The registers and physics of one board; :meth:`handle` answers one request."""

    vendor = "labep"
    model_name = "oim-board-emu"

    def __init__(self, config: BoardConfig, faults: FaultSpec | None = None) -> None:
        self.config = config
        self.faults = faults or FaultSpec()
        self.model = LayeredOIM(config.sizes, shil=0.0)
        self.sim = OIMSimulator(self.model, OIMSimulatorOptions(
            dtype=config.dtype, weight_range=config.coupling_range,
            bias_range=config.bias_range, dt=config.dt, integrator=config.integrator,
            device=DeviceOptions(bits=config.bits, readout_bits=wire.PHASE_BITS,
                                 seed=config.seed)))
        self.shapes = self.model.parameter_shapes()
        self.levels = 1 << config.bits
        self.zero_code = wire.safe_code(config.bits)
        self.serial = config.serial or (
            "E" + "-".join(str(n) for n in config.sizes) + f"s{config.seed}")[:16]
        self._rng = np.random.default_rng([config.seed, 2])
        #: command code -> (request layout, handler): the command table, bound to this board
        known = wire.known_commands(config.protocol)
        self._handlers = {code: (spec.request, getattr(self, "_" + spec.name.lower()))
                          for code, spec in wire.COMMANDS.items() if code in known}
        n_free = self.model.state_size
        self._result_dtype = wire.batch_result_dtype(n_free)
        self.physics_seconds = 0.0
        self.runs = 0
        #: requests refused, by error name (e.g. OUT_OF_RANGE: a code >= 2^bits was sent)
        self.refusals: dict[str, int] = {}
        self.power_on()
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile (or load) the kernel now, so that the first RUN answers in time."""
        self.clamped = self.configured = True
        self.pending = (1, 1.0)
        with one_numba_thread():
            self.integrate()
        self.physics_seconds, self.runs = 0.0, 0
        self.power_on()

    # -- state ------------------------------------------------------------------------------

    def power_on(self) -> None:
        """The state after power-up: the safe state, K_s = 0 and not configured."""
        self.configured = False
        self.shil = 0.0
        self.model.shil = 0.0
        self.reset()

    def reset(self) -> None:
        """The safe state: every code the zero code, nudge off, oscillators stopped (no run,
        no result), clamp cleared, start phases at rest. K_s is kept."""
        self.codes = {name: np.full(shape, self.zero_code, dtype=np.int64)
                      for name, shape in self.shapes.items()}
        self.sim.write(self.codes)
        self.clamp = np.zeros(self.model.input_size)
        self.clamped = False
        self.start = np.full(self.model.state_size, REST_CODE, dtype=np.int64)
        self.beta = 0.0
        self.target = np.zeros(self.model.output_size)
        self.run_state = wire.RunState.IDLE
        self.steps, self.residual, self.elapsed_us = 0, 0.0, 0
        self.result: np.ndarray | None = None
        self.pending: tuple[int, float] | None = None
        #: the relaxations of a RELAX_BATCH still to run: (inputs, start codes, targets)
        self.batch: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        #: a RELAX_STEP still to run: inputs, targets, the nudges' betas, (max_steps,
        #: tolerance) of its nudged phases (its free phase's are ``pending``)
        self.step: tuple[np.ndarray, np.ndarray, list[float], tuple[int, float]] | None = None
        #: the READ_BATCH records of the last completed RELAX_BATCH or RELAX_STEP
        self.batch_result: np.ndarray | None = None

    def is_safe(self) -> bool:
        """Every code at the zero code, nudge off, nothing running."""
        return (all(np.all(c == self.zero_code) for c in self.codes.values())
                and self.beta == 0.0 and self.pending is None)

    # -- requests ---------------------------------------------------------------------------

    def handle(self, command: int, payload: bytes) -> tuple[int, bytes]:
        """The reply (command, payload) to one request."""
        entry = self._handlers.get(command)
        if entry is None:
            return wire.ERROR, wire.error_payload(ErrorCode.UNKNOWN_COMMAND, command,
                                                  f"no command 0x{command:02X}")
        if self.pending is not None and command not in wire.SERVED_WHILE_RUNNING:
            return wire.ERROR, wire.error_payload(ErrorCode.BUSY, command, "running")
        layout, handler = entry
        try:
            reply = handler(layout.unpack(payload))
        except wire.WireFormatError as err:
            return wire.ERROR, wire.error_payload(ErrorCode.BAD_LENGTH, command, str(err))
        except _Refused as err:
            self.refusals[ErrorCode(err.code).name] = (
                self.refusals.get(ErrorCode(err.code).name, 0) + 1)
            return wire.ERROR, wire.error_payload(err.code, command, err.message)
        return command | wire.REPLY_BIT, reply

    def _identify(self, _: wire.Payload) -> bytes:
        return wire.COMMANDS[Command.IDENTIFY].reply.pack(
            np.asarray(self.config.sizes), protocol=self.config.protocol,
            vendor=self.vendor.encode(),
            model=self.model_name.encode(), firmware=f"labep-{labep.__version__}".encode(),
            serial=self.serial.encode(), coupling_bits=self.config.bits,
            bias_bits=self.config.bits, phase_bits=wire.PHASE_BITS,
            coupling_range=self.config.coupling_range, bias_range=self.config.bias_range)

    def _configure(self, request: wire.Payload) -> bytes:
        shil = request["shil"]
        if not (math.isfinite(shil) and shil >= 0.0):
            raise _Refused(ErrorCode.BAD_VALUE, f"K_s {shil} must be finite and >= 0")
        self.shil = shil
        self.model.shil = shil
        self.configured = True
        return b""

    def _reset(self, _: wire.Payload) -> bytes:
        self.reset()
        return b""

    def _parameter(self, selector: int, layer: int) -> str:
        if not 1 <= layer <= self.model.n_layers or selector not in (0, 1, 2):
            raise _Refused(ErrorCode.BAD_BLOCK, f"no parameter selector {selector} layer {layer}")
        return f"{'Jhg'[selector]}{layer}"

    def _store(self, name: str, request: wire.Payload) -> bytes:
        codes = request.array
        assert codes is not None
        flat = self.codes[name].reshape(-1)
        where = _check_block(request["offset"], request["count"], flat.size, name)
        if codes.size and int(codes.max()) >= self.levels:
            raise _Refused(ErrorCode.OUT_OF_RANGE, f"{name}: code {int(codes.max())} >= "
                           f"{self.levels}")
        flat[where] = codes
        self.sim.write({name: self.codes[name]})
        return b""

    def _write_couplings(self, request: wire.Payload) -> bytes:
        return self._store(self._parameter(0, request["layer"]), request)

    def _write_biases(self, request: wire.Payload) -> bytes:
        if request["selector"] not in (wire.Selector.H, wire.Selector.G):
            raise _Refused(ErrorCode.BAD_BLOCK, f"bias selector {request['selector']}")
        return self._store(self._parameter(request["selector"], request["layer"]), request)

    def _read_codes(self, request: wire.Payload) -> bytes:
        name = self._parameter(request["selector"], request["layer"])
        flat = self.codes[name].reshape(-1)
        where = _check_block(request["offset"], request["count"], flat.size, name)
        _check_reply_room(Command.READ_CODES, request["count"])
        return wire.COMMANDS[Command.READ_CODES].reply.pack(flat[where])

    def _clamp(self, request: wire.Payload) -> bytes:
        phases = request.array
        assert phases is not None
        where = _check_block(request["offset"], request["count"], self.clamp.size, "inputs")
        if not np.all(np.isfinite(phases)):
            raise _Refused(ErrorCode.BAD_VALUE, "input phases must be finite")
        self.clamp[where] = phases
        self.clamped = True
        return b""

    def _load_phases(self, request: wire.Payload) -> bytes:
        if request["mode"] == wire.LoadMode.REST:
            if request["count"] or request["offset"]:
                raise _Refused(ErrorCode.BAD_VALUE, "mode REST takes offset 0 and no codes")
            self.start[:] = REST_CODE
            return b""
        if request["mode"] != wire.LoadMode.CODES:
            raise _Refused(ErrorCode.BAD_VALUE, f"load mode {request['mode']}")
        where = _check_block(request["offset"], request["count"], self.start.size, "phases")
        self.start[where] = request.array
        return b""

    def _set_nudge(self, request: wire.Payload) -> bytes:
        beta, target = request["beta"], request.array
        assert target is not None
        if not math.isfinite(beta) or not np.all(np.isfinite(target)):
            raise _Refused(ErrorCode.BAD_VALUE, "beta and the target must be finite")
        if target.size not in (self.model.output_size, 0) or (target.size == 0 and beta != 0):
            raise _Refused(ErrorCode.BAD_VALUE, f"the target needs {self.model.output_size} "
                           "values (none only with beta 0)")
        self.beta = beta
        self.target = target.copy() if target.size else np.zeros(self.model.output_size)
        return b""

    def _run(self, request: wire.Payload) -> bytes:
        if not self.configured or not self.clamped:
            raise _Refused(ErrorCode.NOT_CONFIGURED, "CONFIGURE since power-on and CLAMP "
                           "since RESET are needed")
        tolerance = request["tolerance"]
        if request["max_steps"] < 1 or not (math.isfinite(tolerance) and tolerance > 0):
            raise _Refused(ErrorCode.BAD_VALUE, "max_steps >= 1 and a finite tolerance > 0")
        self.pending = (request["max_steps"], tolerance)
        self.run_state = wire.RunState.RUNNING
        return b""

    def _status(self, _: wire.Payload) -> bytes:
        return wire.COMMANDS[Command.STATUS].reply.pack(
            state=self.run_state, steps=self.steps, residual=self.residual,
            elapsed_us=min(self.elapsed_us, 2**32 - 1))

    def _read_phases(self, request: wire.Payload) -> bytes:
        if self.result is None:
            raise _Refused(ErrorCode.NO_RESULT, "no completed relaxation")
        where = _check_block(request["offset"], request["count"], self.result.size, "phases")
        _check_reply_room(Command.READ_PHASES, request["count"])
        codes = self.result[where].copy()
        invalid = np.zeros(codes.size, dtype=bool)
        if self.faults.nan and self._rng.random() < self.faults.nan:
            unit = int(self._rng.integers(codes.size))
            invalid[unit] = True
            codes[unit] = 0xFFFF
        return wire.COMMANDS[Command.READ_PHASES].reply.pack(
            codes, invalid=invalid, flags=int(invalid.any()))

    def _relax_batch(self, request: wire.Payload) -> bytes:
        if not self.configured:
            raise _Refused(ErrorCode.NOT_CONFIGURED, "CONFIGURE since power-on is needed")
        flags, batch, beta = request["flags"], request["batch"], request["beta"]
        tolerance = request["tolerance"]
        if flags & ~(wire.BatchFlags.START | wire.BatchFlags.NUDGE):
            raise _Refused(ErrorCode.BAD_VALUE, f"unknown flags 0x{flags:02X}")
        if request["max_steps"] < 1 or not (math.isfinite(tolerance) and tolerance > 0):
            raise _Refused(ErrorCode.BAD_VALUE, "max_steps >= 1 and a finite tolerance > 0")
        nudged = bool(flags & wire.BatchFlags.NUDGE)
        if not math.isfinite(beta) or (not nudged and beta != 0.0):
            raise _Refused(ErrorCode.BAD_VALUE, "beta must be finite, and 0 without targets")
        model = self.model
        records = _records(request, batch, wire.batch_request_dtype(
            model.input_size, model.state_size, model.output_size, flags))
        start = (records["start"].astype(np.int64) if flags & wire.BatchFlags.START
                 else np.full((batch, model.state_size), REST_CODE, dtype=np.int64))
        targets = records["target"].astype(np.float64) if nudged else None
        self.batch = (records["phases"].astype(np.float64), start, targets)
        # the registers hold the last sample's context, as after its CLAMP .. RUN group
        self.clamp = self.batch[0][-1].copy()
        self.clamped = True
        self.start = start[-1].copy()
        self.beta = beta
        self.target = targets[-1].copy() if nudged else np.zeros(model.output_size)
        self.pending = (request["max_steps"], tolerance)
        self.run_state = wire.RunState.RUNNING
        self.batch_result = None
        if not request["wait_ms"]:
            return self._batch_reply(None)
        self.integrate()  # the emulator's relaxations end before it answers (see the docs)
        fits = batch <= wire.batch_capacity(self._result_dtype.itemsize, 3)
        return self._batch_reply(slice(0, batch) if fits else None)

    def _relax_step(self, request: wire.Payload) -> bytes:
        if not self.configured:
            raise _Refused(ErrorCode.NOT_CONFIGURED, "CONFIGURE since power-on is needed")
        nudges, batch = request["nudges"], request["batch"]
        betas = [request["beta_1"], request["beta_2"]][:nudges]
        for steps, tolerance in ((request["free_steps"], request["free_tolerance"]),
                                 (request["nudged_steps"], request["nudged_tolerance"])):
            if steps < 1 or not (math.isfinite(tolerance) and tolerance > 0):
                raise _Refused(ErrorCode.BAD_VALUE, "max_steps >= 1 and a finite tolerance > 0")
        if not 1 <= nudges <= 2 or not all(math.isfinite(b) and b != 0.0 for b in betas) or (
                nudges == 1 and request["beta_2"] != 0.0):
            raise _Refused(ErrorCode.BAD_VALUE, "nudges 1 or 2, each beta finite and non-zero "
                           "(beta_2 0 with one nudge)")
        model = self.model
        records = _records(request, batch,
                           wire.step_request_dtype(model.input_size, model.output_size))
        inputs = records["phases"].astype(np.float64)
        targets = records["target"].astype(np.float64)
        rest = np.full((batch, model.state_size), REST_CODE, dtype=np.int64)
        self.batch = (inputs, rest, None)
        self.step = (inputs, targets, betas,
                     (request["nudged_steps"], request["nudged_tolerance"]))
        self.clamp = inputs[-1].copy()
        self.clamped = True
        self.beta = betas[-1]
        self.target = targets[-1].copy()
        self.pending = (request["free_steps"], request["free_tolerance"])
        self.run_state = wire.RunState.RUNNING
        self.batch_result = None
        if not request["wait_ms"]:
            return self._batch_reply(None)
        self.integrate()
        total = batch * (1 + nudges)
        fits = total <= wire.batch_capacity(self._result_dtype.itemsize, 3)
        return self._batch_reply(slice(0, total) if fits else None)

    def _read_batch(self, request: wire.Payload) -> bytes:
        if self.pending is not None and self.batch is not None:
            if not request["wait_ms"]:
                return self._batch_reply(None)
            self.integrate()
        if self.batch_result is None:
            raise _Refused(ErrorCode.NO_RESULT, "no completed RELAX_BATCH")
        where = _check_block(request["offset"], request["count"], len(self.batch_result),
                             "samples")
        room = wire.batch_capacity(self._result_dtype.itemsize, 3)
        if request["count"] > room:
            raise _Refused(ErrorCode.BAD_BLOCK, f"at most {room} samples fit one reply")
        return self._batch_reply(where)

    def _batch_reply(self, where: slice | None) -> bytes:
        """The reply of RELAX_BATCH and READ_BATCH: the run state and the records of
        ``where`` (none: still running, or RELAX_BATCH's results do not fit one reply)."""
        layout = wire.COMMANDS[Command.READ_BATCH].reply
        if where is None or self.batch_result is None:
            return layout.pack(np.zeros(0, dtype=np.uint8), state=self.run_state, count=0)
        records = self.batch_result[where].copy()
        if self.faults.nan:
            for record in records:
                if self._rng.random() < self.faults.nan:
                    unit = int(self._rng.integers(self.model.state_size))
                    record["codes"][unit] = 0xFFFF
                    record["invalid"][unit // 8] |= 1 << (unit % 8)
        return layout.pack(np.frombuffer(records.tobytes(), dtype=np.uint8),
                           state=self.run_state, count=len(records))

    # -- physics ----------------------------------------------------------------------------

    def integrate(self) -> None:
        """Run the pending relaxation (after RUN was answered; the server runs it with one
        numba thread, see :func:`one_numba_thread`), or the pending batch's."""
        if self.pending is None:
            return
        if self.batch is not None:
            self._integrate_batch()
            return
        max_steps, tolerance = self.pending
        started = time.perf_counter()
        nudge = None if self.beta == 0.0 else Nudge(self.beta, self.target[None])
        relaxation = self.sim.relax_phases(self.clamp[None], nudge,
                                           wire.codes_to_phases(self.start)[None],
                                           Settle(tolerance, max_steps))
        self.result = wire.phases_to_codes(relaxation.state[0]).astype(np.int64)
        settled = bool(relaxation.converged[0])
        self.steps = int(relaxation.steps[0])
        self.residual = float(relaxation.residual[0])
        if self.faults.never_settle and self._rng.random() < self.faults.never_settle:
            settled = False
            self.steps = max_steps
            self.residual = max(self.residual, 10.0 * tolerance)
        elapsed = time.perf_counter() - started
        self.physics_seconds += elapsed
        self.elapsed_us = round(elapsed * 1e6)
        self.runs += 1
        self.run_state = wire.RunState.SETTLED if settled else wire.RunState.UNSETTLED
        self.pending = None

    def _integrate_batch(self) -> None:
        """A RELAX_BATCH's relaxations, in one call of the simulator (each sample relaxes on
        its own, exactly as one RUN would), then its READ_BATCH records; STATUS then reports
        the batch: SETTLED if every sample settled, the steps summed, the largest residual,
        the whole time (each record: its sample's share of it). A RELAX_STEP's free phase is
        such a batch from rest; then each nudge relaxes the settled samples from their free
        phase codes (the others' records SKIPPED), its records after the free ones."""
        assert self.pending is not None and self.batch is not None
        inputs, start, targets = self.batch
        started = time.perf_counter()
        nudge = None if targets is None else Nudge(self.beta, targets)
        records = self._relax_records(inputs, nudge, start, *self.pending)
        if self.step is not None:  # RELAX_STEP: each settled sample nudged from its phases
            _, targets, betas, (max_steps, tolerance) = self.step
            ok = records["state"] == wire.RunState.SETTLED
            phases = [records]
            for beta in betas:
                nudged = np.zeros(len(inputs), dtype=self._result_dtype)
                nudged["state"] = wire.RunState.SKIPPED
                nudged["codes"] = 0xFFFF
                nudged["invalid"] = np.packbits(np.ones(self.model.state_size, dtype=bool),
                                                bitorder="little")
                if ok.any():
                    nudged[ok] = self._relax_records(
                        inputs[ok], Nudge(beta, targets[ok]),
                        records["codes"][ok].astype(np.int64), max_steps, tolerance)
                phases.append(nudged)
            records = np.concatenate(phases)
            self.step = None
        ran = records["state"] != wire.RunState.SKIPPED
        elapsed = time.perf_counter() - started
        self.physics_seconds += elapsed
        self.runs += int(ran.sum())
        records["elapsed_us"] = np.where(ran, min(round(elapsed * 1e6 / ran.sum()),
                                                  2**32 - 1), 0)
        self.batch_result = records
        self.result = records["codes"][-1].astype(np.int64)
        self.steps = int(min(records["steps"].astype(np.int64).sum(), 2**32 - 1))
        self.residual = float(records["residual"].max())
        self.elapsed_us = round(elapsed * 1e6)
        self.run_state = (wire.RunState.SETTLED
                          if np.all(records["state"][ran] == wire.RunState.SETTLED)
                          else wire.RunState.UNSETTLED)
        self.batch = None
        self.pending = None

    def _relax_records(self, inputs: np.ndarray, nudge: Nudge | None, start: np.ndarray,
                       max_steps: int, tolerance: float) -> np.ndarray:
        """Result records (no ``elapsed_us``) of relaxations of ``inputs`` from ``start``
        codes, in one call of the simulator (each sample on its own, exactly as one RUN),
        with the ``never_settle`` fault drawn per sample."""
        relaxation = self.sim.relax_phases(inputs, nudge, wire.codes_to_phases(start),
                                           Settle(tolerance, max_steps))
        records = np.zeros(len(inputs), dtype=self._result_dtype)
        records["codes"] = wire.phases_to_codes(relaxation.state)
        settled = relaxation.converged.astype(bool).copy()
        steps = relaxation.steps.astype(np.int64).copy()
        residual = relaxation.residual.astype(np.float64).copy()
        if self.faults.never_settle:
            for sample in range(len(inputs)):
                if self._rng.random() < self.faults.never_settle:
                    settled[sample] = False
                    steps[sample] = max_steps
                    residual[sample] = max(residual[sample], 10.0 * tolerance)
        records["state"] = np.where(settled, wire.RunState.SETTLED, wire.RunState.UNSETTLED)
        records["steps"] = np.minimum(steps, 2**32 - 1)
        records["residual"] = residual
        return records


def _records(request: wire.Payload, batch: int, dtype: np.dtype) -> np.ndarray:
    """The ``batch`` records of a RELAX_BATCH or RELAX_STEP request, their input phases and
    targets (where present) finite."""
    data = request.array
    assert data is not None
    if batch < 1 or data.size != batch * dtype.itemsize:
        raise wire.WireFormatError(f"{batch} record(s) of {dtype.itemsize} bytes need "
                                   f"{batch * dtype.itemsize} bytes, got {data.size}")
    records = np.frombuffer(data.tobytes(), dtype=dtype)
    names = [name for name in ("phases", "target") if name in (dtype.names or ())]
    if not all(np.all(np.isfinite(records[name])) for name in names):
        raise _Refused(ErrorCode.BAD_VALUE, "input phases and targets must be finite")
    return records


@dataclass
class EmulatorStats:
    """What the emulator served: request frames (good and CRC-failed) and reply frames, bytes
    each way, link drops and delayed replies."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    bad_frames: int = 0
    link_drops: int = 0
    delayed: int = 0  # replies held back by the delay fault


class BoardEmulator:
    """Serves an :class:`EmulatedBoard` on a pty (``transport='pty'``) or a loopback TCP port
    (``'tcp'``, ``port`` 0 for any free one), one request at a time, in order.

    ``latency_baud``: the wire time model; each request and each reply takes 10 bits a byte at
    that rate, half duplex: the model's clock (when the line is free) advances by a request's
    bytes from when it reached the emulator (or from when the line was free, if later), then
    by the board's physics on it (the integration time it reports in STATUS), then by the
    reply's bytes, and the reply leaves when the clock says its last byte is out. The
    emulator's own Python on a request (decoding it, checking it, packing the reply and its
    CRC) overlaps the request's and the reply's line time, as a board's logic parses a request
    while its bytes come in and serializes a reply while its bytes go out; a reply never
    leaves before the emulator has it ready, so that Python counts where it outlasts the line
    time (always, at zero latency).
    ``faults``: injected faults (:class:`FaultSpec`), drawn from ``config.seed``.
    """

    def __init__(self, config: BoardConfig | None = None, *,
                 transport: Literal["pty", "tcp"] = "pty", port: int = 0,
                 link_path: str | None = None, latency_baud: float | None = None,
                 faults: FaultSpec | None = None) -> None:
        self.config = config or BoardConfig()
        self.faults = faults or FaultSpec()
        self.board = EmulatedBoard(self.config, self.faults)
        self.transport, self.port, self.link_path = transport, port, link_path
        self.latency_baud = latency_baud
        #: seconds a byte takes on the line (10 bits at latency_baud), 0 without latency
        self._byte_time = 10.0 / latency_baud if latency_baud else 0.0
        #: when the line is free again (the wire time model's clock)
        self._line = 0.0
        self.stats = EmulatorStats()
        self._rng = np.random.default_rng([self.config.seed, 3])
        self._link: PtyLink | TcpLink | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._decoder = wire.FrameDecoder()

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> str:
        """Create the link; returns the URL (a pty path or socket://127.0.0.1:PORT)."""
        if self._link is None:
            self._link = (PtyLink(self.link_path) if self.transport == "pty"
                          else TcpLink(self.port))
            self._wake_r, self._wake_w = os.pipe()
            self._stop.clear()
        return self._link.url

    @property
    def url(self) -> str:
        if self._link is None:
            raise RuntimeError("the emulator is not open")
        return self._link.url

    def start(self) -> str:
        """Open and serve on a daemon thread; returns the URL."""
        url = self.open()
        self._thread = threading.Thread(target=self.serve_forever, name="oim-board-emulator",
                                        daemon=True)
        self._thread.start()
        return url

    def request_stop(self) -> None:
        """Make :meth:`serve_forever` return soon (safe from a signal handler)."""
        self._stop.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Stop serving and release the link. Idempotent."""
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)
            self._thread = None
        if self._link is not None:
            self._link.close()
            self._link = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> BoardEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving ----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Answer requests until :meth:`request_stop`."""
        with one_numba_thread():
            self._serve_forever()

    def _serve_forever(self) -> None:
        self.open()
        assert self._link is not None
        decoder = self._decoder
        last_byte = time.perf_counter()
        while not self._stop.is_set():
            timeout = 0.25
            if decoder.pending:
                timeout = max(0.0, last_byte + wire.GAP_TIMEOUT - time.perf_counter())
            data = self._link.receive(timeout, self._wake_r)
            if self._stop.is_set():
                break
            if data is None:  # a client left or came: a fresh start
                decoder.reset()
                continue
            if data:
                last_byte = time.perf_counter()
                self.stats.bytes_in += len(data)
                events = decoder.feed(self._mangle(data))
            elif decoder.pending and time.perf_counter() - last_byte >= wire.GAP_TIMEOUT:
                events = decoder.expire()
            else:
                continue
            self._serve(events, last_byte)

    def _serve(self, events: list[wire.Frame | wire.BadFrame], arrived: float) -> None:
        """Answer decoded requests (whose last bytes reached the emulator at ``arrived``) in
        order. Replies leave together at the end, except that RUN's reply leaves before its
        integration when no request is queued behind it, and an injected delay holds back
        the replies from its frame on."""
        board, faults = self.board, self.faults
        replies: list[bytes] = []
        byte_time = self._byte_time
        for index, item in enumerate(events):
            if byte_time:  # the request's bytes on the line: it is in when they are
                self._line = max(self._line, arrived) + item.size * byte_time
            physics = board.physics_seconds
            if isinstance(item, wire.BadFrame):
                self.stats.bad_frames += 1
                replies.append(wire.encode(wire.ERROR, item.seq, wire.error_payload(
                    ErrorCode.BAD_CRC, item.command, "CRC mismatch")))
            else:
                self.stats.frames_in += 1
                if faults.close_every and self.stats.frames_in % faults.close_every == 0:
                    self._drop_link()
                    return
                command, payload = board.handle(item.command, item.payload)
                if faults.delay and self._rng.random() < faults.delay:
                    self.stats.delayed += 1
                    self._send(replies)
                    replies = []
                    time.sleep(faults.delay_seconds)
                replies.append(wire.encode(command, item.seq, payload))
                if board.pending is not None:
                    if index == len(events) - 1:
                        self._send(replies)
                        replies = []
                    board.integrate()
            if byte_time:  # the board's physics on it (an integration after RUN's reply too)
                self._line += board.physics_seconds - physics
        self._send(replies)

    def _send(self, replies: list[bytes]) -> None:
        """Send replies in one write, once the wire time model says their last byte is out
        (and not before they are ready: the clock never runs behind the emulator)."""
        if not replies or self._link is None:
            return
        data = b"".join(replies)
        if self._byte_time:
            self._line = max(self._line + len(data) * self._byte_time, time.perf_counter())
            _wait_until(self._line)
        self.stats.frames_out += len(replies)
        self.stats.bytes_out += len(data)
        self._link.send(self._mangle(data))

    def _drop_link(self) -> None:
        assert self._link is not None
        self._link.drop()
        self._decoder.reset()
        self.board.power_on()
        self.stats.link_drops += 1

    def _mangle(self, data: bytes) -> bytes:
        """Injected byte faults: lost and garbled bytes."""
        faults = self.faults
        if not faults.bytes_faulty:
            return data
        raw = np.frombuffer(data, dtype=np.uint8).copy()
        if faults.garble:
            hit = self._rng.random(raw.size) < faults.garble
            raw[hit] ^= self._rng.integers(1, 256, int(hit.sum()), dtype=np.uint8)
        if faults.drop:
            raw = raw[self._rng.random(raw.size) >= faults.drop]
        return raw.tobytes()


def _wait_until(deadline: float) -> None:
    """Sleep, then spin the last 1.5 ms: a sleep's wake-up can be that late on a busy
    machine, and the time model should not make the line slower than it is."""
    remaining = deadline - time.perf_counter()
    if remaining > 2e-3:
        time.sleep(remaining - 1.5e-3)
    while time.perf_counter() < deadline:
        pass
