"""Driver of an FPGA oscillator Ising board (layered OIM) over a USB-UART serial link.

The board speaks the binary protocol of ``docs/oim-board-protocol.md`` (framing and command
table: :mod:`labep.drivers.oim_wire`; transport: :mod:`labep.drivers.oim_link`). It is a
:class:`labep.hardware.bench.Bench` with the same :class:`~labep.hardware.bench.BenchSpec` as
:class:`labep.simulators.oim.OIMSimulator` with quantized storage: parameters ``J1..JL``,
``h1..hL``, ``g1..gL`` of the model's shapes, each with ``levels = 2^bits`` and the range the
board reports (IDENTIFY), written as integer codes. On a protocol-2 board a phase is one
RELAX_BATCH frame per frame-full of samples, whose reply brings every sample's result (one
round trip a phase on a clean link); on a protocol-1 board (or ``phase_requests: sample``)
each sample of a batch runs in turn: CLAMP the input phases, LOAD_PHASES (the start row or
rest), SET_NUDGE, RUN, STATUS and READ_PHASES; the groups of all samples go out pipelined in
one write.

Robustness: every request has a reply timeout, adapted to the latencies the link measures
(:class:`~labep.drivers.oim_link.LinkQuality`); a request that failed (timeout, short,
corrupt or lost reply, BAD_CRC, BUSY, a board that lost its configuration) is re-sent with a
new sequence number, selectively: of independent requests (block writes, READ_CODES,
CONFIGURE, IDENTIFY, reads of a settled result) only the failed ones, of an ordered sequence
everything from its first failure on, and of a sample's relaxation group what its semantics
allow (:meth:`OIMBoard._relax_sample`). A link in sync (a corrupt reply, BAD_CRC, a reply lost
before later ones came) is re-sent to at once; a silent line is probed with STATUS before a
timeout is declared (a late reply still counts), and after a timeout or a short frame the
driver pauses only the board's gap timeout. The attempts are bounded per request
(:meth:`OIMBoard._settle`). Block frames take their size from the measured byte error rate
(:func:`best_payload`: the wire maximum on a clean link). Replies with a sequence number not
awaited are discarded; the decoder resynchronises past garbage; a dropped link is reopened
(same resource), the board re-identified and re-configured and every parameter re-sent from
the host's copy of the last written codes. :meth:`OIMBoard.link_quality` counts what the link
did. Each fault is logged (:meth:`OIMBoard.drain_faults`),
its ``kind`` one of: timeout, short_frame, lost_reply, crc, garbled, stale, busy,
error_frame, board_reset, link_closed, reconnect, safe_state (recovered or not), unsettled and
invalid_readout (a sample that is returned not converged: ``recovered`` False).
When retries are exhausted the board is put in its safe state and
:class:`~labep.hardware.bench.BenchFaultError` is raised (that last fault travels with the
exception, not in the log). Every error that escapes a public method leaves the board in its
safe state (if the link allows); ``close()`` does too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from labep.drivers import oim_wire as wire
from labep.drivers.oim_link import LinkLost, SerialLink, reply_size
from labep.hardware.bench import (
    BenchError,
    BenchFaultError,
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
from labep.models.oim import LayeredOIM
from labep.protocol.strict import STRICT_CONFIG

Command = wire.Command
ErrorCode = wire.ErrorCode


class OIMBoardOptions(BaseModel):
    """Options of the OIM board driver (``bench.options`` in a protocol)."""

    model_config = STRICT_CONFIG

    baudrate: int = Field(
        1_000_000, ge=300, le=20_000_000,
        description="Line rate of the serial port (bit/s). Sizes each request's timeout too "
        "(10 bits a byte); a pty or socket:// link ignores it otherwise.")
    timeout: float = Field(
        0.2, gt=0.0, le=60.0,
        description="Longest reply timeout of a request (s), on top of its bytes' time on the "
        "line and a STATUS request's wait. The timeout in use adapts to the measured reply "
        "latency (smoothed RTT + 4 deviations, at least 20 ms, doubled per timeout in a row) "
        "and never exceeds this. The board answers within 10 ms of a request's end.")
    retries: int = Field(
        3, ge=0, le=20,
        description="Re-sends of each request (new sequence numbers) after a timeout, a "
        "dropped link, BUSY or a board that lost its configuration; failures of the line's "
        "noise (corrupt, short or lost replies, BAD_CRC) get as many on a clean link and, on a "
        "link whose measured error rate makes them common, enough for odds of 1e-6 (at most "
        "5 x retries). Then the board is put in its safe state and BenchFaultError is raised.")
    backoff: float = Field(
        0.02, ge=0.0, le=10.0,
        description="Pause before the first attempt to reopen a dropped link (s), doubled for "
        "each further one (at most 1 s), and before waiting out BUSY. A re-send after a "
        "garbled or lost reply does not pause; after a timeout it pauses the board's 20 ms "
        "gap timeout.")
    reconnects: int = Field(
        3, ge=0, le=20,
        description="Attempts to reopen the port after the link dropped, per drop, each after "
        "the back-off; then BenchFaultError.")
    run_timeout: float = Field(
        30.0, gt=0.0,
        description="Longest a relaxation may run on the board (s) before the driver gives up.")
    poll_wait: float = Field(
        0.1, ge=0.0, le=60.0,
        description="How long a STATUS request asks the board to wait for a running "
        "relaxation to end before it answers (s).")
    dtype: Literal["float32", "float64"] = Field(
        "float32",
        description="dtype of the read-back phases; inputs are rounded to it before they are "
        "encoded as phases (as the simulator does, so a run matches it bit for bit).")
    tolerance: float = Field(1e-4, gt=0.0, description="Default settle tolerance.")
    max_steps: int = Field(2000, ge=1, le=2**32 - 1, description="Default step cap.")
    phase_requests: Literal["batch", "sample"] = Field(
        "batch",
        description="batch: a board of protocol 2 relaxes a phase's samples from RELAX_BATCH "
        "frames (three requests per frame of samples: RELAX_BATCH, STATUS, READ_BATCH); "
        "sample: six requests per sample (CLAMP .. READ_PHASES), as a protocol-1 board needs "
        "(used for it whatever this says).")
    safe_values: dict[str, float] = Field(
        default_factory=dict,
        description="The value (parameter units) a parameter is put to in the safe state, by "
        "name (J1) or for every layer (J, h, g); unnamed ones go to their zero code. The "
        "safe state is RESET followed by these writes, on open, on close and after any "
        "error. Checked against the board's range when it opens, before anything is written.")


@dataclass(frozen=True)
class BoardInfo:
    """What IDENTIFY reported."""

    vendor: str
    model: str
    firmware: str
    serial: str
    protocol: int
    sizes: tuple[int, ...]
    coupling_bits: int
    bias_bits: int
    phase_bits: int
    coupling_range: float
    bias_range: float

    @classmethod
    def decode(cls, payload: bytes) -> BoardInfo:
        reply = wire.COMMANDS[Command.IDENTIFY].reply.unpack(payload)
        text = {k: reply[k].rstrip(b"\0").decode("ascii", "replace")
                for k in ("vendor", "model", "firmware", "serial")}
        assert reply.array is not None
        return cls(**text, protocol=reply["protocol"], sizes=tuple(int(n) for n in reply.array),
                   coupling_bits=reply["coupling_bits"], bias_bits=reply["bias_bits"],
                   phase_bits=reply["phase_bits"], coupling_range=reply["coupling_range"],
                   bias_range=reply["bias_range"])

    def identity(self) -> BenchIdentity:
        return BenchIdentity(self.vendor, self.model, self.serial, self.firmware)


#: what the driver does about a refused request (an ERROR frame), by error code
_RETRY_ERRORS = {ErrorCode.BAD_CRC: "crc", ErrorCode.BUSY: "busy",
                 ErrorCode.NOT_CONFIGURED: "board_reset", ErrorCode.NO_RESULT: "board_reset"}
_KNOWN_ERRORS = frozenset(int(code) for code in ErrorCode)
#: failures that say nothing about the line's noise: the board or the link is silent, busy or
#: lost its state. They count against ``retries`` strictly (see :meth:`OIMBoard._settle`).
_SILENT = frozenset({"timeout", "link_closed", "busy", "board_reset"})
#: a request is given up once failing that often in a row is this unlikely at the measured
#: byte error rate (the noisy budget of :meth:`OIMBoard._noisy_budget`)
_GIVE_UP_ODDS = 1e-6
#: smallest payload (bytes) of an adaptive block frame
_MIN_PAYLOAD = 16
#: a batch's sample groups go out pipelined in one write when a group comes back whole with
#: at least these odds at the measured error rate; else sample by sample
_PIPELINE_ODDS = 0.8
#: a sample's RUN goes out behind its setup frames (one round trip) when they all come back
#: whole with at least these odds; else the setup is confirmed first, then RUN is sent
_OPTIMISTIC_ODDS = 0.5


@dataclass(frozen=True)
class _Block:
    """A command that carries an array split into frames: where the array is (``layout``,
    the request's or the reply's), and the fixed bytes of a request + reply pair."""

    layout: wire.Layout
    overhead: int

    @property
    def item_bytes(self) -> float:
        return self.layout.item_size() + (0.125 if self.layout.bitmap else 0.0)

    @property
    def largest(self) -> int:
        return self.layout.max_count()


def _block(command: Command, in_reply: bool) -> _Block:
    spec = wire.COMMANDS[command]
    layout = spec.reply if in_reply else spec.request
    overhead = 2 * wire.OVERHEAD + spec.request.head.size + (spec.reply.head.size if in_reply
                                                             else 0)
    return _Block(layout, overhead)


_BLOCKS = {Command.WRITE_COUPLINGS: _block(Command.WRITE_COUPLINGS, False),
           Command.WRITE_BIASES: _block(Command.WRITE_BIASES, False),
           Command.READ_CODES: _block(Command.READ_CODES, True),
           Command.CLAMP: _block(Command.CLAMP, False),
           Command.LOAD_PHASES: _block(Command.LOAD_PHASES, False),
           Command.READ_PHASES: _block(Command.READ_PHASES, True)}


def best_payload(error_rate: float, overhead: int, largest: int,
                 smallest: int = _MIN_PAYLOAD, frame_cost: float = 0.0) -> int:
    """The array bytes per frame that maximise the expected goodput of a block transfer.

    A frame pair with L payload bytes and ``overhead`` fixed bytes o (both frames' headers
    and CRCs and the fixed fields) comes back whole with probability (1 - p)^(L + o) at byte
    error rate p, and only a failed frame is sent again. Each attempt costs its L + o bytes
    on the line plus ``frame_cost`` c, the link's fixed cost of a round trip expressed in
    byte times (:meth:`~labep.drivers.oim_link.SerialLink.frame_cost`: the turnaround over
    the time of one byte; infinite where bytes cost nothing next to a round trip), so the
    goodput is L (1 - p)^(L + o) / (L + o + c). Setting its derivative to zero gives
    q L^2 + q k L - k = 0 with k = o + c and q = -ln(1 - p), so
    L = (2 / q) / (1 + sqrt(1 + 4 / (k q))): about sqrt(o / p) for c = 0 and small p, and
    1 / q as c grows without bound. A request's attempts are bounded, so L never goes past
    the size whose frame pair is whole with odds 1/2, ln 2 / q - o (it binds only where c is
    large: a frame whole with odds 1/e would run out of attempts). The better of the two
    whole numbers around it, clamped to [``smallest``, ``largest``]; p = 0 gives
    ``largest``."""
    if error_rate <= 0.0:
        return largest
    q = -math.log1p(-min(error_rate, 0.5))
    fixed = overhead + max(frame_cost, 0.0)
    even_odds = math.log(2.0) / q - overhead
    best = min((2.0 / q) / (1.0 + math.sqrt(1.0 + 4.0 / (fixed * q))), even_odds)
    low = int(min(max(best, smallest), largest))
    high = low if low + 1 > max(even_odds, smallest) else min(low + 1, largest)

    def log_goodput(size: int) -> float:
        cost = math.log(size + fixed) if math.isfinite(fixed) else 0.0
        return math.log(size) - (size + overhead) * q - cost

    return high if log_goodput(high) > log_goodput(low) else low


class _Failed(Exception):  # noqa: N818 - internal: one attempt's verdict
    """How a request failed; ``missing``: a reply never came (the link's observation), so
    the request may or may not have been executed."""

    def __init__(self, kind: str, command: str, message: str, action: str,
                 missing: bool = False, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.kind, self.command, self.message, self.action = kind, command, message, action
        self.missing = missing
        self.detail = detail or {}

    @property
    def silent(self) -> bool:
        """Not the line's noise (see :data:`_SILENT`)."""
        return self.kind in _SILENT


@dataclass
class _Tries:
    """One request's record: attempts sent, and its failures by category."""

    sent: int = 0
    silent: int = 0
    noisy: int = 0


@dataclass
class _Part:
    """A request of a transaction (or a piece of one, see :meth:`OIMBoard._split`): the
    index of the request it belongs to, its record and its reply once answered."""

    request: tuple[int, bytes]
    origin: int
    tries: _Tries = field(default_factory=_Tries)
    done: bool = False
    payload: bytes | None = None


@dataclass
class _Attempt:
    """One exchange as the driver judges it, per request: ``done`` (answered; ``payloads``
    holds the reply, None for an accepted BUSY), else a :class:`_Failed` in ``failures``
    (requests the link left unsent are in neither)."""

    payloads: list[bytes | None]
    done: list[bool]
    failures: dict[int, _Failed]
    silent: bool = False
    reconnected: bool = False
    unsent: frozenset[int] = frozenset()


@dataclass
class _Group:
    """One relaxation's requests. Of one sample (``batch`` 0): the setup (CLAMP and
    LOAD_PHASES blocks, SET_NUDGE), RUN, STATUS and the READ_PHASES blocks (``where``: their
    (offset, count) in the state, for each readout in turn); ``rerun``: the setup requests
    sent again with a RUN that is run again (LOAD_PHASES and SET_NUDGE: a relaxation starts
    from the requested start state). Of ``batch`` samples (protocol 2): no setup, RELAX_BATCH
    as the RUN (it carries every sample's inputs, start and target), STATUS and the
    READ_BATCH blocks (``where``: their (first sample, count))."""

    setup: list[tuple[int, bytes]]
    rerun: frozenset[int]
    run: tuple[int, bytes]
    status: tuple[int, bytes]
    reads: list[tuple[int, bytes]]
    where: list[tuple[int, int]]
    batch: int = 0


_RUN, _STATUS = ("run", 0), ("status", 0)


@dataclass(frozen=True)
class _Rows:
    """Relaxed samples, in arrays: the read-back phases (``dtype``, NaN where invalid), the
    invalid masks and each sample's STATUS fields (run state, steps, residual, elapsed_us)."""

    state: np.ndarray
    invalid: np.ndarray
    run_state: np.ndarray
    steps: np.ndarray
    residual: np.ndarray
    elapsed_us: np.ndarray

    def take(self, index: np.ndarray) -> _Rows:
        """The samples ``index`` selects (indices or a boolean mask), in that order."""
        return _Rows(*(getattr(self, name)[index] for name in _ROW_FIELDS))

    @staticmethod
    def concat(parts: list[_Rows], size: int, dtype: np.dtype) -> _Rows:
        """The samples of ``parts`` in order (``size`` oscillators a sample)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return _Rows(np.empty((0, size), dtype=dtype), np.zeros((0, size), dtype=bool),
                         np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.int64),
                         np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64))
        return _Rows(*(np.concatenate([getattr(part, name) for part in parts])
                       for name in _ROW_FIELDS))


_ROW_FIELDS = ("state", "invalid", "run_state", "steps", "residual", "elapsed_us")
_SETTLED = int(wire.RunState.SETTLED)


def _all_finite(array: np.ndarray) -> bool:
    """np.isfinite(array).all(), as one ufunc reduction over every axis."""
    return bool(np.logical_and.reduce(np.isfinite(array), axis=None))


@dataclass(frozen=True)
class _BatchSizes:
    """A RELAX_BATCH frame pair's record dtype and flags, how many records fit (request and
    reply), the bytes one sample adds to the pair and the pair's fixed bytes."""

    dtype: np.dtype
    flags: int
    largest: int
    item: int
    overhead: int


@cache
def _status_payload(wait_ms: int) -> bytes:
    """A STATUS request's payload (built once per wait: every phase's plan holds one)."""
    return wire.COMMANDS[Command.STATUS].request.pack(wait_ms=wait_ms)


@cache
def _read_batch_payload(wait_ms: int, count: int) -> bytes:
    """A READ_BATCH request's payload for records [0, count) (every RELAX_BATCH frame's plan
    holds one, sent only when the results did not come with the frame's reply)."""
    return wire.COMMANDS[Command.READ_BATCH].request.pack(wait_ms=wait_ms, offset=0,
                                                          count=count)


class _Sample:
    """Where one sample's relaxation stands (see :meth:`OIMBoard._relax_sample`).

    ``confirmed``: setup requests the board acknowledged in the current context (nothing
    else ran since); ``run_valid``: a RUN was acknowledged with the whole setup confirmed
    before it; then ``status`` (the STATUS fields once it reported an ended run) and
    ``reads`` (READ_PHASES replies) of that relaxation. ``tries`` survives :meth:`reset`."""

    def __init__(self, group: _Group) -> None:
        self.group = group
        self.tries: dict[tuple[str, int], _Tries] = {}
        self.reset()

    def reset(self) -> None:
        """Forget what the board holds for this sample (another sample ran, the board was
        reset or reconnected): the next attempt sends the whole group."""
        self.confirmed: set[int] = set()
        self.deadline: float | None = None
        self.run_valid = False
        self.status: dict[str, Any] | None = None
        self.running = False
        self.reads: list[bytes | None] = [None] * len(self.group.reads)

    @property
    def complete(self) -> bool:
        return (self.run_valid and self.status is not None
                and all(read is not None for read in self.reads))

    def request(self, key: tuple[str, int]) -> tuple[int, bytes]:
        kind, index = key
        group = self.group
        if kind == "setup":
            return group.setup[index]
        if kind == "read":
            return group.reads[index]
        return group.run if kind == "run" else group.status

    def unconfirmed(self) -> list[tuple[str, int]]:
        return [("setup", i) for i in range(len(self.group.setup)) if i not in self.confirmed]

    def compose(self, optimistic: bool) -> list[tuple[str, int]]:
        """The requests of the next attempt: before a valid RUN the setup not yet confirmed,
        then (``optimistic``, or nothing left to set up) RUN, STATUS and every READ_PHASES;
        after it STATUS (until it reports an ended run) and the reads still missing."""
        if self.group.batch:  # RELAX_BATCH brings its results, or READ_BATCH polls them
            return [("read", 0)] if self.run_valid and self.reads[0] is None else (
                [] if self.run_valid else [_RUN])
        if not self.run_valid:
            setup = self.unconfirmed()
            if setup and not optimistic:
                return setup
            return [*setup, _RUN, _STATUS,
                    *(("read", j) for j in range(len(self.group.reads)))]
        keys = [] if self.status is not None else [_STATUS]
        return keys + [("read", j) for j, read in enumerate(self.reads) if read is None]


class OIMBoard(BenchLifecycle):
    """An FPGA oscillator Ising board running a layered OIM, as a Bench."""

    name = "oim_board"
    model_kinds = ("layered_oim",)
    options_model = OIMBoardOptions

    def __init__(self, model: LayeredOIM, options: OIMBoardOptions | None = None, *,
                 resource: str | None = None, transport: Any = None) -> None:
        """``resource``: a pyserial URL (``/dev/ttyUSB0``, ``socket://host:port``, ...), or
        ``transport``: a pyserial port object (open or not) the bench then owns: it opens it,
        closes it on :meth:`close` and reopens it on a reconnect. Nothing is opened here."""
        self.model = model
        self.options = options or OIMBoardOptions()
        self._link = SerialLink(resource, self.options.baudrate, transport)
        self.resource = self._link.resource
        self.instrument = f"oim_board {self.resource}"
        self.dtype = np.dtype(self.options.dtype)
        self.board: BoardInfo | None = None
        #: provisional (continuous, unbounded) until open() reads the board's bits and ranges
        self.spec = self._make_spec(None)
        self._link.probe_timeout = self.options.timeout
        self._link.batch_record = wire.batch_result_dtype(model.state_size).itemsize
        self._batch_size_cache: dict[tuple[bool, bool, int], _BatchSizes] = {}
        #: the last inputs relaxed (their dtype, shape and bytes), checked, and their phases
        self._last_clamp: tuple[tuple[str, tuple[int, ...], bytes], np.ndarray,
                                np.ndarray] | None = None
        #: protocol-defined safe values by parameter (checked against the range on open)
        self._safe_values = safe_values(model.parameter_shapes(), self.options.safe_values,
                                        bench=self.instrument)
        self._safe_codes: dict[str, np.ndarray] = {}
        self._faults: list[Fault] = []
        self._codes: dict[str, np.ndarray] = {}  # what the host wants the board to hold
        self._needs_restore = False
        self._generation = 0  # reconnects so far
        self._opened = False
        self._retries = 0  # requests re-sent
        self._bytes_resent = 0
        self._reconnects = 0

    # -- spec and addressing ----------------------------------------------------------------

    def _make_spec(self, board: BoardInfo | None) -> BenchSpec:
        params = []
        for name, shape in self.model.parameter_shapes().items():
            if board is None:
                params.append(ParameterSpec(name, shape, unit="1"))
                continue
            bits, limit = ((board.coupling_bits, board.coupling_range) if len(shape) == 2
                           else (board.bias_bits, board.bias_range))
            params.append(ParameterSpec(name, shape, -limit, limit, unit="1", levels=1 << bits))
        return BenchSpec(tuple(params), self.model.input_size, self.model.state_size,
                         self.model.output_slice)

    @staticmethod
    def _address(name: str) -> tuple[wire.Selector, int]:
        selector = {"J": wire.Selector.COUPLING, "h": wire.Selector.H, "g": wire.Selector.G}
        return selector[name[0]], int(name[1:])

    def _bits(self, name: str) -> int:
        assert self.board is not None
        return self.board.coupling_bits if name.startswith("J") else self.board.bias_bits

    @property
    def link_stats(self) -> dict[str, int]:
        """Frames and bytes sent and received since construction."""
        return self._link.stats.as_dict()

    # -- faults -----------------------------------------------------------------------------

    def drain_faults(self) -> list[Fault]:
        """The faults met since the last call, oldest first; the log is emptied."""
        faults, self._faults = self._faults, []
        return faults

    def _fault(self, kind: str, command: str, message: str, recovered: bool,
               **detail: Any) -> None:
        self._faults.append(Fault(kind, self.instrument, command, message, recovered, detail))

    def _give_up(self, kind: str, command: str, message: str) -> BenchFaultError:
        return BenchFaultError(message, kind=kind, instrument=self.instrument, command=command)

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> BenchIdentity:
        """Connect, IDENTIFY (the board's layer sizes must be the model's), CONFIGURE the SHIL
        strength and RESET to the safe state. Opening an open board starts over."""
        if self._opened:
            self.close()
        try:
            self._link.open()
        except LinkLost as err:
            raise BenchError(f"{self.instrument}: {err}") from err
        self._opened = True
        try:
            with self._guarded():
                info = self._connect(expect=None)
                self.board = info
                self.spec = self._make_spec(info)
                self._safe_codes = self._resolve_safe_codes()
                self._codes = {spec.name: np.full(spec.shape, wire.safe_code(
                    self._bits(spec.name)), dtype=np.int64) for spec in self.spec.parameters}
                self._codes.update({name: codes.copy()
                                    for name, codes in self._safe_codes.items()})
                # RESET, then the safe values: an ordered sequence
                self._transact([(Command.RESET, b""), *self._safe_requests()], "RESET",
                               ordered=True)
        except BaseException:
            self._opened = False
            self._link.close()
            raise
        self._needs_restore = False
        return info.identity()

    def _resolve_safe_codes(self) -> dict[str, np.ndarray]:
        """The codes of the protocol's safe values (nearest code, ties to the lower one, so
        0 is the zero code); :class:`OutOfRangeError` for a value outside the board's range."""
        codes = {}
        for name, value in self._safe_values.items():
            spec = self.spec.parameter(name)
            check_safe_value(spec, value, bench=self.instrument)
            assert spec.levels is not None
            scaled = (value - spec.low) * (spec.levels - 1) / (spec.high - spec.low)
            code = min(max(math.ceil(scaled - 0.5), 0), spec.levels - 1)
            codes[name] = np.full(spec.shape, code, dtype=np.int64)
        return codes

    def _safe_requests(self) -> list[tuple[int, bytes]]:
        """The block writes that put the protocol's safe values after a RESET."""
        requests = []
        for name, codes in self._safe_codes.items():
            if np.any(codes != wire.safe_code(self._bits(name))):
                requests += self._write_requests(name, codes.ravel())
        return requests

    def close(self) -> None:
        """RESET the board to its safe state (best effort, one attempt) and close the port.
        Idempotent."""
        if not self._opened:
            return
        self._opened = False
        try:
            self._safe_state("close")
        finally:
            self._link.close()

    def _safe_state(self, what: str) -> None:
        """One RESET and the protocol's safe values in one pipelined exchange, no retries
        (best effort: logs a fault if the board did not confirm every request)."""
        problem = "the link is closed"
        requests = [(Command.RESET, b"")] + (self._safe_requests() if self.board else [])
        if self._link.is_open:
            try:
                self._link.discard_input()
                exchange = self._link.exchange(requests, self.options.timeout)
            except (LinkLost, OSError) as err:
                problem = str(err)
            else:
                replies = exchange.replies
                if all(reply is not None and reply.command != wire.ERROR for reply in replies):
                    return
                problem = ("no confirmation" if any(reply is None for reply in replies)
                           else "refused")
        self._fault("safe_state", "RESET", f"could not confirm the safe state on {what}: "
                    f"{problem}", recovered=False)

    def _connect(self, expect: BoardInfo | None) -> BoardInfo:
        """IDENTIFY and CONFIGURE over a freshly opened link (no reconnects inside)."""
        self._link.discard_input()
        (payload,) = self._transact([(Command.IDENTIFY, b"")], "IDENTIFY", reconnect=False)
        info = BoardInfo.decode(payload)
        if expect is not None and info.identity() != expect.identity():
            raise self._give_up("reconnect", "IDENTIFY",
                                f"a different board answered after the reconnect: "
                                f"{info.identity().as_dict()} (was {expect.identity().as_dict()})")
        if info.protocol not in wire.PROTOCOLS or info.phase_bits != wire.PHASE_BITS:
            raise BenchError(f"{self.instrument}: the board speaks protocol {info.protocol} with "
                             f"{info.phase_bits}-bit phases; this driver needs protocol "
                             f"{' or '.join(map(str, wire.PROTOCOLS))} with "
                             f"{wire.PHASE_BITS}-bit phases")
        if info.sizes != self.model.sizes:
            raise BenchError(
                f"{self.instrument}: the board is configured for layer sizes "
                f"{list(info.sizes)} but the model has {list(self.model.sizes)}; load the "
                "matching bitstream or change model.sizes")
        request = wire.COMMANDS[Command.CONFIGURE].request.pack(shil=self.model.shil)
        self._transact([(Command.CONFIGURE, request)], "CONFIGURE", reconnect=False)
        return info

    def _require_open(self) -> None:
        if not self._opened or self.board is None:
            raise BenchError(f"{self.instrument}: not open (call open() first)")

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """Whatever escapes leaves the board in its safe state (one RESET, if the link
        allows); the parameters are re-sent before the next relaxation."""
        try:
            yield
        except BaseException as err:
            self._escaped(err)
            raise

    def _escaped(self, err: BaseException) -> None:
        """``err`` escapes a public method: the safe state, and a restore before the next
        relaxation."""
        self._needs_restore = True
        self._safe_state(f"error ({type(err).__name__})")

    # -- link quality -----------------------------------------------------------------------

    def link_quality(self) -> dict[str, float]:
        """How the link behaved, cumulative since construction: ``frames`` (request frames
        sent, STATUS probes included), ``frames_in`` (reply frames received), ``bytes_out``,
        ``bytes_in``, ``retries`` (requests re-sent), ``bytes_resent`` (their frames' bytes),
        ``timeouts`` (reply deadlines that passed with the line silent, a probe's included;
        see :meth:`~labep.drivers.oim_link.SerialLink.exchange`), ``corrupt`` (replies that
        failed their CRC, mismatched, stopped short or were lost, and BAD_CRC refusals),
        ``reconnects``; and the current ``byte_error_rate`` estimate, ``frame_codes`` (codes
        per WRITE_COUPLINGS block frame it gives) and ``reply_timeout`` (s)."""
        stats, quality = self._link.stats, self._link.quality
        return {"frames": float(stats.frames_out), "frames_in": float(stats.frames_in),
                "bytes_out": float(stats.bytes_out), "bytes_in": float(stats.bytes_in),
                "retries": float(self._retries), "bytes_resent": float(self._bytes_resent),
                "timeouts": float(quality.timeouts), "corrupt": float(quality.corrupt),
                "reconnects": float(self._reconnects),
                "byte_error_rate": quality.error_rate,
                "frame_codes": float(self._frame_count(Command.WRITE_COUPLINGS)),
                "reply_timeout": self._reply_timeout()}

    def _reply_timeout(self) -> float:
        """The adaptive reply timeout: min(``timeout``, max(floor, RTO)) (see
        :class:`~labep.drivers.oim_link.LinkQuality`)."""
        return self._link.quality.reply_timeout(self.options.timeout)

    def _frame_count(self, command: Command, resend: bool = False) -> int:
        """Array elements per frame of a block command at the measured byte error rate
        (:func:`best_payload` with the link's frame cost; the wire maximum on a clean link).
        ``resend``: for a request that already failed, sized as if frames cost nothing
        beyond their bytes (smaller: the estimate lags a link that just got worse, and a
        failed frame counts as one bad byte however many it had)."""
        block = _BLOCKS[command]
        largest = block.largest
        payload = best_payload(self._link.quality.error_rate, block.overhead,
                               int(largest * block.item_bytes),
                               frame_cost=0.0 if resend else self._link.frame_cost())
        return max(1, min(largest, int(payload / block.item_bytes)))

    def _clean_odds(self, nbytes: int) -> float:
        """The probability that ``nbytes`` cross the line unharmed at the measured rate."""
        return (1.0 - min(self._link.quality.error_rate, 1.0)) ** nbytes

    def _pair_bytes(self, request: tuple[int, bytes]) -> int:
        """Bytes of a request frame and its (successful) reply."""
        command, payload = request
        return wire.OVERHEAD + len(payload) + reply_size(command, payload,
                                                         self._link.batch_record)

    def _note_sent(self, tries: _Tries, request: tuple[int, bytes], undo: bool = False
                   ) -> None:
        """Count an attempt of ``request`` (a re-send from the second on); ``undo``: the
        link left it unsent after all."""
        step = -1 if undo else 1
        if tries.sent > 1 or (tries.sent == 1 and not undo):
            self._retries += step
            self._bytes_resent += step * (wire.OVERHEAD + len(request[1]))
        tries.sent += step

    # -- transactions -----------------------------------------------------------------------

    def _attempt(self, requests: list[tuple[int, bytes]], what: str, *, wait: float = 0.0,
                 busy_ok: frozenset[int] = frozenset(), reconnect: bool = True) -> _Attempt:
        """One exchange of ``requests`` (pipelined), judged request by request.

        A reply is a success, or an accepted BUSY (index in ``busy_ok``: payload None), or a
        :class:`_Failed`: missing (the link's reason, one object for all the requests the same
        event hit), or refused (an ERROR frame; ``action`` final for errors no re-send can
        cure). A dropped link is reopened (``reconnect``; :meth:`_reconnect` restores the
        board) and every request fails as ``link_closed``. What the link resynchronised past
        is logged as recovered faults."""
        n = len(requests)
        try:
            exchange = self._link.exchange(requests, self._reply_timeout(), wait)
        except LinkLost as err:
            if not reconnect:
                raise
            first = wire.command_name(requests[0][0]) if requests else what
            self._fault("link_closed", first, str(err), recovered=True, operation=what)
            self._reconnect(first)
            dropped = _Failed("link_closed", first, f"the link dropped: {err}", "retry")
            return _Attempt([None] * n, [False] * n, dict.fromkeys(range(n), dropped),
                            reconnected=True)
        for seen in exchange.observations:
            self._fault(seen.kind, seen.command, seen.message, True, **seen.detail)
        payloads: list[bytes | None] = [None] * n
        done = [False] * n
        failures: dict[int, _Failed] = {}
        verdicts: dict[int, _Failed] = {}  # one _Failed per link observation
        for index, ((command, _), reply) in enumerate(zip(requests, exchange.replies,
                                                          strict=True)):
            if reply is None:
                seen = exchange.missing.get(index)
                if seen is not None:
                    failed = verdicts.get(id(seen))
                    if failed is None:
                        failed = verdicts[id(seen)] = _Failed(
                            seen.kind, seen.command, seen.message, "retry", missing=True,
                            detail=seen.detail)
                    failures[index] = failed
                continue
            if reply.command != wire.ERROR:
                payloads[index], done[index] = reply.payload, True
                continue
            code, _, text = wire.parse_error(reply.payload)
            if code == ErrorCode.BUSY and index in busy_ok:
                done[index] = True
                continue
            name = wire.command_name(command)
            message = f"board refused {name}: {wire.error_name(code)}" + (
                f" ({text})" if text else "")
            kind = _RETRY_ERRORS.get(ErrorCode(code)) if code in _KNOWN_ERRORS else None
            if kind is None:
                failures[index] = _Failed("error_frame", name, message, "final")
            else:
                failures[index] = _Failed(kind, name, message,
                                          kind if kind != "crc" else "retry")
        return _Attempt(payloads, done, failures, silent=exchange.silent,
                        unsent=exchange.unsent)

    def _noisy_budget(self, nbytes: int) -> int:
        """Re-sends a request of ``nbytes`` (request and reply) gets for failures of the
        line's noise (corrupt, garbled, lost or short replies, BAD_CRC): ``retries``, or, on
        a link whose measured error rate makes such failures common, as many as it takes
        for the request to fail that often in a row with odds below 1e-6 (at most
        5 x ``retries``). A clean link (rate 0) gives exactly ``retries``."""
        retries = self.options.retries
        fail = 1.0 - self._clean_odds(nbytes)
        if fail <= 0.0 or retries == 0:
            return retries
        if fail >= 1.0:
            return 5 * retries
        need = math.ceil(math.log(_GIVE_UP_ODDS) / math.log(fail)) - 1
        return min(max(retries, need), 5 * retries)

    def _settle(self, failed: list[tuple[_Tries, _Failed, int]], what: str) -> None:
        """Count each failed request (its record, how it failed, its pair's bytes) and log
        the faults (one per link event, one per kind of refusal); raise
        :class:`BenchFaultError` for a final refusal or a request out of attempts: more than
        ``retries`` silent failures (timeout, dropped link, BUSY, lost configuration), or
        more failures in all than :meth:`_noisy_budget` allows. The fault raised is not
        logged (it travels with the exception)."""
        fatal: tuple[_Tries, _Failed] | None = None
        for tries, failure, nbytes in failed:
            if failure.silent:
                tries.silent += 1
            else:
                tries.noisy += 1
            if fatal is None and (failure.action == "final"
                                  or tries.silent > self.options.retries
                                  or tries.silent + tries.noisy > self._noisy_budget(nbytes)):
                fatal = (tries, failure)
        if fatal is not None:
            tries, failure = fatal
            suffix = "" if failure.action == "final" else f" (after {tries.sent} attempt(s))"
            raise self._give_up(failure.kind, failure.command, failure.message + suffix)
        logged: set[int | tuple[str, str]] = set()
        for _, failure, _ in failed:
            key: int | tuple[str, str] = (id(failure) if failure.missing
                                          else (failure.kind, failure.action))
            if key in logged or failure.kind == "link_closed":  # logged when it dropped
                continue
            logged.add(key)
            self._fault(failure.kind, failure.command, failure.message, recovered=True,
                        **failure.detail)

    def _recover(self, attempt: _Attempt, what: str, reconnect: bool = True) -> bool:
        """Prepare the re-send after a failed attempt: wait out a running relaxation (BUSY,
        after ``backoff``), restore a board that lost its configuration, and after a window
        the line left silent (a timeout or a short frame) pause the gap timeout (the board
        drops a partial frame) and discard what came. Corrupt, refused or lost replies whose
        later replies came need no pause: the board is in sync. True if the board was
        restored or reconnected (what it held is gone)."""
        actions = {failure.action for failure in attempt.failures.values()}
        restored = attempt.reconnected
        if "board_reset" in actions:
            self._restore(reconnect=reconnect)
            restored = True
        elif "busy" in actions:
            time.sleep(min(self.options.backoff, 1.0))
            self._wait_idle(what)
        if attempt.silent and not attempt.reconnected:
            time.sleep(wire.GAP_TIMEOUT)
            with suppress(LinkLost):  # the next exchange meets it again and reconnects
                self._link.discard_input()
        return restored

    def _transact(self, requests: list[tuple[int, bytes]], what: str, *,
                  reconnect: bool = True, wait: float = 0.0,
                  busy_ok: frozenset[int] = frozenset(),
                  ordered: bool = False) -> list[bytes | None]:
        """Send ``requests`` (pipelined) until every one is answered; their reply payloads.

        Independent requests (block writes, READ_CODES, CONFIGURE, IDENTIFY, reads): the
        replies that came back fine are kept and only the failed or unsent requests are sent
        again, with new sequence numbers. ``ordered`` (a sequence whose later requests rely
        on the earlier ones, e.g. RESET and then writes): everything from the first failed
        request on is sent again. A request fails on a missing, short or corrupt reply or a
        retryable ERROR (BAD_CRC, BUSY, NOT_CONFIGURED, NO_RESULT); the attempts are
        bounded per request (:meth:`_settle`). BUSY waits for the running relaxation first;
        a board that lost its configuration is restored first (and an ordered sequence
        starts over). A BUSY reply to a request whose index is in ``busy_ok`` is not a
        failure: its payload is None. Other ERRORs are final. A dropped link is reopened
        (``reconnect``) and the requests not yet answered re-sent. A block request (a write,
        READ_CODES) sent again is first split into the frame size the error rate measured
        by then calls for (:meth:`_split`), so a transaction that started on a link believed
        clean does not keep re-sending frames too large to get through."""
        parts = [_Part(request, origin) for origin, request in enumerate(requests)]
        while True:
            pending = [k for k, part in enumerate(parts) if not part.done]
            if ordered and pending:
                pending = list(range(pending[0], len(parts)))
            if not pending:
                return [self._merge(request, [part.payload for part in parts
                                              if part.origin == origin])
                        for origin, request in enumerate(requests)]
            for k in pending:
                self._note_sent(parts[k].tries, parts[k].request)
            attempt = self._attempt([parts[k].request for k in pending], what, wait=wait,
                                    busy_ok=frozenset(i for i, k in enumerate(pending)
                                                      if parts[k].origin in busy_ok),
                                    reconnect=reconnect)
            for i, k in enumerate(pending):
                if attempt.done[i]:
                    parts[k].payload, parts[k].done = attempt.payloads[i], True
                elif i in attempt.unsent:
                    self._note_sent(parts[k].tries, parts[k].request, undo=True)
            if ordered and attempt.failures:
                for part in parts[pending[min(attempt.failures)]:]:
                    part.done = False
            self._settle([(parts[pending[i]].tries, failure,
                           self._pair_bytes(parts[pending[i]].request))
                          for i, failure in attempt.failures.items()], what)
            if self._recover(attempt, what, reconnect) and ordered:
                for part in parts:
                    part.done = False
            parts = [piece for part in parts for piece in self._split(part)]

    def _split(self, part: _Part) -> list[_Part]:
        """A block request not yet answered whose count is above what the measured error
        rate now wants per frame (:meth:`_frame_count` for a re-send) as several smaller
        ones (the same elements, each inheriting the request's record so its attempts stay
        bounded); any other part as it is."""
        command, payload = part.request
        if part.done or command not in (Command.WRITE_COUPLINGS, Command.WRITE_BIASES,
                                        Command.READ_CODES):
            return [part]
        layout = wire.COMMANDS[command].request
        decoded = layout.unpack(payload)
        count, chunk = decoded["count"], self._frame_count(Command(command), resend=True)
        if count <= chunk:
            return [part]
        fields = {name: value for name, value in decoded.fields.items() if name != "count"}
        pieces = []
        for start in range(0, count, chunk):
            size = min(chunk, count - start)
            offset = fields["offset"] + start
            if decoded.array is None:
                piece = layout.pack(**{**fields, "offset": offset, "count": size})
            else:
                piece = layout.pack(decoded.array[start:start + size],
                                    **{**fields, "offset": offset})
            pieces.append(_Part((command, piece), part.origin, replace(part.tries)))
        return pieces

    @staticmethod
    def _merge(request: tuple[int, bytes], payloads: list[bytes | None]) -> bytes | None:
        """The reply payload of a request from those of its pieces (:meth:`_split`): READ_CODES
        replies joined into one (count, codes); any other request has one piece, or empty
        replies."""
        if len(payloads) == 1:
            return payloads[0]
        if request[0] != Command.READ_CODES:
            return payloads[0]
        layout = wire.COMMANDS[Command.READ_CODES].reply
        arrays = []
        for payload in payloads:
            assert payload is not None
            array = layout.unpack(payload).array
            assert array is not None
            arrays.append(array)
        return layout.pack(np.concatenate(arrays))

    def _reconnect(self, what: str) -> None:
        """Reopen the same resource, re-IDENTIFY, re-CONFIGURE and re-send every parameter
        block from the host's copy; :class:`BenchFaultError` after ``reconnects`` attempts.
        ``what``: the command the drop interrupted (the faults name it)."""
        expect = self.board
        problem = "the link dropped"
        for attempt in range(self.options.reconnects):
            time.sleep(min(self.options.backoff * 2 ** attempt, 1.0))
            try:
                self._link.open()
                self._connect(expect)
                self._restore(reconnect=False)
            except LinkLost as err:
                problem = str(err)
                continue
            except BenchFaultError as err:
                problem = err.fault.message
                if err.fault.kind == "reconnect":
                    raise
                continue
            self._generation += 1
            self._reconnects += 1
            self._fault("reconnect", what, f"reopened {self.resource} and restored the board "
                        f"(attempt {attempt + 1})", recovered=True, attempt=attempt + 1)
            return
        self._link.close()
        raise self._give_up("link_closed", what, f"could not reconnect after "
                            f"{self.options.reconnects} attempt(s): {problem}")

    def _restore(self, *, reconnect: bool = True) -> None:
        """CONFIGURE and send every parameter from the host's copy (after a reset board)."""
        request = wire.COMMANDS[Command.CONFIGURE].request.pack(shil=self.model.shil)
        requests = [(Command.CONFIGURE, request)]
        for name, codes in self._codes.items():
            requests += self._write_requests(name, codes.ravel())
        self._transact(requests, "restore", reconnect=reconnect)
        self._needs_restore = False

    def _wait_idle(self, what: str) -> None:
        """Poll STATUS until no relaxation is running (at most ``run_timeout``)."""
        deadline = time.perf_counter() + self.options.run_timeout
        request = self._status_request()
        while True:
            (payload,) = self._transact([(Command.STATUS, request)], what,
                                        wait=self.options.poll_wait)
            assert payload is not None
            state = wire.COMMANDS[Command.STATUS].reply.unpack(payload)["state"]
            if state != wire.RunState.RUNNING:
                return
            if time.perf_counter() > deadline:
                raise self._give_up("timeout", "RUN", f"still running after "
                                    f"{self.options.run_timeout:g} s")

    def _wait_ms(self) -> int:
        """The long-poll wait of STATUS, RELAX_BATCH and READ_BATCH (``poll_wait``, in ms)."""
        return min(round(self.options.poll_wait * 1000), 65535)

    def _status_request(self) -> bytes:
        return _status_payload(self._wait_ms())

    # -- parameters -------------------------------------------------------------------------

    def _check_codes(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every parameter's codes as int64 of the declared shape, or an error; nothing is
        sent before all of them passed."""
        checked = {}
        for name, values in params.items():
            try:
                spec = self.spec.parameter(name)
            except KeyError:
                raise BenchError(f"{self.instrument}: write: no parameter {name!r}; the board "
                                 f"has {', '.join(self.spec.parameter_names)}") from None
            assert spec.levels is not None
            codes = np.asarray(values)
            if codes.shape != spec.shape:
                raise BenchError(f"{self.instrument}: write {name}: shape {codes.shape} != "
                                 f"declared {spec.shape}")
            if codes.dtype.kind not in "iuf":
                raise OutOfRangeError(f"{self.instrument}: write {name}: codes must be integers")
            if codes.dtype.kind == "f" and (not np.all(np.isfinite(codes))
                                            or np.any(np.rint(codes) != codes)):
                raise OutOfRangeError(f"{self.instrument}: write {name}: codes must be "
                                      "integers")
            as_int = codes.astype(np.int64)
            if as_int.size and (as_int.min() < 0 or as_int.max() >= spec.levels):
                raise OutOfRangeError(
                    f"{self.instrument}: write {name}: codes span [{as_int.min()}, "
                    f"{as_int.max()}], outside [0, {spec.levels - 1}]; refused before sending")
            checked[name] = as_int
        return checked

    def _write_requests(self, name: str, flat: np.ndarray,
                        old: np.ndarray | None = None) -> list[tuple[int, bytes]]:
        """Block frames for the codes of ``name`` (only blocks that differ from ``old``), of
        :meth:`_frame_count` codes each."""
        selector, layer = self._address(name)
        chunk = self._frame_count(Command.WRITE_COUPLINGS if selector == wire.Selector.COUPLING
                                  else Command.WRITE_BIASES)
        requests = []
        for offset in range(0, flat.size, chunk):
            block = flat[offset:offset + chunk]
            if old is not None and np.array_equal(block, old[offset:offset + chunk]):
                continue
            if selector == wire.Selector.COUPLING:
                payload = wire.COMMANDS[Command.WRITE_COUPLINGS].request.pack(
                    block, layer=layer, offset=offset)
                requests.append((Command.WRITE_COUPLINGS, payload))
            else:
                payload = wire.COMMANDS[Command.WRITE_BIASES].request.pack(
                    block, selector=selector, layer=layer, offset=offset)
                requests.append((Command.WRITE_BIASES, payload))
        return requests

    def write(self, params: dict[str, np.ndarray]) -> None:
        """Write integer codes (0 <= code < levels) of any of the parameters, in block frames.

        All codes are checked before a byte is sent (:class:`OutOfRangeError`,
        :class:`BenchError` for a shape or name). Only blocks whose codes changed are sent
        (the host keeps a copy of what the board holds; after a reset or reconnect everything
        is re-sent)."""
        self._require_open()
        checked = self._check_codes(params)
        previous = {name: codes.copy() for name, codes in self._codes.items()}
        requests = []
        for name, codes in checked.items():
            requests += self._write_requests(name, codes.ravel(),
                                             None if self._needs_restore
                                             else self._codes[name].ravel())
            self._codes[name] = codes.copy()
        try:
            with self._guarded():
                if self._needs_restore:
                    self._restore()  # sends the new codes with the rest
                elif requests:
                    self._transact(requests, "WRITE")
        except BaseException:
            self._codes = previous  # what the host believes the board should hold
            raise

    def read_params(self) -> dict[str, np.ndarray]:
        """The codes the board holds (READ_CODES), by parameter, as int64."""
        self._require_open()
        layout = wire.COMMANDS[Command.READ_CODES].request
        requests, where = [], []
        chunk = self._frame_count(Command.READ_CODES)
        for spec in self.spec.parameters:
            selector, layer = self._address(spec.name)
            size = int(np.prod(spec.shape))
            for offset in range(0, size, chunk):
                count = min(chunk, size - offset)
                requests.append((Command.READ_CODES, layout.pack(
                    selector=selector, layer=layer, offset=offset, count=count)))
                where.append((spec.name, offset, count))
        out = {spec.name: np.empty(int(np.prod(spec.shape)), dtype=np.int64)
               for spec in self.spec.parameters}
        with self._guarded():
            payloads = self._transact(requests, "READ_CODES")
        reply = wire.COMMANDS[Command.READ_CODES].reply
        for (name, offset, count), payload in zip(where, payloads, strict=True):
            assert payload is not None
            codes = reply.unpack(payload).array
            assert codes is not None
            if codes.size != count:
                raise self._give_up("garbled", "READ_CODES", f"asked {count} codes of {name}, "
                                    f"got {codes.size}")
            out[name][offset:offset + count] = codes
        return {spec.name: out[spec.name].reshape(spec.shape) for spec in self.spec.parameters}

    # -- relaxation -------------------------------------------------------------------------

    def relax(
        self,
        inputs: np.ndarray,
        nudge: Nudge | None = None,
        start: np.ndarray | None = None,
        settle: Settle | None = None,
    ) -> Relaxation:
        """Relax each sample of the batch on the board in turn and read its phases back.

        On a clean link the groups of requests of all samples go out pipelined (one write,
        as the window allows), on a noisy one sample by sample; a sample whose group did not
        come back whole is finished on its own (:meth:`_relax_sample`: only what failed is
        sent again, as far as the relaxation's semantics allow). Everything is checked
        before a byte is sent. The
        state rows are the read-back phases (k * 2 pi / 65536 rad, ``dtype``; NaN for an
        oscillator whose readout is invalid); ``converged`` is the board's settled flag with a
        valid readout."""
        self._require_open()
        settle = settle or Settle(self.options.tolerance, self.options.max_steps)
        plan = self._plan(inputs, nudge, start, settle)
        try:  # what _guarded does, without a generator per phase
            if self._needs_restore:
                self._restore()
            rows = self._relax_batch(plan, settle.readouts)
            return self._relaxation(rows)
        except BaseException as err:
            self._escaped(err)
            raise

    def relax_step(self, inputs: np.ndarray, nudges: list[Nudge], free: Settle,
                   nudged: Settle) -> tuple[Relaxation, list[Relaxation]] | None:
        """A training step's phases in RELAX_STEP frames (protocol 3): the free phase from
        rest, then each nudge from the free phases of the samples that settled, one round
        trip per frame of samples on a clean link; the same Relaxations as :meth:`relax`
        phase by phase (:class:`~labep.hardware.bench.StepRelaxing`). None (the engine then
        relaxes phase by phase) on a board of protocol < 3, with ``phase_requests:
        sample``, for more than two nudges, several readouts, a correction, or a link so
        noisy that one sample's frame pair mostly fails."""
        self._require_open()
        if not self._step_frames(nudges, free, nudged):
            return None
        x, clamp = self._clamp_phases(inputs)
        for settle in (free, nudged):
            self._check_settle(settle)
        targets = [self._checked_target(nudge, len(x)) for nudge in nudges]
        target = targets[0]
        if target is None or any(t is None or not np.array_equal(t, target) for t in targets):
            raise ValueError(f"{self.instrument}: the nudges of a step need one target and "
                             "non-zero strengths")
        plan = self._plan_steps(clamp, target,
                                [float(n.strength) for n in nudges], free, nudged)
        with self._guarded():
            if self._needs_restore:
                self._restore()
            rows = self._relax_batch(plan, 1)
            where: list[list[int]] = [[] for _ in range(1 + len(nudges))]
            first = 0
            for group in plan:  # each frame's records: phase by phase
                count = group.batch // len(where)
                for j, indices in enumerate(where):
                    indices.extend(range(first + j * count, first + (j + 1) * count))
                first += group.batch
            phases = [rows.take(np.array(indices, dtype=np.intp)) for indices in where]
            free_phase = self._relaxation(phases[0], "free")
            ok = free_phase.converged
            if not ok.any():
                return free_phase, []
            return free_phase, [
                self._relaxation(rows_j.take(ok), f"nudged (beta {nudge.strength:+g})")
                for nudge, rows_j in zip(nudges, phases[1:], strict=True)]

    def _relaxation(self, rows: _Rows, phase: str | None = None) -> Relaxation:
        """A Relaxation from relaxed samples' rows; an unsettled sample and an invalid
        readout are logged as faults (``phase``: which phase of a step)."""
        state, invalids, steps, residual = rows.state, rows.invalid, rows.steps, rows.residual
        board_seconds = 0.0
        for elapsed in rows.elapsed_us.tolist():  # summed sample by sample, in order
            board_seconds += elapsed * 1e-6
        # (ufunc reductions: ndarray.all/any add a Python wrapper per call; a plain int, not
        # the IntEnum, for the comparison)
        settled_all = rows.run_state == _SETTLED
        converged = settled_all & ~np.logical_or.reduce(invalids, axis=1)
        if np.logical_and.reduce(converged):
            return Relaxation(state, converged, steps, residual,
                              {"board_seconds": board_seconds})
        where = {} if phase is None else {"phase": phase}
        for sample in np.flatnonzero(~converged).tolist():
            invalid = invalids[sample]
            if not settled_all[sample]:
                steps_i, residual_i = int(steps[sample]), float(residual[sample])
                self._fault("unsettled", "RUN", f"sample {sample} did not settle: residual "
                            f"{residual_i:.3g} after {steps_i} steps",
                            recovered=False, sample=sample, steps=steps_i,
                            residual=residual_i, **where)
            if invalid.any():
                self._fault("invalid_readout", "READ_PHASES",
                            f"sample {sample}: invalid phase readout of "
                            f"{int(invalid.sum())} oscillator(s)", recovered=False,
                            sample=sample, oscillators=np.flatnonzero(invalid).tolist(),
                            **where)
        return Relaxation(state, converged, steps, residual, {"board_seconds": board_seconds})

    def _checked_inputs(self, inputs: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.model.input_size or not _all_finite(x):
            raise ValueError(f"{self.instrument}: inputs must be finite, (batch, "
                             f"{self.model.input_size}), got {x.shape}")
        return x

    def _clamp_phases(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The checked inputs and their input phases. The last batch's are kept: EP relaxes
        the same batch for its free and nudged phases, so an input array equal byte for
        byte (same dtype and shape) to the last one reuses its check and phases (the same
        arrays: neither is written to)."""
        if isinstance(inputs, np.ndarray):
            key = (inputs.dtype.str, inputs.shape, inputs.tobytes())
            last = self._last_clamp
            if last is not None and last[0] == key:
                return last[1], last[2]
        else:
            key = None
        x = self._checked_inputs(inputs)
        clamp = self.model.input_phases(x)
        clamp.flags.writeable = False  # kept for the next call: nothing may change it
        if key is not None:
            self._last_clamp = (key, x, clamp)
        return x, clamp

    def _checked_target(self, nudge: Nudge | None, batch: int) -> np.ndarray | None:
        """The nudge's targets (None for no nudge or strength 0), checked."""
        strength = 0.0 if nudge is None else float(nudge.strength)
        if not math.isfinite(strength):
            raise ValueError(f"{self.instrument}: nudge strength must be finite")
        if strength == 0.0:
            return None
        assert nudge is not None
        target = np.asarray(nudge.target, dtype=np.float64)
        if target.shape != (batch, self.model.output_size) or not _all_finite(target):
            raise ValueError(f"{self.instrument}: nudge target must be finite, ({batch}, "
                             f"{self.model.output_size}), got {target.shape}")
        return target

    def _check_settle(self, settle: Settle) -> None:
        if not (math.isfinite(settle.tolerance) and settle.tolerance > 0
                and 1 <= settle.max_steps <= 2**32 - 1 and settle.readouts >= 1):
            raise ValueError(f"{self.instrument}: settle needs tolerance > 0, 1 <= max_steps "
                             f"< 2^32 and readouts >= 1, got {settle}")

    def _plan(self, inputs: np.ndarray, nudge: Nudge | None, start: np.ndarray | None,
              settle: Settle) -> list[_Group]:
        """The requests of every sample, after checking every argument; arrays in blocks of
        :meth:`_frame_count` elements."""
        model = self.model
        x, clamp = self._clamp_phases(inputs)
        batch = x.shape[0]
        if start is not None:
            start = np.asarray(start, dtype=np.float64)
            if start.shape != (batch, model.state_size) or not _all_finite(start):
                raise ValueError(f"{self.instrument}: start must be finite, ({batch}, "
                                 f"{model.state_size}), got {start.shape}")
            start_codes = wire.phases_to_codes(start)
        target = self._checked_target(nudge, batch)
        strength = 0.0 if target is None or nudge is None else float(nudge.strength)
        self._check_settle(settle)
        status = (Command.STATUS, self._status_request())
        if self._batch_frames(settle, start is not None, target is not None):
            return self._plan_batches(clamp, None if start is None else start_codes, strength,
                                      target, settle, status)
        layouts = {code: wire.COMMANDS[code].request for code in Command}
        run = (Command.RUN, layouts[Command.RUN].pack(max_steps=int(settle.max_steps),
                                                      tolerance=float(settle.tolerance)))
        n = model.state_size
        read_chunk = self._frame_count(Command.READ_PHASES)
        where = [(offset, min(read_chunk, n - offset))
                 for offset in range(0, n, read_chunk)] * settle.readouts
        reads = [(Command.READ_PHASES, layouts[Command.READ_PHASES].pack(offset=offset,
                                                                        count=count))
                 for offset, count in where]
        clamp_chunk = self._frame_count(Command.CLAMP)
        load_chunk = self._frame_count(Command.LOAD_PHASES)
        rest = layouts[Command.LOAD_PHASES].pack(mode=wire.LoadMode.REST, offset=0)
        plan = []
        for sample in range(batch):
            setup: list[tuple[int, bytes]] = []
            for offset in range(0, model.input_size, clamp_chunk):
                setup.append((Command.CLAMP, layouts[Command.CLAMP].pack(
                    clamp[sample, offset:offset + clamp_chunk], offset=offset)))
            first_load = len(setup)
            if start is None:
                setup.append((Command.LOAD_PHASES, rest))
            else:
                for offset in range(0, n, load_chunk):
                    setup.append((Command.LOAD_PHASES, layouts[Command.LOAD_PHASES].pack(
                        start_codes[sample, offset:offset + load_chunk],
                        mode=wire.LoadMode.CODES, offset=offset)))
            setup.append((Command.SET_NUDGE, layouts[Command.SET_NUDGE].pack(
                None if target is None else target[sample], beta=strength)))
            plan.append(_Group(setup, frozenset(range(first_load, len(setup))), run, status,
                               reads, where))
        return plan

    def _batch_frames(self, settle: Settle, start: bool, nudged: bool) -> bool:
        """Whether a phase goes out as RELAX_BATCH frames: a protocol-2 board, the option
        ``phase_requests: batch``, one readout, one sample's record fitting a request and
        its result a reply, and a link on which one sample's frame pair comes back whole
        with odds of at least 0.5 at the measured error rate (else the six-request groups,
        whose small frames are re-sent selectively)."""
        assert self.board is not None
        if (self.board.protocol < 2 or self.options.phase_requests != "batch"
                or settle.readouts != 1):
            return False
        sizes = self._batch_sizes(start, nudged)
        if sizes.largest < 1:
            return False
        # on a link so noisy that even one sample's frame pair mostly fails, the six small
        # requests of a sample, re-sent selectively, waste less
        return self._clean_odds(sizes.overhead + sizes.item) >= _OPTIMISTIC_ODDS

    def _batch_sizes(self, start: bool, nudged: bool) -> _BatchSizes:
        """The sizes of a RELAX_BATCH frame pair with or without start codes and targets
        (they depend only on the model and the board's result record: computed once)."""
        result = self._link.batch_record
        key = (start, nudged, result)
        sizes = self._batch_size_cache.get(key)
        if sizes is None:
            dtype = self._batch_record(start, nudged)
            spec = wire.COMMANDS[Command.RELAX_BATCH]
            head, reply_head = spec.request.head.size, spec.reply.head.size
            sizes = self._batch_size_cache[key] = _BatchSizes(
                dtype=dtype,
                flags=(wire.BatchFlags.START if start else 0) | (
                    wire.BatchFlags.NUDGE if nudged else 0),
                largest=min(wire.batch_capacity(dtype.itemsize, head),
                            wire.batch_capacity(result, reply_head)),
                item=dtype.itemsize + result,
                overhead=2 * wire.OVERHEAD + head + reply_head)
        return sizes

    def _step_frames(self, nudges: list[Nudge], free: Settle, nudged: Settle) -> bool:
        """Whether a step goes out as RELAX_STEP frames (see :meth:`relax_step`)."""
        assert self.board is not None
        if (self.board.protocol < 3 or self.options.phase_requests != "batch"
                or not 1 <= len(nudges) <= 2 or any(n.correction for n in nudges)
                or free.readouts != 1 or nudged.readouts != 1 or free.samples
                or nudged.samples):
            return False
        model = self.model
        record = wire.step_request_dtype(model.input_size, model.output_size).itemsize
        results = (1 + len(nudges)) * self._link.batch_record
        head = wire.COMMANDS[Command.RELAX_STEP].request.head.size
        if (wire.batch_capacity(record, head) < 1
                or wire.batch_capacity(results, 3) < 1):
            return False
        one = 2 * wire.OVERHEAD + head + 3 + record + results
        return self._clean_odds(one) >= _OPTIMISTIC_ODDS

    def _plan_steps(self, clamp: np.ndarray, target: np.ndarray, strengths: list[float],
                    free: Settle, nudged: Settle) -> list[_Group]:
        """A step as RELAX_STEP frames, each with the records (input phases, targets) of as
        many samples as fit a request and whose ``1 + nudges`` results each fit its reply,
        fewer on a noisy link (:func:`best_payload`, as for RELAX_BATCH). A group counts
        its result records (``batch``: samples x phases); READ_BATCH polls them."""
        model = self.model
        dtype = wire.step_request_dtype(model.input_size, model.output_size)
        layout = wire.COMMANDS[Command.RELAX_STEP].request
        read_layout = wire.COMMANDS[Command.READ_BATCH].request
        phases = 1 + len(strengths)
        results = phases * self._link.batch_record
        largest = min(wire.batch_capacity(dtype.itemsize, layout.head.size),
                      wire.batch_capacity(results, 3))
        item = dtype.itemsize + results
        overhead = 2 * wire.OVERHEAD + layout.head.size + 3
        per_frame = max(1, min(largest, best_payload(self._link.quality.error_rate, overhead,
                                                     largest * item, smallest=item,
                                                     frame_cost=self._link.frame_cost())
                                        // item))
        status = (Command.STATUS, self._status_request())
        wait_ms = self._wait_ms()  # the wait of ``status``
        betas = [*strengths, 0.0][:2]
        plan = []
        for first in range(0, len(clamp), per_frame):
            rows = slice(first, min(len(clamp), first + per_frame))
            count = rows.stop - rows.start
            records = np.zeros(count, dtype=dtype)
            records["phases"] = clamp[rows]
            records["target"] = target[rows]
            run = (Command.RELAX_STEP, layout.pack(
                np.frombuffer(records.tobytes(), dtype=np.uint8), nudges=len(strengths),
                batch=count, free_steps=int(free.max_steps),
                free_tolerance=float(free.tolerance), nudged_steps=int(nudged.max_steps),
                nudged_tolerance=float(nudged.tolerance), beta_1=betas[0], beta_2=betas[1],
                wait_ms=wait_ms))
            read = (Command.READ_BATCH, read_layout.pack(wait_ms=wait_ms, offset=0,
                                                         count=count * phases))
            plan.append(_Group([], frozenset(), run, status, [read], [(0, count * phases)],
                               batch=count * phases))
        return plan

    def _batch_record(self, start: bool, nudged: bool) -> np.dtype:
        model = self.model
        flags = (wire.BatchFlags.START if start else 0) | (wire.BatchFlags.NUDGE if nudged
                                                           else 0)
        return wire.batch_request_dtype(model.input_size, model.state_size, model.output_size,
                                        flags)

    def _plan_batches(self, clamp: np.ndarray, start_codes: np.ndarray | None,
                      strength: float, target: np.ndarray | None, settle: Settle,
                      status: tuple[int, bytes]) -> list[_Group]:
        """A phase as RELAX_BATCH frames (protocol 2), each with the records (input phases,
        start codes, targets) of as many samples as fit a request and whose results fit its
        reply, fewer on a noisy link: the count whose frame pair :func:`best_payload` gives
        at the measured error rate. A frame's reply brings the results when the samples
        ended within ``poll_wait``; else READ_BATCH (same wait) polls for them."""
        sizes = self._batch_sizes(start_codes is not None, target is not None)
        dtype, flags, largest, item = sizes.dtype, sizes.flags, sizes.largest, sizes.item
        relax_layout = wire.COMMANDS[Command.RELAX_BATCH].request
        error_rate = self._link.quality.error_rate
        per_frame = largest if error_rate <= 0.0 else max(1, min(largest, best_payload(
            error_rate, sizes.overhead, largest * item, smallest=item,
            frame_cost=self._link.frame_cost()) // item))
        wait_ms = self._wait_ms()  # the wait of ``status``
        batch = len(clamp)
        plan = []
        for first in range(0, batch, per_frame):
            rows = slice(first, min(batch, first + per_frame))
            count = rows.stop - rows.start
            records = np.zeros(count, dtype=dtype)
            records["phases"] = clamp[rows]
            if start_codes is not None:
                records["start"] = start_codes[rows]
            if target is not None:
                records["target"] = target[rows]
            run = (Command.RELAX_BATCH, relax_layout.pack_bytes(
                records.tobytes(), flags=flags, batch=count,
                max_steps=int(settle.max_steps), tolerance=float(settle.tolerance),
                beta=strength, wait_ms=wait_ms))
            read = (Command.READ_BATCH, _read_batch_payload(wait_ms, count))
            plan.append(_Group([], frozenset(), run, status, [read], [(0, count)],
                               batch=count))
        return plan

    def _relax_batch(self, plan: list[_Group], readouts: int) -> _Rows:
        """Every sample relaxed: the phases, the invalid masks and the STATUS fields.

        On a clean link (a group comes back whole with odds of at least 0.8 at the measured
        error rate) every sample's whole group goes out in one pipelined exchange first. Each
        group sets everything its relaxation uses, so one sample's failure does not spoil
        another's result; but a later sample's group overwrote the board's registers and its
        result, so a sample that did not complete there starts over on its own, except the
        last one, whose context is intact (it is finished first). On a noisy link the
        samples go one by one from the start (:meth:`_relax_sample`)."""
        samples = [_Sample(group) for group in plan]
        if len(samples) > 1 and self._clean_odds(max(
                sum(self._pair_bytes(request) for request in
                    [*group.setup, group.run, group.status, *group.reads])
                for group in plan)) >= _PIPELINE_ODDS:
            keys = [(sample, key) for sample in samples for key in sample.compose(True)]
            self._relax_attempt(keys)
            for sample in samples[:-1]:
                if not sample.complete:
                    sample.reset()
            order = [samples[-1], *samples[:-1]]
        else:
            order = samples
        for sample in order:
            self._relax_sample(sample)
        return _Rows.concat([self._results(sample, readouts) for sample in samples],
                            self.model.state_size, np.dtype(self.dtype))

    def _relax_sample(self, sample: _Sample) -> None:
        """Finish one sample's relaxation, whose context on the board (the registers and the
        result) is intact: attempts of the requests :meth:`_Sample.compose` says are
        missing, until RUN was acknowledged after a confirmed setup, STATUS reported the
        relaxation ended and every READ_PHASES came back. The setup is sent selectively: a
        setup request acknowledged stays confirmed, except that LOAD_PHASES and SET_NUDGE
        are sent again whenever RUN is (after a RUN that may have run, the relaxation must
        start from the requested start state again, never from an already relaxed one). RUN
        goes out behind the setup frames still to confirm when all of them come back whole
        with odds of at least 0.5 at the measured error rate; else once they are confirmed.
        After an acknowledged RUN, STATUS and READ_PHASES are idempotent reads of its
        result: only the failed ones are sent again; while STATUS reports RUNNING (the
        reads then answer BUSY) both are polled, at most ``run_timeout``."""
        while not sample.complete:
            if sample.group.batch:  # a RELAX_BATCH frame has no setup to be optimistic about
                optimistic = True
            else:
                setup = sample.unconfirmed()
                nbytes = sum(self._pair_bytes(sample.request(key)) for key in [*setup, _RUN])
                optimistic = self._clean_odds(nbytes) >= _OPTIMISTIC_ODDS
            self._relax_attempt([(sample, key) for key in sample.compose(optimistic)])
            if sample.running:
                if sample.deadline is None:
                    sample.deadline = time.perf_counter() + self.options.run_timeout
                elif time.perf_counter() > sample.deadline:
                    raise self._give_up("timeout", "RUN", f"still running after "
                                        f"{self.options.run_timeout:g} s")

    def _relax_attempt(self, keys: list[tuple[_Sample, tuple[str, int]]]) -> None:
        """One pipelined exchange of the given requests of one or more samples, and what it
        means for each sample (:meth:`_absorb`); failures are counted and logged
        (:meth:`_settle`), then recovered from (:meth:`_recover`): a sample whose board was
        reset or reconnected starts over."""
        requests = [sample.request(key) for sample, key in keys]
        for (sample, key), request in zip(keys, requests, strict=True):
            self._note_sent(sample.tries.setdefault(key, _Tries()), request)
        busy_ok = frozenset(i for i, (_, key) in enumerate(keys) if key[0] == "read")
        wait = self.options.poll_wait if any(key == _STATUS or sample.group.batch
                                             for sample, key in keys) else 0.0
        attempt = self._attempt(requests, "relax", wait=wait, busy_ok=busy_ok)
        for i in attempt.unsent:
            sample, key = keys[i]
            self._note_sent(sample.tries[key], requests[i], undo=True)
        failed: list[tuple[_Tries, _Failed, int]] = []
        start = 0
        while start < len(keys):
            sample = keys[start][0]
            stop = start
            while stop < len(keys) and keys[stop][0] is sample:
                stop += 1
            self._absorb(sample, [key for _, key in keys[start:stop]], attempt, start, failed)
            start = stop
        self._settle(failed, "relax")
        if self._recover(attempt, "relax"):
            for sample in {id(s): s for s, _ in keys}.values():
                if not sample.complete:
                    sample.reset()

    def _absorb(self, sample: _Sample, keys: list[tuple[str, int]], attempt: _Attempt,
                base: int, failed: list[tuple[_Tries, _Failed, int]]) -> None:
        """Update ``sample`` from its requests ``keys`` in ``attempt`` (at ``base`` on), in
        the board's order: setup acknowledgements, then RUN (valid only with the whole setup
        confirmed; one that may have run unconfirms LOAD_PHASES and SET_NUDGE), then, for a
        valid relaxation, STATUS and READ_PHASES. Replies to reads of a RUN that was not
        valid are void (neither used nor counted). Failures go to ``failed``; STATUS IDLE
        after an acknowledged RUN is one (the board lost the relaxation: it is restored and
        the sample run again)."""
        if sample.group.batch:
            self._absorb_batch(sample, keys, attempt, base, failed)
            return
        status_layout = wire.COMMANDS[Command.STATUS].reply
        for offset, key in enumerate(keys):
            index = base + offset
            failure = attempt.failures.get(index)
            done = attempt.done[index]
            kind, position = key
            if kind == "setup":
                if done:
                    sample.confirmed.add(position)
            elif kind == "run":
                if done and len(sample.confirmed) == len(sample.group.setup):
                    sample.run_valid = True
                    sample.status, sample.running = None, False
                    sample.reads = [None] * len(sample.group.reads)
                elif done or (failure is not None and failure.missing):  # it may have run
                    sample.confirmed -= sample.group.rerun
            elif not sample.run_valid:
                continue  # a read of a relaxation that does not count
            elif kind == "status" and done:
                payload = attempt.payloads[index]
                assert payload is not None
                fields = status_layout.unpack(payload).fields
                if fields["state"] == wire.RunState.RUNNING:
                    sample.running = True
                    sample.reads = [None] * len(sample.reads)
                elif fields["state"] == wire.RunState.IDLE:
                    failure = _Failed("board_reset", "RUN", "the board lost the relaxation "
                                      "(reset or reconnected); the sample is run again",
                                      "board_reset")
                else:
                    sample.status, sample.running = fields, False
            elif kind == "read" and done:
                payload = attempt.payloads[index]
                if payload is not None:
                    sample.reads[position] = payload
                elif sample.status is not None:  # BUSY after STATUS said the run ended
                    failure = _Failed("busy", "READ_PHASES", "the board answered BUSY to "
                                      "READ_PHASES after STATUS reported the run ended", "busy")
            if failure is not None:
                tries = sample.tries.setdefault(key, _Tries())
                failed.append((tries, failure, self._pair_bytes(sample.request(key))))

    def _absorb_batch(self, sample: _Sample, keys: list[tuple[str, int]], attempt: _Attempt,
                      base: int, failed: list[tuple[_Tries, _Failed, int]]) -> None:
        """:meth:`_absorb` for a RELAX_BATCH frame: an answered RELAX_BATCH makes the
        relaxations valid, and its reply (or, while it said RUNNING, a READ_BATCH reply)
        brings every sample's record; a READ_BATCH of a RELAX_BATCH that did not count is
        void. A reply whose records do not match the request is a failure (sent again)."""
        layout = wire.COMMANDS[Command.READ_BATCH].reply
        record = self._link.batch_record
        for offset, key in enumerate(keys):
            index = base + offset
            failure = attempt.failures.get(index)
            payload = attempt.payloads[index] if attempt.done[index] else None
            if key == _RUN and attempt.done[index]:
                sample.run_valid = True
                sample.status, sample.running = None, False
                sample.reads = [None]
            elif key == _RUN or not sample.run_valid:
                payload = None  # a reply of a RELAX_BATCH that does not count
            if payload is not None:
                reply = layout.unpack(payload)
                assert reply.array is not None
                if reply["state"] == wire.RunState.RUNNING:
                    sample.running = True
                elif (reply["count"] == sample.group.batch
                      and reply.array.size == record * sample.group.batch):
                    sample.status, sample.running = {"state": reply["state"]}, False
                    sample.reads = [payload[layout.head.size:]]  # the records' bytes
                elif key == _RUN:  # ended, but its results did not come with it: read them
                    sample.running = True
                else:
                    command = wire.command_name(sample.request(key)[0])
                    failure = _Failed("garbled", command, f"asked {sample.group.batch} "
                                      f"records, got {reply['count']} in {reply.array.size} "
                                      "bytes", "retry")
            if failure is not None:
                tries = sample.tries.setdefault(key, _Tries())
                failed.append((tries, failure, self._pair_bytes(sample.request(key))))

    def _results(self, sample: _Sample, readouts: int) -> _Rows:
        """The rows of the samples of a completed group."""
        status = sample.status
        assert sample.complete and status is not None
        n = self.model.state_size
        if not sample.group.batch:
            phases, invalid = self._phases(sample.reads, sample.group.where, readouts)
            return _Rows(phases[None], invalid[None], np.array([status["state"]]),
                         np.array([status["steps"]], dtype=np.int64),
                         np.array([status["residual"]], dtype=np.float64),
                         np.array([status["elapsed_us"]], dtype=np.int64))
        dtype = wire.batch_result_dtype(n)
        parts = []
        for data in sample.reads:  # each reply's records decoded at once
            assert data is not None
            records = np.frombuffer(data, dtype=dtype)
            invalid = np.unpackbits(records["invalid"], axis=1, count=n,
                                    bitorder="little").view(bool)  # 0 or 1: a bool view
            phases = wire.codes_to_phases(records["codes"]).astype(self.dtype)
            phases[invalid] = np.nan
            parts.append(_Rows(phases, invalid, records["state"],
                               records["steps"].astype(np.int64),
                               records["residual"].astype(np.float64),
                               records["elapsed_us"].astype(np.int64)))
        return _Rows.concat(parts, n, np.dtype(self.dtype))

    def _phases(self, payloads: list[bytes | None], where: list[tuple[int, int]],
                readouts: int) -> tuple[np.ndarray, np.ndarray]:
        """Phases (NaN where invalid) and the invalid mask from READ_PHASES replies (block
        ``i`` holds ``where[i]``: offset, count); several readouts are averaged on the
        circle."""
        layout = wire.COMMANDS[Command.READ_PHASES].reply
        n = self.model.state_size
        per = len(payloads) // readouts
        codes = np.empty((readouts, n), dtype=np.int64)
        invalid = np.zeros(n, dtype=bool)
        for index, (payload, (offset, count)) in enumerate(zip(payloads, where, strict=True)):
            assert payload is not None
            reply = layout.unpack(payload)
            assert reply.array is not None and reply.invalid is not None
            if reply.array.size != count:
                raise self._give_up("garbled", "READ_PHASES", f"asked {count} phases, got "
                                    f"{reply.array.size}")
            codes[index // per, offset:offset + count] = reply.array
            invalid[offset:offset + count] |= reply.invalid
        if readouts == 1 or np.all(codes == codes[0]):
            phases = wire.codes_to_phases(codes[0])
        else:
            angles = wire.codes_to_phases(codes)
            phases = np.mod(np.arctan2(np.sin(angles).sum(0), np.cos(angles).sum(0)),
                            2.0 * math.pi)
        phases = phases.astype(self.dtype)
        phases[invalid] = np.nan
        return phases, invalid
