"""Load a protocol file and validate it whole, against the registry, before any bench opens.

The schema is the generic :class:`labep.protocol.sections.Protocol` with its ``model``,
``dataset`` and ``estimator`` sections narrowed to the discriminated unions of every config
class the registry holds (:func:`protocol_schema`): a plugin's section is validated, and its
errors located (dotted path, line of the file or ``--set`` override), exactly like labep's
own. Then the cross-checks that need the registered classes or the data: the bench exists,
runs the model and accepts its options; one learning rate per layer; the dataset is readable
and fits the model; the estimator can use the bench (correction, Boltzmann samples).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, ValidationError, create_model

from labep import registry
from labep.protocol.sections import BenchDocument, Protocol
from labep.protocol.text import (
    MAX_PROTOCOL_BYTES,
    LineMap,
    Problem,
    ProtocolError,
    apply_override,
    describe,
    document_loc,
    dotted,
    parse_override,
    read_yaml,
    too_big,
)

#: (location, message) of one problem a cross-check found
Found = list[tuple[tuple[Any, ...], str]]


def _union(kind: str, tag: str) -> Any:
    """The discriminated union (on ``tag``) of the config classes registered for ``kind``."""
    registered = registry.load_all(kind)
    if not registered:
        raise registry.RegistryError(f"no {kind} is registered (group {registry.GROUPS[kind]}): "
                                     "is labep installed (pip install -e .)?")
    classes = tuple(obj if kind == "dataset" else obj.config_model
                    for obj in registered.values())
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator=tag)]  # noqa: UP007 - a runtime tuple


def _key() -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(f"{e.name}={e.value}" for e in registry.entries(kind).values())
                 for kind in ("model", "dataset", "estimator"))


_SCHEMAS: dict[tuple[Any, ...], tuple[type[Protocol], type[BenchDocument]]] = {}


def _schemas() -> tuple[type[Protocol], type[BenchDocument]]:
    key = _key()
    if key not in _SCHEMAS:
        model = _union("model", "kind")
        protocol = create_model(
            "Protocol", __base__=Protocol, __doc__=Protocol.__doc__,
            model=(model, ...), dataset=(_union("dataset", "name"), ...),
            estimator=(_union("estimator", "name"), ...))
        bench_file = create_model("BenchDocument", __base__=BenchDocument,
                                  __doc__=BenchDocument.__doc__, model=(model, ...))
        _SCHEMAS[key] = (protocol, bench_file)
    return _SCHEMAS[key]


def protocol_schema() -> type[Protocol]:
    """The schema of a protocol file, with the registry's unions (built once per registry)."""
    return _schemas()[0]


def bench_file_schema() -> type[BenchDocument]:
    """The schema of a bench file (``bench`` and ``model``), with the registry's models."""
    return _schemas()[1]


def tags() -> frozenset[str]:
    """Every registered model kind, dataset name and estimator name (the tags pydantic puts
    into the locations of a discriminated union's errors)."""
    return frozenset(name for kind in ("model", "dataset", "estimator")
                     for name in registry.names(kind))


@dataclass
class LoadedProtocol:
    """A validated protocol with the document it came from (as run, overrides applied)."""

    protocol: Any  # Protocol, or BenchDocument from load_bench_file
    document: dict[str, Any]
    source: str


def load_bench_file(
    source: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> LoadedProtocol:
    """A protocol, or a bench file with only ``bench`` and ``model`` (and ``name``)."""
    text = Path(source).read_text(errors="replace") if Path(source).is_file() else ""
    try:
        doc = read_yaml(text)
    except yaml.YAMLError:
        doc = None
    bench_only = isinstance(doc, dict) and set(doc) <= {"name", "bench", "model"}
    return load_protocol(source, overrides, schema=bench_file_schema() if bench_only else None)


def load_protocol(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
    schema: type[Protocol] | type[BenchDocument] | None = None,
) -> LoadedProtocol:
    """Read, override and validate a protocol; raise :class:`ProtocolError` listing every
    problem. ``schema`` defaults to :func:`protocol_schema`. Nothing is created and no bench
    is touched here."""
    schema = protocol_schema() if schema is None else schema
    text: str | None = None
    if isinstance(source, dict):
        label, doc = "<protocol>", copy.deepcopy(source)
    else:
        label = str(source)
        path = Path(source)
        try:
            if path.is_file() and path.stat().st_size > MAX_PROTOCOL_BYTES:
                problem = Problem("", f"the file has {path.stat().st_size:,} bytes; a protocol "
                                  f"has at most {MAX_PROTOCOL_BYTES:,}")
                raise ProtocolError(label, [problem])
            raw = path.read_bytes()
        except OSError as err:
            problem = Problem("", f"cannot read the file: {err.strerror}")
            raise ProtocolError(label, [problem]) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError(label, [Problem("", f"not UTF-8 text ({err.reason})")]) from None
        try:
            doc = read_yaml(text)
        except RecursionError:
            raise ProtocolError(label, [Problem("", "not a protocol: nested too deeply")]) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ProtocolError(label, [Problem("", f"not valid YAML: {problem}", where)]) from None
        if doc is None:
            doc = {}
    if not isinstance(doc, dict):
        raise ProtocolError(label, [Problem("", "a protocol must be a mapping of fields")])
    reason = too_big(doc)
    if reason is not None:
        raise ProtocolError(label, [Problem("", f"not a protocol: {reason}")])

    problems: list[Problem] = []
    overridden: dict[tuple[Any, ...], str] = {}
    for item in overrides:
        try:
            path_, value = parse_override(item)
            apply_override(doc, path_, value)
            overridden[path_] = item
        except ValueError as err:
            problems.append(Problem("", str(err), f"--set {item}"))
        except KeyError as err:
            problems.append(Problem(err.args[0], "no such field to override", f"--set {item}"))
    if problems:
        raise ProtocolError(label, problems)

    lines = LineMap(text)

    def where(loc: tuple[Any, ...]) -> str:
        for path_, item in overridden.items():
            if loc[: len(path_)] == path_ or path_[: len(loc)] == loc:
                return f"--set {item}"
        line = lines.line(loc)
        return f"line {line}" if line is not None else ""

    try:
        protocol = schema.model_validate(doc)
    except ValidationError as err:
        for error in err.errors():
            loc = document_loc(doc, tuple(error["loc"]), tags())
            problems.append(Problem(dotted(loc), describe(error), where(loc)))
        raise ProtocolError(label, problems) from None

    for loc, message in cross_check(protocol):
        problems.append(Problem(dotted(loc), message, where(loc)))
    if problems:
        raise ProtocolError(label, problems)
    return LoadedProtocol(protocol, doc, label)


def cross_check(protocol: Protocol | BenchDocument) -> Found:
    """Checks that need the registry or the data; returns (location, message) pairs."""
    problems = check_bench(protocol)
    if not isinstance(protocol, Protocol):
        return problems
    problems += check_training(protocol)
    problems += check_correction(protocol)
    problems += check_samples(protocol)
    problems += check_estimator(protocol)
    return problems


def _bench_class(protocol: Protocol | BenchDocument) -> Any | None:
    """The registered class of the protocol's bench, or None (check_bench reports it)."""
    bench = protocol.bench
    if (bench.simulator is None) == (bench.driver is None):
        return None
    try:
        return registry.bench_class(bench.kind, bench.name)
    except registry.RegistryError:
        return None


def check_bench(protocol: Protocol | BenchDocument) -> Found:
    """The bench exists, runs the model, and accepts its options; the bench class's
    ``check_model(section, options)`` checks the model section against its
    own limits (a simulator's memory); returns (location, message) pairs."""
    problems: Found = []
    bench = protocol.bench
    if (bench.simulator is None) == (bench.driver is None):
        problems.append((("bench",), "give exactly one of 'simulator' or 'driver'"))
        return problems
    cls = _bench_class(protocol)
    if cls is None:
        known = ", ".join(registry.names(bench.kind)) or "(none yet)"
        message = f"unknown {bench.kind} {bench.name!r}; known: {known}"
        problems.append((("bench", bench.kind), message))
        return problems
    if protocol.model.kind not in cls.model_kinds:
        problems.append((
            ("model", "kind"),
            f"bench {bench.name!r} runs {', '.join(cls.model_kinds)}, "
            f"not {protocol.model.kind}",
        ))
    try:
        options = cls.options_model.model_validate(bench.options)
    except ValidationError as err:
        for error in err.errors():
            loc = ("bench", "options", *error["loc"])
            problems.append((loc, describe(error)))
    else:
        # a bench's own limits on the model it is given (e.g. what it can diagonalize)
        if protocol.model.kind in cls.model_kinds:
            problems += cls.check_model(protocol.model, options)
    if bench.kind == "driver" and not bench.resource:
        problems.append((("bench", "resource"), "a driver needs a resource string"))
    return problems


def check_training(protocol: Protocol) -> Found:
    """One learning rate per layer; the dataset is readable and fits the model."""
    problems: Found = []
    sizes = protocol.model.sizes
    n_layers = len(sizes) - 1
    rates = protocol.training.learning_rates
    if len(rates) not in (1, n_layers):
        problems.append((
            ("training", "learning_rates"),
            f"give one learning rate per layer of couplings ({n_layers}) or a single value, "
            f"got {len(rates)}",
        ))
    try:
        n_features, n_classes = protocol.dataset.shape()
    except (OSError, ValueError) as err:
        problems.append((("dataset", "path"), str(err)))
    else:
        if sizes[0] != n_features:
            problems.append((
                ("model", "sizes", 0),
                f"the input layer has {sizes[0]} units but the dataset has "
                f"{n_features} features",
            ))
        if sizes[-1] != n_classes:
            problems.append((
                ("model", "sizes", len(sizes) - 1),
                f"the output layer has {sizes[-1]} units but the dataset has "
                f"{n_classes} classes",
            ))
    return problems


def check_correction(protocol: Protocol) -> Found:
    """A protocol asking for the non-conservative correction uses an estimator of
    deterministic states and names a bench that applies the correction."""
    estimator = protocol.estimator
    if not estimator.correction:
        return []
    if not registry.load("estimator", estimator.name).deterministic:
        able = ", ".join(name for name, cls in registry.load_all("estimator").items()
                         if cls.deterministic)
        return [(("estimator", "correction"), "the non-conservative correction is for the "
                 f"estimators of deterministic states ({able}), not {estimator.name}")]
    cls = _bench_class(protocol)
    if cls is None or cls.supports_correction:
        return []
    able = ", ".join(registry.correcting_benches())
    return [(("estimator", "correction"),
             f"bench {protocol.bench.name!r} cannot apply the non-conservative correction "
             f"(J^T - J)(s - s0) to its nudged phases; benches that can: {able or '(none)'}")]


def check_estimator(protocol: Protocol) -> Found:
    """The estimator's own checks of the model and the bench (its class's
    ``check_protocol``), e.g. a model with the derivatives it takes."""
    cls = registry.load("estimator", protocol.estimator.name)
    try:
        model_class = registry.model_class(protocol.model.kind)
    except registry.RegistryError:
        model_class = None
    bench = _bench_class(protocol)
    options = None
    if bench is not None:
        try:
            options = bench.options_model.model_validate(protocol.bench.options)
        except ValidationError:
            options = None  # check_bench reports it
    return cls.check_protocol(protocol, model_class, options)


#: largest sample set an estimator over sample sets may keep per phase (bytes)
MAX_SAMPLE_BYTES = 2 * 2**30


def check_samples(protocol: Protocol) -> Found:
    """An estimator over Boltzmann sample sets (its class's ``samples``) needs a bench that
    returns them (its options' ``sampling_temperature`` T > 0) and >= 2 readouts."""
    estimator = protocol.estimator.name
    if not registry.load("estimator", estimator).samples:
        return []
    cls = _bench_class(protocol)
    if cls is None:
        return []  # check_bench reports it
    try:
        options = cls.options_model.model_validate(protocol.bench.options)
    except ValidationError:
        return []  # check_bench reports it
    problems: Found = []
    temperature = getattr(options, "sampling_temperature", None)
    bench = protocol.bench.name
    if temperature is None:
        problems.append((("estimator", "name"), f"{estimator} takes Boltzmann samples; bench "
                         f"{bench!r} cannot return samples (its options give no "
                         "sampling_temperature; `labep benches` lists the benches and "
                         "their options)"))
    elif not temperature > 0.0:
        problems.append((("bench", "options"), f"{estimator} takes Boltzmann samples at a "
                         f"temperature T > 0; bench {bench!r} is at T = 0 (its options set "
                         "its sampling temperature; `labep benches` lists them)"))
    if protocol.phases.readout_average < 2:
        problems.append((("phases", "readout_average"), f"{estimator}: the readouts per phase "
                         "are its samples; give at least 2 (a few hundred in practice)"))
    # the samples of a phase are kept whole: (readouts, batch, units) float64
    units = sum(protocol.model.sizes[1:])
    kept = protocol.phases.readout_average * protocol.training.batch_size * units * 8
    if kept > MAX_SAMPLE_BYTES:
        problems.append((("phases", "readout_average"), f"{estimator} keeps every readout: "
                         f"{protocol.phases.readout_average} readouts x batch "
                         f"{protocol.training.batch_size} x {units} "
                         f"units is {kept / 2**30:.1f} GiB per phase (limit "
                         f"{MAX_SAMPLE_BYTES / 2**30:.0f} GiB); fewer readouts or a smaller "
                         "batch"))
    return problems
