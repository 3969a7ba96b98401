"""``labep watch``: a read-only follower of a run written by another process; it redraws
while the run goes, never blocks or changes it, and ends when the run does."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

from labep.store.runs import RunStore
from labep.store.watch import StoreView, follow

from .conftest import cli, tiny_xor, write_protocol


def start_run(tmp_path: Path, epochs: int) -> tuple[subprocess.Popen[str], Path]:
    path = write_protocol(tmp_path / "p.yaml", tiny_xor(**{
        "training.epochs": epochs, "evaluation.every_epochs": 1}))
    store = tmp_path / "runs.db"
    writer = subprocess.Popen([sys.executable, "-m", "labep.cli.main", "run", str(path),
                               "--store", str(store), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return writer, store


def first_run(store: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        if store.exists():
            try:
                runs = StoreView(store).runs()
            except Exception:  # the writer is still creating the store
                runs = []
            if runs:
                return runs[0]["id"]
        time.sleep(0.05)
    raise AssertionError("the run never appeared in the store")


def test_watch_follows_a_run_written_by_another_process(tmp_path: Path) -> None:
    writer, store = start_run(tmp_path, epochs=20)
    run_id = first_run(store, time.monotonic() + 120)
    view = StoreView(store)
    drawn: list[int] = []

    def draw() -> bool:
        drawn.append(view.summary(run_id, with_protocol=False)["steps"])
        return True

    ended = follow(view, run_id, draw, interval=0.05, timeout=300)
    assert writer.wait(timeout=300) == 0, writer.stderr.read() if writer.stderr else ""
    assert ended == "completed"
    assert len(set(drawn)) >= 3 and drawn == sorted(drawn)  # it followed the steps
    assert drawn[-1] == RunStore(store, create=False).summary(run_id)["steps"]


def test_watch_to_a_file_on_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    writer, store = start_run(tmp_path, epochs=2)
    assert writer.wait(timeout=300) == 0
    run_id = RunStore(store, create=False).runs()[0]["id"]
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    out = tmp_path / "live.png"
    result = cli("watch", run_id, "--store", str(store), "--out", str(out), "--interval", "0.1")
    assert result.exit_code == 0, result.output
    assert f"run {run_id}: completed" in result.stdout
    assert out.read_bytes().startswith(b"\x89PNG")
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before


def test_watch_of_a_missing_or_damaged_store_says_so(tmp_path: Path) -> None:
    missing = cli("watch", "latest", "--store", str(tmp_path / "none.db"))
    assert missing.exit_code == 1 and "no run store" in missing.stderr
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"not a store at all" * 20)
    refused = cli("watch", "latest", "--store", str(damaged), "--out", str(tmp_path / "x.png"))
    assert refused.exit_code == 1 and "Traceback" not in refused.output
