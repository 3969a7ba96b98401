"""Driver of an FPGA oscillator Ising board (layered OIM) over a USB-UART serial link.

The board speaks the binary protocol of ``docs/oim-board-protocol.md`` (framing and command
table: :mod:`labep.drivers.oim_wire`; transport: :mod:`labep.drivers.oim_link`). It is a
:class:`labep.bench.Bench` with the same :class:`~labep.bench.BenchSpec` as
:class:`labep.simulators.oim.OIMSimulator` with quantized storage: parameters ``J1..JL``,
``h1..hL``, ``g1..gL`` of the model's shapes, each with ``levels = 2^bits`` and the range the
board reports (IDENTIFY), written as integer codes. A relaxation runs each sample of a batch on
the board in turn: CLAMP the input phases, LOAD_PHASES (the start row or rest), SET_NUDGE, RUN,
STATUS and READ_PHASES; the groups of all samples go out pipelined in one write.

Robustness: every request has a timeout; a failed attempt (timeout, short or corrupt reply,
BUSY, a board that lost its configuration) is re-sent with new sequence numbers after a
doubling back-off, at most ``retries`` times; replies with a sequence number not awaited are
discarded; the decoder resynchronises past garbage; a dropped link is reopened (same
resource), the board re-identified and re-configured and every parameter re-sent from the
host's copy of the last written codes. Each fault is logged (:meth:`OIMBoard.drain_faults`),
its ``kind`` one of: timeout, short_frame, lost_reply, crc, garbled, stale, busy,
error_frame, board_reset, link_closed, reconnect, safe_state (recovered or not), unsettled and
invalid_readout (a sample that is returned not converged: ``recovered`` False).
When retries are exhausted the board is put in its safe state and
:class:`~labep.bench.BenchFaultError` is raised (that last fault travels with the exception, not
in the log). Every error that escapes a public method leaves the board in its safe state (if the
link allows); ``close()`` does too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from labep.bench import (
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
from labep.drivers import oim_wire as wire
from labep.drivers.oim_link import Exchange, LinkLost, SerialLink
from labep.models.oim import LayeredOIM

Command = wire.Command
ErrorCode = wire.ErrorCode


class OIMBoardOptions(BaseModel):
    """Options of the OIM board driver (``bench.options`` in a protocol)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    baudrate: int = Field(
        1_000_000, ge=300, le=20_000_000,
        description="Line rate of the serial port (bit/s). Sizes each request's timeout too "
        "(10 bits a byte); a pty or socket:// link ignores it otherwise.")
    timeout: float = Field(
        0.2, gt=0.0, le=60.0,
        description="Reply timeout of a request (s), on top of its bytes' time on the line "
        "and a STATUS request's wait. The board answers within 10 ms of a request's end.")
    retries: int = Field(
        3, ge=0, le=20,
        description="Re-sends of a request (new sequence numbers) after a timeout, a short "
        "or corrupt reply, BUSY, or a board that lost its configuration; then the board is "
        "put in its safe state and BenchFaultError is raised.")
    backoff: float = Field(
        0.02, ge=0.0, le=10.0,
        description="Pause before the first re-send (s), doubled for each further one (at "
        "most 1 s). 0.02 or more lets the board drop a partial frame first (its 20 ms gap).")
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
_CODE_CHUNK = wire.COMMANDS[Command.WRITE_BIASES].request.max_count()
_CLAMP_CHUNK = wire.COMMANDS[Command.CLAMP].request.max_count()
_LOAD_CHUNK = wire.COMMANDS[Command.LOAD_PHASES].request.max_count()
_READ_CHUNK = wire.COMMANDS[Command.READ_PHASES].reply.max_count()


class _Failed(Exception):  # noqa: N818 - internal: one attempt's verdict
    """How an attempt failed; ``missing``: a reply never came (the link's observation)."""

    def __init__(self, kind: str, command: str, message: str, action: str,
                 missing: bool = False) -> None:
        super().__init__(message)
        self.kind, self.command, self.message, self.action = kind, command, message, action
        self.missing = missing


class OIMBoard(BenchLifecycle):
    """An FPGA oscillator Ising board running a layered OIM, as a Bench."""

    name = "oim_board"
    model_kinds = ("layered_oim",)
    options_model = OIMBoardOptions

    def __init__(self, model: LayeredOIM, options: OIMBoardOptions | None = None, *,
                 resource: str) -> None:
        self.model = model
        self.options = options or OIMBoardOptions()
        self.resource = resource
        self.instrument = f"oim_board {resource}"
        self.dtype = np.dtype(self.options.dtype)
        self.board: BoardInfo | None = None
        #: provisional (continuous, unbounded) until open() reads the board's bits and ranges
        self.spec = self._make_spec(None)
        self._link = SerialLink(resource, self.options.baudrate)
        #: protocol-defined safe values by parameter (checked against the range on open)
        self._safe_values = safe_values(model.parameter_shapes(), self.options.safe_values,
                                        bench=self.instrument)
        self._safe_codes: dict[str, np.ndarray] = {}
        self._faults: list[Fault] = []
        self._codes: dict[str, np.ndarray] = {}  # what the host wants the board to hold
        self._needs_restore = False
        self._generation = 0  # reconnects so far
        self._opened = False

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
                self._transact([(Command.RESET, b"")], "RESET")
                self._safe_codes = self._resolve_safe_codes()
                self._codes = {spec.name: np.full(spec.shape, wire.safe_code(
                    self._bits(spec.name)), dtype=np.int64) for spec in self.spec.parameters}
                self._codes.update({name: codes.copy()
                                    for name, codes in self._safe_codes.items()})
                requests = self._safe_requests()
                if requests:
                    self._transact(requests, "WRITE (safe values)")
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
        if info.protocol != wire.VERSION or info.phase_bits != wire.PHASE_BITS:
            raise BenchError(f"{self.instrument}: the board speaks protocol {info.protocol} with "
                             f"{info.phase_bits}-bit phases; this driver needs protocol "
                             f"{wire.VERSION} with {wire.PHASE_BITS}-bit phases")
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
            self._needs_restore = True
            self._safe_state(f"error ({type(err).__name__})")
            raise

    # -- transactions -----------------------------------------------------------------------

    def _transact(self, requests: list[tuple[int, bytes]], what: str, *,
                  reconnect: bool = True, wait: float = 0.0,
                  busy_ok: frozenset[int] = frozenset(), tried: int = 0,
                  last: _Failed | None = None) -> list[bytes | None]:
        """Send ``requests`` (pipelined) until every one is answered; their reply payloads.

        An attempt fails on a missing, short or corrupt reply or a retryable ERROR (BAD_CRC,
        BUSY, NOT_CONFIGURED, NO_RESULT); it is re-sent whole with new sequence numbers after
        the back-off, at most ``retries`` times. BUSY waits for the running relaxation first;
        a board that lost its configuration is restored first. A BUSY reply to a request whose
        index is in ``busy_ok`` is not a failure: its payload is None. Other ERRORs are final.
        A dropped link is reopened (``reconnect``) and the attempt re-sent. ``tried``
        attempts were made already (the last one failed as ``last``)."""
        first = wire.command_name(requests[0][0]) if requests else what
        for attempt in range(tried, self.options.retries + 1):
            if attempt:
                time.sleep(min(self.options.backoff * 2 ** (attempt - 1), 1.0))
                with suppress(LinkLost):  # the exchange below meets it again and reconnects
                    self._link.discard_input()
            try:
                exchange = self._link.exchange(requests, self.options.timeout, wait)
            except LinkLost as err:
                if not reconnect:
                    raise
                self._fault("link_closed", first, str(err), recovered=True, attempt=attempt,
                            operation=what)
                self._reconnect(first)
                last = _Failed("link_closed", first, f"the link dropped: {err}", "retry")
                continue
            for seen in exchange.observations:
                self._fault(seen.kind, seen.command, seen.message, True, **seen.detail)
            try:
                return self._verdict(requests, exchange, busy_ok)
            except _Failed as failed:
                last = failed
            if last.action == "final" or attempt == self.options.retries:
                break
            self._fault(last.kind, last.command, last.message, recovered=True, attempt=attempt)
            if last.action == "busy":
                self._wait_idle(what)
            elif last.action == "board_reset":
                self._restore(reconnect=reconnect)
        assert last is not None
        suffix = "" if last.action == "final" else (
            f" (after {self.options.retries + 1} attempt(s))")
        raise self._give_up(last.kind, last.command, last.message + suffix)

    def _verdict(self, requests: list[tuple[int, bytes]], exchange: Exchange,
                 busy_ok: frozenset[int]) -> list[bytes | None]:
        """The payloads of a complete, successful exchange, or :class:`_Failed` naming the
        first request (in order) that failed."""
        payloads: list[bytes | None] = []
        for index, ((command, _), reply) in enumerate(zip(requests, exchange.replies,
                                                          strict=True)):
            if reply is None:
                seen = exchange.failure
                assert seen is not None
                raise _Failed(seen.kind, seen.command, seen.message, "retry", missing=True)
            if reply.command != wire.ERROR:
                payloads.append(reply.payload)
                continue
            code, _, text = wire.parse_error(reply.payload)
            if code == ErrorCode.BUSY and index in busy_ok:
                payloads.append(None)
                continue
            name = wire.command_name(command)
            message = f"board refused {name}: {wire.error_name(code)}" + (
                f" ({text})" if text else "")
            kind = _RETRY_ERRORS.get(ErrorCode(code)) if code in _KNOWN_ERRORS else None
            if kind is None:
                raise _Failed("error_frame", name, message, "final")
            raise _Failed(kind, name, message, kind if kind != "crc" else "retry")
        return payloads

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

    def _status_request(self) -> bytes:
        wait_ms = min(round(self.options.poll_wait * 1000), 65535)
        return wire.COMMANDS[Command.STATUS].request.pack(wait_ms=wait_ms)

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
        """Block frames for the codes of ``name`` (only chunks that differ from ``old``)."""
        selector, layer = self._address(name)
        requests = []
        for offset in range(0, flat.size, _CODE_CHUNK):
            block = flat[offset:offset + _CODE_CHUNK]
            if old is not None and np.array_equal(block, old[offset:offset + _CODE_CHUNK]):
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
        for spec in self.spec.parameters:
            selector, layer = self._address(spec.name)
            size = int(np.prod(spec.shape))
            for offset in range(0, size, _CODE_CHUNK):
                count = min(_CODE_CHUNK, size - offset)
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

        The groups of requests of all samples go out pipelined (one write, as the window
        allows); a sample whose group did not come back whole is run again on its own, with
        the retries of :meth:`_transact`. Everything is checked before a byte is sent. The
        state rows are the read-back phases (k * 2 pi / 65536 rad, ``dtype``; NaN for an
        oscillator whose readout is invalid); ``converged`` is the board's settled flag with a
        valid readout."""
        self._require_open()
        settle = settle or Settle(self.options.tolerance, self.options.max_steps)
        plan = self._plan(inputs, nudge, start, settle)
        batch = len(plan)
        state = np.empty((batch, self.model.state_size), dtype=self.dtype)
        converged = np.zeros(batch, dtype=bool)
        steps = np.zeros(batch, dtype=np.int64)
        residual = np.zeros(batch, dtype=np.float64)
        board_seconds = 0.0
        with self._guarded():
            if self._needs_restore:
                self._restore()
            for sample, (phases, invalid, status) in enumerate(
                    self._relax_batch(plan, settle.readouts)):
                state[sample] = phases
                steps[sample] = status["steps"]
                residual[sample] = status["residual"]
                board_seconds += status["elapsed_us"] * 1e-6
                settled = status["state"] == wire.RunState.SETTLED
                converged[sample] = settled and not invalid.any()
                if not settled:
                    self._fault("unsettled", "RUN", f"sample {sample} did not settle: residual "
                                f"{status['residual']:.3g} after {status['steps']} steps",
                                recovered=False, sample=sample, steps=int(status["steps"]),
                                residual=float(status["residual"]))
                if invalid.any():
                    self._fault("invalid_readout", "READ_PHASES",
                                f"sample {sample}: invalid phase readout of "
                                f"{int(invalid.sum())} oscillator(s)", recovered=False,
                                sample=sample, oscillators=np.flatnonzero(invalid).tolist())
        return Relaxation(state, converged, steps, residual, {"board_seconds": board_seconds})

    def _plan(self, inputs: np.ndarray, nudge: Nudge | None, start: np.ndarray | None,
              settle: Settle) -> list[list[tuple[int, bytes]]]:
        """The requests of every sample, after checking every argument."""
        model = self.model
        x = np.asarray(inputs, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != model.input_size or not np.all(np.isfinite(x)):
            raise ValueError(f"{self.instrument}: inputs must be finite, (batch, "
                             f"{model.input_size}), got {x.shape}")
        batch = x.shape[0]
        clamp = model.input_phases(x)
        if start is not None:
            start = np.asarray(start, dtype=np.float64)
            if start.shape != (batch, model.state_size) or not np.all(np.isfinite(start)):
                raise ValueError(f"{self.instrument}: start must be finite, ({batch}, "
                                 f"{model.state_size}), got {start.shape}")
            start_codes = wire.phases_to_codes(start)
        strength = 0.0 if nudge is None else float(nudge.strength)
        target = None
        if strength != 0.0:
            assert nudge is not None
            target = np.asarray(nudge.target, dtype=np.float64)
            if target.shape != (batch, model.output_size) or not np.all(np.isfinite(target)):
                raise ValueError(f"{self.instrument}: nudge target must be finite, ({batch}, "
                                 f"{model.output_size}), got {target.shape}")
        if not math.isfinite(strength):
            raise ValueError(f"{self.instrument}: nudge strength must be finite")
        if not (math.isfinite(settle.tolerance) and settle.tolerance > 0
                and 1 <= settle.max_steps <= 2**32 - 1 and settle.readouts >= 1):
            raise ValueError(f"{self.instrument}: settle needs tolerance > 0, 1 <= max_steps "
                             f"< 2^32 and readouts >= 1, got {settle}")
        layouts = {code: wire.COMMANDS[code].request for code in Command}
        run = layouts[Command.RUN].pack(max_steps=int(settle.max_steps),
                                        tolerance=float(settle.tolerance))
        status = self._status_request()
        reads = [(Command.READ_PHASES, layouts[Command.READ_PHASES].pack(
            offset=offset, count=min(_READ_CHUNK, model.state_size - offset)))
            for offset in range(0, model.state_size, _READ_CHUNK)] * settle.readouts
        rest = layouts[Command.LOAD_PHASES].pack(mode=wire.LoadMode.REST, offset=0)
        plan = []
        for sample in range(batch):
            requests: list[tuple[int, bytes]] = []
            for offset in range(0, model.input_size, _CLAMP_CHUNK):
                requests.append((Command.CLAMP, layouts[Command.CLAMP].pack(
                    clamp[sample, offset:offset + _CLAMP_CHUNK], offset=offset)))
            if start is None:
                requests.append((Command.LOAD_PHASES, rest))
            else:
                for offset in range(0, model.state_size, _LOAD_CHUNK):
                    requests.append((Command.LOAD_PHASES, layouts[Command.LOAD_PHASES].pack(
                        start_codes[sample, offset:offset + _LOAD_CHUNK],
                        mode=wire.LoadMode.CODES, offset=offset)))
            nudge_payload = layouts[Command.SET_NUDGE].pack(
                None if target is None else target[sample], beta=strength)
            requests += [(Command.SET_NUDGE, nudge_payload), (Command.RUN, run),
                         (Command.STATUS, status), *reads]
            plan.append(requests)
        return plan

    def _relax_batch(self, plan: list[list[tuple[int, bytes]]], readouts: int
                     ) -> list[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
        """Every sample's group in one pipelined exchange (one attempt); the samples whose
        replies did not all come back fine go through :meth:`_relax_sample` again. Each group
        sets everything its relaxation uses, so one sample's failure does not spoil another's
        result."""
        requests = [request for group in plan for request in group]
        try:
            exchange: Exchange | None = self._link.exchange(requests, self.options.timeout,
                                                            self.options.poll_wait)
        except LinkLost as err:
            self._fault("link_closed", "CLAMP", str(err), recovered=True, operation="relax")
            self._reconnect("CLAMP")
            exchange = None
        retrying = self.options.retries > 0
        if exchange is not None:
            for seen in exchange.observations:
                self._fault(seen.kind, seen.command, seen.message, True, **seen.detail)
            if exchange.failure is not None:  # logged once, whichever samples it hit
                failure = exchange.failure
                self._fault(failure.kind, failure.command, failure.message, retrying,
                            **failure.detail)
        results = []
        index = 0
        for group in plan:
            payloads, failed = None, None
            if exchange is not None:
                part = Exchange(exchange.replies[index:index + len(group)], [],
                                exchange.failure)
                try:
                    payloads = self._verdict(group, part, self._busy_reads(group))
                except _Failed as refused:
                    failed = refused
                    if refused.action == "final":
                        raise self._give_up(refused.kind, refused.command,
                                            refused.message) from None
                    if not refused.missing:
                        self._fault(refused.kind, refused.command, refused.message, retrying)
                    if retrying and refused.action == "busy":
                        self._wait_idle("relax")
                    elif retrying and refused.action == "board_reset":
                        self._restore()
            index += len(group)
            results.append(self._relax_sample(group, readouts, payloads, failed))
        return results

    @staticmethod
    def _busy_reads(group: list[tuple[int, bytes]]) -> frozenset[int]:
        """The READ_PHASES requests of a sample's group (BUSY is their answer while the
        relaxation still runs)."""
        return frozenset(i for i, (command, _) in enumerate(group)
                         if command == Command.READ_PHASES)

    def _relax_sample(self, requests: list[tuple[int, bytes]], readouts: int,
                      payloads: list[bytes | None] | None = None,
                      failed: _Failed | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One sample: the pipelined setup, RUN, STATUS and READ_PHASES (unless ``payloads``
        already holds their replies, or ``failed`` says how a first attempt failed); then,
        while the board still runs, STATUS and READ_PHASES again. A reset or reconnected
        board on the way restarts the sample."""
        n_reads = sum(1 for command, _ in requests if command == Command.READ_PHASES)
        first_read = len(requests) - n_reads
        poll = requests[first_read - 1:]
        status_layout = wire.COMMANDS[Command.STATUS].reply
        for _ in range(self.options.retries + 1):
            if payloads is None:
                # a reconnect inside this transaction re-sends the whole (self-contained) group
                payloads = self._transact(requests, "relax", wait=self.options.poll_wait,
                                          busy_ok=self._busy_reads(requests),
                                          tried=int(failed is not None), last=failed)
                failed = None
            generation = self._generation
            deadline = time.perf_counter() + self.options.run_timeout
            status = status_layout.unpack(payloads[first_read - 1]).fields  # type: ignore[arg-type]
            while status["state"] == wire.RunState.RUNNING:
                if time.perf_counter() > deadline:
                    raise self._give_up("timeout", "RUN", f"still running after "
                                        f"{self.options.run_timeout:g} s")
                payloads = payloads[:first_read - 1] + self._transact(
                    poll, "relax", wait=self.options.poll_wait,
                    busy_ok=frozenset(range(1, len(poll))))
                status = status_layout.unpack(payloads[first_read - 1]).fields  # type: ignore[arg-type]
                if self._generation != generation:
                    break
            if self._generation != generation or status["state"] == wire.RunState.IDLE:
                self._fault("board_reset", "RUN", "the board lost the relaxation (reset or "
                            "reconnected); the sample is run again", recovered=True)
                payloads = None
                continue
            phases, invalid = self._phases(payloads[first_read:], readouts)
            return phases, invalid, status
        raise self._give_up("board_reset", "RUN", "the board kept losing the relaxation")

    def _phases(self, payloads: list[bytes | None], readouts: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """Phases (NaN where invalid) and the invalid mask from READ_PHASES replies; several
        readouts are averaged on the circle."""
        layout = wire.COMMANDS[Command.READ_PHASES].reply
        n = self.model.state_size
        per = len(payloads) // readouts
        codes = np.empty((readouts, n), dtype=np.int64)
        invalid = np.zeros(n, dtype=bool)
        for index, payload in enumerate(payloads):
            if payload is None:
                raise self._give_up("garbled", "READ_PHASES", "the board answered BUSY to "
                                    "READ_PHASES after STATUS reported the run ended")
            reply = layout.unpack(payload)
            assert reply.array is not None and reply.invalid is not None
            offset = (index % per) * _READ_CHUNK
            if reply.array.size != min(_READ_CHUNK, n - offset):
                raise self._give_up("garbled", "READ_PHASES", f"asked {min(_READ_CHUNK, n)} "
                                    f"phases, got {reply.array.size}")
            codes[index // per, offset:offset + reply.array.size] = reply.array
            invalid[offset:offset + reply.array.size] |= reply.invalid
        if readouts == 1 or np.all(codes == codes[0]):
            phases = wire.codes_to_phases(codes[0])
        else:
            angles = wire.codes_to_phases(codes)
            phases = np.mod(np.arctan2(np.sin(angles).sum(0), np.cos(angles).sum(0)),
                            2.0 * math.pi)
        phases = phases.astype(self.dtype)
        phases[invalid] = np.nan
        return phases, invalid
