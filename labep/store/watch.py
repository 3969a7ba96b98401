"""``labep watch RUN``: follow a run as it is written, from any process on the same store.

The watcher opens the store **read-only** (SQLite ``mode=ro``). In WAL mode a reader never
takes the write lock and never blocks the run that writes. Every ``interval`` seconds it
reads the run's summary. When a step, an epoch or the status has changed, it redraws the
report figure (:func:`labep.store.report.render`: cost, accuracy, settle steps, write
errors, parameters). The figure goes either to a window (an interactive matplotlib backend)
or to a file that is replaced whole each time (``--out``, for a headless machine: open it in
any image viewer that reloads).

It stops when the run ends (completed, failed, interrupted), when its writer process is gone
(a killed run, which ``labep resume`` can continue), or when the window is closed.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labep.store.files import SCHEMA_VERSION, FileHold, StoreError, store_error
from labep.store.queries import RunQueries


class StoreView(RunQueries):
    """A read-only connection to a run store: every query of :class:`RunQueries`, and no way
    to write (the file, its WAL and its schema are never changed)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"no run store at {self.path}")
        try:
            # counted with the process's other connections to the file (see FileHold)
            self._hold: FileHold | None = FileHold(self.path)
        except OSError as err:
            raise StoreError(f"cannot read the run store {self.path}: {err.strerror}") from err
        try:
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                      timeout=5.0, isolation_level=None)
        except sqlite3.Error as err:
            self._hold.release()
            raise store_error(self.path, err, "open") from err
        try:
            row = self.db.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None or not str(row[0]).isdigit():
                raise StoreError(f"{self.path}: not a labep run store (no schema version)")
            if int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {row[0]}, this labep reads "
                                 f"{SCHEMA_VERSION}; watch it with the labep that writes it")
        except BaseException as err:
            self.close()
            if isinstance(err, sqlite3.Error | UnicodeDecodeError):
                raise store_error(self.path, err, "open") from err
            raise

    def close(self) -> None:
        """Close the connection, then let go of the file (see FileHold)."""
        try:
            self.db.close()
        finally:
            if self._hold is not None:
                self._hold.release()


def follow(view: RunQueries, run_id: str, draw: Callable[[], bool], *,
           interval: float = 2.0, timeout: float | None = None,
           sleep: Callable[[float], Any] = time.sleep) -> str:
    """Call ``draw()`` whenever run ``run_id`` has changed, until it ends; ``draw`` returns
    False to stop (a closed window). Returns why it stopped: the run's status, ``writer
    gone``, ``closed`` or ``timeout``."""
    run_id = view.resolve(run_id)
    start, seen = time.monotonic(), None
    while True:
        try:
            summary = view.summary(run_id, with_protocol=False)
        except (sqlite3.OperationalError, StoreError):  # a busy moment: read again
            sleep(interval)
            continue
        state = (summary["steps"], summary["epochs"], summary["status"],
                 tuple(sorted((k, v) for k, v in summary["metrics"].items() if v is not None)))
        if state != seen:
            seen = state
            if not draw():
                return "closed"
        if summary["status"] != "running":
            return str(summary["status"])
        if summary["resumable"]:
            return "writer gone"
        if timeout is not None and time.monotonic() - start > timeout:
            return "timeout"
        sleep(interval)


def file_drawer(view: RunQueries, run_id: str, out: Path) -> Callable[[], bool]:
    """A ``draw`` for :func:`follow` that replaces ``out`` whole with the newest report."""
    from matplotlib.figure import Figure

    from labep.store.report import render

    fig = Figure(layout="constrained")
    partial = out.with_name(f".{out.name}.partial{out.suffix}")

    def draw() -> bool:
        render(fig, view, run_id)
        fig.savefig(partial, dpi=90)
        os.replace(partial, out)  # a viewer never sees half a file
        return True

    return draw


def window_drawer(view: RunQueries, run_id: str, interval: float) -> Callable[[], bool]:
    """A ``draw`` for :func:`follow` that redraws a matplotlib window (False once closed)."""
    import matplotlib.pyplot as plt

    from labep.store.report import render

    fig = plt.figure(layout="constrained")
    plt.show(block=False)

    def draw() -> bool:
        if not plt.fignum_exists(fig.number):
            return False
        render(fig, view, run_id)
        fig.canvas.draw_idle()
        plt.pause(min(interval, 0.1))
        return True

    return draw


def interactive_backend() -> bool:
    """Whether matplotlib can open a window here."""
    import matplotlib

    backend = matplotlib.get_backend().lower()
    return backend not in ("agg", "pdf", "ps", "svg", "cairo", "template") and (
        os.name == "nt" or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
        or backend.startswith("macosx"))
