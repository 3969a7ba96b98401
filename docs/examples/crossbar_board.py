"""An example labep driver (docs/writing-a-driver.md): an analog crossbar board that runs a
layered Hopfield network and speaks one text line per command over any pyserial-like port.

    *IDN?                         -> vendor,model,serial,firmware
    SET <name> v,v,...            -> OK        (row-major values of one parameter)
    GET <name>                    -> v,v,...
    RELAX x,...;beta;y,...;tol;n  -> steps;residual;s,...   (from the board's rest state)
    anything refused              -> ERR <reason>
"""

from __future__ import annotations

import numpy as np
import serial
from pydantic import BaseModel, ConfigDict, Field

from labep.hardware.bench import (
    BenchError,
    BenchFaultError,
    BenchIdentity,
    BenchLifecycle,
    BenchSpec,
    ParameterSpec,
    Relaxation,
    Settle,
)


def numbers(values) -> str:
    return ",".join(map(repr, np.ravel(values).astype(float).tolist()))


class CrossbarOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    timeout: float = Field(1.0, gt=0.0, description="Seconds to wait for a reply line.")
    safe_value: float = Field(0.0, ge=-1.0, le=1.0, description="Every weight when safe.")


class CrossbarBoard(BenchLifecycle):
    """A crossbar board over a serial line, as a Bench."""

    name = "crossbar_board"
    model_kinds = ("layered_hopfield",)
    options_model = CrossbarOptions

    def __init__(self, model, options, *, resource=None, transport=None) -> None:
        if (resource is None) == (transport is None):
            raise BenchError(f"{self.name}: give a resource string or a transport")
        self.model, self.options, self.resource, self.port = model, options, resource, transport
        self.shapes = model.parameter_shapes()
        self.spec = BenchSpec(tuple(ParameterSpec(n, s, -1.0, 1.0, "V") for n, s in
                                    self.shapes.items()),
                              model.input_size, model.state_size, model.output_slice)

    def _ask(self, command: str) -> str:
        self.port.write(command.encode() + b"\n")
        reply = self.port.readline().decode().strip()
        if not reply or reply.startswith("ERR"):
            raise BenchFaultError(reply or "no reply", kind="error_frame" if reply else
                                  "timeout", instrument=self.name, command=command.split()[0])
        return reply

    def open(self) -> BenchIdentity:
        if self.port is None:  # connect here, never in __init__
            self.port = serial.serial_for_url(self.resource, timeout=self.options.timeout)
        identity = BenchIdentity(*self._ask("*IDN?").split(",", 3))
        self.write({n: np.full(s, self.options.safe_value) for n, s in self.shapes.items()})
        return identity

    def close(self) -> None:
        if self.port is not None and self.port.is_open:
            try:  # safe state first, on every exit path
                self.write({n: np.full(s, self.options.safe_value)
                            for n, s in self.shapes.items()})
            finally:
                self.port.close()

    def write(self, params: dict[str, np.ndarray]) -> None:
        for name, values in params.items():  # refuse before anything is sent
            self.spec.parameter(name).check_range(np.asarray(values), bench=self.name)
        for name, values in params.items():
            self._ask(f"SET {name} {numbers(values)}")

    def read_params(self) -> dict[str, np.ndarray]:
        return {n: np.array(self._ask(f"GET {n}").split(","), float).reshape(s)
                for n, s in self.shapes.items()}

    def relax(self, inputs, nudge=None, start=None, settle=None) -> Relaxation:
        settle = settle or Settle(1e-6, 1000)
        beta = 0.0 if nudge is None else float(nudge.strength)
        rows = []
        for k, x in enumerate(np.asarray(inputs, dtype=float)):
            y = np.zeros(self.model.output_size) if nudge is None else nudge.target[k]
            reply = self._ask(f"RELAX {numbers(x)};{beta!r};{numbers(y)};"
                              f"{float(settle.tolerance)!r};{settle.max_steps}")
            steps, residual, state = reply.split(";")
            rows.append((int(steps), float(residual), np.array(state.split(","), float)))
        steps, residual, states = zip(*rows, strict=True)
        residual = np.array(residual)
        return Relaxation(np.array(states), residual <= settle.tolerance, np.array(steps),
                          residual)
