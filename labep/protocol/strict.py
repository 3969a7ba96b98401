"""The strictness every user-written document is validated with: protocol sections
(:mod:`labep.protocol`) and bench options (``options_model`` of the simulators and drivers).

One pydantic config for them all: unknown keys are refused, NaN and infinities are refused,
and types are strict, so a boolean is never taken for a number (``beta: true`` is not 1)
nor a number for a boolean (``correction: 1`` is not true), and a string never stands in
for a number. An integer where a float is expected stays accepted (``beta: 1``). A field
whose lax conversion is legitimate says so itself (``Field(strict=False)``: a YAML list to a
tuple, a path string to a path); the items inside it stay strict.

This module imports nothing from labep, so any module may use it without an import cycle.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

#: the pydantic config of every protocol section and every bench options model
STRICT_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StrictModel(BaseModel):
    """A model validated with :data:`STRICT_CONFIG`."""

    model_config = STRICT_CONFIG
