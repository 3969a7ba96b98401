"""Ctrl-C and SIGTERM at a safe point: a parameter block is written whole or not at all.

During a run (:func:`terminate_as_interrupt`) SIGTERM acts exactly like Ctrl-C: it raises
:class:`Terminated`, a :class:`KeyboardInterrupt`, so the run ends ``interrupted`` with its
reason, its events and metrics committed and the bench in its safe state. A SIGINT or SIGTERM
that arrives while a write to a bench is under way (:func:`deferred_interrupt`) is held until
the write is done, then raised: the bench never holds half of a block. Elsewhere both act at
once (a phase is aborted, the bench's ``close`` puts it in its safe state).
"""

from __future__ import annotations

import _signal
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """The process was asked to stop with SIGTERM (e.g. ``kill PID``, a scheduler, systemd)."""


#: how each signal is described where a run records why it ended
REASONS = {signal.SIGINT: "interrupted by the user (SIGINT)",
           signal.SIGTERM: "terminated (SIGTERM)"}


def interrupt_for(signum: int, detail: str = "") -> KeyboardInterrupt:
    """The exception a signal raises: :class:`Terminated` for SIGTERM, else
    :class:`KeyboardInterrupt`; its message is the recorded reason."""
    message = REASONS.get(signum, f"signal {signum}") + (f"; {detail}" if detail else "")
    return Terminated(message) if signum == signal.SIGTERM else KeyboardInterrupt(message)


def reason(err: BaseException) -> str:
    """Why a run was interrupted, as recorded in the store."""
    text = str(err)
    if text:
        return text
    return REASONS[signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT]


#: the signals a parameter write holds back
_HELD_SIGNALS = (int(signal.SIGINT), int(signal.SIGTERM))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (like Ctrl-C raises
    KeyboardInterrupt). A no-op off the main thread (Python delivers signals there only)."""
    if not _main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise interrupt_for(signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the duration of the block; afterwards raise the first one
    that arrived (:func:`interrupt_for`), unless it was ignored before the block. A no-op off
    the main thread."""
    if not _main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    # the C module's signal(), not signal.signal: that wrapper turns each old handler back
    # into an enum through a raised and caught ValueError, 3 us a call against 0.3, and a
    # training step writes once (the handlers compare and restore the same either way)
    previous = {signum: _signal.signal(signum, hold) for signum in _HELD_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            _signal.signal(signum, handler)
    if received:
        first = received[0]
        if previous[first] == signal.SIG_IGN:
            return  # the signal was ignored before the block
        raise interrupt_for(first, "it arrived during a parameter write; the write completed")
