"""Parameter storage of an ideal simulator: every value held exactly in float64.

The simulators whose physics is solved exactly (the quantum register, the Lagrangian
oscillators) store their parameters as given, within a physical range per parameter; this is
the storage half of their Bench contract, in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from labep.hardware.bench import BenchError, BenchLifecycle, BenchSpec, ParameterSpec


class ExactParameters(BenchLifecycle):
    """``write``/``read_params``/``close`` over float64 copies of the model's parameters.

    ``limit(name)``: the physical range |value| <= limit of a parameter (None: unbounded);
    writes outside it are refused, never clipped."""

    name = ""

    def _store_parameters(self, model: Any, limit: Callable[[str], float | None],
                          state_unit: str) -> None:
        parameters = []
        for name, shape in model.parameter_shapes().items():
            bound = limit(name)
            bound = np.inf if bound is None else float(bound)
            parameters.append(ParameterSpec(name, shape, -bound, bound, unit="1"))
        self.spec = BenchSpec(tuple(parameters), model.input_size, model.state_size,
                              model.output_slice, state_unit=state_unit)
        self._params = {name: np.zeros(shape) for name, shape in model.parameter_shapes().items()}

    def close(self) -> None:
        """Nothing to release; the parameters are kept (idempotent)."""

    def write(self, params: dict[str, np.ndarray]) -> None:
        """Check every value against its range first, then store copies."""
        for name, values in params.items():
            if name not in self._params:
                raise BenchError(f"{self.name}: no parameter {name!r}")
            self.spec.parameter(name).check_range(values, bench=self.name)
        for name, values in params.items():
            self._params[name] = np.array(values, dtype=np.float64)

    def read_params(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self._params.items()}
