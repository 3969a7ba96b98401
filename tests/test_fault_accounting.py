"""Every unsettled or non-finite sample is accounted for in one place (``labep show``), and
the counts add up: checked against the board's own per-sample reports under injected faults."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

from .conftest import PROTOCOLS, cli

OVERRIDES = ["training.epochs=3", "dataset.repeats=6", "evaluation.every_epochs=1",
             "bench.options.timeout=0.1"]


def independent_counts(events: list[dict]) -> dict[str, int]:
    """The left-out and evaluated-only counts, rebuilt from the board's per-sample fault
    events alone: a sample with an invalid readout is non-finite, one only reported
    unsettled is unsettled; a nudged sample counts once over both nudged phases (its index
    is the one among the samples whose free phase settled)."""
    reports: dict[tuple, set[str]] = defaultdict(set)
    for event in events:
        detail = event["detail"] or {}
        if event["kind"] != "fault" or detail.get("fault") not in ("unsettled",
                                                                    "invalid_readout"):
            continue
        during = detail["during"]
        if during == "free and nudged phases":  # one RELAX_STEP: the fault names its phase
            where = "free" if detail["phase"] == "free" else "nudged"
        else:
            where = ("free" if during == "free phase" else
                     "evaluation" if during == "evaluation" else "nudged")
        reports[(where, event["step"], detail["sample"])].add(detail["fault"])
    counts: dict[str, int] = defaultdict(int)
    for (where, _, _), kinds in reports.items():
        counts[f"{where}_{'nonfinite' if 'invalid_readout' in kinds else 'unsettled'}"] += 1
    return counts


def test_unsettled_and_nan_samples_add_up_under_injected_faults(
        tmp_path: Path, emulator_factory) -> None:
    emulator = emulator_factory((2, 8, 2), faults="never_settle=0.06,nan=0.06",
                                transport="tcp")
    protocol = load_protocol(PROTOCOLS / "oim_board_xor.yaml",
                             [*OVERRIDES, f"bench.resource={emulator.url}"])
    with RunStore(tmp_path / "runs.db") as store:
        result = Trainer(protocol, store, progress=False).run()
        samples = store.summary(result.run_id)["samples"]
        events = store.events(result.run_id)
    assert result.status == "completed"
    steps = result.steps
    assert samples["trained"] == steps * 4
    assert samples["trained"] == samples["used"] + samples["left_out"] + samples["skipped"]
    free, nudged = samples["free"], samples["nudged"]
    assert samples["left_out"] == sum(free.values()) + sum(nudged.values())
    expected = independent_counts(events)
    assert free == {"nonfinite": expected["free_nonfinite"],
                    "unsettled": expected["free_unsettled"]}
    assert nudged == {"nonfinite": expected["nudged_nonfinite"],
                      "unsettled": expected["nudged_unsettled"]}
    assert samples["left_out"] > 0 and free["nonfinite"] and nudged["unsettled"]
    evaluated = samples["evaluated"]
    assert evaluated["samples"] == 3 * 4  # three evaluations of the four XOR points
    assert evaluated["nonfinite"] == expected["evaluation_nonfinite"]
    assert evaluated["unsettled"] == expected["evaluation_unsettled"]
    # the per-step "samples left out" events carry the same counts
    left = sum(e["detail"]["samples"] for e in events if e["kind"] == "unsettled")
    assert left == samples["left_out"]

    shown = cli("show", result.run_id, "--store", str(tmp_path / "runs.db"))
    assert shown.exit_code == 0
    text = shown.stdout
    assert (f"trained {samples['trained']} = used {samples['used']} + left out "
            f"{samples['left_out']} + in skipped batches 0") in text
    assert f"non-finite {free['nonfinite']}, unsettled {free['unsettled']}" in text
    assert "evaluated only: 12 test samples" in text


def test_show_prints_the_runs_link_quality_summary(tmp_path: Path,
                                                  emulator_factory) -> None:
    """A board run behind a garbling link that drops twice: ``labep show`` has the link's
    frames, retries, bytes re-sent and reconnects, and they agree with what the emulator saw."""
    emulator = emulator_factory((2, 8, 2), faults="garble=0.002,close_every=100",
                                transport="tcp")
    protocol = load_protocol(PROTOCOLS / "oim_board_xor.yaml",
                             [*OVERRIDES, f"bench.resource={emulator.url}"])
    store_path = tmp_path / "runs.db"
    with RunStore(store_path) as store:
        result = Trainer(protocol, store, progress=False).run()
    assert result.status == "completed"
    shown = cli("show", result.run_id, "--store", str(store_path), "--json")
    link = __import__("json").loads(shown.stdout)["link"]
    assert link["reconnects"] == emulator.stats.link_drops >= 1
    assert link["retries"] > 0 and link["bytes_resent"] > 0
    # every request frame the driver sent reached the emulator, or was lost with a link drop
    assert link["frames"] >= emulator.stats.frames_in + emulator.stats.bad_frames
    text = cli("show", result.run_id, "--store", str(store_path)).stdout
    assert (f"link      frames {link['frames']:.6g}, retries {link['retries']:.6g}, bytes "
            f"resent {link['bytes_resent']:.6g}, reconnects {link['reconnects']:.6g}") in text


def test_every_sample_of_a_step_is_counted_once() -> None:
    """A step's accounting against a sample-by-sample classification: a sample is used only
    if every phase settled with a finite readout; otherwise it counts once, as non-finite if
    a phase read it back non-finite, else as unsettled, in the free phase first (a sample
    whose free phase failed was not nudged)."""
    import numpy as np

    from labep.hardware.bench import Relaxation
    from labep.run.step import phase_accounting

    rng = np.random.default_rng(11)

    def phase(size: int) -> Relaxation:
        state = rng.random((size, 3))
        state[rng.random(size) < 0.2, 1] = np.nan
        return Relaxation(state, rng.random(size) < 0.8, np.ones(size, dtype=int),
                          np.zeros(size))

    for trial in range(200):
        size = int(rng.integers(1, 12))
        free = phase(size)
        settled = np.flatnonzero(free.converged & np.isfinite(free.state).all(axis=1))
        nudged = [phase(len(settled)) for _ in range(int(rng.integers(0, 3)))] if len(
            settled) else []
        if trial % 7 == 0:  # every phase settles: the common case
            free = Relaxation(np.ones((size, 3)), np.ones(size, bool), free.steps, free.residual)
            settled = np.arange(size)
            nudged = [Relaxation(np.ones((size, 3)), np.ones(size, bool), free.steps,
                                 free.residual) for _ in range(2)]
        want = dict.fromkeys(["used", "free_nonfinite", "free_unsettled", "nudged_nonfinite",
                              "nudged_unsettled"], 0)
        used = np.zeros(size, dtype=bool)
        for sample in range(size):
            if not np.isfinite(free.state[sample]).all():
                want["free_nonfinite"] += 1
                continue
            if not free.converged[sample]:
                want["free_unsettled"] += 1
                continue
            row = int(np.searchsorted(settled, sample))
            if any(not np.isfinite(p.state[row]).all() for p in nudged):
                want["nudged_nonfinite"] += 1
            elif any(not p.converged[row] for p in nudged):
                want["nudged_unsettled"] += 1
            else:
                want["used"] += 1
                used[sample] = True
        free_ok, ok, counts = phase_accounting(free, nudged)
        assert {k.removeprefix("samples_"): v for k, v in counts.items()} == {
            **want, "skipped": 0}, trial
        np.testing.assert_array_equal(ok, used)
        np.testing.assert_array_equal(free_ok, np.isin(np.arange(size), settled))
