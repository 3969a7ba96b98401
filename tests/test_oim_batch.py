"""Protocol 2 of the OIM board: RELAX_BATCH and READ_BATCH, on the emulated board's registers
and through the driver (a whole phase in one frame; split frames; a noisy link; a board of
the first firmware)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from labep.drivers import oim_wire as wire
from labep.drivers.oim_board import OIMBoard, OIMBoardOptions
from labep.hardware.bench import Nudge
from labep.models.oim import LayeredOIM
from labep.simulators.oim_board_emulator import BoardConfig, EmulatedBoard

from .test_oim_board import SETTLE, XOR, board_codes, run_epoch, simulator

Command = wire.Command


def request(board: EmulatedBoard, command: Command, payload: bytes) -> tuple[int, bytes]:
    return board.handle(command, payload)


def relax_batch_payload(model: LayeredOIM, phases: np.ndarray, *, wait_ms: int,
                        beta: float = 0.0, target: np.ndarray | None = None,
                        flags: int | None = None) -> bytes:
    nudged = target is not None
    flags = (wire.BatchFlags.NUDGE if nudged else 0) if flags is None else flags
    dtype = wire.batch_request_dtype(model.input_size, model.state_size, model.output_size,
                                     flags)
    records = np.zeros(len(phases), dtype=dtype)
    records["phases"] = phases
    if nudged:
        records["target"] = target
    return wire.COMMANDS[Command.RELAX_BATCH].request.pack(
        np.frombuffer(records.tobytes(), dtype=np.uint8), flags=flags, batch=len(phases),
        max_steps=2000, tolerance=1e-4, beta=beta, wait_ms=wait_ms)


def results(payload: bytes, free: int) -> tuple[int, np.ndarray]:
    reply = wire.COMMANDS[Command.READ_BATCH].reply.unpack(payload)
    assert reply.array is not None
    return reply["state"], np.frombuffer(reply.array.tobytes(),
                                         dtype=wire.batch_result_dtype(free))


@pytest.fixture
def board() -> EmulatedBoard:
    board = EmulatedBoard(BoardConfig(sizes=(2, 4, 2), seed=3))
    configure = wire.COMMANDS[Command.CONFIGURE].request.pack(shil=0.1)
    assert request(board, Command.CONFIGURE, configure)[0] == Command.CONFIGURE | 0x80
    return board


def test_relax_batch_results_are_each_samples_run(board: EmulatedBoard) -> None:
    """RELAX_BATCH's result records equal the RUN of each sample on its own (same codes,
    steps, residual), and the registers afterwards hold the last sample's context."""
    model = board.model
    phases = model.input_phases(np.array([[0.0, 1.0], [1.0, 1.0], [0.3, 0.8]]))
    target = np.array([[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0]])
    code, payload = request(board, Command.RELAX_BATCH, relax_batch_payload(
        model, phases, wait_ms=100, beta=0.2, target=target))
    assert code == Command.RELAX_BATCH | 0x80
    state, records = results(payload, model.state_size)
    assert len(records) == 3 and state in (wire.RunState.SETTLED, wire.RunState.UNSETTLED)
    assert np.array_equal(board.clamp, phases[-1]) and board.beta == 0.2
    for index in range(3):
        single = EmulatedBoard(BoardConfig(sizes=(2, 4, 2), seed=3))
        single.configured, single.shil, single.model.shil = True, 0.1, 0.1
        single.clamp, single.clamped = phases[index].copy(), True
        single.beta, single.target = 0.2, target[index].copy()
        single.pending = (2000, 1e-4)
        single.integrate()
        assert np.array_equal(records["codes"][index], single.result)
        assert records["steps"][index] == single.steps
        assert records["residual"][index] == single.residual
        assert records["state"][index] == single.run_state
    # READ_BATCH reads the same records back, in blocks
    read = wire.COMMANDS[Command.READ_BATCH].request.pack(wait_ms=0, offset=1, count=2)
    _, again = results(request(board, Command.READ_BATCH, read)[1], model.state_size)
    assert np.array_equal(again["codes"], records["codes"][1:])


def test_relax_batch_without_wait_answers_running_and_read_batch_waits(
        board: EmulatedBoard) -> None:
    model = board.model
    phases = model.input_phases(np.array([[0.0, 1.0], [1.0, 0.0]]))
    _, payload = request(board, Command.RELAX_BATCH,
                            relax_batch_payload(model, phases, wait_ms=0))
    assert results(payload, model.state_size)[0] == wire.RunState.RUNNING
    assert len(results(payload, model.state_size)[1]) == 0
    layout = wire.COMMANDS[Command.READ_BATCH].request
    polled = request(board, Command.READ_BATCH, layout.pack(wait_ms=0, offset=0, count=2))
    assert results(polled[1], model.state_size)[0] == wire.RunState.RUNNING
    # while it runs only IDENTIFY, RESET, STATUS and READ_BATCH are served
    clamp = wire.COMMANDS[Command.CLAMP].request.pack(np.zeros(2), offset=0)
    refused = request(board, Command.CLAMP, clamp)
    assert refused[0] == wire.ERROR and wire.parse_error(refused[1])[0] == wire.ErrorCode.BUSY
    waited = request(board, Command.READ_BATCH, layout.pack(wait_ms=100, offset=0, count=2))
    state, records = results(waited[1], model.state_size)
    assert state != wire.RunState.RUNNING and len(records) == 2


@pytest.mark.parametrize(("change", "error"), [
    ("flags", wire.ErrorCode.BAD_VALUE), ("beta", wire.ErrorCode.BAD_VALUE),
    ("length", wire.ErrorCode.BAD_LENGTH), ("nan", wire.ErrorCode.BAD_VALUE),
    ("configure", wire.ErrorCode.NOT_CONFIGURED)])
def test_relax_batch_refusals(board: EmulatedBoard, change: str, error: wire.ErrorCode) -> None:
    model = board.model
    phases = model.input_phases(np.array([[0.0, 1.0]]))
    payload = relax_batch_payload(model, phases, wait_ms=100)
    if change == "flags":
        payload = relax_batch_payload(model, phases, wait_ms=100, flags=0x04)
    elif change == "beta":  # a nudge strength without targets
        payload = relax_batch_payload(model, phases, wait_ms=100, beta=0.5)
    elif change == "length":
        payload = payload[:-1]
    elif change == "nan":
        payload = relax_batch_payload(model, np.array([[math.nan, 0.0]]), wait_ms=100)
    else:
        board.power_on()
    code, reply = request(board, Command.RELAX_BATCH, payload)
    assert code == wire.ERROR and wire.parse_error(reply)[0] == error
    assert board.pending is None and board.batch_result is None


def test_read_batch_needs_a_batch_and_a_range(board: EmulatedBoard) -> None:
    layout = wire.COMMANDS[Command.READ_BATCH].request
    code, reply = request(board, Command.READ_BATCH, layout.pack(wait_ms=0, offset=0, count=1))
    assert code == wire.ERROR and wire.parse_error(reply)[0] == wire.ErrorCode.NO_RESULT
    phases = board.model.input_phases(np.array([[0.0, 1.0]]))
    request(board, Command.RELAX_BATCH, relax_batch_payload(board.model, phases, wait_ms=100))
    code, reply = request(board, Command.READ_BATCH, layout.pack(wait_ms=0, offset=0, count=2))
    assert code == wire.ERROR and wire.parse_error(reply)[0] == wire.ErrorCode.BAD_BLOCK
    request(board, Command.RESET, b"")
    code, reply = request(board, Command.READ_BATCH, layout.pack(wait_ms=0, offset=0, count=1))
    assert wire.parse_error(reply)[0] == wire.ErrorCode.NO_RESULT


def test_a_protocol_one_board_knows_no_batch_and_the_driver_uses_groups(
        emulator_factory) -> None:
    from labep.simulators.oim_board_emulator import BoardEmulator

    old = EmulatedBoard(BoardConfig(sizes=(2, 4, 2), protocol=1))
    code, reply = old.handle(Command.RELAX_BATCH, b"")
    assert code == wire.ERROR and wire.parse_error(reply)[0] == wire.ErrorCode.UNKNOWN_COMMAND
    emulator = BoardEmulator(BoardConfig(sizes=(2, 4, 2), seed=3, protocol=1))
    emulator.start()
    try:
        model = LayeredOIM([2, 4, 2], shil=0.1)
        board = OIMBoard(model, resource=emulator.url)
        board.open()
        assert board.board is not None and board.board.protocol == 1
        codes = board_codes(board)
        board.write(codes)
        before = board.link_stats["frames_out"]
        free = board.relax(XOR, settle=SETTLE)
        assert board.link_stats["frames_out"] - before == 6 * len(XOR)
        reference = simulator((2, 4, 2), 0.1, codes).relax(XOR, settle=SETTLE)
        assert np.array_equal(free.state, reference.state)
        board.close()
    finally:
        emulator.close()


def test_a_phase_is_one_frame_and_a_large_batch_several(emulator_factory) -> None:
    """The XOR batch relaxes in one request frame; 300 inputs (2,400-byte records: one a
    frame) take one frame a sample; both give the simulator's states."""
    emulator = emulator_factory((2, 4, 2))
    model = LayeredOIM([2, 4, 2], shil=0.1)
    board = OIMBoard(model, resource=emulator.url)
    board.open()
    codes = board_codes(board)
    board.write(codes)
    before = board.link_stats["frames_out"]
    states = run_epoch(board, model)
    assert board.link_stats["frames_out"] - before == 6  # six phases, one frame each
    reference = run_epoch(simulator((2, 4, 2), 0.1, codes), model)
    assert all(np.array_equal(a, b) for a, b in zip(states, reference, strict=True))
    board.close()

    wide = emulator_factory((300, 3, 2))
    model = LayeredOIM([300, 3, 2], shil=0.1)
    board = OIMBoard(model, resource=wide.url)
    board.open()
    codes = board_codes(board)
    codes["J1"] = np.random.default_rng(6).integers(125, 130, (300, 3))
    board.write(codes)
    x = np.random.default_rng(5).random((3, 300))
    target = model.encode_target(np.array([0, 1, 0]))
    before = board.link_stats["frames_out"]
    ours = board.relax(x, Nudge(0.2, target), settle=SETTLE)
    assert board.link_stats["frames_out"] - before == 3
    theirs = simulator((300, 3, 2), 0.1, codes).relax(x, Nudge(0.2, target), settle=SETTLE)
    assert np.array_equal(ours.state, theirs.state)
    assert np.array_equal(ours.steps, theirs.steps)
    board.close()


def test_garbled_batch_frames_are_sent_again_and_change_nothing(emulator_factory) -> None:
    emulator = emulator_factory((2, 4, 2), faults="garble=0.003,drop=0.001")
    model = LayeredOIM([2, 4, 2], shil=0.1)
    board = OIMBoard(model, OIMBoardOptions(retries=6, backoff=0.001), resource=emulator.url)
    board.open()
    codes = board_codes(board)
    board.write(codes)
    reference = run_epoch(simulator((2, 4, 2), 0.1, codes), model)
    for _ in range(4):
        states = run_epoch(board, model)
        assert all(np.array_equal(a, b) for a, b in zip(states, reference, strict=True))
    assert board.link_quality()["retries"] > 0
    commands = {fault.command for fault in board.drain_faults()}
    assert "RELAX_BATCH" in commands
    board.close()


def test_a_very_noisy_link_falls_back_to_the_six_request_groups(emulator_factory) -> None:
    """At about 1% of bytes in error one sample's RELAX_BATCH pair mostly fails: the phase
    goes as per-sample groups (small frames, re-sent selectively); a clean estimate goes back
    to one frame a phase."""
    emulator = emulator_factory((2, 4, 2))
    model = LayeredOIM([2, 4, 2], shil=0.1)
    board = OIMBoard(model, resource=emulator.url)
    board.open()
    board.write(board_codes(board))
    board._link.quality.note_traffic(20_000, 200)  # the link measured 1% of bytes in error
    before = board.link_stats["frames_out"]
    board.relax(XOR, settle=SETTLE)
    assert board.link_stats["frames_out"] - before == 6 * len(XOR)
    board._link.quality = type(board._link.quality)()  # a fresh, clean estimate
    before = board.link_stats["frames_out"]
    board.relax(XOR, settle=SETTLE)
    assert board.link_stats["frames_out"] - before == 1
    board.close()
