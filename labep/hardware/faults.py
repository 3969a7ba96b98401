"""The engine's fault policy: what a run does when a bench command fails.

A driver retries frames, resynchronises and reconnects by itself; each fault it met is in its
fault log (:class:`labep.hardware.bench.FaultReporting`). Only when its own retries are exhausted
does it raise :class:`labep.hardware.bench.BenchFaultError`, after putting the hardware in its safe
state. Then the protocol's ``faults.policy`` decides: run the phase (or write) again up to
``max_retries`` times and then give up (``retry_phase``), give up at once (``skip``), or stop the
run (``stop``). A phase given up on skips its batch (no update). A write given up on leaves the
bench out of step with the shadow: under ``retry_phase`` the update stays in the shadow, under
``skip`` it is dropped; either way the next step re-reads the bench and writes what differs
before its first phase (:meth:`labep.hardware.write_path.WritePath.resync`). Every fault, recovered
or not, becomes an event of the step it happened in, tagged with the phase or write it hit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from labep.hardware.bench import Bench, BenchFaultError, Fault, FaultReporting
from labep.protocol.sections import FaultsConfig

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

    def __post_init__(self) -> None:
        self._reporting = isinstance(self.bench, FaultReporting)

    def call(self, what: str, command: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``command(*args, **kwargs)``; on :class:`BenchFaultError` retry (``retry_phase``,
        up to ``max_retries`` times), give up at once (``skip``) or stop (``stop``: re-raise).
        Giving up raises :class:`SkipBatch`; the caller decides what that means for the batch
        (:meth:`skip`, or a deferred write). The faults the bench logged during the command
        become events tagged ``during: what``."""
        retries = self.config.max_retries if self.config.policy == "retry_phase" else 0
        for attempt in range(retries + 1):
            try:
                result = command(*args, **kwargs)
            except BenchFaultError as err:
                self.drain(what)
                self.record(err.fault, what, attempt=attempt)
                if self.config.policy == "stop":
                    raise
                continue
            self.drain(what)
            return result
        self.events.append(("gave_up", f"{what}: gave up after {retries + 1} attempt(s)",
                            {"policy": self.config.policy, "during": what,
                             "attempts": retries + 1}))
        raise SkipBatch(what)

    def skip(self, what: str, samples: int) -> None:
        """Count a batch that makes no update because the policy gave up on ``what``."""
        self.skipped_batches += 1
        self.events.append(("skipped", f"{what}: the batch makes no update",
                            {"policy": self.config.policy, "during": what,
                             "samples": samples}))

    def drain(self, what: str | None = None) -> None:
        """Move the faults the bench logged (and recovered from) into the events."""
        if self._reporting:
            for fault in self.bench.drain_faults():  # type: ignore[attr-defined]
                self.record(fault, what)

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
