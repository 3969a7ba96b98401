"""FPGA OIM board: wire protocol bytes, the driver against a scripted port, and the driver
against the board emulator over a real pty (and TCP, and the ``labep emulate`` CLI)."""

from __future__ import annotations

import math
import re
import signal
import struct
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import serial

from labep import registry
from labep.drivers import oim_wire as wire
from labep.drivers.oim_board import OIMBoard, OIMBoardOptions
from labep.hardware.bench import (
    Bench,
    BenchError,
    BenchFaultError,
    FaultReporting,
    Nudge,
    OutOfRangeError,
    Settle,
)
from labep.models.oim import LayeredOIM
from labep.run.engine import Trainer, final_params
from labep.run.validate import load_protocol
from labep.simulators.device import DeviceOptions
from labep.simulators.oim import OIMSimulator, OIMSimulatorOptions
from labep.simulators.oim_board_emulator import FaultSpec
from labep.store.runs import RunStore

from .conftest import PROTOCOLS

XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
SETTLE = Settle(1e-4, 2000)
STEP = 2 * math.pi / 65536

# -- an independent reference of the framing (from the document, not from oim_wire) --------


def crc_reference(data: bytes) -> int:
    """CRC-16/CCITT-FALSE, bit by bit."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def frame(command: int, seq: int, payload: bytes = b"") -> bytes:
    body = bytes([0xA5, 0x01]) + struct.pack("<H", len(payload)) + bytes([command, seq]) + payload
    return body + struct.pack("<H", crc_reference(body))


def ok(command: int, seq: int, payload: bytes = b"") -> bytes:
    return frame(command | 0x80, seq, payload)


def error(seq: int, code: int, command: int, text: bytes = b"") -> bytes:
    return frame(0xFF, seq, bytes([code, command]) + text)


def identify_payload(sizes: tuple[int, ...], bits: int = 8, coupling_range: float = 2.0,
                     bias_range: float = 1.5, bias_bits: int | None = None) -> bytes:
    return struct.pack("<B16s16s16s16sBBBBdd", 1, b"acme", b"oim-fpga", b"fw-2.1", b"SN0042",
                       bits, bits if bias_bits is None else bias_bits, 16, len(sizes),
                       coupling_range, bias_range) + struct.pack(f"<{len(sizes)}H", *sizes)


# -- a scripted pyserial port: the far end is a list of (expected write, reply) steps -------


class FarEnd:
    """What the driver wrote, and what it reads back: each write takes the next step."""

    def __init__(self, steps: list[tuple[bytes | None, bytes]] | None = None,
                 chunk: int = 65536) -> None:
        self.steps = list(steps or [])
        self.chunk = chunk
        self.written: list[bytes] = []
        self.mismatches: list[tuple[bytes, bytes]] = []
        self.pending = bytearray()
        self.opened = 0

    def on_write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        if not self.steps:
            return
        expected, reply = self.steps.pop(0)
        if expected is not None and bytes(data) != expected:
            self.mismatches.append((expected, bytes(data)))
            return
        self.pending += reply


FAR_ENDS: dict[str, FarEnd] = {}


class ScriptedPort:
    """The pyserial API the driver uses, over a :class:`FarEnd` (``labepscript://NAME``)."""

    def __init__(self, port: Any = None, **options: Any) -> None:
        self.port = port
        self.timeout = options.get("timeout")
        self.is_open = False

    def open(self) -> None:
        self.far = FAR_ENDS[self.port.split("://", 1)[1]]
        self.far.opened += 1
        self.is_open = True

    def close(self) -> None:
        self.is_open = False

    @property
    def in_waiting(self) -> int:
        return len(self.far.pending)

    def read(self, size: int = 1) -> bytes:
        if not self.far.pending:
            time.sleep(min(self.timeout or 0.0, 0.01))
        take = min(size, self.far.chunk, len(self.far.pending))
        data = bytes(self.far.pending[:take])
        del self.far.pending[:take]
        return data

    def write(self, data: bytes) -> int:
        self.far.on_write(data)
        return len(data)

    def reset_input_buffer(self) -> None:
        self.far.pending.clear()


_PACKAGE = types.ModuleType("labep_test_serial")
_PACKAGE.__path__ = []  # type: ignore[attr-defined]
_HANDLER = types.ModuleType("labep_test_serial.protocol_labepscript")
_HANDLER.Serial = ScriptedPort  # type: ignore[attr-defined]
sys.modules.setdefault("labep_test_serial", _PACKAGE)
sys.modules.setdefault("labep_test_serial.protocol_labepscript", _HANDLER)
if "labep_test_serial" not in serial.protocol_handler_packages:
    serial.protocol_handler_packages.append("labep_test_serial")

FAST = OIMBoardOptions(timeout=0.05, backoff=0.001, retries=2, poll_wait=0.1)


def scripted(name: str, steps: list[tuple[bytes | None, bytes]], *, sizes=(2, 4, 2),
             board_sizes=None, shil: float = 0.25, options: OIMBoardOptions = FAST,
             chunk: int = 65536) -> tuple[OIMBoard, FarEnd]:
    """A driver over a scripted port whose first steps answer open() (seq 1, 2, 3)."""
    opening = [
        (frame(0x01, 1), ok(0x01, 1, identify_payload(tuple(board_sizes or sizes)))),
        (frame(0x02, 2, struct.pack("<d", shil)), ok(0x02, 2)),
        (frame(0x03, 3), ok(0x03, 3)),
    ]
    far = FAR_ENDS[name] = FarEnd(opening + steps, chunk)
    board = OIMBoard(LayeredOIM(list(sizes), shil=shil), options,
                     resource=f"labepscript://{name}")
    return board, far


def kinds(board: OIMBoard) -> list[str]:
    return [fault.kind for fault in board.drain_faults()]


# -- wire ------------------------------------------------------------------------------------


def test_crc_and_the_documented_worked_examples() -> None:
    assert wire.crc16(b"123456789") == crc_reference(b"123456789") == 0x29B1
    # docs/oim-board-protocol.md, "Worked examples"
    assert wire.encode(wire.Command.IDENTIFY, 0) == bytes.fromhex("a5 01 00 00 01 00 59 35")
    configure = wire.encode(wire.Command.CONFIGURE, 0x2A, struct.pack("<d", 0.1))
    assert configure == bytes.fromhex("a5 01 08 00 02 2a 9a 99 99 99 99 99 b9 3f e4 73")
    document = (Path(__file__).resolve().parents[1] / "docs" / "oim-board-protocol.md")
    section = document.read_text().split("## 11. Worked examples")[1].split("## 12.")[0]
    examples = re.findall(r"\| `([0-9a-f ]+)` \|", section)
    assert len(examples) >= 14
    for text in examples:
        data = bytes.fromhex(text)
        assert crc_reference(data[:-2]) == struct.unpack("<H", data[-2:])[0], text
        (decoded,) = wire.FrameDecoder().feed(data)
        assert wire.encode(decoded.command, decoded.seq, decoded.payload) == data
    step = next(bytes.fromhex(t) for t in examples if t.startswith("a5 01 4d 00 28"))
    (decoded,) = wire.FrameDecoder().feed(step)
    request = wire.COMMANDS[wire.Command.RELAX_STEP].request.unpack(decoded.payload)
    assert (request["nudges"], request["batch"], request["nudged_steps"]) == (1, 2, 500)
    records = np.frombuffer(request.array.tobytes(), dtype=wire.step_request_dtype(1, 1))
    assert records["phases"][:, 0].tolist() == [math.pi, 0.0]
    assert records["target"][:, 0].tolist() == [1.0, -1.0]
    rng = np.random.default_rng(0)
    for _ in range(50):
        payload = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        command, seq = int(rng.integers(0, 256)), int(rng.integers(0, 256))
        assert wire.encode(command, seq, payload) == frame(command, seq, payload)


def test_decoder_skips_garbage_resyncs_after_bad_crc_and_reassembles_bytes() -> None:
    good = frame(0x81, 7, b"\x01\x02")
    corrupt = bytearray(frame(0x82, 8, b"\x05\x06\x07"))
    corrupt[7] ^= 0x40
    stream = b"\x00\xa5\x02junk" + bytes(corrupt) + good
    decoder = wire.FrameDecoder()
    found: list[Any] = []
    for byte in stream:  # one byte at a time: short reads
        found += decoder.feed(bytes([byte]))
    assert isinstance(found[0], wire.BadFrame) and (found[0].command, found[0].seq) == (0x82, 8)
    assert found[1] == wire.Frame(0x81, 7, b"\x01\x02")
    assert decoder.pending == 0 and decoder.skipped >= 7
    # a corrupt length holds a frame back until the gap expires; then it is found inside
    decoder = wire.FrameDecoder()
    assert decoder.feed(b"\xa5\x01\x00\x02\x10\x01" + good) == []  # claims 512 bytes
    assert decoder.expire() == [wire.Frame(0x81, 7, b"\x01\x02")]
    # a length beyond the maximum payload is not a frame
    assert wire.FrameDecoder().feed(b"\xa5\x01\xff\xff" + good) == [
        wire.Frame(0x81, 7, b"\x01\x02")]


def test_phase_and_parameter_codes() -> None:
    codes = wire.phases_to_codes(np.array([0.0, math.pi / 2, math.pi, 2 * math.pi - 1e-9,
                                           -STEP, 3 * STEP + 0.4 * STEP]))
    assert codes.tolist() == [0, 16384, 32768, 0, 65535, 3]
    assert wire.codes_to_phases(np.array([16384]))[0] == math.pi / 2
    assert wire.safe_code(8) == 127 and wire.code_value(127, 8, 2.0) == pytest.approx(-2 / 255)


def test_pack_bytes_is_pack_for_byte_arrays_and_refuses_other_layouts() -> None:
    relax = wire.COMMANDS[wire.Command.RELAX_BATCH].request
    records = np.zeros(3, dtype=wire.batch_request_dtype(2, 8, 2, 3))
    records["phases"], records["start"], records["target"] = 0.25, 513, -1.0
    fields = {"flags": 3, "batch": 3, "max_steps": 2000, "tolerance": 1e-4, "beta": 0.2,
              "wait_ms": 100}
    packed = relax.pack(np.frombuffer(records.tobytes(), dtype=np.uint8), **fields)
    assert relax.pack_bytes(records.tobytes(), **fields) == packed
    assert relax.unpack(packed).array.tobytes() == records.tobytes()
    for layout in (wire.COMMANDS[wire.Command.CLAMP].request,  # counted f64 array
                   wire.COMMANDS[wire.Command.READ_PHASES].reply,  # bitmap
                   wire.COMMANDS[wire.Command.STATUS].request):  # no array
        with pytest.raises(TypeError):
            layout.pack_bytes(b"", offset=0)


# -- the driver against a scripted port: bytes out, bytes in ---------------------------------


def test_open_identifies_configures_and_resets() -> None:
    board, far = scripted("open", [])
    identity = board.open()
    assert far.mismatches == []
    assert identity.as_dict() == {"vendor": "acme", "model": "oim-fpga", "serial": "SN0042",
                                  "firmware": "fw-2.1"}
    j1, h1 = board.spec.parameter("J1"), board.spec.parameter("h1")
    assert (j1.shape, j1.levels, j1.low, j1.high) == ((2, 4), 256, -2.0, 2.0)
    assert (h1.shape, h1.levels, h1.low, h1.high) == ((4,), 256, -1.5, 1.5)
    assert board.spec.parameter_names == ("J1", "J2", "h1", "h2", "g1", "g2")
    assert isinstance(board, Bench) and isinstance(board, FaultReporting)
    far.steps.append((frame(0x03, 4), ok(0x03, 4)))
    board.close()
    board.close()  # idempotent
    assert far.written[-1] == frame(0x03, 4) and len(far.written) == 4


def test_open_refuses_a_board_built_for_other_sizes() -> None:
    board, far = scripted("sizes", [(frame(0x03, 2), ok(0x03, 2))], board_sizes=(2, 8, 2))
    far.steps = far.steps[:1] + far.steps[3:]  # the driver RESETs (seq 2) instead of configuring
    with pytest.raises(BenchError, match=r"layer sizes \[2, 8, 2\] but the model has \[2, 4, 2\]"):
        board.open()
    assert far.written[-1] == frame(0x03, 2)  # left safe


def test_write_sends_block_frames_and_read_params_decodes_codes() -> None:
    codes = {"J1": np.arange(8).reshape(2, 4) + 100, "J2": np.arange(8).reshape(4, 2),
             "h1": np.array([1, 2, 3, 255]), "h2": np.array([0, 9]),
             "g1": np.array([5, 6, 7, 8]), "g2": np.array([126, 128])}
    blocks = [
        (0x10, struct.pack("<BIH", 1, 0, 8) + struct.pack("<8H", *codes["J1"].ravel())),
        (0x10, struct.pack("<BIH", 2, 0, 8) + struct.pack("<8H", *codes["J2"].ravel())),
        (0x11, struct.pack("<BBIH", 1, 1, 0, 4) + struct.pack("<4H", *codes["h1"])),
        (0x11, struct.pack("<BBIH", 1, 2, 0, 2) + struct.pack("<2H", *codes["h2"])),
        (0x11, struct.pack("<BBIH", 2, 1, 0, 4) + struct.pack("<4H", *codes["g1"])),
        (0x11, struct.pack("<BBIH", 2, 2, 0, 2) + struct.pack("<2H", *codes["g2"])),
    ]
    request = b"".join(frame(c, 4 + i, p) for i, (c, p) in enumerate(blocks))
    reply = b"".join(ok(c, 4 + i) for i, (c, _) in enumerate(blocks))
    selectors = [(0, 1, 8), (0, 2, 8), (1, 1, 4), (1, 2, 2), (2, 1, 4), (2, 2, 2)]
    reads = b"".join(frame(0x12, 10 + i, struct.pack("<BBIH", s, layer, 0, n))
                     for i, (s, layer, n) in enumerate(selectors))
    names = ["J1", "J2", "h1", "h2", "g1", "g2"]
    answers = b"".join(ok(0x12, 10 + i, struct.pack("<H", codes[name].size)
                          + codes[name].astype("<u2").tobytes())
                       for i, name in enumerate(names))
    board, far = scripted("write", [(request, reply), (reads, answers)])
    board.open()
    board.write(codes)
    back = board.read_params()
    assert far.mismatches == []
    for name in names:
        assert back[name].dtype == np.int64 and np.array_equal(back[name], codes[name])
    # unchanged codes are not sent again; a changed block is
    changed = {**codes, "h2": np.array([0, 10])}
    far.steps.append((frame(0x11, 16, struct.pack("<BBIH2H", 1, 2, 0, 2, 0, 10)),
                      ok(0x11, 16)))
    board.write(changed)
    assert far.mismatches == [] and len(far.written) == 6


def test_out_of_range_codes_are_refused_before_any_byte() -> None:
    board, far = scripted("range", [])
    board.open()
    sent = len(far.written)
    good = {"J1": np.full((2, 4), 3), "h2": np.zeros(2, dtype=int)}
    for bad in ({**good, "h2": np.array([0, 256])}, {**good, "J1": np.full((2, 4), -1)},
                {**good, "J1": np.full((2, 4), 2.5)}, {**good, "h2": np.array([0, np.nan])}):
        with pytest.raises(OutOfRangeError):
            board.write(bad)
    with pytest.raises(BenchError, match="shape"):
        board.write({**good, "J1": np.zeros((4, 2), dtype=int)})
    with pytest.raises(BenchError, match="no parameter"):
        board.write({"W1": np.zeros((2, 4), dtype=int)})
    assert len(far.written) == sent  # not one byte


def sample_frames(seq: int, x: np.ndarray, *, start: np.ndarray | None = None,
                  beta: float = 0.0, target: np.ndarray | None = None) -> bytes:
    """The pipelined requests of one sample of a 2-4-2 board (seq, seq + 1, ...)."""
    phases = np.arccos(np.clip(2 * x.astype(np.float32).astype(np.float64) - 1, -1, 1))
    clamp = struct.pack("<IH2d", 0, 2, *phases)
    if start is None:
        load = struct.pack("<BIH", 1, 0, 0)
    else:
        load = struct.pack("<BIH", 0, 0, 6) + struct.pack("<6H", *start)
    nudge = struct.pack("<dH", beta, 0 if target is None else 2) + (
        b"" if target is None else struct.pack("<2d", *target))
    parts = [(0x20, clamp), (0x21, load), (0x22, nudge), (0x23, struct.pack("<Id", 2000, 1e-4)),
             (0x24, struct.pack("<H", 100)), (0x25, struct.pack("<IH", 0, 6))]
    return b"".join(frame(c, seq + i, p) for i, (c, p) in enumerate(parts))


def sample_replies(seq: int, codes: list[int], *, state: int = 2, steps: int = 57,
                   residual: float = 3e-5, invalid: int = 0) -> bytes:
    status = struct.pack("<BIdI", state, steps, residual, 120)
    phases = struct.pack("<BH6H", int(invalid != 0), 6, *codes) + bytes([invalid])
    return (b"".join(ok(c, seq + i) for i, c in enumerate((0x20, 0x21, 0x22, 0x23)))
            + ok(0x24, seq + 4, status) + ok(0x25, seq + 5, phases))


def test_relax_pipelines_every_samples_frame_group_and_decodes_the_phases() -> None:
    x = np.array([[0.0, 1.0], [0.3, 0.7]])
    first, second = [0, 16384, 32768, 49152, 1, 65535], [10, 20, 30, 40, 50, 60]
    target = np.array([[1.0, -1.0], [-1.0, 1.0]])
    start = np.array([first, second]) * STEP
    steps = [  # one write a batch: every sample's group pipelined
        (sample_frames(4, x[0]) + sample_frames(10, x[1]),
         sample_replies(4, first) + sample_replies(10, second, state=3, steps=2000,
                                                   residual=0.5)),
        (sample_frames(16, x[0], start=np.array(first), beta=-0.2, target=target[0])
         + sample_frames(22, x[1], start=np.array(second), beta=-0.2, target=target[1]),
         sample_replies(16, first, invalid=0b100) + sample_replies(22, second)),
    ]
    board, far = scripted("relax", steps)
    board.open()
    free = board.relax(x, settle=SETTLE)
    assert far.mismatches == []
    assert free.state.dtype == np.float32
    assert np.array_equal(free.state, (np.array([first, second]) * STEP).astype(np.float32))
    assert free.converged.tolist() == [True, False]
    assert free.steps.tolist() == [57, 2000] and free.residual.tolist() == [3e-5, 0.5]
    assert free.info["board_seconds"] == pytest.approx(240e-6)
    assert kinds(board) == ["unsettled"]
    nudged = board.relax(x, Nudge(-0.2, target), start=start.astype(np.float32), settle=SETTLE)
    assert far.mismatches == []
    assert np.isnan(nudged.state[0, 2]) and np.isfinite(np.delete(nudged.state[0], 2)).all()
    assert nudged.converged.tolist() == [False, True]
    assert kinds(board) == ["invalid_readout"]


def test_short_reads_garbage_and_stale_replies_are_survived_and_logged() -> None:
    x = XOR[:1]
    codes = [1, 2, 3, 4, 5, 6]
    stale = ok(0x24, 2, struct.pack("<BIdI", 2, 1, 0.0, 1))  # an old STATUS reply
    steps = [(sample_frames(4, x[0]), b"\x17\xa5\x00noise" + stale + sample_replies(4, codes))]
    board, far = scripted("noisy", steps, chunk=3)  # three bytes a read
    board.open()
    result = board.relax(x, settle=SETTLE)
    assert far.mismatches == [] and result.converged.all()
    assert wire.phases_to_codes(result.state[0]).tolist() == codes
    faults = board.drain_faults()
    assert {f.kind for f in faults} == {"garbled", "stale"} and all(f.recovered for f in faults)
    assert all(f.instrument == "oim_board labepscript://noisy" for f in faults)


def test_a_corrupt_reply_is_retried_at_once_with_new_sequence_numbers() -> None:
    """Only the corrupt READ_PHASES is sent again (a new sequence number, no pause): after an
    acknowledged RUN and a settled STATUS it is an idempotent read of the same result."""
    x = XOR[:1]
    corrupt = bytearray(sample_replies(4, [9] * 6))
    corrupt[-5] ^= 0xFF  # inside the READ_PHASES reply
    phases = struct.pack("<BH6H", 0, 6, *[9] * 6) + b"\x00"
    steps = [(sample_frames(4, x[0]), bytes(corrupt)),
             (frame(0x25, 10, struct.pack("<IH", 0, 6)), ok(0x25, 10, phases))]
    board, far = scripted("crc", steps)
    board.open()
    started = time.perf_counter()
    result = board.relax(x, settle=SETTLE)
    assert time.perf_counter() - started < FAST.timeout  # no waiting for a timeout
    assert far.mismatches == [] and result.converged.all()
    faults = board.drain_faults()
    assert [f.kind for f in faults] == ["crc"] and faults[0].command == "READ_PHASES"


def test_busy_is_waited_out_and_the_request_re_sent() -> None:
    x = XOR[:1]
    busy = (error(4, 0x07, 0x20) + b"".join(error(4 + i, 0x07, c) for i, c in
                                            enumerate((0x21, 0x22, 0x23), start=1))
            + ok(0x24, 8, struct.pack("<BIdI", 1, 10, 1.0, 0)) + error(9, 0x07, 0x25))
    steps = [(sample_frames(4, x[0]), busy),
             (frame(0x24, 10, struct.pack("<H", 100)),
              ok(0x24, 10, struct.pack("<BIdI", 2, 10, 0.0, 5))),
             (sample_frames(11, x[0]), sample_replies(11, [7] * 6))]
    board, far = scripted("busy", steps)
    board.open()
    assert board.relax(x, settle=SETTLE).converged.all()
    assert far.mismatches == []
    assert kinds(board) == ["busy"]


def test_timeouts_exhaust_the_retries_then_raise_after_the_safe_state() -> None:
    board, far = scripted("silent", [])
    board.open()
    with pytest.raises(BenchFaultError) as caught:
        board.relax(XOR[:1], settle=SETTLE)
    fault = caught.value.fault
    assert (fault.kind, fault.command, fault.recovered) == ("timeout", "CLAMP", False)
    assert "after 3 attempt(s)" in fault.message
    logged = board.drain_faults()
    # per attempt its STATUS probe's timeout, then the attempt's (the last one is raised)
    assert [f.kind for f in logged] == ["timeout"] * 5 + ["safe_state"]
    assert [f.recovered for f in logged] == [True] * 5 + [False]
    assert [f.detail.get("probe", False) for f in logged[:5]] == [True, False] * 2 + [True]
    sent = [wire.FrameDecoder().feed(chunk) for chunk in far.written[3:]]
    # three attempts, then RESET, each followed by one STATUS probe at its deadline
    assert [len(frames) for frames in sent] == [6, 1, 6, 1, 6, 1, 1, 1]
    assert [sent[i][0].command for i in (1, 3, 5, 7)] == [wire.Command.STATUS] * 4
    assert sent[-2][0].command == wire.Command.RESET
    assert len({f.seq for frames in sent for f in frames}) == 23  # every frame a new number


def test_a_refusal_is_final_and_leaves_the_board_safe() -> None:
    x = XOR[:1]
    refused = (error(4, 0x05, 0x20, b"inputs[0:2] outside [0, 1)") + ok(0x21, 5) + ok(0x22, 6)
               + error(7, 0x08, 0x23) + ok(0x24, 8, struct.pack("<BIdI", 0, 0, 0.0, 0))
               + error(9, 0x09, 0x25))  # every request answered, as a board does
    board, far = scripted("refused", [(sample_frames(4, x[0]), refused),
                                      (frame(0x03, 10), ok(0x03, 10))])
    board.open()
    with pytest.raises(BenchFaultError, match=r"CLAMP: board refused CLAMP: BAD_BLOCK") as err:
        board.relax(x, settle=SETTLE)
    assert err.value.fault.kind == "error_frame"
    assert far.mismatches == [] and far.written[-1] == frame(0x03, 10)
    assert kinds(board) == []


# -- the driver against the emulator ---------------------------------------------------------


def board_codes(board: OIMBoard | OIMSimulator, seed: int = 0) -> dict[str, np.ndarray]:
    """Codes of labep's initial parameters (random codes near the middle)."""
    rng = np.random.default_rng(seed)
    return {spec.name: rng.integers(80, 176, spec.shape) for spec in board.spec.parameters}


def simulator(sizes: tuple[int, ...], shil: float, codes: dict[str, np.ndarray]
              ) -> OIMSimulator:
    """The simulator the emulated board must match: same bits, ranges, 16-bit readout."""
    sim = OIMSimulator(LayeredOIM(list(sizes), shil=shil), OIMSimulatorOptions(
        weight_range=2.0, bias_range=2.0,
        device=DeviceOptions(bits=8, readout_bits=16)))
    sim.write(codes)
    return sim


def run_epoch(board: OIMBoard | OIMSimulator, model: LayeredOIM) -> list[np.ndarray]:
    """Free, nudged +beta and nudged -beta phases of the XOR batch, twice."""
    target = model.encode_target(np.array([0, 1, 1, 0]))
    states = []
    for _ in range(2):
        free = board.relax(XOR, settle=SETTLE)
        states.append(free.state)
        for beta in (0.3, -0.3):
            states.append(board.relax(XOR, Nudge(beta, target), start=free.state,
                                      settle=SETTLE).state)
    return states


def test_simulator_relax_phases_is_relax_bit_for_bit() -> None:
    model = LayeredOIM([2, 4, 2], shil=0.2)
    sim = simulator((2, 4, 2), 0.2, board_codes(OIMSimulator(model), 1))
    x = np.random.default_rng(2).random((3, 2))
    a = sim.relax(x, settle=SETTLE)
    b = sim.relax_phases(model.input_phases(x.astype(np.float32)), settle=SETTLE)
    assert np.array_equal(a.state, b.state) and np.array_equal(a.steps, b.steps)


@pytest.mark.parametrize("requests", ["batch", "sample"])
def test_driver_and_emulator_match_the_simulator(emulator_factory, requests: str) -> None:
    """Both ways of relaxing a phase (RELAX_BATCH frames, six requests per sample) give the
    simulator's states, steps and residuals at the board's resolution, bit for bit."""
    emulator = emulator_factory((2, 8, 2))
    model = LayeredOIM([2, 8, 2], shil=0.1)
    board = OIMBoard(model, OIMBoardOptions(phase_requests=requests), resource=emulator.url)
    identity = board.open()
    assert identity.vendor == "labep" and identity.serial == emulator.board.serial
    codes = board_codes(board)
    board.write(codes)
    held = board.read_params()
    assert all(np.array_equal(held[name], codes[name]) for name in codes)
    sim = simulator((2, 8, 2), 0.1, codes)
    ours, theirs = run_epoch(board, model), run_epoch(sim, sim.model)
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(wire.phases_to_codes(a), wire.phases_to_codes(b))
        assert np.array_equal(a, b)  # the same float32 phases
    free = board.relax(XOR, settle=SETTLE)
    reference = sim.relax(XOR, settle=SETTLE)
    assert free.converged.all() and np.array_equal(free.steps, reference.steps)
    assert np.array_equal(free.residual, reference.residual)
    assert board.drain_faults() == []
    board.close()


def test_large_layers_go_in_several_block_frames(emulator_factory) -> None:
    """1100 inputs: CLAMP in 3 frames, J1 (3300 codes) in 2 blocks, windows of 8 KB."""
    sizes = (1100, 3, 2)
    emulator = emulator_factory(sizes)
    model = LayeredOIM(list(sizes), shil=0.1)
    board = OIMBoard(model, resource=emulator.url)
    board.open()
    codes = board_codes(board)
    codes["J1"] = np.random.default_rng(6).integers(125, 130, (1100, 3))  # weak input pull
    before = board.link_stats["frames_out"]
    board.write(codes)
    assert board.link_stats["frames_out"] - before == 2 + 5  # J1 in two blocks, 5 others
    assert all(np.array_equal(board.read_params()[k], v) for k, v in codes.items())
    x = np.random.default_rng(5).random((2, 1100))
    ours = board.relax(x, settle=SETTLE)
    theirs = simulator(sizes, 0.1, codes).relax(x, settle=SETTLE)
    assert np.array_equal(ours.state, theirs.state) and ours.converged.all()
    assert np.array_equal(ours.steps, theirs.steps)
    board.close()


@pytest.mark.parametrize(("requests", "every"), [("batch", 18), ("sample", 120)])
def test_reconnects_after_the_emulator_drops_the_link(emulator_factory, requests: str,
                                                      every: int) -> None:
    emulator = emulator_factory(faults=f"close_every={every}")
    model = LayeredOIM([2, 4, 2], shil=0.1)
    board = OIMBoard(model, OIMBoardOptions(backoff=0.005, phase_requests=requests),
                     resource=emulator.url)
    board.open()
    codes = board_codes(board)
    board.write(codes)
    reference = run_epoch(simulator((2, 4, 2), 0.1, codes), model)
    for _ in range(6):  # a drop needs about a dozen frames of restoring in between
        states = run_epoch(board, model)
        assert all(np.array_equal(a, b) for a, b in zip(states, reference, strict=True))
    assert emulator.stats.link_drops >= 3
    found = kinds(board)
    assert found.count("reconnect") == emulator.stats.link_drops
    assert "link_closed" in found
    assert all(np.array_equal(v, codes[k]) for k, v in board.read_params().items())
    board.close()


def test_retries_survive_garbled_dropped_and_delayed_frames(emulator_factory) -> None:
    emulator = emulator_factory(faults="garble=0.0005,drop=0.0005,delay=0.01:0.15")
    model = LayeredOIM([2, 4, 2], shil=0.1)
    options = OIMBoardOptions(timeout=0.06, backoff=0.001, retries=8, poll_wait=0.0)
    board = OIMBoard(model, options, resource=emulator.url)
    board.open()
    codes = board_codes(board)
    board.write(codes)
    states = run_epoch(board, model)
    reference = run_epoch(simulator((2, 4, 2), 0.1, codes), model)
    assert all(np.array_equal(a, b) for a, b in zip(states, reference, strict=True))
    faults = board.drain_faults()
    assert all(f.recovered for f in faults)
    assert {"timeout"} <= {f.kind for f in faults}
    assert {f.kind for f in faults} & {"crc", "garbled", "short_frame", "stale"}
    board.close()


def test_invalid_readout_and_unsettled_phases_are_not_converged(emulator_factory) -> None:
    model = LayeredOIM([2, 4, 2], shil=0.1)
    for faults, kind in (("nan=1.0", "invalid_readout"), ("never_settle=1.0", "unsettled")):
        emulator = emulator_factory(faults=faults)
        board = OIMBoard(model, resource=emulator.url)
        board.open()
        board.write(board_codes(board))
        result = board.relax(XOR, settle=SETTLE)
        assert not result.converged.any()
        found = board.drain_faults()
        assert [f.kind for f in found] == [kind] * 4
        assert [f.detail["sample"] for f in found] == [0, 1, 2, 3]
        if kind == "invalid_readout":
            assert np.isnan(result.state).sum() == 4
        else:
            assert (result.steps == 2000).all() and (result.residual >= 1e-3).all()
        board.close()


def _open_xor_board(emulator_factory) -> tuple:
    """An emulated 2-4-2 board, opened through the driver, with codes written."""
    emulator = emulator_factory()
    model = LayeredOIM([2, 4, 2], shil=0.1)
    board = OIMBoard(model, resource=emulator.url)
    board.open()
    board.write(board_codes(board))
    return emulator, model, board


def test_close_and_errors_leave_the_emulated_board_safe(emulator_factory) -> None:
    emulator, model, board = _open_xor_board(emulator_factory)
    target = model.encode_target(np.array([0, 1, 1, 0]))
    board.relax(XOR, Nudge(0.5, target), settle=SETTLE)
    assert not emulator.board.is_safe() and emulator.board.beta == 0.5
    with pytest.raises(ValueError):  # refused before a byte is sent: the board keeps its state
        board.relax(XOR[:, :1], settle=SETTLE)
    assert not emulator.board.is_safe()
    board.close()
    deadline = time.monotonic() + 2
    while not emulator.board.is_safe() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert emulator.board.is_safe()
    assert emulator.board.codes["J1"].max() == wire.safe_code(8) and emulator.board.beta == 0.0


def test_repeated_inputs_reuse_their_phases_and_changed_ones_do_not(emulator_factory) -> None:
    _, _, board = _open_xor_board(emulator_factory)
    x = XOR.copy()
    first = board.relax(x, settle=SETTLE)
    assert np.array_equal(board.relax(x, settle=SETTLE).state, first.state, equal_nan=True)
    x[0] = x[3]  # changed in place: the same array object, other bytes
    again = board.relax(x, settle=SETTLE)
    assert np.array_equal(again.state[0], first.state[3], equal_nan=True)
    assert np.array_equal(again.state[1:], first.state[1:], equal_nan=True)
    as32 = board.relax(XOR.astype(np.float32), settle=SETTLE)  # other dtype: other key
    assert np.array_equal(as32.state, first.state, equal_nan=True)
    bad = XOR.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        board.relax(bad, settle=SETTLE)
    with pytest.raises(ValueError, match="finite"):  # still refused when asked again
        board.relax(bad, settle=SETTLE)
    with pytest.raises(ValueError):  # its phases are not handed out for writing
        board._clamp_phases(XOR)[1][0, 0] = 0.0
    board.close()


def test_protocol_defined_safe_values_on_open_close_and_error(emulator_factory) -> None:
    """``bench.options.safe_values`` puts the named parameters at their safe value (RESET, then
    the writes) on open, after an error and on close; the rest stay at the zero code."""
    emulator = emulator_factory()
    model = LayeredOIM([2, 4, 2], shil=0.1)
    board = OIMBoard(model, OIMBoardOptions(safe_values={"J": 0.5, "h2": -0.25}),
                     resource=emulator.url)
    half, quarter = round(0.5 * 255 / 4 + 127.5), round(-0.25 * 255 / 4 + 127.5)

    def assert_safe() -> None:
        deadline = time.monotonic() + 2
        while emulator.board.beta != 0.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        codes = emulator.board.codes
        assert (codes["J1"] == half).all() and (codes["J2"] == half).all()
        assert (codes["h2"] == quarter).all() and (codes["h1"] == wire.safe_code(8)).all()
        assert (codes["g1"] == wire.safe_code(8)).all() and emulator.board.beta == 0.0

    board.open()
    assert_safe()
    held = board.read_params()
    assert (held["J1"] == half).all() and (held["h2"] == quarter).all()
    board.write(board_codes(board))
    target = model.encode_target(np.array([0, 1, 1, 0]))
    board.relax(XOR, Nudge(0.5, target), settle=SETTLE)
    assert emulator.board.beta == 0.5 and not (emulator.board.codes["J1"] == half).all()
    exchange, failed = board._link.exchange, []

    def fail_once(requests, *args, **kwargs):  # an unexpected OS error in the middle of a phase
        if not failed and any(command in (wire.Command.READ_PHASES, wire.Command.RELAX_BATCH)
                              for command, _ in requests):
            failed.append(True)
            raise OSError("the USB adapter went away")
        return exchange(requests, *args, **kwargs)

    board._link.exchange = fail_once
    with pytest.raises(OSError, match="USB adapter"):
        board.relax(XOR, Nudge(0.5, target), settle=SETTLE)
    assert failed
    assert_safe()
    board.relax(XOR, settle=SETTLE)  # the host re-sends its parameters before the next phase
    assert not (emulator.board.codes["J1"] == half).all()
    board.close()
    assert_safe()


def test_safe_values_are_checked_before_anything_is_written(emulator_factory) -> None:
    model = LayeredOIM([2, 4, 2], shil=0.1)
    with pytest.raises(BenchError, match=r"safe_values: no parameter 'K'.*J1, J2"):
        OIMBoard(model, OIMBoardOptions(safe_values={"K": 0.0}), resource="/dev/null")
    emulator = emulator_factory()
    board = OIMBoard(model, OIMBoardOptions(safe_values={"h": 3.0}), resource=emulator.url)
    with pytest.raises(OutOfRangeError, match=r"h1.*outside.*safe_values"):
        board.open()
    assert emulator.board.is_safe()


def test_tcp_transport_and_the_registry(emulator_factory) -> None:
    emulator = emulator_factory(transport="tcp")
    assert emulator.url.startswith("socket://127.0.0.1:")
    assert registry.bench_class("driver", "oim_board") is OIMBoard
    assert "oim_board" in registry.names("driver")
    assert "oim_board" not in registry.names("simulator")
    board = OIMBoard(LayeredOIM([2, 4, 2], shil=0.1), resource=emulator.url)
    board.open()
    board.write(board_codes(board))
    assert board.relax(XOR, settle=SETTLE).converged.all()
    board.close()


def test_fault_spec_syntax() -> None:
    spec = FaultSpec.parse("garble=0.01,drop=0.02,delay=0.05:0.4,close_every=200,nan=0.1")
    assert (spec.garble, spec.drop, spec.delay, spec.delay_seconds) == (0.01, 0.02, 0.05, 0.4)
    assert (spec.close_every, spec.never_settle, spec.nan) == (200, 0.0, 0.1)
    assert FaultSpec.parse("") == FaultSpec()
    for bad in ("garble", "garble=2", "wobble=0.1"):
        with pytest.raises(ValueError):
            FaultSpec.parse(bad)


def test_labep_emulate_oim_board_cli() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "labep.cli.main", "emulate", "oim-board", "--pty", "--sizes",
         "2-4-2", "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        path = process.stdout.readline().strip()
        board = OIMBoard(LayeredOIM([2, 4, 2], shil=0.1), resource=path)
        assert board.open().serial == "E2-4-2s1"
        board.write(board_codes(board))
        assert board.relax(XOR, settle=SETTLE).converged.all()
        board.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_training_through_a_faulty_board_ends_where_the_simulator_does(tmp_path,
                                                                       emulator_factory) -> None:
    """The shipped protocol, shortened, on the emulator behind a link that garbles bytes and
    drops the connection: every fault is recovered (or the phase retried by the engine) and
    the run's parameters are the simulator's, bit for bit."""
    emulator = emulator_factory((2, 8, 2), faults="garble=0.001,close_every=40",
                                transport="tcp")
    overrides = ["training.epochs=2", "dataset.repeats=2", "evaluation.every_epochs=1",
                 f"bench.resource={emulator.url}", "bench.options.timeout=0.1",
                 "bench.options.backoff=0.002", "bench.options.retries=5"]
    board_run = load_protocol(PROTOCOLS / "oim_board_xor.yaml", overrides)
    simulator_run = load_protocol(PROTOCOLS / "oim_xor.yaml", [
        *overrides[:3], "bench.options.weight_range=2.0", "bench.options.bias_range=2.0",
        "bench.options.device.bits=8", "bench.options.device.readout_bits=16"])
    with RunStore(tmp_path / "runs.db") as store:
        on_board = Trainer(board_run, store, progress=False).run()
        simulated = Trainer(simulator_run, store, progress=False).run()
        events = store.events(on_board.run_id)
        ours, theirs = (final_params(store, r.run_id) for r in (on_board, simulated))
    assert on_board.status == "completed" and on_board.steps == simulated.steps
    assert all(np.array_equal(ours[name], theirs[name]) for name in theirs)
    seen = {event["detail"]["fault"] for event in events if event["kind"] == "fault"}
    # a corrupted byte is a CRC failure or a garbled frame depending on where it lands (and
    # on timing, which moves the fault schedule over the frames): either is the noise
    assert {"reconnect", "link_closed"} <= seen and seen & {"crc", "garbled"}
    assert emulator.stats.link_drops >= 1 and emulator.stats.bad_frames >= 1


def test_xor_through_a_faulty_pty_link_learns_and_matches_the_simulator(
        tmp_path, emulator_factory) -> None:
    """The XOR protocol over a pty with about 1% of frames garbled, 1% of replies delayed
    beyond the timeout and one link closure per epoch (about 70 frames an epoch): it
    completes at 100%, every fault is in the store with its instrument and command, and its
    parameters are the fault-free simulator's bit for bit, so no update came from a bad phase."""
    emulator = emulator_factory((2, 8, 2), faults="garble=0.0003,delay=0.01:0.15,"
                                "close_every=70", transport="pty")
    epochs = ["training.epochs=10", "evaluation.every_epochs=5"]
    board_run = load_protocol(PROTOCOLS / "oim_board_xor.yaml", [
        *epochs, f"bench.resource={emulator.url}", "bench.options.timeout=0.05",
        "bench.options.backoff=0.002", "bench.options.retries=5"])
    simulator_run = load_protocol(PROTOCOLS / "oim_xor.yaml", [
        *epochs, "bench.options.weight_range=2.0", "bench.options.bias_range=2.0",
        "bench.options.device.bits=8", "bench.options.device.readout_bits=16"])
    with RunStore(tmp_path / "runs.db") as store:
        on_board = Trainer(board_run, store, progress=False).run()
        simulated = Trainer(simulator_run, store, progress=False).run()
        faults = [e for e in store.events(on_board.run_id) if e["kind"] == "fault"]
        ours, theirs = (final_params(store, r.run_id) for r in (on_board, simulated))
    assert on_board.status == "completed" and on_board.test_accuracy == 1.0
    assert all(np.array_equal(ours[name], theirs[name]) for name in theirs)
    kinds = {event["detail"]["fault"] for event in faults}
    assert {"link_closed", "reconnect", "timeout"} <= kinds and kinds & {"crc", "garbled"}
    assert all(event["detail"]["instrument"].startswith("oim_board ")
               and event["detail"]["command"] for event in faults)
    assert emulator.stats.link_drops >= 9 and emulator.stats.bad_frames >= 1


def test_a_killed_board_run_leaves_the_board_safe_on_reconnect_and_resumes(
        tmp_path, emulator_factory) -> None:
    """labep killed (SIGKILL) in the middle of a run on the board: the board keeps what the
    dead process last wrote until the driver's next connect puts it in its safe state; resume
    writes the committed parameters back before its first phase and ends where a run never
    interrupted ends."""
    import sqlite3

    import yaml

    overrides = ["training.epochs=4", "evaluation.every_epochs=2",
                 "training.checkpoint_every=2"]
    reference = emulator_factory((2, 8, 2), transport="tcp")
    clean = load_protocol(PROTOCOLS / "oim_board_xor.yaml",
                          [*overrides, f"bench.resource={reference.url}"])
    with RunStore(tmp_path / "clean.db") as store:
        expected = Trainer(clean, store, progress=False).run()
        expected_params = final_params(store, expected.run_id)

    emulator = emulator_factory((2, 8, 2), transport="tcp")
    doc = load_protocol(PROTOCOLS / "oim_board_xor.yaml",
                        [*overrides, f"bench.resource={emulator.url}"]).document
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(doc))
    store_path = tmp_path / "killed.db"
    process = subprocess.Popen([sys.executable, "-m", "labep.cli.main", "run", str(path), "--store",
                                str(store_path), "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    steps = 0
    while process.poll() is None and time.monotonic() < deadline and steps < 9:
        time.sleep(0.01)
        if store_path.exists():
            with sqlite3.connect(store_path) as db:
                try:
                    steps = db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
                except sqlite3.OperationalError:
                    steps = 0
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 9 <= steps < expected.steps, "the run was not killed in its middle"
    assert not emulator.board.is_safe()  # nobody told the board: it holds the last codes

    model = LayeredOIM([2, 8, 2], shil=0.1)
    board = OIMBoard(model, resource=emulator.url)
    board.open()  # the next connect resets the board
    assert emulator.board.is_safe()
    board.close()

    with RunStore(store_path) as store:
        (run,) = store.runs()
        assert run["status"] == "running" and run["resumable"]  # a dead owner: stale lock
        resumed = Trainer.resume(store, run["id"], progress=False)
        assert resumed.status == "completed" and resumed.test_accuracy == 1.0
        got = final_params(store, run["id"])
        steps_done = [s for (s,) in store.db.execute(
            "SELECT step FROM steps WHERE run_id = ? ORDER BY step", (run["id"],))]
    assert steps_done == list(range(1, expected.steps + 1))
    assert all(np.array_equal(got[name], expected_params[name]) for name in expected_params)


def test_a_pyserial_port_handed_in_is_the_boards_transport(emulator_factory) -> None:
    """A pyserial port object (not yet open) as ``transport``: the board opens it, relaxes as
    through a resource string, closes it, and reopens it when opened again."""
    import serial

    sizes = (2, 4, 2)
    emulator = emulator_factory(sizes)
    port = serial.serial_for_url(emulator.url, do_not_open=True)
    board = OIMBoard(LayeredOIM(list(sizes), shil=0.1), transport=port)
    assert not port.is_open  # construction touches nothing
    board.open()
    assert port.is_open and board.resource == emulator.url
    codes = board_codes(board)
    board.write(codes)
    x = np.array([[0.0, 1.0], [1.0, 1.0]])
    ours = board.relax(x, settle=SETTLE)
    theirs = simulator(sizes, 0.1, codes).relax(x, settle=SETTLE)
    assert np.array_equal(ours.state, theirs.state)
    board.close()
    assert not port.is_open
    board.open()
    assert port.is_open
    board.close()
    with pytest.raises(ValueError, match="exactly one"):
        OIMBoard(LayeredOIM(list(sizes), shil=0.1), resource=emulator.url, transport=port)


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_step_is_one_relax_step_request_with_the_phase_by_phase_states(
        emulator_factory, protocol: int) -> None:
    """On a protocol-3 board the free phase and both nudged phases of a step are one
    RELAX_STEP request whose states, steps and residuals are the simulator's phase by phase,
    bit for bit; a protocol-2 board declines (None: the engine relaxes phase by phase)."""
    emulator = emulator_factory((2, 8, 2), protocol=protocol)
    model = LayeredOIM([2, 8, 2], shil=0.1)
    board = OIMBoard(model, resource=emulator.url)
    board.open()
    codes = board_codes(board)
    board.write(codes)
    target = model.encode_target(np.array([0, 1, 1, 0]))
    nudges = [Nudge(0.3, target), Nudge(-0.3, target)]
    before = board.link_quality()["frames"]
    step = board.relax_step(XOR, nudges, SETTLE, SETTLE)
    sent = board.link_quality()["frames"] - before
    if protocol == 2:
        assert step is None and sent == 0
        board.close()
        return
    assert step is not None and sent == 1
    free, nudged = step
    sim = simulator((2, 8, 2), 0.1, codes)
    reference = sim.relax(XOR, settle=SETTLE)
    assert free.converged.all()
    for ours, theirs in [(free, reference), *(
            (got, sim.relax(XOR, nudge, start=reference.state, settle=SETTLE))
            for got, nudge in zip(nudged, nudges, strict=True))]:
        assert np.array_equal(ours.state, theirs.state)
        assert np.array_equal(ours.steps, theirs.steps)
        assert np.array_equal(ours.residual, theirs.residual)
    board.close()


def test_a_relax_step_nudges_only_the_samples_whose_free_phase_settled(
        emulator_factory) -> None:
    """A free phase cut short leaves some samples unsettled: RELAX_STEP nudges the others
    (from their free phases, as the engine would) and reports the rest SKIPPED; the driver
    returns nudged phases of the settled samples only, as relax() phase by phase would."""
    emulator = emulator_factory((2, 8, 2))
    model = LayeredOIM([2, 8, 2], shil=0.1)
    board = OIMBoard(model, resource=emulator.url)
    board.open()
    codes = board_codes(board)
    board.write(codes)
    sim = simulator((2, 8, 2), 0.1, codes)
    steps = np.sort(sim.relax(XOR, settle=SETTLE).steps)
    assert steps[1] < steps[-1]  # these codes settle XOR's samples after different times
    short = Settle(SETTLE.tolerance, int(steps[1]))
    target = model.encode_target(np.array([0, 1, 1, 0]))
    step = board.relax_step(XOR, [Nudge(0.3, target)], short, SETTLE)
    assert step is not None
    free, (nudged,) = step
    reference = sim.relax(XOR, settle=short)
    ok = reference.converged
    assert np.array_equal(free.converged, ok) and 0 < ok.sum() < 4
    expected = sim.relax(XOR[ok], Nudge(0.3, target[ok]), start=reference.state[ok],
                         settle=SETTLE)
    assert np.array_equal(nudged.state, expected.state) and nudged.converged.all()
    assert emulator.board.batch_result is not None
    skipped = emulator.board.batch_result["state"][4:] == wire.RunState.SKIPPED
    assert np.array_equal(skipped, ~ok)
    assert {f.kind for f in board.drain_faults()} == {"unsettled"}
    board.close()


def test_training_on_protocol_3_and_2_boards_ends_alike_with_fewer_requests(
        tmp_path, emulator_factory) -> None:
    """The engine hands a step to a protocol-3 board as RELAX_STEP frames: the same final
    parameters as phase by phase on a protocol-2 board, with fewer request frames."""
    runs = {}
    for protocol in (3, 2):
        emulator = emulator_factory((2, 8, 2), protocol=protocol, transport="tcp")
        loaded = load_protocol(PROTOCOLS / "oim_board_xor.yaml", [
            "training.epochs=1", "dataset.repeats=2", f"bench.resource={emulator.url}"])
        with RunStore(tmp_path / "runs.db") as store:
            result = Trainer(loaded, store, progress=False).run()
            assert result.status == "completed"
            runs[protocol] = (final_params(store, result.run_id),
                              store.summary(result.run_id)["link"]["frames"])
    (step_params, step_frames), (phase_params, phase_frames) = runs[3], runs[2]
    assert all(np.array_equal(step_params[k], phase_params[k]) for k in phase_params)
    assert step_frames < phase_frames


def test_the_loop_overhead_benchmark_runs_against_its_emulator() -> None:
    """benchmarks/loop_overhead.py starts the emulator and times phases (a smoke run: it once
    could not start the emulator); no timing is asserted."""
    import json

    done = subprocess.run([sys.executable, str(PROTOCOLS.parent / "benchmarks" /
                                               "loop_overhead.py"), "--phases", "3",
                           "--warmup", "1", "--bauds", "0", "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["rows"]
    assert row["frames_per_phase"] == 1.0 and row["unsettled"] == 0


def test_the_wire_time_model_never_beats_the_line_and_overlaps_the_emulators_python(
        emulator_factory: Any) -> None:
    """--latency-baud: a reply's last byte leaves no earlier than the request's and the reply's
    bytes at the line rate plus the board's physics after the request reached the emulator,
    and the emulator's own work on a request (here 5 ms more of it, not physics) does not add
    to that where the line time covers it, as a board parses and serializes while the bytes
    move."""
    baud = 20_000.0  # 0.5 ms a byte: a RELAX_BATCH pair is tens of ms
    emulator = emulator_factory((2, 8, 2), latency_baud=baud)
    handle = emulator.board.handle

    def slow_handle(command: int, payload: bytes) -> tuple[int, bytes]:
        time.sleep(0.005)
        return handle(command, payload)

    emulator.board.handle = slow_handle
    model = LayeredOIM([2, 8, 2], shil=0.1)
    board = OIMBoard(model, OIMBoardOptions(baudrate=int(baud)), resource=emulator.url)
    board.open()
    try:
        inputs = np.array([[0.0, 1.0], [1.0, 0.0]])
        board.relax(inputs)  # warm
        spare = []
        for _ in range(3):
            before, physics = board.link_stats, emulator.board.physics_seconds
            started = time.perf_counter()
            board.relax(inputs)
            wall = time.perf_counter() - started
            after = board.link_stats
            assert after["frames_out"] - before["frames_out"] == 1
            moved = (after["bytes_out"] - before["bytes_out"]
                     + after["bytes_in"] - before["bytes_in"])
            spare.append(wall - moved * 10.0 / baud - (emulator.board.physics_seconds - physics))
        assert min(spare) >= 0.0  # never faster than the line
        assert min(spare) < 0.005  # the 5 ms of the emulator's work hid in the line time
    finally:
        board.close()
