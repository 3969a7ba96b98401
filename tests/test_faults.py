"""The engine's fault policy: a bench command that fails after the bench's own retries is run
again, skipped or stops the run, as the protocol says; every fault is in the run store, and no
update ever comes from a failed or unsettled phase."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from labep import registry
from labep.bench import BenchFaultError, Fault, Nudge, Relaxation, Settle
from labep.engine import Trainer, final_params
from labep.protocol import ProtocolError, load_protocol
from labep.simulators.hopfield import HopfieldSimulator
from labep.store import RunStore

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

    def __init__(self, model: Any, options: Any = None) -> None:
        super().__init__(model, options)
        self.calls = 0
        self.log: list[Fault] = []
        self.closed = 0

    def relax(self, inputs: np.ndarray, nudge: Nudge | None = None,
              start: np.ndarray | None = None, settle: Settle | None = None) -> Relaxation:
        call, self.calls = self.calls, self.calls + 1
        self.relaxed.append((len(inputs), nudge is not None))
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
                os.kill(os.getpid(), signal.SIGINT)
        self.completed_writes = getattr(self, "completed_writes", 0) + 1

    def drain_faults(self) -> list[Fault]:
        faults, self.log = self.log, []
        return faults

    def close(self) -> None:
        self.closed += 1
        super().close()


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> type[FlakyHopfield]:
    entry = registry.BenchEntry("simulator", f"{__name__}:FlakyHopfield")
    monkeypatch.setitem(registry.BENCHES, "flaky_hopfield", entry)
    monkeypatch.setattr(FlakyHopfield, "plan", {})
    monkeypatch.setattr(FlakyHopfield, "relaxed", [])
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
    assert {e["detail"].get("during") for e in faults} == {"free phase",
                                                          "nudged phase (beta -0.5)", None}
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
    faults = [e for e in store.events(summary["id"]) if e["kind"] == "fault"]
    assert faults == []  # the failing step was never committed: its fault is in the error
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
    assert event["detail"]["samples"] == 1 and event["detail"]["free_unsettled"] == 1


def test_fault_policy_is_validated() -> None:
    with pytest.raises(ProtocolError, match=r"faults\.policy"):
        load_protocol(tiny_xor(**{"faults.policy": "ignore"}))
    with pytest.raises(ProtocolError, match=r"faults\.max_retries"):
        load_protocol(tiny_xor(**{"faults.max_retries": -1}))


def test_ctrl_c_during_a_write_finishes_the_block_then_interrupts(
        tmp_path: Path, flaky: type[FlakyHopfield], monkeypatch: pytest.MonkeyPatch) -> None:
    flaky.plan = {"interrupt_write": {3}}  # the third update's write (0 is the initial one)
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
