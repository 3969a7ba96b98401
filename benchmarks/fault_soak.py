"""Soak: the FPGA board protocol under a grid of link faults, against the simulator.

What is run
-----------
``protocols/oim_board_xor.yaml`` (2-8-2 layered OIM, XOR, 30 epochs, 480 steps), as shipped,
on the board emulator (``labep.simulators.oim_board_emulator``) in a separate process, over a
loopback TCP socket, once per fault specification of the grid (the emulator's ``--faults``
syntax, docs/oim-board-protocol.md section 12); and once on the ``oim`` simulator with the
board's resolution (``protocols/oim_xor.yaml`` with weight_range 2, bias_range 2,
device.bits 8, device.readout_bits 16), the peer every board run must end at. Every run keeps
a snapshot of the codes at every step (``training.checkpoint_every: 1``).

What is printed, per fault specification
----------------------------------------
``done``       the run completed
``seconds``    wall time of ``Trainer.run`` (the emulator's start-up excluded), and its ratio
               to the fault-free board run's
``bad upd``    updates not explained by the store: steps at which the board's codes leave the
               simulator's although they agreed before the step and the step recorded no
               left-out or skipped sample and no deferred or re-synced write (must be 0)
``oor``        writes the board refused as out of range (OUT_OF_RANGE replies; must be 0)
``dist``       final distance to the simulator's codes: channels that differ, and the largest
               difference in codes (LSB); 0 / 0 is "the simulator's final parameters"
``diverged``   the first step whose codes differ, and why (the events of that step)
``link``       the driver's link-quality counters (frames, retries, bytes resent, reconnects,
               timeouts) and the emulator's injected faults (bad frames, link drops)

    python benchmarks/fault_soak.py
    python benchmarks/fault_soak.py --faults "garble=0.001" "garble=0.01,close_every=300"
    python benchmarks/fault_soak.py --faults "garble=0.0003,delay=0.01:0.5,close_every=third"
    python benchmarks/fault_soak.py --epochs 5 --json

The default grid: clean; garble (1e-4, 3e-4, 1e-3, 1e-2 per byte); README's example
(garble=0.01,delay=0.01:0.5,close_every=300); the target set "1% of frames, 1% delayed
replies, 3 link drops per run" (garble=0.0003,delay=0.01:S for S = 0.05, 0.1, 0.2 and 0.5,
close_every chosen from the clean run's request frames for 3 or more drops); dropped bytes;
phases that never settle and NaN readouts. The emulator's ``delay`` blocks the board S
seconds, so a run cannot be faster than (delayed replies) x S: the benchmark prints that bound
beside the time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import load_average, log

from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

REPO = Path(__file__).resolve().parents[1]
BOARD = REPO / "protocols" / "oim_board_xor.yaml"
SIMULATOR = REPO / "protocols" / "oim_xor.yaml"
PEER = ["bench.options.weight_range=2.0", "bench.options.bias_range=2.0",
        "bench.options.device.bits=8", "bench.options.device.readout_bits=16"]
#: step events that explain a departure from the simulator's trajectory
EXPLAINED = {"unsettled", "skipped", "deferred", "resynced"}


def serve(faults: str, seed: int, conn: Any) -> None:
    """The emulator process: serve on a free TCP port; send its URL, then on request its
    statistics."""
    from labep.simulators.oim_board_emulator import BoardConfig, BoardEmulator, FaultSpec

    emulator = BoardEmulator(BoardConfig(sizes=(2, 8, 2), bits=8, seed=seed),
                             transport="tcp", port=0, faults=FaultSpec.parse(faults))
    conn.send(emulator.start())
    conn.recv()  # stop
    emulator.close()
    stats = emulator.stats
    conn.send({"frames_in": stats.frames_in, "bad_frames": stats.bad_frames,
               "link_drops": stats.link_drops, "delayed": stats.delayed,
               "out_of_range": emulator.board.refusals.get("OUT_OF_RANGE", 0),
               "refusals": dict(emulator.board.refusals)})


def codes_by_step(store: RunStore, run_id: str, steps: int) -> list[dict[str, np.ndarray]]:
    out = []
    for step in range(steps + 1):
        found = store.arrays(run_id, "codes", step=step)
        out.append({} if found is None else found[1])
    return out


def equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return bool(a) and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def run_board(faults: str, overrides: list[str], seed: int, store: RunStore
              ) -> dict[str, Any]:
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=serve, args=(faults, seed, child), daemon=True)
    process.start()
    url = parent.recv()
    protocol = load_protocol(BOARD, [*overrides, f"bench.resource={url}"])
    started = time.perf_counter()
    try:
        result = Trainer(protocol, store, progress=False).run()
        status, run_id, error = result.status, result.run_id, None
    except Exception as err:  # a run that did not complete is a figure too
        status, run_id, error = "failed", store.runs()[-1]["id"], f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - started
    parent.send("stop")
    emulator = parent.recv()
    process.join(timeout=30)
    return {"faults": faults or "none", "status": status, "run_id": run_id, "error": error,
            "seconds": seconds, "emulator": emulator}


def judge(row: dict[str, Any], store: RunStore, reference: list[dict[str, np.ndarray]]) -> None:
    """Bad updates, the first divergence and the final distance, from the stored codes."""
    run_id = row["run_id"]
    summary = store.summary(run_id)
    steps = summary["steps"]
    ours = codes_by_step(store, run_id, steps)
    events: dict[int, set[str]] = {}
    for event in store.events(run_id):
        events.setdefault(event["step"], set()).add(event["kind"])
    bad, diverged = 0, None
    for step in range(1, min(steps, len(reference) - 1) + 1):
        if equal(ours[step], reference[step]):
            continue
        why = sorted(events.get(step, set()) & EXPLAINED)
        if equal(ours[step - 1], reference[step - 1]) and not why:
            bad += 1
        if diverged is None:
            diverged = (step, why)
    final = ours[steps] if steps < len(ours) else {}
    last = reference[-1]
    if final and final.keys() == last.keys():
        differ = sum(int(np.count_nonzero(final[k] != last[k])) for k in last)
        worst = max(int(np.max(np.abs(final[k] - last[k]))) for k in last)
    else:
        differ, worst = -1, -1
    link = summary["link"]
    row.update(steps=steps, bad_updates=bad, diverged=diverged, differ=differ, worst=worst,
               link=link, test_accuracy=summary["metrics"].get("test_accuracy"),
               samples=summary["samples"])


def delay_seconds(faults: str) -> tuple[float, float]:
    """(probability, seconds) of the spec's delay fault, (0, 0) without one: the board is
    blocked S seconds per delayed reply, so a run takes at least (delayed replies) x S."""
    for part in faults.split(","):
        if part.startswith("delay="):
            prob, _, seconds = part[len("delay="):].partition(":")
            return float(prob), float(seconds or 0.5)
    return 0.0, 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", nargs="*", help="Fault specifications (default: the grid); "
                        "close_every=third: a third of the clean run's request frames.")
    parser.add_argument("--epochs", type=int, help="training.epochs (default: the protocol's).")
    parser.add_argument("--seed", type=int, default=1, help="The emulator's fault seed.")
    parser.add_argument("--json", action="store_true", help="Print JSON rows.")
    args = parser.parse_args()
    overrides = ["training.checkpoint_every=1"]
    if args.epochs:
        overrides += [f"training.epochs={args.epochs}",
                      f"evaluation.every_epochs={min(args.epochs, 5)}"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder, RunStore(Path(folder) / "soak.db") as store:
        peer = Trainer(load_protocol(SIMULATOR, [*overrides, *PEER]), store,
                       progress=False).run()
        reference = codes_by_step(store, peer.run_id, peer.steps)
        log(f"simulator: {peer.steps} steps, test accuracy {peer.test_accuracy}")
        clean = run_board("", overrides, args.seed, store)
        judge(clean, store, reference)
        rows.append(clean)
        frames = int(clean["link"].get("frames", clean["emulator"]["frames_in"]))
        # faults add re-sent and smaller frames (about 1.4 x at 3e-4 per byte): a drop every
        # third of the clean run's frames gives 3 or 4 drops a run
        drops3 = max(frames // 3, 1)
        log(f"clean board run: {clean['seconds']:.1f} s, {frames} request frames "
            f"(close_every={drops3}: 3 or more link drops)")
        grid = [spec.replace("close_every=third", f"close_every={drops3}")
                for spec in args.faults] if args.faults is not None else [
            "garble=0.0001", "garble=0.0003", "garble=0.001", "garble=0.01",
            "drop=0.0003", "garble=0.01,delay=0.01:0.5,close_every=300",
            f"garble=0.0003,delay=0.01:0.05,close_every={drops3}",
            f"garble=0.0003,delay=0.01:0.1,close_every={drops3}",
            f"garble=0.0003,delay=0.01:0.2,close_every={drops3}",
            f"garble=0.0003,delay=0.01:0.5,close_every={drops3}",
            "garble=0.0001,never_settle=0.05,nan=0.05"]
        for spec in grid:
            row = run_board(spec, overrides, args.seed, store)
            judge(row, store, reference)
            rows.append(row)
            log(f"{spec}: {row['status']} in {row['seconds']:.1f} s")
    base = clean["seconds"]
    for row in rows:
        _, seconds = delay_seconds(row["faults"])
        row["delay_bound_seconds"] = row["emulator"]["delayed"] * seconds
        row["ratio"] = row["seconds"] / base
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        print()
        return
    print(f"oim_board_xor.yaml on the emulator (TCP, separate process) vs the oim simulator; "
          f"load average {load_average()}")
    header = (f"{'faults':46} {'done':5} {'seconds':>8} {'x clean':>7} {'bound':>6} "
              f"{'bad upd':>7} {'oor':>4} {'dist':>7} {'acc':>5}  diverged / link")
    print(header)
    for row in rows:
        link = row["link"]
        counters = ", ".join(f"{name} {link[name]:.0f}" for name in
                             ("frames", "retries", "bytes_resent", "reconnects", "timeouts")
                             if name in link)
        emulator = row["emulator"]
        diverged = ("-" if row["diverged"] is None else
                    f"step {row['diverged'][0]} ({', '.join(row['diverged'][1]) or '?'})")
        accuracy = row["test_accuracy"]
        print(f"{row['faults'][:46]:46} {'yes' if row['status'] == 'completed' else 'NO':5} "
              f"{row['seconds']:8.1f} {row['ratio']:7.2f} {row['delay_bound_seconds']:6.1f} "
              f"{row['bad_updates']:7d} {emulator['out_of_range']:4d} "
              f"{row['differ']:>3}/{row['worst']:<3} "
              f"{'-' if accuracy is None else f'{accuracy:.2f}':>5}  {diverged}")
        print(f"{'':46} link: {counters}; injected: bad frames {emulator['bad_frames']}, "
              f"link drops {emulator['link_drops']}" + (f"; {row['error']}" if row["error"]
                                                         else ""))


if __name__ == "__main__":
    main()
