"""The engine's fault policy: a bench command that fails after the bench's own retries is run
again, skipped or stops the run, as the protocol says; every fault is in the run store, and no
update ever comes from a failed or unsettled phase."""

from __future__ import annotations

import os
import signal
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from labep import registry
from labep.hardware.bench import BenchFaultError, Fault, Nudge, Relaxation, Settle
from labep.protocol.text import ProtocolError
from labep.run.engine import Trainer, final_params
from labep.run.validate import load_protocol
from labep.simulators.hopfield import HopfieldSimulator
from labep.store.runs import RunStore

from .conftest import tiny_xor


class FlakyHopfield(HopfieldSimulator):
    """The Hopfield simulator behind a transport that fails on chosen relax calls.

    ``fail_calls``: relax call numbers (from 0) that raise :class:`BenchFaultError` (a command
    the driver gave up on); ``recovered_calls``: calls that log a recovered fault (a retried
    frame) and succeed; ``nan_calls``: calls whose read-back state is NaN for sample 0.
    """

    name = "flaky_hopfield"
    plan: ClassVar[dict[str, set[int]]] = {}
    relaxed: ClassVar[list[tuple[int, bool]]] = []  # (batch size, nudged?) of every relax call
    instances: ClassVar[list[FlakyHopfield]] = []

    def __init__(self, model: Any, options: Any = None) -> None:
        super().__init__(model, options)
        self.calls = 0
        self.log: list[Fault] = []
        self.closed = 0
        self.held: list[dict[str, np.ndarray]] = []
        self.instances.append(self)

    def relax(self, inputs: np.ndarray, nudge: Nudge | None = None,
              start: np.ndarray | None = None, settle: Settle | None = None) -> Relaxation:
        call, self.calls = self.calls, self.calls + 1
        self.relaxed.append((len(inputs), nudge is not None))
        self.held.append(self.read_params())  # what each phase ran on
        if call in self.plan.get("fail_calls", set()):
            raise BenchFaultError("no reply after 3 retries", kind="timeout",
                                  instrument="flaky COM9", command="RUN")
        if call in self.plan.get("recovered_calls", set()):
            self.log.append(Fault("crc", "flaky COM9", "READ_PHASES", "bad CRC, re-sent",
                                  recovered=True))
        result = super().relax(inputs, nudge, start, settle)
        if call in self.plan.get("nan_calls", set()):
            result.state[0] = np.nan
        return result

    def write(self, params: dict[str, np.ndarray]) -> None:
        """Writes block by block, like a driver; with ``interrupt_write`` a Ctrl-C arrives
        after the first block of that write (counting writes from 0)."""
        call, self.writes = getattr(self, "writes", 0), getattr(self, "writes", 0) + 1
        for position, (name, values) in enumerate(params.items()):
            super().write({name: values})
            if position == 0 and call in self.plan.get("interrupt_write", set()):
                os.kill(os.getpid(), self.plan.get("signal", signal.SIGINT))
            if position == 0 and call in self.plan.get("fail_writes", set()):
                # the link died after the first block: the bench holds part of the write
                raise BenchFaultError("no reply to WRITE_COUPLINGS after 3 retries",
                                      kind="timeout", instrument="flaky COM9",
                                      command="WRITE_COUPLINGS")
        self.completed_writes = getattr(self, "completed_writes", 0) + 1

    def drain_faults(self) -> list[Fault]:
        faults, self.log = self.log, []
        return faults

    def close(self) -> None:
        self.closed += 1
        super().close()


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> type[FlakyHopfield]:
    entry = metadata.EntryPoint("flaky_hopfield", f"{__name__}:FlakyHopfield",
                                registry.GROUPS["simulator"])
    monkeypatch.setitem(registry.entries("simulator"), "flaky_hopfield", entry)
    monkeypatch.setattr(FlakyHopfield, "plan", {})
    monkeypatch.setattr(FlakyHopfield, "relaxed", [])
    monkeypatch.setattr(FlakyHopfield, "instances", [])
    return FlakyHopfield


def run(store_path: Path, bench: str, **changes: Any) -> tuple[RunStore, str, Any]:
    doc = tiny_xor(**{"bench.simulator": bench, **changes})
    store = RunStore(store_path)
    trainer = Trainer(load_protocol(doc), store, progress=False)
    result = trainer.run()
    return store, result.run_id, result


def test_retried_phases_end_where_a_clean_run_ends(tmp_path: Path,
                                                   flaky: type[FlakyHopfield]) -> None:
    clean_store, clean_id, _ = run(tmp_path / "clean.db", "hopfield")
    # relax calls: 0 free (fails), 1 free again, 2 nudged +beta, 3 nudged -beta (fails),
    # 4 nudged -beta again; 5 the free phase of step 2 (fails), 6 again
    flaky.plan = {"fail_calls": {0, 3, 5}, "recovered_calls": {7, 9}}
    store, run_id, result = run(tmp_path / "flaky.db", "flaky_hopfield")
    assert result.status == "completed"
    expected, got = final_params(clean_store, clean_id), final_params(store, run_id)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    faults = [e for e in store.events(run_id) if e["kind"] == "fault"]
    assert len(faults) == 5  # three given up on (then retried), two recovered by the bench
    assert all(e["detail"]["instrument"] == "flaky COM9" for e in faults)
    assert sorted(e["detail"]["command"] for e in faults) == ["READ_PHASES"] * 2 + ["RUN"] * 3
    # every fault names the phase it hit, recovered ones too
    assert {e["detail"]["during"] for e in faults} == {
        "free phase", "nudged phase (beta -0.5)", "nudged phase (beta +0.5)"}
    assert store.final_metrics(run_id)["faults_total"] == 5


def test_skip_policy_makes_no_update_from_a_failed_batch(tmp_path: Path,
                                                         flaky: type[FlakyHopfield]) -> None:
    flaky.plan = {"fail_calls": {1, 9}}  # a nudged phase of step 1, the free phase of step 4
    store, run_id, _ = run(tmp_path / "skip.db", "flaky_hopfield", **{"faults.policy": "skip"})
    steps, skipped = store.metric_series(run_id, "skipped")
    assert steps.tolist() == [1, 4] and skipped.tolist() == [1, 1]
    # each of the 16 steps writes once, except the two skipped ones
    assert store.final_metrics(run_id)["writes_W1"] == 1 + 16 - 2
    assert store.final_metrics(run_id)["skipped_batches"] == 2
    # no write at the skipped steps (a write records write_changed with its step)
    written = {step for (step,) in store.db.execute(
        "SELECT step FROM metrics WHERE run_id = ? AND name = 'write_changed'", (run_id,))}
    assert written == set(range(1, 17)) - {1, 4}
    skips = [e for e in store.events(run_id) if e["kind"] == "skipped"]
    assert len(skips) == 2 and "makes no update" in skips[0]["message"]


def test_stop_policy_fails_the_run_and_leaves_the_bench_closed(
        tmp_path: Path, flaky: type[FlakyHopfield], monkeypatch: pytest.MonkeyPatch) -> None:
    flaky.plan = {"fail_calls": {6}}
    closed: list[FlakyHopfield] = []
    monkeypatch.setattr(FlakyHopfield, "close",
                        lambda self: closed.append(self) or HopfieldSimulator.close(self))
    with pytest.raises(BenchFaultError, match="flaky COM9: RUN"):
        run(tmp_path / "stop.db", "flaky_hopfield", **{"faults.policy": "stop"})
    store = RunStore(tmp_path / "stop.db")
    (summary,) = store.runs()
    assert summary["status"] == "failed"
    assert len(closed) == 1
    events = store.events(summary["id"])
    # the failing step was never committed, but its fault and the reason the run ended are
    (fault,) = [e for e in events if e["kind"] == "fault"]
    assert fault["detail"]["during"] == "free phase" and fault["step"] == 3
    (ended,) = [e for e in events if e["kind"] == "run_ended"]
    assert ended["detail"]["status"] == "failed" and "BenchFaultError" in ended["message"]
    assert ended["detail"]["faults_in_step"] == 1
    assert "BenchFaultError" in store.summary(summary["id"])["error"]


def test_a_nan_readout_never_produces_an_update(tmp_path: Path,
                                                flaky: type[FlakyHopfield]) -> None:
    flaky.plan = {"nan_calls": {0}}  # the first free phase reads back NaN for sample 0
    store, run_id, _ = run(tmp_path / "nan.db", "flaky_hopfield")
    _, unsettled = store.metric_series(run_id, "unsettled")
    assert unsettled[0] == 1 and unsettled[1:].sum() == 0
    for values in final_params(store, run_id).values():
        assert np.all(np.isfinite(values))


def test_a_sample_whose_free_phase_failed_is_not_nudged(tmp_path: Path,
                                                        flaky: type[FlakyHopfield]) -> None:
    """Its nudge would be computed from a state that is not steady (here NaN), and it is left
    out of the update anyway: the nudged phases of that step run on the other samples."""
    flaky.plan = {"nan_calls": {0}}  # the first free phase reads back NaN for sample 0
    store, run_id, _ = run(tmp_path / "nan.db", "flaky_hopfield")
    assert flaky.relaxed[:3] == [(4, False), (3, True), (3, True)]
    assert flaky.relaxed[3:6] == [(4, False), (4, True), (4, True)]
    (event,) = [e for e in store.events(run_id) if e["kind"] == "unsettled"]
    assert event["step"] == 1  # steps count from 1
    assert event["detail"]["samples"] == 1 and event["detail"]["samples_free_nonfinite"] == 1
    assert event["detail"]["samples_free_unsettled"] == 0  # a NaN state counts as non-finite


def test_fault_policy_is_validated() -> None:
    with pytest.raises(ProtocolError, match=r"faults\.policy"):
        load_protocol(tiny_xor(**{"faults.policy": "ignore"}))
    with pytest.raises(ProtocolError, match=r"faults\.max_retries"):
        load_protocol(tiny_xor(**{"faults.max_retries": -1}))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_during_a_write_finishes_the_block_then_interrupts(
        tmp_path: Path, flaky: type[FlakyHopfield], monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest, signum: int) -> None:
    """SIGTERM acts exactly like Ctrl-C: the block being written is finished, the run ends
    ``interrupted`` with the signal named, and it resumes."""
    # Ctrl-C as on a terminal, whatever this process inherited (a shell starting pytest in
    # the background sets SIGINT to ignored, and an ignored signal is meant to stay ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    # the third update's write (0 is the initial one)
    flaky.plan = {"interrupt_write": {3}, "signal": signum}
    benches: list[FlakyHopfield] = []
    original = FlakyHopfield.__init__

    def keep(self: FlakyHopfield, *args: Any) -> None:
        original(self, *args)
        benches.append(self)

    monkeypatch.setattr(FlakyHopfield, "__init__", keep)
    with pytest.raises(KeyboardInterrupt, match="the write completed"):
        run(tmp_path / "int.db", "flaky_hopfield")
    (bench,) = benches
    assert bench.completed_writes == 4  # the interrupted write went through whole
    store = RunStore(tmp_path / "int.db")
    (summary,) = store.runs()
    assert summary["status"] == "interrupted" and summary["resumable"]
    assert summary["steps"] == 2  # step 3 wrote its update but never committed
    named = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    assert named in store.summary(summary["id"])["error"]
    (ended,) = [e for e in store.events(summary["id"]) if e["kind"] == "run_ended"]
    assert ended["detail"]["status"] == "interrupted" and named in ended["message"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    flaky.plan = {}
    resumed = Trainer.resume(store, summary["id"], progress=False)
    assert resumed.status == "completed"


# -- writes under the fault policy ----------------------------------------------------------


def same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_first_write_given_up_on_is_written_at_the_first_step(
        tmp_path: Path, flaky: type[FlakyHopfield]) -> None:
    """The start write fails four times (retry_phase, max_retries 3): the run does not end;
    the first step re-reads the bench and writes the parameters before its free phase, so
    the run ends exactly where a clean run ends."""
    clean_store, clean_id, _ = run(tmp_path / "clean.db", "hopfield")
    flaky.plan = {"fail_writes": {0, 1, 2, 3}}
    store, run_id, result = run(tmp_path / "flaky.db", "flaky_hopfield")
    assert result.status == "completed"
    assert same_params(final_params(store, run_id), final_params(clean_store, clean_id))
    events = store.events(run_id)
    assert [e["detail"]["during"] for e in events if e["kind"] == "gave_up"] == ["write"]
    (resynced,) = [e for e in events if e["kind"] == "resynced"]
    assert resynced["step"] == 1
    assert store.final_metrics(run_id).get("skipped_batches") in (None, 0)


def test_a_write_given_up_on_under_retry_phase_is_written_at_the_next_step(
        tmp_path: Path, flaky: type[FlakyHopfield]) -> None:
    """Step 2's update write fails on every attempt, after a partial block each time: the
    update stays in the shadow, step 3 writes it before its phases (which run on exactly the
    parameters a clean run's step 3 runs on), and the run ends where a clean run ends."""
    _, _, _ = run(tmp_path / "clean.db", "flaky_hopfield")
    (clean_bench,) = flaky.instances
    flaky.instances.clear()
    flaky.plan = {"fail_writes": {2, 3, 4, 5}}  # write 0 starts the run, 1 is step 1's
    store, run_id, result = run(tmp_path / "flaky.db", "flaky_hopfield")
    (bench,) = flaky.instances
    assert result.status == "completed"
    assert len(bench.held) == len(clean_bench.held)
    assert all(same_params(a, b) for a, b in zip(bench.held, clean_bench.held, strict=True))
    events = store.events(run_id)
    (deferred,) = [e for e in events if e["kind"] == "deferred"]
    (resynced,) = [e for e in events if e["kind"] == "resynced"]
    assert (deferred["step"], resynced["step"]) == (2, 3)
    assert not [e for e in events if e["kind"] == "skipped"]
    assert len([e for e in events if e["kind"] == "fault"]) == 4  # each attempt recorded


def test_a_write_given_up_on_under_skip_drops_the_update_and_restores_the_bench(
        tmp_path: Path, flaky: type[FlakyHopfield]) -> None:
    """policy skip: step 2's failed write skips the batch: its update is dropped, the bench
    (which holds a partial block) is re-read and written back, and step 3 runs on the
    parameters step 2 ran on."""
    flaky.plan = {"fail_writes": {2}}
    store, run_id, result = run(tmp_path / "skip.db", "flaky_hopfield",
                                **{"faults.policy": "skip"})
    (bench,) = flaky.instances
    assert result.status == "completed"
    # relax calls: 3 per step (free, +beta, -beta): step 2 starts at call 3, step 3 at 6
    assert same_params(bench.held[3], bench.held[6])
    assert same_params(bench.held[6], bench.held[7])  # step 3's phases: one set of parameters
    steps, skipped = store.metric_series(run_id, "samples_skipped")
    assert dict(zip(steps.tolist(), skipped.tolist(), strict=True))[2] == 4
    assert store.final_metrics(run_id)["skipped_batches"] == 1
    # the bench ends holding the shadow's parameters
    assert same_params(bench.read_params(), final_params(store, run_id))


def test_a_write_given_up_on_under_stop_ends_the_run_with_its_events(
        tmp_path: Path, flaky: type[FlakyHopfield]) -> None:
    flaky.plan = {"fail_writes": {2}}
    with pytest.raises(BenchFaultError, match="WRITE_COUPLINGS"):
        run(tmp_path / "stop.db", "flaky_hopfield", **{"faults.policy": "stop"})
    (bench,) = flaky.instances
    store = RunStore(tmp_path / "stop.db")
    (summary,) = store.runs()
    assert summary["status"] == "failed" and bench.closed == 1
    events = store.events(summary["id"])
    (fault,) = [e for e in events if e["kind"] == "fault"]
    assert fault["detail"]["during"] == "write" and fault["step"] == 2
    assert [e["kind"] for e in events][-1] == "run_ended"


def test_sigterm_through_the_cli_ends_the_run_interrupted_and_it_resumes(
        tmp_path: Path) -> None:
    """``kill PID`` on ``labep run``: exit 143, status interrupted with the reason, every
    committed step kept, resumable, and the resume completes."""
    import sqlite3
    import subprocess
    import sys
    import time

    from .conftest import write_protocol

    doc = tiny_xor(**{"training.epochs": 400, "training.checkpoint_every": 2})
    path = write_protocol(tmp_path / "long.yaml", doc)
    store_path = tmp_path / "term.db"
    process = subprocess.Popen([sys.executable, "-m", "labep.cli.main", "run", str(path),
                                "--store", str(store_path), "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        steps = 0
        while steps < 20 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
            if store_path.exists():
                db = sqlite3.connect(store_path)
                try:
                    steps = db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
                except sqlite3.OperationalError:
                    steps = 0
                db.close()
        assert process.poll() is None, "the run ended before it could be terminated"
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    finally:  # a failed check never leaves the run behind
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, stderr
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    with RunStore(store_path) as store:
        (summary,) = store.runs()
        assert summary["status"] == "interrupted" and summary["resumable"]
        assert "SIGTERM" in store.summary(summary["id"])["error"]
        assert summary["steps"] >= 20
        kinds = [e["kind"] for e in store.events(summary["id"])]
        assert kinds[-1] == "run_ended"
