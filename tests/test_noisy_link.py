"""The OIM board driver on a noisy link: adaptive frame sizes, selective re-sends, no back-off
for a link that is in sync, an adaptive reply timeout and the link-quality counters."""

from __future__ import annotations

import math
import struct
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from labep.drivers import oim_board
from labep.drivers import oim_wire as wire
from labep.drivers.oim_board import OIMBoard, OIMBoardOptions, best_payload
from labep.drivers.oim_link import TIMEOUT_FLOOR, LinkQuality, SerialLink
from labep.hardware.bench import LinkReporting, Nudge, Settle
from labep.models.oim import LayeredOIM
from labep.simulators.oim_board_emulator import BoardEmulator

from .test_oim_board import SETTLE, XOR, frame, ok, sample_frames, sample_replies, scripted

KEYS = {"frames", "frames_in", "bytes_out", "bytes_in", "retries", "bytes_resent", "timeouts",
        "corrupt", "reconnects", "byte_error_rate", "frame_codes", "reply_timeout"}


@pytest.fixture
def emulator_factory(emulator_factory: Callable[..., BoardEmulator]
                     ) -> Callable[..., BoardEmulator]:
    """conftest's emulators, 2-8-2 over TCP by default."""

    def start(sizes: tuple[int, ...] = (2, 8, 2), faults: str = "", seed: int = 3
              ) -> BoardEmulator:
        return emulator_factory(sizes, faults, seed, transport="tcp")

    return start


def codes_for(board: OIMBoard, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {spec.name: rng.integers(80, 176, spec.shape) for spec in board.spec.parameters}


class Sleeps:
    """A stand-in for the driver's ``time`` module that records every sleep."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.perf_counter = time.perf_counter
        self.monotonic = time.monotonic

    def sleep(self, seconds: float) -> None:
        self.calls.append(seconds)
        time.sleep(seconds)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Sleeps:
    recorder = Sleeps()
    monkeypatch.setattr(oim_board, "time", types.SimpleNamespace(
        sleep=recorder.sleep, perf_counter=recorder.perf_counter, monotonic=recorder.monotonic))
    return recorder


# -- frame sizes -------------------------------------------------------------------------------


def test_best_payload_maximises_the_goodput_and_is_the_wire_maximum_on_a_clean_link() -> None:
    overhead, largest = 23, 4088
    for cost in (0.0, 100.0, math.inf):
        assert best_payload(0.0, overhead, largest, frame_cost=cost) == largest
        previous = largest
        for rate in (1e-7, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1):
            chosen = best_payload(rate, overhead, largest, frame_cost=cost)
            assert 16 <= chosen <= previous  # shrinks as the error rate rises
            previous = chosen
            # never past even odds of the frame pair coming back whole
            even = math.log(2) / -math.log1p(-rate) - overhead
            assert chosen <= max(16, even)

            def goodput(size: int, rate: float = rate, cost: float = cost) -> float:
                whole = (1 - rate) ** (size + overhead)
                return size * whole / (size + overhead + cost) if math.isfinite(cost) else (
                    size * whole)

            sizes = range(16, int(min(largest, max(16, even))) + 1)
            best = max(sizes, key=goodput)  # brute force over every allowed size
            assert goodput(chosen) >= goodput(best) * (1 - 1e-6)
            if 16 < best < sizes[-1]:
                assert abs(chosen - best) <= 1
    assert best_payload(1e-4, overhead, largest) == pytest.approx(math.sqrt(overhead / 1e-4),
                                                                  rel=0.1)
    assert best_payload(0.3, overhead, largest) == 16  # clamped at the minimum
    # a round trip that costs more than bytes: larger frames, up to about 1 / p
    assert best_payload(3e-4, overhead, largest, frame_cost=math.inf) > 2000
    sizes = [best_payload(3e-4, overhead, largest, frame_cost=cost)
             for cost in (0.0, 100.0, math.inf)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_frame_codes_follow_the_measured_error_rate() -> None:
    board = OIMBoard(LayeredOIM([2, 8, 2], shil=0.1), resource="/dev/null")
    largest = wire.COMMANDS[wire.Command.WRITE_COUPLINGS].request.max_count()
    quality = board._link.quality
    assert quality.error_rate == 0.0 and board.link_quality()["frame_codes"] == largest
    counts = []
    for _ in range(6):  # a link that garbles about one byte in a hundred
        quality.note_traffic(2000, 20)
        counts.append(board.link_quality()["frame_codes"])
    assert counts == sorted(counts, reverse=True) and counts[-1] < 40
    assert 0.005 < quality.error_rate < 0.01
    phases = board._frame_count(wire.Command.READ_PHASES)
    assert 2 <= phases < wire.COMMANDS[wire.Command.READ_PHASES].reply.max_count()
    for _ in range(200):  # then clean again: the estimate decays, the frames grow back
        quality.note_traffic(20000, 0)
    assert board.link_quality()["frame_codes"] > 1000


def test_the_error_rate_estimate_is_not_capped_by_the_frame_size() -> None:
    """On a link with 1% of bytes bad, 500-byte frame pairs fail 99% of the time: counted as
    one bad byte each the estimate would stay near 1 / 500; counted as their expected number
    given that they failed it converges to the rate."""
    rate, size, frames = 0.01, 500, 1000
    failures = round(frames * (1 - (1 - rate) ** size))
    naive, quality = LinkQuality(), LinkQuality()
    for _ in range(200):
        naive.note_traffic(frames * size, failures)
        quality.note_traffic(frames * size, failures, frames)
    assert naive.error_rate < 0.003
    assert quality.error_rate == pytest.approx(rate, rel=0.1)
    assert quality.corrupt == naive.corrupt == 200 * failures  # the count stays in frames


def test_a_step_stays_one_frame_where_round_trips_cost_more_than_bytes() -> None:
    """At about 3e-4 per byte (1% of frames) a 2-8-2 training step of four samples fits one
    RELAX_STEP frame pair over a socket (bytes take no line time: a round trip is what
    costs), while on a serial line with a negligible turnaround the goodput rule alone
    splits it; at 1% per byte the step is split on either."""
    model = LayeredOIM([2, 8, 2], shil=0.1)
    clamp, target = np.zeros((4, 2)), np.zeros((4, 2))
    settle = Settle(1e-4, 2000)
    plans = {}
    for resource in ("socket://127.0.0.1:1", "/dev/null"):
        board = OIMBoard(model, resource=resource)
        board._link.batch_record = wire.batch_result_dtype(model.state_size).itemsize
        board._link.quality.note_latency(1e-6)  # a turnaround of one microsecond
        board._link.quality.note_traffic(100_000, 30)
        assert 2e-4 < board._link.quality.error_rate < 4e-4
        plans[resource] = len(board._plan_steps(clamp, target, [0.1, -0.1], settle, settle))
        for _ in range(10):
            board._link.quality.note_traffic(10_000, 100)
        assert board._link.quality.error_rate > 5e-3
        assert len(board._plan_steps(clamp, target, [0.1, -0.1], settle, settle)) > 1
    assert board._link.frame_cost() == pytest.approx(1e-6 / 1e-5)  # 1 Mbaud: 10 us a byte
    assert plans == {"socket://127.0.0.1:1": 1, "/dev/null": 2}


def test_a_noisy_link_writes_smaller_blocks(emulator_factory) -> None:
    """The same write on a clean link goes in one frame per parameter; on a link that
    garbles 1% of the bytes J1 (2 x 200 codes) goes in many small blocks, and arrives."""
    sizes = (2, 200, 2)
    model = LayeredOIM(list(sizes), shil=0.1)
    clean = OIMBoard(model, resource=emulator_factory(sizes).url)
    noisy = OIMBoard(model, OIMBoardOptions(retries=5),
                     resource=emulator_factory(sizes, "garble=0.01").url)
    clean.open()
    noisy.open()
    codes = codes_for(clean)
    clean.write(codes)
    for _ in range(3):  # the estimate needs traffic to learn from
        noisy.write({k: (v + 1) % 256 for k, v in codes_for(noisy, 1).items()})
        noisy.write(codes)
    assert clean.link_quality()["frame_codes"] == 2044
    assert noisy.link_quality()["byte_error_rate"] > 0.003
    assert noisy.link_quality()["frame_codes"] < 100
    for board in (clean, noisy):
        held = board.read_params()
        assert all(np.array_equal(held[k], codes[k]) for k in codes)
    before = noisy.link_stats["frames_out"]
    noisy.write({**codes, "J1": (codes["J1"] + 1) % 256})
    assert noisy.link_stats["frames_out"] - before >= 400 // noisy._frame_count(
        wire.Command.WRITE_COUPLINGS)
    clean.close()
    noisy.close()


# -- selective re-sends ------------------------------------------------------------------------


def six_blocks(codes: dict[str, np.ndarray]) -> list[tuple[int, bytes]]:
    """The write of a whole 2-4-2 network (one frame per parameter)."""
    return [
        (0x10, struct.pack("<BIH", 1, 0, 8) + codes["J1"].astype("<u2").tobytes()),
        (0x10, struct.pack("<BIH", 2, 0, 8) + codes["J2"].astype("<u2").tobytes()),
        (0x11, struct.pack("<BBIH", 1, 1, 0, 4) + codes["h1"].astype("<u2").tobytes()),
        (0x11, struct.pack("<BBIH", 1, 2, 0, 2) + codes["h2"].astype("<u2").tobytes()),
        (0x11, struct.pack("<BBIH", 2, 1, 0, 4) + codes["g1"].astype("<u2").tobytes()),
        (0x11, struct.pack("<BBIH", 2, 2, 0, 2) + codes["g2"].astype("<u2").tobytes()),
    ]


def test_a_write_re_sends_only_the_blocks_whose_replies_failed(sleeps: Sleeps) -> None:
    codes = {"J1": np.arange(8).reshape(2, 4) + 100, "J2": np.arange(8).reshape(4, 2),
             "h1": np.array([1, 2, 3, 255]), "h2": np.array([0, 9]),
             "g1": np.array([5, 6, 7, 8]), "g2": np.array([126, 128])}
    blocks = six_blocks(codes)
    request = b"".join(frame(c, 4 + i, p) for i, (c, p) in enumerate(blocks))
    corrupt = bytearray(ok(0x11, 6))  # the h1 block's reply fails its CRC
    corrupt[-1] ^= 0x5A
    replies = (ok(0x10, 4) + ok(0x10, 5) + bytes(corrupt) + error(7, 0x01, 0x11)  # BAD_CRC
               + b"" + ok(0x11, 9))  # the g1 block's reply is lost
    steps = [(request, replies),
             (frame(*blocks[2][:1], 10, blocks[2][1]) + frame(*blocks[3][:1], 11, blocks[3][1])
              + frame(*blocks[4][:1], 12, blocks[4][1]),
              ok(0x11, 10) + ok(0x11, 11) + ok(0x11, 12))]
    board, far = scripted("selective", steps)
    board.open()
    before = board.link_quality()
    board.write(codes)
    assert far.mismatches == []
    quality = board.link_quality()
    assert quality["frames"] - before["frames"] == 6 + 3  # three blocks sent again, no more
    assert quality["retries"] == 3
    assert quality["bytes_resent"] == sum(wire.OVERHEAD + len(blocks[i][1]) for i in (2, 3, 4))
    assert quality["corrupt"] - before["corrupt"] == 3  # a CRC failure, BAD_CRC, a lost reply
    assert sorted(f.kind for f in board.drain_faults()) == ["crc", "crc", "lost_reply"]
    assert sleeps.calls == []  # the board was in sync: no pause at all


def error(seq: int, code: int, command: int) -> bytes:
    return frame(0xFF, seq, bytes([code, command]))


def test_an_ordered_sequence_is_re_sent_from_its_first_failure() -> None:
    """open() with safe values sends RESET and then their writes as an ordered sequence: a
    lost RESET reply sends RESET and every write after it again."""
    sizes = (2, 4, 2)
    half = round(0.5 * 255 / 4 + 127.5)
    writes = [(0x10, struct.pack("<BIH", 1, 0, 8) + np.full(8, half, "<u2").tobytes()),
              (0x10, struct.pack("<BIH", 2, 0, 8) + np.full(8, half, "<u2").tobytes())]
    first = frame(0x03, 3) + frame(*writes[0][:1], 4, writes[0][1]) + frame(
        *writes[1][:1], 5, writes[1][1])
    again = frame(0x03, 6) + frame(*writes[0][:1], 7, writes[0][1]) + frame(
        *writes[1][:1], 8, writes[1][1])
    board, far = scripted("ordered", [], sizes=sizes,
                          options=OIMBoardOptions(timeout=0.05, retries=2,
                                                  safe_values={"J": 0.5}))
    far.steps = [*far.steps[:2], (first, ok(0x10, 4) + ok(0x10, 5)),  # RESET's reply lost
                 (again, ok(0x03, 6) + ok(0x10, 7) + ok(0x10, 8))]
    board.open()
    assert far.mismatches == [] and far.steps == []
    assert board.link_quality()["retries"] == 3


def test_a_lost_run_reply_re_sends_load_nudge_and_run_but_not_the_clamp(sleeps: Sleeps
                                                                         ) -> None:
    """RUN's reply lost (the later replies came): the relaxation may have run, so LOAD_PHASES
    and SET_NUDGE go again with RUN, STATUS and READ_PHASES (its reads were of a relaxation
    that does not count); CLAMP was acknowledged and is not sent again."""
    x = XOR[1:2]
    codes = [3, 1, 4, 1, 5, 9]
    replies = sample_replies(4, [0] * 6)
    run_reply = ok(0x23, 7)
    group = sample_frames(4, x[0])
    parts = wire.FrameDecoder().feed(group)
    again = b"".join(wire.encode(p.command, 10 + i, p.payload) for i, p in enumerate(parts[1:]))
    status = struct.pack("<BIdI", 2, 57, 3e-5, 120)
    answers = (ok(0x21, 10) + ok(0x22, 11) + ok(0x23, 12) + ok(0x24, 13, status)
               + ok(0x25, 14, struct.pack("<BH6H", 0, 6, *codes) + b"\x00"))
    steps = [(group, replies.replace(run_reply, b"")), (again, answers)]
    board, far = scripted("lost_run", steps)
    board.open()
    result = board.relax(x, settle=SETTLE)
    assert far.mismatches == [] and far.steps == []
    assert wire.phases_to_codes(result.state[0]).tolist() == codes
    assert [f.kind for f in board.drain_faults()] == ["lost_reply"]
    assert board.link_quality()["retries"] == 5
    assert sleeps.calls == []


# -- pauses and the reply timeout --------------------------------------------------------------


def silent_read_steps(probe_reply: bytes) -> tuple[list[tuple[bytes | None, bytes]], list[int]]:
    """A sample whose READ_PHASES reply never comes, then the driver's STATUS probe (answered
    with ``probe_reply``), then READ_PHASES alone again (seq 11)."""
    codes = [9] * 6
    phases = ok(0x25, 11, struct.pack("<BH6H", 0, 6, *codes) + b"\x00")
    replies = sample_replies(4, codes)
    read_reply = ok(0x25, 9, struct.pack("<BH6H", 0, 6, *codes) + b"\x00")
    return [(sample_frames(4, XOR[0]), replies.replace(read_reply, b"")),
            (frame(0x24, 10, struct.pack("<H", 0)), probe_reply),
            (frame(0x25, 11, struct.pack("<IH", 0, 6)), phases)], codes


def test_a_timeout_probes_then_pauses_only_the_gap_timeout(sleeps: Sleeps) -> None:
    """The READ_PHASES reply never comes (nothing after it shows it was lost): at the reply
    timeout the driver sends one STATUS probe; that stays silent too, so it pauses the board's
    gap timeout (not the back-off) and re-sends only READ_PHASES."""
    steps, codes = silent_read_steps(b"")
    options = OIMBoardOptions(timeout=0.3, backoff=0.5, retries=2, poll_wait=0.1)
    board, far = scripted("silent_read", steps, options=options)
    board.open()
    started = time.perf_counter()
    result = board.relax(XOR[:1], settle=SETTLE)
    elapsed = time.perf_counter() - started
    assert far.mismatches == [] and far.steps == [] and result.converged.all()
    assert wire.phases_to_codes(result.state[0]).tolist() == codes
    assert sleeps.calls == [wire.GAP_TIMEOUT]
    faults = board.drain_faults()  # the probe's timeout, then the window's
    assert [(f.kind, f.detail.get("probe")) for f in faults] == [("timeout", True),
                                                                 ("timeout", None)]
    # the scripted port answers at once: the adaptive timeout is the floor (then doubled for
    # the probe), not the 0.3 s of the option each time
    assert TIMEOUT_FLOOR * 3 <= elapsed < 0.3 + TIMEOUT_FLOOR * 2
    quality = board.link_quality()
    assert quality["timeouts"] == 2 and quality["retries"] == 1


def test_an_answered_probe_shows_the_reply_was_lost_and_nothing_pauses(sleeps: Sleeps
                                                                        ) -> None:
    status = struct.pack("<BIdI", 2, 57, 3e-5, 120)
    steps, codes = silent_read_steps(ok(0x24, 10, status))
    board, far = scripted("probe_answered", steps)
    board.open()
    result = board.relax(XOR[:1], settle=SETTLE)
    assert far.mismatches == [] and far.steps == []
    assert wire.phases_to_codes(result.state[0]).tolist() == codes
    assert [f.kind for f in board.drain_faults()] == ["timeout", "lost_reply"]
    assert sleeps.calls == []  # the probe's answer shows the board is in sync


def test_the_reply_timeout_is_smoothed_rtt_plus_four_deviations_within_its_bounds() -> None:
    quality = LinkQuality()
    assert quality.reply_timeout(0.2) == 0.2  # no sample yet: the option
    for _ in range(20):
        quality.note_latency(0.001)
    assert quality.reply_timeout(0.2) == TIMEOUT_FLOOR  # a fast board: the floor
    assert math.isclose(TIMEOUT_FLOOR, wire.GAP_TIMEOUT)
    for sample in (0.05, 0.03, 0.06, 0.04) * 10:  # a slow one: SRTT + 4 RTTVAR
        quality.note_latency(sample)
    assert quality.srtt is not None
    assert quality.reply_timeout(10.0) == pytest.approx(quality.srtt + 4 * quality.rttvar)
    assert 0.04 < quality.srtt < 0.05 and quality.reply_timeout(10.0) > 0.06
    assert quality.reply_timeout(0.07) == 0.07  # never beyond the option
    base = quality.reply_timeout(10.0)
    quality.note_timeout()
    quality.note_timeout()
    assert quality.reply_timeout(10.0) == pytest.approx(4 * base)  # doubled per timeout
    quality.note_latency(0.045)
    assert quality.reply_timeout(10.0) < 2 * base and quality.timeouts == 2


# -- against the emulator ------------------------------------------------------------------


def relax_all(board: OIMBoard, model: LayeredOIM) -> list[np.ndarray]:
    target = model.encode_target(np.array([0, 1, 1, 0]))
    free = board.relax(XOR, settle=SETTLE)
    nudged = board.relax(XOR, Nudge(0.2, target), start=free.state, settle=SETTLE)
    return [free.state, nudged.state, free.steps, nudged.steps]


def test_write_and_relax_through_a_link_garbling_one_byte_in_a_hundred(emulator_factory
                                                                        ) -> None:
    """At 1% garbled bytes (most frame groups meet a fault) with the default options the
    writes and relaxations complete, with the codes and phases of a clean link, bit for
    bit; the counters say what happened."""
    model = LayeredOIM([2, 8, 2], shil=0.1)
    clean = OIMBoard(model, resource=emulator_factory().url)
    noisy = OIMBoard(model, resource=emulator_factory(faults="garble=0.01").url)
    outcomes = []
    for board in (clean, noisy):
        board.open()
        for seed in range(3):
            board.write(codes_for(board, seed))
        codes = codes_for(board, 7)
        board.write(codes)
        held = board.read_params()
        assert all(np.array_equal(held[k], codes[k]) for k in codes)
        outcomes.append(relax_all(board, model) + relax_all(board, model))
    for ours, theirs in zip(*outcomes, strict=True):
        assert np.array_equal(ours, theirs)
    quality = noisy.link_quality()
    assert set(quality) == KEYS and isinstance(noisy, LinkReporting)
    assert quality["retries"] > 10 and quality["corrupt"] > 10
    assert 0.003 < quality["byte_error_rate"] < 0.03
    assert quality["frames"] > clean.link_quality()["frames"]
    assert clean.link_quality()["retries"] == 0 and clean.link_quality()["corrupt"] == 0
    assert clean.link_quality()["byte_error_rate"] == 0.0
    faults = noisy.drain_faults()
    assert faults and all(f.recovered for f in faults)
    for board in (clean, noisy):
        board.close()


def test_link_quality_counts_frames_retries_and_reconnects(emulator_factory) -> None:
    emulator = emulator_factory(faults="garble=0.002,close_every=60")
    model = LayeredOIM([2, 8, 2], shil=0.1)
    board = OIMBoard(model, OIMBoardOptions(phase_requests="sample"), resource=emulator.url)
    assert set(board.link_quality()) == KEYS
    assert board.link_quality()["frames"] == 0
    board.open()
    board.write(codes_for(board))
    seen = [board.link_quality()]
    for _ in range(4):
        relax_all(board, model)
        seen.append(board.link_quality())
    frames = [q["frames"] for q in seen]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)  # it grows
    last = seen[-1]
    assert last["frames"] == board.link_stats["frames_out"]
    assert last["bytes_in"] == board.link_stats["bytes_in"]
    assert last["reconnects"] == emulator.stats.link_drops >= 2
    assert last["retries"] > 0 and last["bytes_resent"] > 0
    assert last["frames_in"] <= last["frames"]
    assert TIMEOUT_FLOOR <= last["reply_timeout"] <= board.options.timeout
    found = [f.kind for f in board.drain_faults()]
    assert found.count("reconnect") == last["reconnects"]
    board.close()


def test_a_clean_link_keeps_the_wire_maximum_and_sends_each_request_once(emulator_factory
                                                                          ) -> None:
    model = LayeredOIM([2, 8, 2], shil=0.1)
    emulator = emulator_factory()
    board = OIMBoard(model, resource=emulator.url)
    board.open()
    board.write(codes_for(board))
    relax_all(board, model)
    quality: dict[str, Any] = board.link_quality()
    assert quality["retries"] == quality["bytes_resent"] == quality["timeouts"] == 0
    assert quality["frame_codes"] == 2044 and quality["corrupt"] == 0
    assert quality["frames"] == quality["frames_in"] == emulator.stats.frames_in
    # the emulator answers in milliseconds: the timeout stays at (or, on a loaded machine,
    # near) its floor, far below the 0.2 s maximum
    assert TIMEOUT_FLOOR <= quality["reply_timeout"] < 2 * TIMEOUT_FLOOR
    board.close()


def test_a_dropped_socket_link_reopens_without_pyserials_pause(emulator_factory,
                                                               monkeypatch) -> None:
    """pyserial's socket:// handler sleeps 0.3 s in close(); the link closes the socket itself,
    so a reconnect costs a round trip (the socket is closed all the same)."""
    import serial.urlhandler.protocol_socket as handler

    slept: list[float] = []
    monkeypatch.setattr(handler.time, "sleep", slept.append)
    link = SerialLink(emulator_factory().url, 1_000_000)
    link.open()
    port = link.port
    sock = port._socket
    link.close()
    assert slept == [] and not port.is_open and sock.fileno() == -1
    link.open()  # and it opens again
    assert link.is_open
    link.close()
