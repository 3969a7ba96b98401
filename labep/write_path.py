"""The one write path from the host's parameters to a bench.

The host keeps full-precision *shadow* parameters; an update changes the shadow, and the write
path hands the bench the values to store. The bench checks its physical range and refuses any
value outside it: the write path never clips silently.
"""

from __future__ import annotations

import numpy as np

from labep.bench import Bench
from labep.models import Params


class WritePath:
    """Shadow parameters theta (float64) and the writes that put them on a bench."""

    def __init__(self, bench: Bench, params: Params) -> None:
        self.bench = bench
        self.shadow: Params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
        self.writes = 0

    def write_all(self) -> None:
        """Write every shadow parameter to the bench (at start, and after a resume)."""
        self.bench.write(self.shadow)
        self.writes += 1

    def apply(self, update: Params) -> None:
        """theta <- theta + update and write the changed parameters. The shadow only changes
        once the bench accepted the write, so a refused write leaves host and bench agreeing."""
        candidate = {name: self.shadow[name] + delta for name, delta in update.items()}
        self.bench.write(candidate)
        self.shadow.update(candidate)
        self.writes += 1
