"""Per-phase loop overhead of the FPGA OIM board driver against its emulator.

What is measured
----------------
One *phase* is one ``OIMBoard.relax`` of the XOR batch (4 samples) on a 2-8-2 layered OIM
board (the network of ``protocols/oim_xor.yaml``: K_s = 0.1, tolerance 1e-4, at most 2000
steps), through the driver (:mod:`labep.drivers.oim_board`) and the board emulator
(``labep emulate oim-board --pty``, a separate process, as a real board would be). Phases run
in cycles of three as symmetric EP does: free, nudged with beta = +0.2 and with beta = -0.2
(both from the free state), on labep's initial parameters written as 8-bit codes.

Each phase's wall time (time.perf_counter around ``relax``) is split into

``wire``      (bytes sent + bytes received) x 10 / baud, counted from the frames the driver
              actually sent and received (``OIMBoard.link_stats``); 0 at zero latency
``physics``   the board's integration time, as the board reports it in STATUS (the sum over
              the batch of ``elapsed_us``: the emulator times its simulator call)
``overhead``  the rest: labep's own framing, CRC, Python on both ends, and the pty's
              wake-ups (two processes handing bytes back and forth)

for each line rate given (default: zero latency, and 1 Mbaud through the emulator's
``--latency-baud 1000000``). The emulator's wire time model (docs/oim-board-protocol.md,
section 12) holds the reply until its last byte would be out: the request's bytes from when
it reached the emulator, the board's physics, the reply's bytes. Since 2026-12-07 the
emulator's own decoding of a request and packing of its reply overlap those modelled bytes
(a board's logic parses and serializes while the bytes move) instead of adding to them; the
overhead at a line rate is then the driver's Python, the pty hops both ways and the emulator's
write, plus any emulator Python the line time does not cover. Reported per phase: median and
mean over ``--phases`` phases after ``--warmup`` untimed ones. The targets are overhead <= 1 ms
per phase at zero latency and <= 5% of the wire time at 1 Mbaud.

    python benchmarks/loop_overhead.py
    python benchmarks/loop_overhead.py --phases 600 --bauds 0 115200 1000000

On a 2-core machine anything else running delays every wake-up of the two processes: the
load average is printed with the results; compare runs on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from machine import load_average, log

from labep.drivers.oim_board import OIMBoard, OIMBoardOptions
from labep.hardware.bench import Nudge, Settle
from labep.hardware.write_path import WritePath
from labep.models.oim import LayeredOIM
from labep.run.assembly import stream

XOR = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
LABELS = np.array([0, 1, 1, 0])


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used so far (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Figures:
    baud: float
    wall: np.ndarray
    wire: np.ndarray
    physics: np.ndarray
    frames: float
    bytes: float
    unsettled: int
    driver_cpu: float
    emulator_cpu: float | None

    @property
    def overhead(self) -> np.ndarray:
        return self.wall - self.wire - self.physics

    def row(self) -> dict[str, float]:
        out: dict[str, float] = {"baud": self.baud, "frames_per_phase": self.frames,
                                 "bytes_per_phase": self.bytes, "unsettled": self.unsettled,
                                 "driver_cpu_ms": self.driver_cpu * 1e3,
                                 "emulator_cpu_ms": float("nan") if self.emulator_cpu is None
                                 else self.emulator_cpu * 1e3}
        for name in ("wall", "wire", "physics", "overhead"):
            values = getattr(self, name) * 1e3
            out[f"{name}_median_ms"] = float(np.median(values))
            out[f"{name}_mean_ms"] = float(np.mean(values))
        return out


def start_emulator(baud: float) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "labep.cli.main", "emulate", "oim-board", "--pty",
               "--sizes", "2-8-2", "--bits", "8"]
    if baud:
        command += ["--latency-baud", f"{baud:g}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url:
        raise RuntimeError(f"the emulator did not start: {' '.join(command)}")
    return process, url


def measure(baud: float, phases: int, warmup: int) -> Figures:
    process, url = start_emulator(baud)
    model = LayeredOIM([2, 8, 2], shil=0.1)
    board = OIMBoard(model, OIMBoardOptions(baudrate=int(baud) if baud else 1_000_000),
                     resource=url)
    try:
        board.open()
        WritePath(board, model.init_params(stream(0, 0))).write_all()
        settle = Settle(1e-4, 2000)
        target = model.encode_target(LABELS)
        walls, wires, physics, frames, sizes = [], [], [], [], []
        unsettled = 0
        free = None
        cpu: dict[str, float | None] = {}
        for index in range(warmup + phases):
            if index == warmup:
                cpu = {"driver": time.process_time(), "emulator": process_cpu(process.pid)}
            kind = index % 3
            before = board.link_stats
            started = time.perf_counter()
            if kind == 0:
                result = free = board.relax(XOR, settle=settle)
            else:
                assert free is not None
                beta = 0.2 if kind == 1 else -0.2
                result = board.relax(XOR, Nudge(beta, target), start=free.state, settle=settle)
            wall = time.perf_counter() - started
            after = board.link_stats
            if index < warmup:
                continue
            moved = (after["bytes_out"] - before["bytes_out"]
                     + after["bytes_in"] - before["bytes_in"])
            walls.append(wall)
            wires.append(moved * 10.0 / baud if baud else 0.0)
            physics.append(result.info["board_seconds"])
            frames.append(after["frames_out"] - before["frames_out"])
            sizes.append(moved)
            unsettled += int(np.count_nonzero(~result.converged))
        driver_cpu = (time.process_time() - cpu["driver"]) / phases  # type: ignore[operator]
        emulator_end = process_cpu(process.pid)
        emulator_cpu = (None if emulator_end is None or cpu["emulator"] is None
                        else (emulator_end - cpu["emulator"]) / phases)
        faults = board.drain_faults()
        if faults:
            log(f"baud {baud:g}: {len(faults)} fault(s), first: {faults[0].message}")
    finally:
        board.close()
        process.terminate()
        process.wait(timeout=10)
    return Figures(baud, np.array(walls), np.array(wires), np.array(physics),
                   float(np.mean(frames)), float(np.mean(sizes)), unsettled, driver_cpu,
                   emulator_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", type=int, default=300, help="Timed phases per line rate.")
    parser.add_argument("--warmup", type=int, default=30, help="Untimed phases first.")
    parser.add_argument("--bauds", type=float, nargs="+", default=[0.0, 1_000_000.0],
                        help="Line rates of the emulator's wire model (0: no latency).")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    args = parser.parse_args()
    rows = []
    for baud in args.bauds:
        log(f"measuring {'zero latency' if not baud else f'{baud:g} baud'} ...")
        rows.append(measure(baud, args.phases, args.warmup).row())
    load = load_average()
    if args.json:
        print(json.dumps({"rows": rows, "load_average": load, "argv": sys.argv}, indent=2))
        return
    print(f"OIM board loop, one phase = relax of 4 XOR samples on 2-8-2 "
          f"({args.phases} phases, median / mean ms per phase)")
    print(f"{'line':>12} {'wall':>15} {'wire':>15} {'physics':>15} {'overhead':>15} "
          f"{'frames':>7} {'bytes':>7} {'cpu host':>9} {'cpu board':>9}")
    for row in rows:
        line = "no latency" if not row["baud"] else f"{row['baud']:g} Bd"
        cells = " ".join(f"{row[f'{n}_median_ms']:7.3f}/{row[f'{n}_mean_ms']:<7.3f}"
                         for n in ("wall", "wire", "physics", "overhead"))
        print(f"{line:>12} {cells} {row['frames_per_phase']:7.1f} {row['bytes_per_phase']:7.0f}"
              f" {row['driver_cpu_ms']:9.3f} {row['emulator_cpu_ms']:9.3f}")
    unsettled = sum(int(row["unsettled"]) for row in rows)
    if unsettled:
        print(f"({unsettled} unsettled samples)")
    print("cpu host / cpu board: CPU ms per phase of the driver's and of the emulator's process "
          "(the board's includes its physics)")
    print(f"load average {load if load is None else f'{load:.2f}'} (2 cores: above ~0.5 the "
          "figures are inflated by other work)")
    print("command: " + " ".join(["python", *sys.argv]))


if __name__ == "__main__":
    main()
