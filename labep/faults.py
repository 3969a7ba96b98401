"""The engine's fault policy: what a run does when a bench command fails.

A driver retries frames, resynchronises and reconnects by itself; each fault it met is in its
fault log (:class:`labep.bench.FaultReporting`). Only when its own retries are exhausted does it
raise :class:`labep.bench.BenchFaultError`, after putting the hardware in its safe state. Then
the protocol's ``faults.policy`` decides: run the phase (or write) again up to ``max_retries``
times and then skip the batch, skip the batch at once, or stop the run. A skipped batch makes
no update. Every fault, recovered or not, becomes an event of the step it happened in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from labep.bench import Bench, BenchFaultError, Fault, FaultReporting
from labep.protocol import FaultsConfig

T = TypeVar("T")


class SkipBatch(Exception):  # noqa: N818 - control flow, not an error
    """The policy gave up on this batch: it makes no update."""


@dataclass
class FaultPolicy:
    """Runs bench commands under the protocol's fault policy and collects fault events."""

    config: FaultsConfig
    bench: Bench
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    total: int = 0
    skipped_batches: int = 0

    def call(self, what: str, command: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``command(*args, **kwargs)``; on :class:`BenchFaultError` retry, skip
        (:class:`SkipBatch`) or stop (re-raise) as the policy says. ``what`` names the phase
        or write in the events."""
        retries = self.config.max_retries if self.config.policy == "retry_phase" else 0
        for attempt in range(retries + 1):
            try:
                return command(*args, **kwargs)
            except BenchFaultError as err:
                self.drain()
                self.record(err.fault, what, attempt=attempt)
                if self.config.policy == "stop":
                    raise
        self.skipped_batches += 1
        self.events.append(("skipped", f"{what}: gave up after {retries + 1} attempt(s); the "
                            "batch makes no update", {"policy": self.config.policy}))
        raise SkipBatch(what)

    def drain(self) -> None:
        """Move the faults the bench logged (and recovered from) into the events."""
        if isinstance(self.bench, FaultReporting):
            for fault in self.bench.drain_faults():
                self.record(fault, None)

    def record(self, fault: Fault, what: str | None, **extra: Any) -> None:
        self.total += 1
        detail = {"fault": fault.kind, **fault.as_event(), **extra}
        if what is not None:
            detail["during"] = what
        self.events.append(("fault", fault.message, detail))

    def take_events(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The events collected since the last call (the bench's log drained first)."""
        self.drain()
        events, self.events = self.events, []
        return events
