"""The serial link to an oscillator board: request frames out, replies matched by sequence.

:class:`SerialLink` owns the transport (a pyserial port from ``serial.serial_for_url``: a
device path, a pty path or ``socket://host:port``; nothing else is ever opened), numbers the
requests, pipelines them within the protocol's window, decodes the replies (resynchronising
past garbage), and reports what it saw. It never retries by itself: one :meth:`exchange` is
one attempt, and the driver (:mod:`labep.drivers.oim_board`) decides what a failed attempt
means. A dropped link raises :class:`LinkLost`. :class:`LinkQuality` holds what the link
measured (the byte error rate, the reply latency and the adaptive reply timeout); a window
whose line stays silent past its deadline is probed once with STATUS before its missing
replies are given up.

For a plain serial device or pty (``serial.Serial``) reads and writes go straight to the file
descriptor (poll, then one read of everything available): pyserial's own ``read``/``write``
add a select and a timeout object per call, which is most of a round trip on a pty. Any other
pyserial handler (``socket://``, ``spy://``, ...) is used through its own API.
"""

from __future__ import annotations

import math
import os
import select
import socket
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import serial

from labep.drivers import oim_wire as wire

try:  # termios errors (e.g. tcflush on a pty whose other end closed) are not OSErrors
    import termios
except ImportError:  # pragma: no cover - not POSIX
    PORT_ERRORS: tuple[type[BaseException], ...] = (serial.SerialException, OSError)
else:
    PORT_ERRORS = (serial.SerialException, OSError, termios.error)

class LinkLost(Exception):  # noqa: N818 - a condition the driver recovers from, not a bug
    """The transport closed or failed (device gone, pty closed, socket disconnected)."""


#: a reply timeout never goes below this (s): the gap timeout, twice the 10 ms within which a
#: board answers (section 9). A deadline that passes early costs only a STATUS probe (late
#: replies still count), while every reply lost whole on a noisy line costs a deadline
TIMEOUT_FLOOR = wire.GAP_TIMEOUT


@dataclass(frozen=True)
class Observation:
    """Something wrong the link saw during an exchange (the driver turns it into a Fault)."""

    kind: str  # crc, garbled, stale, timeout, short_frame, lost_reply
    command: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Exchange:
    """The outcome of one attempt: per request its reply frame (a reply or an ERROR frame) or
    None when none came, and what went wrong on the way."""

    replies: list[wire.Frame | None]
    #: what the link resynchronised past (corrupt, stale or garbage bytes): nothing awaited
    observations: list[Observation]
    #: the first failure in request order (a timeout, a short frame, a corrupt or lost
    #: awaited reply), None if every sent request was answered
    failure: Observation | None = None
    #: why each sent request without a reply has none (requests that met the same event
    #: share one Observation)
    missing: dict[int, Observation] = field(default_factory=dict)
    #: requests never sent: the exchange stopped after a window the line left silent
    unsent: frozenset[int] = frozenset()
    #: a window ended on the line's silence (a timeout or a short frame): the board may hold
    #: a partial frame, so a re-send should wait the gap timeout first
    silent: bool = False


@dataclass
class LinkStats:
    """Traffic counters (frames and bytes each way), for the loop-overhead benchmark."""

    frames_out: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    bytes_in: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"frames_out": self.frames_out, "bytes_out": self.bytes_out,
                "frames_in": self.frames_in, "bytes_in": self.bytes_in}


class LinkQuality:
    """What the link measured: the per-byte error rate and the reply latency.

    **Byte error rate**: every window of an exchange adds the bytes it moved (both ways) and
    the frame errors it met (a reply failing its CRC, a mismatched or lost reply, a reply
    that stopped short, a BAD_CRC refusal: each is at least one bad byte, counted as its
    expected number given that the pair failed, :meth:`note_traffic`); the estimate is
    errors / (bytes + ``prior_bytes``), both sums decayed with a half-life of ``half_life``
    bytes, so it starts at 0 (the prior: a clean link) and follows a link whose quality
    changes. Timeouts are not counted: a silent board is not a noisy line.

    **Reply timeout** (RFC 6298): each reply that came yields a latency sample, the time since
    the later of its window's write and the previous reply (the driver's deadline moves with
    each reply, so that is what the timeout bounds; in the emulator a reply queued behind RUN
    leaves after the integration, and its sample includes it); SRTT and RTTVAR are smoothed
    with gains 1/8 and 1/4 and RTO = SRTT + 4 RTTVAR. Every deadline that passes doubles it
    (the back-off), a reply that comes resets the doubling: :meth:`reply_timeout` is
    min(maximum, max(:data:`TIMEOUT_FLOOR`, RTO) x 2^timeouts), the maximum before the first
    sample.
    """

    def __init__(self, prior_bytes: float = 1000.0, half_life: float = 50_000.0) -> None:
        self.prior_bytes = prior_bytes
        self.half_life = half_life
        self._bytes = 0.0
        self._errors = 0.0
        self.srtt: float | None = None
        self.rttvar = 0.0
        #: the smallest reply latency seen (s): the link's turnaround, what a frame costs
        #: beyond its bytes (:meth:`SerialLink.frame_cost`)
        self.min_rtt: float | None = None
        self.backoff = 0
        #: cumulative counts: frame errors (as above) and reply deadlines that passed
        self.corrupt = 0
        self.timeouts = 0

    @property
    def error_rate(self) -> float:
        """The current estimate of the probability that a byte is corrupt or lost."""
        return self._errors / (self._bytes + self.prior_bytes)

    def note_traffic(self, nbytes: int, errors: int, frames: int = 0) -> None:
        """``nbytes`` moved on the line in ``frames`` frame pairs, ``errors`` frame errors
        among them. With ``frames`` given, a failed pair of the window's mean size n counts
        n p / (1 - (1 - p)^n) bad bytes at the current estimate p: its expected count given
        that it failed (about 1 where n p is small), so on a link that fails most large
        frames the estimate still converges to the rate (an EM step) instead of to 1 / n."""
        if nbytes <= 0 and errors <= 0:
            return
        self.corrupt += errors
        rate = self.error_rate
        weighted = float(errors)
        if errors > 0 and frames > 0 and nbytes > 0 and 0.0 < rate < 1.0:
            size = nbytes / frames
            failed = -math.expm1(size * math.log1p(-rate))
            weighted *= max(1.0, size * rate / failed)
        decay = 0.5 ** (max(nbytes, 0) / self.half_life)
        self._bytes = self._bytes * decay + max(nbytes, 0)
        self._errors = self._errors * decay + weighted

    def note_latency(self, seconds: float) -> None:
        """A reply latency sample (s)."""
        seconds = max(seconds, 0.0)
        self.min_rtt = seconds if self.min_rtt is None else min(self.min_rtt, seconds)
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2.0
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - seconds)
            self.srtt = 0.875 * self.srtt + 0.125 * seconds
        self.backoff = 0

    def note_timeout(self) -> None:
        """A reply deadline passed: count it and double the next timeout."""
        self.timeouts += 1
        self.backoff = min(self.backoff + 1, 16)

    def reply_timeout(self, maximum: float) -> float:
        """How long to wait for a missing reply: min(maximum, max(floor, RTO) x 2^backoff)."""
        if self.srtt is None:
            return maximum
        rto = max(TIMEOUT_FLOOR, self.srtt + 4.0 * self.rttvar) * 2.0 ** self.backoff
        return min(maximum, rto)


#: a probe: STATUS that answers at once (served in every state, changes nothing)
_PROBE = wire.COMMANDS[wire.Command.STATUS].request.pack(wait_ms=0)
_PROBE_REPLY = wire.OVERHEAD + wire.COMMANDS[wire.Command.STATUS].reply.size()


def reply_allowance(command: int, payload: bytes, record: int = 0) -> int:
    """An upper bound of the reply's size in bytes (to size the timeout by the line rate):
    a read's reply, else an ERROR frame with its longest message."""
    if command in (wire.Command.READ_CODES, wire.Command.READ_PHASES, wire.Command.IDENTIFY,
                   wire.Command.READ_BATCH, wire.Command.RELAX_BATCH, wire.Command.RELAX_STEP):
        return reply_size(command, payload, record)
    return wire.OVERHEAD + 202


def reply_size(command: int, payload: bytes, record: int = 0) -> int:
    """The size in bytes of a successful reply to a request (for the cost of a frame pair);
    ``record``: the bytes of one READ_BATCH record (:func:`~labep.drivers.oim_wire.
    batch_result_dtype` of the board's free oscillators)."""
    if command == wire.Command.READ_BATCH:
        return wire.OVERHEAD + 3 + record * int.from_bytes(payload[4:6], "little")
    if command == wire.Command.RELAX_BATCH:  # its results come with it when they fit
        batch = int.from_bytes(payload[1:3], "little")
        inline = record and batch <= wire.batch_capacity(record, 3)
        return wire.OVERHEAD + 3 + (record * batch if inline else 0)
    if command == wire.Command.RELAX_STEP:  # batch x (1 + nudges) records, when they fit
        records = int.from_bytes(payload[1:3], "little") * (1 + payload[0])
        inline = record and records <= wire.batch_capacity(record, 3)
        return wire.OVERHEAD + 3 + (record * records if inline else 0)
    if command == wire.Command.READ_CODES:
        return wire.OVERHEAD + 2 + 2 * int.from_bytes(payload[6:8], "little")
    if command == wire.Command.READ_PHASES:
        count = int.from_bytes(payload[4:6], "little")
        return wire.OVERHEAD + 3 + 2 * count + -(-count // 8)
    if command == wire.Command.IDENTIFY:
        return wire.OVERHEAD + 85 + 2 * 32
    if command == wire.Command.STATUS:
        return wire.OVERHEAD + wire.COMMANDS[wire.Command.STATUS].reply.size()
    return wire.OVERHEAD


class SerialLink:
    """Frames to and from one board over one pyserial transport."""

    def __init__(self, resource: str | None, baudrate: int, transport: Any = None) -> None:
        if (resource is None) == (transport is None):
            raise ValueError("a link needs exactly one of a resource string (a pyserial URL) "
                             "or a transport (a pyserial port object)")
        #: the pyserial port object handed in (the link owns it: it opens it, closes it and
        #: reopens it on a reconnect), or None to build one from ``resource``
        self.transport = transport
        self.resource = resource if resource is not None else str(
            getattr(transport, "port", None) or type(transport).__name__)
        self.baudrate = baudrate
        self.port: Any = None
        self.decoder = wire.FrameDecoder()
        self.stats = LinkStats()
        self.quality = LinkQuality()
        #: STATUS probes a window sends when its deadline passes before giving up (each
        #: waits the next, doubled reply timeout, at most ``probe_timeout``)
        self.probes = 1
        self.probe_timeout = 0.2
        self.probes_sent = 0
        #: bytes of one READ_BATCH record of the board (set by the driver; sizes replies)
        self.batch_record = 0
        self._seq = 0
        self._fd: int | None = None
        self._poll: Any = None

    # -- transport --------------------------------------------------------------------------

    @property
    def byte_seconds(self) -> float:
        """The time one byte takes on the line: 10 bits at ``baudrate`` on a serial device (or
        pty, or an RFC 2217 port), 0 where no line rate applies (``socket://``, ``loop://``:
        bytes cost nothing next to a round trip)."""
        port = self.port if self.port is not None else self.transport
        handler = type(port).__module__ if port is not None else ""
        if handler.endswith((".protocol_socket", ".protocol_loop")) or (
                port is None and self.resource.startswith(("socket://", "loop://"))):
            return 0.0
        return 10.0 / self.baudrate

    def frame_cost(self) -> float:
        """What one more frame pair costs beyond its bytes, in byte times: the turnaround
        (the smallest reply latency :class:`LinkQuality` saw, 0 before the first) over
        :attr:`byte_seconds`; infinite where bytes take no line time. Sizes block frames
        with :func:`~labep.drivers.oim_board.best_payload`."""
        seconds = self.byte_seconds
        if seconds <= 0.0:
            return math.inf
        return (self.quality.min_rtt or 0.0) / seconds

    @property
    def is_open(self) -> bool:
        return self.port is not None

    def open(self) -> None:
        """Open the resource with ``serial.serial_for_url`` (or (re)open the transport handed
        in); :class:`LinkLost` if it fails."""
        self.close()
        try:
            if self.transport is not None:
                port = self.transport
                port.timeout = 0
            else:
                port = serial.serial_for_url(self.resource, baudrate=self.baudrate, timeout=0,
                                             do_not_open=True)
            if not port.is_open:
                port.open()
        except (*PORT_ERRORS, ValueError) as err:
            raise LinkLost(f"cannot open {self.resource}: {err}") from err
        self.port = port
        self.decoder.reset()
        if type(port) is serial.Serial and hasattr(port, "fd"):  # a plain device or pty
            self._fd = port.fd
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)

    def close(self) -> None:
        port, self.port, self._fd, self._poll = self.port, None, None, None
        if port is None:
            return
        sock = getattr(port, "_socket", None)
        if type(port).__module__.endswith(".protocol_socket") and sock is not None:
            # pyserial's socket:// handler sleeps 0.3 s in close() (time for a server to take
            # a quick reconnect): a dropped link would cost that on every reconnect. Closed
            # here instead; a server not ready yet refuses the next open, which the driver
            # retries after its back-off.
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                sock.close()
            port._socket, port.is_open = None, False
            return
        with suppress(*PORT_ERRORS):
            port.close()

    def discard_input(self) -> None:
        """Drop everything received and not yet decoded (before a re-send)."""
        self.decoder.reset()
        if self.port is None:
            return
        try:
            self.port.reset_input_buffer()
        except PORT_ERRORS as err:
            raise LinkLost(f"{self.resource}: {err}") from err

    def _write(self, data: bytes) -> None:
        if self.port is None:
            raise LinkLost(f"{self.resource} is not open")
        if self._fd is None:
            try:
                self.port.write(data)
            except PORT_ERRORS as err:
                raise LinkLost(f"write failed: {err}") from err
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                select.select([], [self._fd], [], 0.1)
            except OSError as err:
                raise LinkLost(f"write failed: {err}") from err

    def _read(self, timeout: float) -> bytes:
        """What arrives within ``timeout`` seconds (b"" if nothing did)."""
        if self.port is None:
            raise LinkLost(f"{self.resource} is not open")
        if self._fd is None:
            try:
                self.port.timeout = max(timeout, 0.0)
                return bytes(self.port.read(max(1, self.port.in_waiting)))
            except PORT_ERRORS as err:
                raise LinkLost(f"read failed: {err}") from err
        if not self._poll.poll(max(timeout, 0.0) * 1000.0):
            return b""
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return b""
        except OSError as err:
            raise LinkLost(f"read failed: {err}") from err
        if not data:
            raise LinkLost("the port is readable but returned no data (device gone)")
        return data

    # -- frames -----------------------------------------------------------------------------

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def exchange(self, requests: Sequence[tuple[int, bytes]], timeout: float,
                 wait: float = 0.0) -> Exchange:
        """Send ``requests`` (command, payload), pipelined in windows of at most
        :data:`~labep.drivers.oim_wire.RX_WINDOW` bytes, and collect one reply per request.

        A window waits for its replies ``timeout`` (plus line time, plus ``wait`` while a
        STATUS long-poll may hold the board) after each reply that came; when that passes
        with the line silent it sends up to :attr:`probes` STATUS probes (wait 0), each
        waited for the next, doubled timeout: replies that were only late (a board busy or
        held up) still count, and a probe answered before them shows they were lost (no
        re-send piles up behind a board that is only slow). Replies whose
        sequence number is not awaited are stale and discarded. A window keeps collecting
        after a failed reply, so every reply that comes back fine is kept: a reply that fails
        its CRC check, that stops short (the gap timeout) or that a later reply skipped (a
        board answers in order: it was lost) is given up at once, without waiting for the
        deadline. The next window is sent unless this one ended at its deadline (the line is
        silent: the later windows are left unsent)."""
        frames = []
        for command, payload in requests:
            frames.append((command, wire.encode(command, self.next_seq(), payload),
                           reply_allowance(command, payload, self.batch_record)))
        replies: list[wire.Frame | None] = [None] * len(frames)
        missing: dict[int, Observation] = {}
        seen: list[Observation] = []
        silent = False
        index = 0
        while index < len(frames):
            size, stop = 0, index
            while stop < len(frames) and (stop == index or
                                          size + len(frames[stop][1]) <= wire.RX_WINDOW):
                size += len(frames[stop][1])
                stop += 1
            timed_out, short = self._window(frames, index, stop, replies, missing, seen,
                                            timeout, wait)
            silent = silent or timed_out or short
            index = stop
            if timed_out:
                break
        failure = missing[min(missing)] if missing else None
        return Exchange(replies, seen, failure, missing, frozenset(range(index, len(frames))),
                        silent)

    def _anomaly(self, item: wire.Frame | wire.BadFrame, frames: list[tuple[int, bytes, int]],
                 first: int, unresolved: set[int], at: int | None) -> Observation:
        """What is wrong with a received frame that is not an awaited reply."""
        waiting = frames[min(unresolved)][0] if unresolved else frames[first][0]
        name = wire.command_name(waiting)
        if isinstance(item, wire.BadFrame):
            return Observation("crc", name, "a reply failed its CRC check",
                               {"seq": item.seq, "length": item.length})
        self.stats.frames_in += 1
        if at is None:
            return Observation("stale", name, f"discarded a {wire.command_name(item.command)} "
                               f"reply with sequence {item.seq} (not awaited)", {"seq": item.seq})
        return Observation("garbled", name, f"reply {wire.command_name(item.command)} to "
                           f"{wire.command_name(frames[at][0])} (sequence {item.seq})",
                           {"seq": item.seq})

    def _window(self, frames: list[tuple[int, bytes, int]], first: int, stop: int,
                replies: list[wire.Frame | None], missing: dict[int, Observation],
                seen: list[Observation], timeout: float, wait: float) -> tuple[bool, bool]:
        """Send frames[first:stop] in one write and collect their replies into ``replies``;
        a request given up goes into ``missing`` with its reason. Returns (timed out, a reply
        stopped short).

        The deadline moves with progress: ``timeout`` plus the line time of the bytes still
        to come (plus ``wait`` while the next reply due is a STATUS) after the last reply.
        Since a board answers in order, a reply still missing when a later one came was lost
        (``lost_reply``), and a partial reply the line left silent for the gap timeout lost
        bytes (``short_frame``): neither waits for the deadline. Every reply yields a latency
        sample and every window its bytes and frame errors (:class:`LinkQuality`)."""
        awaited = {frames[i][1][5]: i for i in range(first, stop)}
        unresolved = set(range(first, stop))
        data = b"".join(frame for _, frame, _ in frames[first:stop])
        per_byte = 20.0 / self.baudrate  # 10 bits a byte, twice as a margin
        to_come = sum(allow for _, _, allow in frames[first:stop])
        quality = self.quality
        bytes_in = self.stats.bytes_in
        errors = 0
        short = False
        now = time.perf_counter()
        deadline = now + timeout + (len(data) + to_come) * per_byte + (
            wait if frames[first][0] in wire.WAITING_COMMANDS else 0.0)
        self._write(data)
        self.stats.frames_out += stop - first
        self.stats.bytes_out += len(data)
        decoder = self.decoder
        last_byte = mark = now
        probes = self.probes
        probe_seq = -1
        late = False
        while unresolved:
            now = time.perf_counter()
            if now >= deadline:
                if not probes or decoder.pending:
                    break
                # the line is silent: a STATUS probe tells a lost reply from a late one
                name = wire.command_name(frames[min(unresolved)][0])
                seen.append(Observation("timeout", name, f"no reply to {name} within "
                                        f"{timeout:.3g} s of the last; sent a STATUS probe",
                                        {"missing": len(unresolved), "probe": True}))
                probes -= 1
                probe_seq = self.next_seq()
                probe = wire.encode(wire.Command.STATUS, probe_seq, _PROBE)
                self._write(probe)
                self.stats.frames_out += 1
                self.stats.bytes_out += len(probe)
                self.probes_sent += 1
                quality.note_timeout()
                timeout = quality.reply_timeout(self.probe_timeout)
                deadline = now + timeout + (len(probe) + _PROBE_REPLY) * per_byte
                late = True  # what comes now is no latency sample (Karn)
                continue
            patience = deadline - now
            if decoder.pending:
                patience = min(patience, max(last_byte + wire.GAP_TIMEOUT - now, 0.0))
            chunk = self._read(patience)
            now = time.perf_counter()
            skipped = decoder.skipped
            if chunk:
                last_byte = now
                self.stats.bytes_in += len(chunk)
                items = decoder.feed(chunk)
            elif decoder.pending and now - last_byte >= wire.GAP_TIMEOUT:
                header = decoder.pending_header
                seq = -1 if header is None else header[1]
                at = awaited.get(seq)
                if at is not None and at in unresolved:
                    name = wire.command_name(frames[at][0])
                    missing[at] = Observation(
                        "short_frame", name, f"the reply to {name} stopped after "
                        f"{decoder.pending} byte(s)",
                        {"seq": seq, "pending_bytes": decoder.pending})
                    unresolved.discard(at)
                    short = True
                    errors += 1
                items = decoder.expire()
            else:
                continue
            for item in items:
                if (item.seq == probe_seq and isinstance(item, wire.Frame)
                        and item.command == wire.Command.STATUS | wire.REPLY_BIT):
                    self.stats.frames_in += 1
                    probe_seq = -1
                    if unresolved:  # answered after them, in order: they were lost
                        name = wire.command_name(frames[min(unresolved)][0])
                        observation = Observation(
                            "lost_reply", name, f"no reply to {name} although a later "
                            "STATUS probe was answered", {"missing": len(unresolved)})
                        for i in unresolved:
                            missing[i] = observation
                        errors += len(unresolved)
                        unresolved.clear()
                    continue
                at = awaited.get(item.seq)
                if (at is not None and isinstance(item, wire.Frame)
                        and item.command in (frames[at][0] | wire.REPLY_BIT, wire.ERROR)):
                    self.stats.frames_in += 1
                    if (item.command == wire.ERROR and item.payload[:1]
                            == bytes([wire.ErrorCode.BAD_CRC])):
                        errors += 1  # our request arrived corrupt
                    replies[at] = item
                    missing.pop(at, None)
                    if at in unresolved:
                        unresolved.discard(at)
                        if not late and not (wait and frames[at][0] in wire.WAITING_COMMANDS):
                            quality.note_latency(now - mark)
                        mark = now
                        to_come -= frames[at][2]
                    lost = sorted(i for i in unresolved if i < at)
                    if lost:  # the board answers in order: these replies were lost
                        name = wire.command_name(frames[lost[0]][0])
                        observation = Observation(
                            "lost_reply", name, f"no reply to {name} although the replies "
                            "after it came", {"missing": len(lost)})
                        for i in lost:
                            missing[i] = observation
                            unresolved.discard(i)
                            to_come -= frames[i][2]
                        errors += len(lost)
                    if unresolved:
                        nearest = min(unresolved)
                        deadline = now + timeout + to_come * per_byte + (
                            wait if frames[nearest][0] in wire.WAITING_COMMANDS else 0.0)
                    continue
                errors += not (isinstance(item, wire.Frame) and at is None)  # stale: no error
                anomaly = self._anomaly(item, frames, first, unresolved, at)
                if at is not None and at in unresolved and isinstance(item, wire.BadFrame):
                    missing[at] = anomaly  # the awaited reply came corrupt: no use waiting
                    unresolved.discard(at)
                    to_come -= frames[at][2]
                    continue
                seen.append(anomaly)
            if decoder.skipped != skipped and not any(isinstance(item, wire.BadFrame)
                                                      for item in items):
                # (the bytes of a frame that failed its CRC are skipped too: reported above)
                seen.append(Observation(
                    "garbled", wire.command_name(frames[first][0]),
                    f"skipped {decoder.skipped - skipped} garbage byte(s) to resynchronise",
                    {"bytes": decoder.skipped - skipped}))
        timed_out = bool(unresolved)
        if timed_out:
            names = [wire.command_name(frames[i][0]) for i in sorted(unresolved)]
            kind = "short_frame" if decoder.pending else "timeout"
            message = (f"no reply to {', '.join(names)} within {timeout:.3g} s of the last"
                       + (f" ({decoder.pending} byte(s) of an incomplete frame)"
                          if decoder.pending else ""))
            observation = Observation(kind, names[0], message, {
                "missing": len(unresolved), "pending_bytes": decoder.pending})
            for i in unresolved:
                missing[i] = observation
            quality.note_timeout()
        quality.note_traffic(len(data) + self.stats.bytes_in - bytes_in, errors, stop - first)
        return timed_out, short
