"""The wire protocol of the FPGA oscillator-Ising boards: framing and commands.

Everything about bytes lives here, once, and both ends use it: the driver
(:mod:`labep.drivers.oim_board`) and the board emulator
(:mod:`labep.simulators.oim_board_emulator`). The specification a client can be written from
is ``docs/oim-board-protocol.md``; this module implements exactly that document.

A frame (all multi-byte fields little-endian)::

    0xA5 | version 0x01 | length u16 | command u8 | sequence u8 | payload[length] | CRC-16 u16

CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor) over every byte
before the CRC, start byte included. A reply carries the request's command with the reply bit
0x80 set, or :data:`ERROR` (0xFF), and always the request's sequence number.
"""

from __future__ import annotations

import math
import struct
from binascii import crc_hqx
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cache
from typing import Any

import numpy as np

START = 0xA5
#: the frame format's version byte (unchanged since the first boards)
VERSION = 1
#: the protocol versions a board reports in IDENTIFY: 1 (the single-sample commands), 2 (adds
#: RELAX_BATCH and READ_BATCH: a whole phase in one request), 3 (adds RELAX_STEP: the free
#: phase and its nudged phases in one request)
PROTOCOLS = (1, 2, 3)
PROTOCOL = PROTOCOLS[-1]
#: start, version, length, command, sequence
HEADER = struct.Struct("<BBHBB")
HEADER_SIZE = HEADER.size  # 6
CRC_SIZE = 2
OVERHEAD = HEADER_SIZE + CRC_SIZE  # 8 bytes of every frame that are not payload
#: largest payload of any frame, either direction (protocol version 1)
MAX_PAYLOAD = 4096
#: a client keeps at most this many request bytes unanswered (pipelining window)
RX_WINDOW = 8192
#: a receiver drops a partial frame after this long without a byte (seconds)
GAP_TIMEOUT = 0.020
REPLY_BIT = 0x80
ERROR = 0xFF
#: phase code k stands for k * PHASE_STEP radians (16-bit phase readout and start phases)
PHASE_BITS = 16
PHASE_STEP = 2.0 * math.pi / 65536


class Command(IntEnum):
    """Request command codes (a reply sets :data:`REPLY_BIT`)."""

    IDENTIFY = 0x01
    CONFIGURE = 0x02
    RESET = 0x03
    WRITE_COUPLINGS = 0x10
    WRITE_BIASES = 0x11
    READ_CODES = 0x12
    CLAMP = 0x20
    LOAD_PHASES = 0x21
    SET_NUDGE = 0x22
    RUN = 0x23
    STATUS = 0x24
    READ_PHASES = 0x25
    RELAX_BATCH = 0x26  # protocol 2
    READ_BATCH = 0x27  # protocol 2
    RELAX_STEP = 0x28  # protocol 3


#: the commands a board knows from protocol 2 on, and from protocol 3 on
BATCH_COMMANDS = frozenset({Command.RELAX_BATCH, Command.READ_BATCH})
STEP_COMMANDS = frozenset({Command.RELAX_STEP})


def known_commands(protocol: int) -> frozenset[Command]:
    """The commands a board of ``protocol`` serves (any other is UNKNOWN_COMMAND)."""
    later = (BATCH_COMMANDS if protocol < 2 else frozenset()) | (
        STEP_COMMANDS if protocol < 3 else frozenset())
    return frozenset(Command) - later


#: requests whose reply may wait ``wait_ms`` for a running relaxation to end
WAITING_COMMANDS = frozenset({Command.STATUS, Command.RELAX_BATCH, Command.READ_BATCH,
                              Command.RELAX_STEP})
#: requests a board serves while a relaxation runs (any other is BUSY)
SERVED_WHILE_RUNNING = frozenset({Command.IDENTIFY, Command.RESET, Command.STATUS,
                                  Command.READ_BATCH})


class ErrorCode(IntEnum):
    """The first payload byte of an ERROR frame."""

    BAD_CRC = 0x01  # a received frame failed its CRC (sequence and command as received)
    UNKNOWN_COMMAND = 0x02
    BAD_LENGTH = 0x03  # the payload length does not match the command's layout
    OUT_OF_RANGE = 0x04  # a parameter code >= 2^bits
    BAD_BLOCK = 0x05  # a layer, selector, offset or count outside the addressed array
    BAD_VALUE = 0x06  # a non-finite or invalid number or mode
    BUSY = 0x07  # a relaxation is running (only IDENTIFY, RESET, STATUS, READ_BATCH served)
    NOT_CONFIGURED = 0x08  # RUN before CONFIGURE (since power-on) or CLAMP (since RESET)
    NO_RESULT = 0x09  # READ_PHASES (READ_BATCH) before any completed relaxation (batch)


class RunState(IntEnum):
    """The first field of a STATUS reply."""

    IDLE = 0  # no relaxation since power-on or RESET
    RUNNING = 1
    SETTLED = 2  # residual <= tolerance within max_steps
    UNSETTLED = 3  # max_steps reached with residual > tolerance
    SKIPPED = 4  # (a RELAX_STEP result record) not relaxed: its free phase did not settle


class Selector(IntEnum):
    """Which parameter array a code block addresses (WRITE_BIASES, READ_CODES)."""

    COUPLING = 0  # J_l, shape (n_{l-1}, n_l), row-major
    H = 1  # h_l, in-phase bias, n_l
    G = 2  # g_l, quadrature bias, n_l


class LoadMode(IntEnum):
    CODES = 0
    REST = 1  # every free oscillator at pi/2


class BatchFlags(IntEnum):
    """Bits of RELAX_BATCH's ``flags``: which per-sample arrays its records carry."""

    START = 0x01  # u16 start phase codes of the free oscillators (else every one at rest)
    NUDGE = 0x02  # f64 targets of the outputs (the nudge beta, t; else the nudge is off)


class WireFormatError(ValueError):
    """A payload does not match its command's layout (wrong length or count)."""


# -- CRC and frames ------------------------------------------------------------------------


def crc16(data: bytes | bytearray | memoryview, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, MSB first, no final xor
    (``binascii.crc_hqx`` is this CRC; check value 0x29B1 for b"123456789")."""
    return crc_hqx(data, crc)


def encode(command: int, seq: int, payload: bytes = b"") -> bytes:
    """One frame: header, payload and CRC."""
    if len(payload) > MAX_PAYLOAD:
        raise WireFormatError(f"payload of {len(payload)} bytes > {MAX_PAYLOAD}")
    body = HEADER.pack(START, VERSION, len(payload), command, seq & 0xFF) + payload
    return body + crc_hqx(body, 0xFFFF).to_bytes(2, "little")


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame whose CRC checked."""

    command: int
    seq: int
    payload: bytes

    @property
    def size(self) -> int:
        return OVERHEAD + len(self.payload)


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A well-formed header whose frame failed its CRC (command and sequence as received,
    so possibly corrupt themselves)."""

    command: int
    seq: int
    length: int

    @property
    def size(self) -> int:
        return OVERHEAD + self.length


class FrameDecoder:
    """Incremental decoder: feed it bytes as they come, get whole frames back.

    It hunts for the start byte followed by version 1 and a length <= :data:`MAX_PAYLOAD`;
    anything else is garbage and skipped (counted in :attr:`skipped`). A candidate whose CRC
    fails is reported as a :class:`BadFrame` and hunting resumes at the byte after its start
    byte, so a real frame hidden in a corrupt one's payload is still found.
    """

    __slots__ = ("_buffer", "skipped")

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: garbage bytes dropped since construction (callers take differences)
        self.skipped = 0

    def reset(self) -> None:
        """Drop everything buffered (after a timeout, before a re-send)."""
        self._buffer.clear()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)

    @property
    def pending_header(self) -> tuple[int, int] | None:
        """(command, sequence) of the incomplete frame held back, once its header is in."""
        buffer = self._buffer
        return (buffer[4], buffer[5]) if len(buffer) >= HEADER_SIZE else None

    @property
    def needed(self) -> int:
        """At least how many more bytes the frame being assembled needs (>= 1)."""
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            return HEADER_SIZE - len(buffer)
        return max(1, OVERHEAD + (buffer[2] | buffer[3] << 8) - len(buffer))

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        """Append ``data``; return the frames (and CRC failures) it completed, in order."""
        self._buffer += data
        return self._scan()

    def expire(self) -> list[Frame | BadFrame]:
        """Give up the partial frame at the front (its bytes stopped coming: a corrupt length)
        and hunt again from the byte after its start byte."""
        if not self._buffer:
            return []
        del self._buffer[0]
        self.skipped += 1
        return self._scan()

    def _scan(self) -> list[Frame | BadFrame]:
        buffer = self._buffer
        size = len(buffer)
        found: list[Frame | BadFrame] = []
        pos = 0
        while pos < size:
            start = buffer.find(START, pos)
            if start < 0:
                self.skipped += size - pos
                pos = size
                break
            self.skipped += start - pos
            pos = start
            if size - pos < HEADER_SIZE:
                break
            length = buffer[pos + 2] | buffer[pos + 3] << 8
            if buffer[pos + 1] != VERSION or length > MAX_PAYLOAD:
                pos += 1
                self.skipped += 1
                continue
            end = pos + HEADER_SIZE + length + CRC_SIZE
            if size < end:
                break
            body = bytes(buffer[pos:end - CRC_SIZE])
            if crc_hqx(body, 0xFFFF) != (buffer[end - 2] | buffer[end - 1] << 8):
                found.append(BadFrame(buffer[pos + 4], buffer[pos + 5], length))
                pos += 1
                self.skipped += 1
                continue
            found.append(Frame(body[4], body[5], body[HEADER_SIZE:]))
            pos = end
        if pos:
            del buffer[:pos]
        return found


# -- payload layouts -----------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """A decoded payload: the fixed fields by name, the trailing array, the validity bitmap."""

    fields: dict[str, Any]
    array: np.ndarray | None = None
    invalid: np.ndarray | None = None

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]


@dataclass(frozen=True)
class Layout:
    """The layout of one payload: fixed fields, then optionally an array.

    ``fields`` are (name, struct code) pairs, little-endian, no padding. ``array`` is the numpy
    dtype of a trailing array whose length is the field named ``count`` (or, with ``count``
    None, whatever the rest of the payload holds). With ``bitmap``, ceil(count / 8) bytes
    follow the array: bit i (byte i // 8, least significant bit first) set marks element i
    invalid.
    """

    fields: tuple[tuple[str, str], ...] = ()
    array: str | None = None
    count: str | None = None
    bitmap: bool = False
    head: struct.Struct = field(init=False, repr=False, compare=False)
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    itemsize: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", struct.Struct("<" + "".join(c for _, c in self.fields)))
        object.__setattr__(self, "names", tuple(name for name, _ in self.fields))
        object.__setattr__(self, "itemsize",
                           0 if self.array is None else np.dtype(self.array).itemsize)

    def item_size(self) -> int:
        return self.itemsize

    def max_count(self, limit: int = MAX_PAYLOAD) -> int:
        """The largest array that fits a payload of ``limit`` bytes."""
        room = limit - self.head.size
        if self.bitmap:
            return (8 * room) // (8 * self.item_size() + 1)
        return room // self.item_size()

    def size(self, count: int = 0) -> int:
        """Payload bytes for an array of ``count`` elements."""
        return self.head.size + count * self.item_size() + (-(-count // 8) if self.bitmap else 0)

    def pack(self, array: Any = None, invalid: Any = None, **values: Any) -> bytes:
        """The payload for ``values`` (every fixed field but the count, which is the array's
        length) and ``array``."""
        if self.array is None:
            return self.head.pack(*[values[name] for name in self.names])
        array = np.ascontiguousarray(array if array is not None else (), dtype=self.array)
        if self.count is not None:
            values[self.count] = array.size
        out = self.head.pack(*[values[name] for name in self.names]) + array.tobytes()
        if not self.bitmap:
            return out
        flags = np.zeros(array.size, dtype=bool) if invalid is None else np.asarray(
            invalid, dtype=bool)
        return out + np.packbits(flags, bitorder="little").tobytes()

    def pack_bytes(self, data: bytes, **values: Any) -> bytes:
        """:meth:`pack` for a layout whose trailing array is bytes (``u1``, no count field, no
        bitmap: RELAX_BATCH, RELAX_STEP), with the array's bytes as they are (no copy into
        an array first)."""
        if self.array != "u1" or self.count is not None or self.bitmap:
            raise TypeError("pack_bytes is for a trailing u1 array without count or bitmap")
        return self.head.pack(*[values[name] for name in self.names]) + data

    def unpack(self, payload: bytes) -> Payload:
        """Decode a payload; :class:`WireFormatError` if its length does not fit."""
        head = self.head.size
        if len(payload) < head:
            raise WireFormatError(f"payload of {len(payload)} bytes, layout needs >= {head}")
        values = dict(zip(self.names, self.head.unpack_from(payload), strict=True))
        if self.array is None:
            if len(payload) != head:
                raise WireFormatError(f"payload of {len(payload)} bytes, layout has {head}")
            return Payload(values)
        item = self.itemsize
        if self.count is None:
            if (len(payload) - head) % item:
                raise WireFormatError(f"array of {len(payload) - head} bytes is not a whole "
                                      f"number of {item}-byte items")
            count = (len(payload) - head) // item
        else:
            count = values[self.count]
        expected = head + count * item + ((count + 7) >> 3 if self.bitmap else 0)
        if len(payload) != expected:
            raise WireFormatError(f"payload of {len(payload)} bytes, layout with {count} "
                                  f"items has {expected}")
        array = np.frombuffer(payload, dtype=self.array, count=count, offset=head)
        invalid = None
        if self.bitmap:
            bits = np.frombuffer(payload, dtype=np.uint8, offset=head + count * item)
            invalid = np.unpackbits(bits, count=count, bitorder="little").view(bool)
        return Payload(values, array, invalid)


@dataclass(frozen=True)
class CommandSpec:
    """One row of the command table."""

    code: Command
    request: Layout
    reply: Layout
    summary: str

    @property
    def name(self) -> str:
        return self.code.name


_EMPTY = Layout()
_STRING = "16s"

COMMANDS: dict[int, CommandSpec] = {spec.code: spec for spec in (
    CommandSpec(Command.IDENTIFY, _EMPTY, Layout(
        (("protocol", "B"), ("vendor", _STRING), ("model", _STRING), ("firmware", _STRING),
         ("serial", _STRING), ("coupling_bits", "B"), ("bias_bits", "B"), ("phase_bits", "B"),
         ("layers", "B"), ("coupling_range", "d"), ("bias_range", "d")),
        array="<u2", count="layers"),
        "who the board is and the topology it is built for (sizes n_0 .. n_L)"),
    CommandSpec(Command.CONFIGURE, Layout((("shil", "d"),)), _EMPTY,
                "SHIL strength K_s (finite, >= 0)"),
    CommandSpec(Command.RESET, _EMPTY, _EMPTY,
                "safe state: every code to the zero code, nudge off, oscillators stopped"),
    CommandSpec(Command.WRITE_COUPLINGS, Layout(
        (("layer", "B"), ("offset", "I"), ("count", "H")), array="<u2", count="count"), _EMPTY,
        "codes of J_layer[offset : offset + count] (row-major)"),
    CommandSpec(Command.WRITE_BIASES, Layout(
        (("selector", "B"), ("layer", "B"), ("offset", "I"), ("count", "H")), array="<u2",
        count="count"), _EMPTY, "codes of h_layer (selector 1) or g_layer (selector 2)"),
    CommandSpec(Command.READ_CODES, Layout(
        (("selector", "B"), ("layer", "B"), ("offset", "I"), ("count", "H"))),
        Layout((("count", "H"),), array="<u2", count="count"),
        "codes held by J (selector 0), h (1) or g (2) of a layer"),
    CommandSpec(Command.CLAMP, Layout((("offset", "I"), ("count", "H")), array="<f8",
                                      count="count"), _EMPTY,
                "input phases phi_0[offset : offset + count] (radians)"),
    CommandSpec(Command.LOAD_PHASES, Layout(
        (("mode", "B"), ("offset", "I"), ("count", "H")), array="<u2", count="count"), _EMPTY,
        "start phases of the free oscillators (codes, mode 0) or rest pi/2 (mode 1, count 0)"),
    CommandSpec(Command.SET_NUDGE, Layout((("beta", "d"), ("count", "H")), array="<f8",
                                          count="count"), _EMPTY,
                "nudge strength beta and target t (n_L values; count 0 only with beta 0)"),
    CommandSpec(Command.RUN, Layout((("max_steps", "I"), ("tolerance", "d"))), _EMPTY,
                "start a relaxation from the loaded phases"),
    CommandSpec(Command.STATUS, Layout((("wait_ms", "H"),)), Layout(
        (("state", "B"), ("steps", "I"), ("residual", "d"), ("elapsed_us", "I"))),
        "run state, steps, residual; waits up to wait_ms while running"),
    CommandSpec(Command.READ_PHASES, Layout((("offset", "I"), ("count", "H"))), Layout(
        (("flags", "B"), ("count", "H")), array="<u2", count="count", bitmap=True),
        "phase codes of free oscillators [offset, offset + count) and an invalid bitmap"),
    CommandSpec(Command.RELAX_BATCH, Layout(
        (("flags", "B"), ("batch", "H"), ("max_steps", "I"), ("tolerance", "d"),
         ("beta", "d"), ("wait_ms", "H")), array="u1"),
        Layout((("state", "B"), ("count", "H")), array="u1"),
        "relax `batch` samples one after another (records: batch_request_dtype); answers when "
        "they ended (their results, if they fit) or wait_ms after, whichever first"),
    CommandSpec(Command.READ_BATCH, Layout((("wait_ms", "H"), ("offset", "H"), ("count", "H"))),
                Layout((("state", "B"), ("count", "H")), array="u1"),
                "result records [offset, offset + count) of the last RELAX_BATCH or RELAX_STEP "
                "(records: batch_result_dtype); waits up to wait_ms while it runs"),
    CommandSpec(Command.RELAX_STEP, Layout(
        (("nudges", "B"), ("batch", "H"), ("free_steps", "I"), ("free_tolerance", "d"),
         ("nudged_steps", "I"), ("nudged_tolerance", "d"), ("beta_1", "d"), ("beta_2", "d"),
         ("wait_ms", "H")), array="u1"),
        Layout((("state", "B"), ("count", "H")), array="u1"),
        "relax `batch` samples from rest (free phase), then each settled one nudged at beta_1 "
        "(and beta_2) from its free phases (records: step_request_dtype); answers as "
        "RELAX_BATCH with batch x (1 + nudges) result records, phase by phase"),
)}


@cache
def batch_request_dtype(inputs: int, free: int, outputs: int, flags: int) -> np.dtype:
    """One sample's record in a RELAX_BATCH request: ``f64 phases[n_0]``, then
    ``u16 start[N]`` with :attr:`BatchFlags.START`, then ``f64 target[n_L]`` with
    :attr:`BatchFlags.NUDGE` (little-endian, no padding)."""
    fields: list[tuple[str, str, tuple[int, ...]]] = [("phases", "<f8", (inputs,))]
    if flags & BatchFlags.START:
        fields.append(("start", "<u2", (free,)))
    if flags & BatchFlags.NUDGE:
        fields.append(("target", "<f8", (outputs,)))
    return np.dtype(fields)


@cache
def step_request_dtype(inputs: int, outputs: int) -> np.dtype:
    """One sample's record in a RELAX_STEP request: ``f64 phases[n_0], f64 target[n_L]``."""
    return np.dtype([("phases", "<f8", (inputs,)), ("target", "<f8", (outputs,))])


@cache
def batch_result_dtype(free: int) -> np.dtype:
    """One sample's record in a READ_BATCH reply: ``u8 state, u32 steps, f64 residual,
    u32 elapsed_us, u16 codes[N], u8 invalid[ceil(N / 8)]`` (the meanings of STATUS and
    READ_PHASES, for that sample)."""
    return np.dtype([("state", "u1"), ("steps", "<u4"), ("residual", "<f8"),
                     ("elapsed_us", "<u4"), ("codes", "<u2", (free,)),
                     ("invalid", "u1", (-(-free // 8),))])


def batch_capacity(record: int, head: int) -> int:
    """How many records of ``record`` bytes fit one payload after ``head`` fixed bytes."""
    return max(0, (MAX_PAYLOAD - head) // record)

#: the payload of an ERROR frame: error code, the refused command, a short ASCII message
ERROR_LAYOUT = Layout((("code", "B"), ("command", "B")), array="u1")


def command_name(code: int) -> str:
    """A command code's name (replies and unknown codes included)."""
    if code == ERROR:
        return "ERROR"
    try:
        return Command(code & ~REPLY_BIT).name
    except ValueError:
        return f"0x{code:02X}"


def error_payload(code: ErrorCode, command: int, message: str = "") -> bytes:
    text = message.encode("ascii", "replace")[:200]
    return ERROR_LAYOUT.pack(np.frombuffer(text, dtype=np.uint8), code=code, command=command)


def parse_error(payload: bytes) -> tuple[int, int, str]:
    """(error code, refused command, message) of an ERROR frame's payload."""
    decoded = ERROR_LAYOUT.unpack(payload)
    assert decoded.array is not None
    return decoded["code"], decoded["command"], decoded.array.tobytes().decode("ascii",
                                                                               "replace")


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error 0x{code:02X}"


# -- values and codes ----------------------------------------------------------------------


def safe_code(bits: int) -> int:
    """The zero code of a parameter with ``bits`` of resolution: 2^(bits-1) - 1, the code whose
    nominal value -R + 2 R k / (2^bits - 1) is nearest zero (-LSB/2; 2^bits evenly spaced codes
    over [-R, R] hold no exact zero)."""
    return (1 << (bits - 1)) - 1


def code_value(code: np.ndarray | int, bits: int, limit: float) -> np.ndarray:
    """The nominal value of parameter codes: -R + 2 R k / (2^bits - 1)."""
    return np.linspace(-limit, limit, 1 << bits)[code]


def phases_to_codes(phases: np.ndarray) -> np.ndarray:
    """Phase codes (uint16) of phases in radians: round(phase mod 2 pi / step) mod 65536."""
    wrapped = np.mod(np.asarray(phases, dtype=np.float64), 2.0 * math.pi)
    return (np.rint(wrapped / PHASE_STEP).astype(np.int64) & 0xFFFF).astype(np.uint16)


def codes_to_phases(codes: np.ndarray) -> np.ndarray:
    """Phases in radians (float64) of phase codes: k * 2 pi / 65536."""
    return np.asarray(codes, dtype=np.float64) * PHASE_STEP
