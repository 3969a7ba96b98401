"""Where protocol names resolve to classes: benches (simulators and drivers) and models.

Imports are lazy so that validating a protocol never imports numba kernels or opens hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any


@dataclass(frozen=True)
class BenchEntry:
    """A bench a protocol can name: ``kind`` is ``simulator`` or ``driver``."""

    kind: str
    target: str  # "module:Class"

    def load(self) -> Any:
        module, _, name = self.target.partition(":")
        return getattr(import_module(module), name)


BENCHES: dict[str, BenchEntry] = {
    "hopfield": BenchEntry("simulator", "labep.simulators.hopfield:HopfieldSimulator"),
    "oim": BenchEntry("simulator", "labep.simulators.oim:OIMSimulator"),
    "oim_board": BenchEntry("driver", "labep.drivers.oim_board:OIMBoard"),
    "polariton": BenchEntry("simulator", "labep.simulators.polariton:PolaritonSimulator"),
    "polariton_bench": BenchEntry("driver", "labep.drivers.polariton_bench:PolaritonBench"),
    "nonreciprocal": BenchEntry("simulator",
                                "labep.simulators.nonreciprocal:NonreciprocalSimulator"),
}

MODELS: dict[str, str] = {
    "layered_hopfield": "labep.models.hopfield:LayeredHopfield",
    "layered_oim": "labep.models.oim:LayeredOIM",
    "dense_oim": "labep.models.dense_oim:DenseOIM",
    "polariton": "labep.models.polariton:PolaritonLattice",
    "nonreciprocal": "labep.models.nonreciprocal:NonreciprocalLayered",
}


def bench_names(kind: str) -> list[str]:
    return sorted(name for name, entry in BENCHES.items() if entry.kind == kind)


def correcting_benches() -> list[str]:
    """Benches that apply the non-conservative correction (``supports_correction``)."""
    #: kept by name so that listing them never imports every bench's kernels
    return ["nonreciprocal"]


def load_model_class(kind: str) -> Any:
    module, _, name = MODELS[kind].partition(":")
    return getattr(import_module(module), name)
