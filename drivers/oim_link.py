"""The serial link to an oscillator board: request frames out, replies matched by sequence.

:class:`SerialLink` owns the transport (a pyserial port from ``serial.serial_for_url``: a
device path, a pty path or ``socket://host:port``; nothing else is ever opened), numbers the
requests, pipelines them within the protocol's window, decodes the replies (resynchronising
past garbage), and reports what it saw. It never retries by itself: one :meth:`exchange` is
one attempt, and the driver (:mod:`labep.drivers.oim_board`) decides what a failed attempt
means. A dropped link raises :class:`LinkLost`.

For a plain serial device or pty (``serial.Serial``) reads and writes go straight to the file
descriptor (poll, then one read of everything available): pyserial's own ``read``/``write``
add a select and a timeout object per call, which is most of a round trip on a pty. Any other
pyserial handler (``socket://``, ``spy://``, ...) is used through its own API.
"""

from __future__ import annotations

import os
import select
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
    #: what the link resynchronised past (corrupt, stale or garbage bytes)
    observations: list[Observation]
    #: what ended the attempt early (a timeout, a short frame, a corrupt awaited reply);
    #: the replies still missing are None
    failure: Observation | None = None


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


def reply_allowance(command: int, payload: bytes) -> int:
    """An upper bound of the reply's size in bytes (to size the timeout by the line rate)."""
    if command == wire.Command.READ_CODES:
        return wire.OVERHEAD + 2 + 2 * int.from_bytes(payload[6:8], "little")
    if command == wire.Command.READ_PHASES:
        count = int.from_bytes(payload[4:6], "little")
        return wire.OVERHEAD + 3 + 2 * count + -(-count // 8)
    if command == wire.Command.IDENTIFY:
        return wire.OVERHEAD + 85 + 2 * 32
    return wire.OVERHEAD + 202  # an ERROR frame with its longest message


class SerialLink:
    """Frames to and from one board over one pyserial transport."""

    def __init__(self, resource: str, baudrate: int) -> None:
        self.resource = resource
        self.baudrate = baudrate
        self.port: Any = None
        self.decoder = wire.FrameDecoder()
        self.stats = LinkStats()
        self._seq = 0
        self._fd: int | None = None
        self._poll: Any = None

    # -- transport --------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.port is not None

    def open(self) -> None:
        """Open the resource with ``serial.serial_for_url``; :class:`LinkLost` if it fails."""
        self.close()
        try:
            port = serial.serial_for_url(self.resource, baudrate=self.baudrate, timeout=0,
                                         do_not_open=True)
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
        if port is not None:
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
        STATUS long-poll may hold the board) after each reply that came. Replies whose
        sequence number
        is not awaited are stale and discarded. The attempt ends (later windows unsent) at the
        first window with a reply missing: at its deadline, or at once when an awaited reply
        fails its CRC check, stops short, or is skipped by the board's later replies."""
        frames = []
        for command, payload in requests:
            frames.append((command, wire.encode(command, self.next_seq(), payload),
                           reply_allowance(command, payload)))
        replies: list[wire.Frame | None] = [None] * len(frames)
        seen: list[Observation] = []
        index = 0
        while index < len(frames):
            size, stop = 0, index
            while stop < len(frames) and (stop == index or
                                          size + len(frames[stop][1]) <= wire.RX_WINDOW):
                size += len(frames[stop][1])
                stop += 1
            missing = self._window(frames, index, stop, replies, seen, timeout, wait)
            if missing is not None:
                return Exchange(replies, seen, missing)
            index = stop
        return Exchange(replies, seen)

    def _anomaly(self, item: wire.Frame | wire.BadFrame, frames: list[tuple[int, bytes, int]],
                 first: int, awaited: dict[int, int], at: int | None) -> Observation:
        """What is wrong with a received frame that is not an awaited reply."""
        waiting = frames[min(awaited.values())][0] if awaited else frames[first][0]
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
                replies: list[wire.Frame | None], seen: list[Observation], timeout: float,
                wait: float) -> Observation | None:
        """Send frames[first:stop] in one write and collect their replies; what ended the
        attempt if some did not come.

        The deadline moves with progress: ``timeout`` plus the line time of the bytes still
        to come (plus ``wait`` while the next reply due is a STATUS) after the last reply.
        Since a board answers in order, a reply missing when the window's last reply came
        was lost (``lost_reply``), and a partial reply the line left silent for the gap
        timeout lost bytes (``short_frame``): neither waits for the deadline."""
        awaited = {frames[i][1][5]: i for i in range(first, stop)}
        data = b"".join(frame for _, frame, _ in frames[first:stop])
        per_byte = 20.0 / self.baudrate  # 10 bits a byte, twice as a margin
        to_come = sum(allow for _, _, allow in frames[first:stop])
        now = time.perf_counter()
        deadline = now + timeout + (len(data) + to_come) * per_byte + (
            wait if frames[first][0] == wire.Command.STATUS else 0.0)
        self._write(data)
        self.stats.frames_out += stop - first
        self.stats.bytes_out += len(data)
        decoder = self.decoder
        last_byte = now
        while awaited:
            now = time.perf_counter()
            if now >= deadline:
                break
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
                if header is not None and header[1] in awaited:
                    name = wire.command_name(frames[awaited[header[1]]][0])
                    return Observation("short_frame", name, f"the reply to {name} stopped "
                                       f"after {decoder.pending} byte(s)",
                                       {"seq": header[1], "pending_bytes": decoder.pending})
                items = decoder.expire()
            else:
                continue
            for item in items:
                at = awaited.get(item.seq)
                if (at is not None and isinstance(item, wire.Frame)
                        and item.command in (frames[at][0] | wire.REPLY_BIT, wire.ERROR)):
                    self.stats.frames_in += 1
                    replies[at] = item
                    del awaited[item.seq]
                    if not awaited:
                        break
                    if at == stop - 1:  # the last reply came: the ones still missing are lost
                        name = wire.command_name(frames[min(awaited.values())][0])
                        return Observation("lost_reply", name, f"no reply to {name} although "
                                           "the replies after it came", {"missing": len(awaited)})
                    to_come -= frames[at][2]
                    nearest = min(awaited.values())
                    deadline = now + timeout + to_come * per_byte + (
                        wait if frames[nearest][0] == wire.Command.STATUS else 0.0)
                    continue
                anomaly = self._anomaly(item, frames, first, awaited, at)
                if at is not None and isinstance(item, wire.BadFrame):
                    return anomaly  # the awaited reply came corrupt: no use waiting on
                seen.append(anomaly)
            if decoder.skipped != skipped:
                seen.append(Observation(
                    "garbled", wire.command_name(frames[first][0]),
                    f"skipped {decoder.skipped - skipped} garbage byte(s) to resynchronise",
                    {"bytes": decoder.skipped - skipped}))
        if not awaited:
            return None
        missing = [wire.command_name(frames[i][0]) for i in sorted(awaited.values())]
        kind = "short_frame" if decoder.pending else "timeout"
        message = (f"no reply to {', '.join(missing)} within {timeout:.3g} s of the last"
                   + (f" ({decoder.pending} byte(s) of an incomplete frame)"
                      if decoder.pending else ""))
        return Observation(kind, missing[0], message,
                           {"missing": len(awaited), "pending_bytes": decoder.pending})
