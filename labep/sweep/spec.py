"""A sweep file: a base protocol, fixed overrides, and axes of overrides; expanded to trials,
every one validated as a protocol before anything is created.

```yaml
name: beta-scan
protocol: quickstart.yaml        # relative to this file
set: {training.epochs: 2}        # the same for every trial
grid:                            # every combination (the last axis varies fastest)
  estimator.beta: [0.25, 0.5, 1.0]
  seed: [0, 1]
zip:                             # lists of equal length, taken together
  training.learning_rates[0]: [0.1, 0.05]
  training.learning_rates[1]: [0.05, 0.025]
random:                          # count draws with a seed
  count: 4
  seed: 0
  axes:
    phases.free.tolerance: {log_uniform: [1.0e-5, 1.0e-3]}
    estimator.beta: {uniform: [0.1, 1.0]}
    model.sizes[1]: {choice: [64, 128, 256]}
scheduler: tcp://10.0.0.5:8786   # optional: an existing dask cluster
```

The trials are the product of the blocks present (grid combinations x zip rows x random
draws). Any dotted protocol path (``--set`` syntax) is an axis.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from labep.protocol.strict import StrictModel
from labep.protocol.text import (
    LineMap,
    Problem,
    ProtocolError,
    apply_override,
    describe,
    dotted,
    parse_override,
    read_yaml,
)
from labep.run.validate import load_protocol

#: at most this many trials in one sweep
MAX_TRIALS = 100_000


class SweepError(ValueError):
    """A sweep file was refused; ``problems`` lists every offending field or trial."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: invalid sweep ({len(problems)} problem(s)); nothing was created"]
        lines += [f"  {problem}" for problem in problems]
        super().__init__("\n".join(lines))


def axis_path(key: str) -> tuple[Any, ...]:
    """``model.sizes[1]`` -> ("model", "sizes", 1), as ``--set`` reads it."""
    return parse_override(f"{key}=0")[0]


class Draw(StrictModel):
    """One random axis: exactly one of ``uniform: [lo, hi]``, ``log_uniform: [lo, hi]``
    (lo > 0) or ``choice: [values...]``."""

    uniform: tuple[float, float] | None = Field(None, strict=False)
    log_uniform: tuple[float, float] | None = Field(None, strict=False)
    choice: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> Draw:
        given = [name for name in ("uniform", "log_uniform", "choice")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, log_uniform, choice")
        bounds = self.uniform or self.log_uniform
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"the bounds must be [low, high] with low < high, got {bounds}")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform needs a positive low bound")
        return self

    def draw(self, rng: np.random.Generator) -> Any:
        if self.uniform is not None:
            return float(rng.uniform(*self.uniform))
        if self.log_uniform is not None:
            low, high = self.log_uniform
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        assert self.choice is not None
        return self.choice[int(rng.integers(len(self.choice)))]


class RandomAxes(StrictModel):
    count: int = Field(ge=1, le=MAX_TRIALS)
    seed: int = Field(0, ge=0)
    axes: dict[str, Draw] = Field(min_length=1)


def _check_paths(axes: dict[str, Any]) -> dict[str, Any]:
    for key in axes:
        axis_path(key)  # ValueError: not a dotted path
    return axes


class SweepFile(StrictModel):
    """The schema of a sweep file (see the module's docstring)."""

    name: str = Field("sweep", max_length=200)
    protocol: str = Field(description="The base protocol, relative to the sweep file.")
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)
    random: RandomAxes | None = None
    scheduler: str | None = Field(None, description="tcp://HOST:PORT of a dask scheduler.")
    workers: int | None = Field(None, ge=1, description="LocalCluster worker processes.")
    store: str | None = None

    @field_validator("set")
    @classmethod
    def _set_paths(cls, axes: dict[str, Any]) -> dict[str, Any]:
        return _check_paths(axes)

    @field_validator("grid", "zip")
    @classmethod
    def _nonempty(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        _check_paths(axes)
        for key, values in axes.items():
            if not values:
                raise ValueError(f"axis {key} has no values")
        return axes

    @model_validator(mode="after")
    def _consistent(self) -> SweepFile:
        if self.random is not None:
            _check_paths(self.random.axes)
        lengths = {len(values) for values in self.zip.values()}
        if len(lengths) > 1:
            raise ValueError("the zip axes must have lists of equal length, got " + ", ".join(
                f"{key}: {len(values)}" for key, values in self.zip.items()))
        seen: dict[tuple[Any, ...], str] = {}
        for key in [*self.set, *self.axes()]:
            path = axis_path(key)
            if path in seen:
                raise ValueError(f"{key} is given twice (also as {seen[path]})")
            seen[path] = key
        if self.size() > MAX_TRIALS:
            raise ValueError(f"{self.size():,} trials; a sweep has at most {MAX_TRIALS:,}")
        return self

    def axes(self) -> list[str]:
        """The axis names: grid's, zip's, random's, in that order."""
        drawn = list(self.random.axes) if self.random is not None else []
        return [*self.grid, *self.zip, *drawn]

    def size(self) -> int:
        grid = math.prod(len(values) for values in self.grid.values())
        rows = len(next(iter(self.zip.values()))) if self.zip else 1
        return grid * rows * (self.random.count if self.random is not None else 1)

    def expand(self) -> list[dict[str, Any]]:
        """Every trial's axis values (axis name -> value), in trial order."""
        grid = [dict(zip(self.grid, combo, strict=True))
                for combo in itertools.product(*self.grid.values())]
        rows = ([dict(zip(self.zip, row, strict=True)) for row in zip(*self.zip.values(),
                                                                      strict=True)]
                if self.zip else [{}])
        drawn: list[dict[str, Any]] = [{}]
        if self.random is not None:
            rng = np.random.default_rng(self.random.seed)
            drawn = [{key: draw.draw(rng) for key, draw in self.random.axes.items()}
                     for _ in range(self.random.count)]
        return [{**g, **r, **d} for g in grid for r in rows for d in drawn]


@dataclass
class Sweep:
    """A validated sweep: its file, the base protocol's path and every trial's (axis values,
    protocol document)."""

    spec: SweepFile
    source: Path
    base: Path
    trials: list[tuple[dict[str, Any], dict[str, Any]]]

    @property
    def store(self) -> str | None:
        """The sweep file's ``store``, else the base protocol's."""
        return self.spec.store or (self.trials[0][1].get("store") if self.trials else None)


def _refuse_file(label: str, text: str, err: ValidationError) -> SweepError:
    lines = LineMap(text)
    problems = []
    for error in err.errors():
        loc = tuple(error["loc"])
        line = lines.line(loc)
        problems.append(Problem(dotted(loc), describe(error),
                                f"line {line}" if line is not None else ""))
    return SweepError(label, problems)


def load_sweep(source: str | Path) -> Sweep:
    """Read a sweep file, expand it, and validate every trial's protocol; raise
    :class:`SweepError` listing every problem (trial index and path). Creates nothing."""
    label, path = str(source), Path(source)
    try:
        text = path.read_text(encoding="utf-8")
        doc = read_yaml(text)
    except OSError as err:
        raise SweepError(label, [Problem("", f"cannot read the file: {err.strerror}")]) from None
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise SweepError(label, [Problem("", f"not a YAML text file: {err}")]) from None
    if not isinstance(doc, dict):
        raise SweepError(label, [Problem("", "a sweep file must be a mapping of fields")])
    try:
        spec = SweepFile.model_validate(doc)
    except ValidationError as err:
        raise _refuse_file(label, text, err) from None
    base = (path.parent / spec.protocol).resolve() if not Path(spec.protocol).is_absolute() \
        else Path(spec.protocol)
    try:
        base_doc = read_yaml(base.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SweepError(label, [Problem("protocol", f"cannot read the base protocol {base}: "
                                         f"{err}")]) from None
    if not isinstance(base_doc, dict):
        raise SweepError(label, [Problem("protocol", f"{base} is not a protocol mapping")])

    problems: list[Problem] = []
    trials: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for index, values in enumerate(spec.expand()):
        trial_doc = copy.deepcopy(base_doc)
        shown = ", ".join(f"{key}={value!r}" for key, value in values.items())
        where = f"trial {index}" + (f": {shown}" if shown else "")
        found: list[Problem] = []
        for key, value in [*spec.set.items(), *values.items()]:
            try:
                apply_override(trial_doc, axis_path(key), copy.deepcopy(value))
            except KeyError as err:
                found.append(Problem(err.args[0], f"no such field ({key})", where))
        if not found:
            try:
                load_protocol(trial_doc)
            except ProtocolError as err:
                found += [Problem(problem.path, problem.message, where)
                          for problem in err.problems]
        problems += found
        trials.append((values, trial_doc))
        if len(problems) >= 50:
            break
    if problems:
        raise SweepError(label, problems)
    return Sweep(spec, path, base, trials)
