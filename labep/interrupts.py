"""Ctrl-C at a safe point: a parameter block is written whole or not at all.

A SIGINT that arrives while a write to a bench is under way is held until the write is done,
then raised as :class:`KeyboardInterrupt`: the bench never holds half of a block, and the
run ends ``interrupted`` with its last step committed. Elsewhere Ctrl-C acts at once (a phase
is aborted, the bench's ``close`` puts it in its safe state).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT for the duration of the block; raise it afterwards. A no-op off the main
    thread (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt("interrupted during a parameter write; the write completed")
