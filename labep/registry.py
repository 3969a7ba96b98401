"""The one registry: every simulator, driver, model, estimator and dataset a protocol can name.

Each is an entry point of an installed distribution (:mod:`importlib.metadata`), in the group
of its kind; labep declares its own in its ``pyproject.toml`` exactly as a lab's package
declares its additions, so a lab adds an instrument without editing labep:

    [project.entry-points."labep.drivers"]
    my_laser_bench = "mylab.bench:LaserBench"

- ``labep.simulators`` and ``labep.drivers``: a bench class (the Bench contract,
  :class:`labep.hardware.bench.Bench`), built as ``cls(model, options)`` (a driver also gets
  ``resource=`` and ``transport=``); it declares ``model_kinds``, ``options_model`` and
  optionally ``supports_correction``;
- ``labep.models``: a model class, declaring ``kind`` and ``config_model`` (its protocol
  section, a :class:`labep.protocol.sections.ModelSection`);
- ``labep.estimators``: an estimator class, declaring ``name``, ``config_model`` (a
  :class:`labep.protocol.sections.EstimatorSection`), ``samples`` and ``deterministic``;
- ``labep.datasets``: a :class:`labep.protocol.sections.DatasetSection` subclass (its
  ``shape`` and ``load``).

Loading is lazy: an entry point is imported only when its name is looked up (or when every
entry of a group is listed). Validating a protocol loads the model, estimator and dataset
classes (plain numpy and pydantic modules) and the one bench it names, for the bench's
options model; a simulator's module imports numba and declares its kernels, but numba
compiles them (or reads them from its cache) only when they are first called, and a driver's
module opens nothing: a bench connects in ``open()``, never at import or construction.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata
from typing import Any

#: the kinds of things a protocol can name, and the entry-point group of each
GROUPS: dict[str, str] = {
    "simulator": "labep.simulators",
    "driver": "labep.drivers",
    "model": "labep.models",
    "estimator": "labep.estimators",
    "dataset": "labep.datasets",
}

#: the kinds a protocol's ``bench`` can name
BENCH_KINDS = ("simulator", "driver")


class RegistryError(LookupError):
    """A name is not registered, or registered twice with different targets."""


@cache
def entries(kind: str) -> dict[str, metadata.EntryPoint]:
    """The entry points of one kind, by name (discovered once; :func:`refresh` forgets)."""
    group = GROUPS[kind]
    found: dict[str, metadata.EntryPoint] = {}
    for entry in metadata.entry_points(group=group):
        known = found.get(entry.name)
        if known is not None and known.value != entry.value:
            raise RegistryError(f"{group}: {entry.name!r} is registered twice, as "
                                f"{known.value} and as {entry.value}")
        found[entry.name] = entry
    return found


def refresh() -> None:
    """Forget what was discovered (after a distribution was installed or put on sys.path)."""
    entries.cache_clear()


def names(kind: str) -> list[str]:
    """The registered names of one kind, sorted."""
    return sorted(entries(kind))


def load(kind: str, name: str) -> Any:
    """The object a name of ``kind`` points at, imported now if it was not yet."""
    entry = entries(kind).get(name)
    if entry is None:
        known = ", ".join(names(kind)) or "(none)"
        raise RegistryError(f"unknown {kind} {name!r}; known: {known}")
    return entry.load()


def load_all(kind: str) -> dict[str, Any]:
    """Every registered object of one kind, by name (imports them all)."""
    return {name: load(kind, name) for name in names(kind)}


def bench_class(kind: str, name: str) -> Any:
    """The class of a bench: ``kind`` is ``simulator`` or ``driver``."""
    if kind not in BENCH_KINDS:
        raise RegistryError(f"a bench is a simulator or a driver, not a {kind}")
    return load(kind, name)


def model_class(kind: str) -> Any:
    """The model class of a model section's ``kind``."""
    return load("model", kind)


def correcting_benches() -> list[str]:
    """The benches that apply the non-conservative correction (``supports_correction``);
    imports every bench class (for error messages and listings only)."""
    return [name for kind in BENCH_KINDS for name, cls in load_all(kind).items()
            if cls.supports_correction]
