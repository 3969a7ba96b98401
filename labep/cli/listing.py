"""``labep benches``, ``models``, ``estimators``, ``datasets``: what the registry holds.

Each lists the installed entries of its entry-point group (labep's own and any plugin's),
with the options or fields a protocol may give them (default and description, from their
Pydantic models) and, for a bench, the models it runs and what it supports.
"""

from __future__ import annotations

from typing import Any

import click
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from labep import registry
from labep.cli.common import dump


def _fields(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The fields of a Pydantic model: name, default (``required`` if none), description."""
    rows = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        if field.default is not PydanticUndefined:
            default = repr(field.default)
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = "required"
        if isinstance(field.default, BaseModel) or len(default) > 40:
            default = type(field.default).__name__ if isinstance(field.default, BaseModel) \
                else default[:37] + "..."
        rows.append({"name": name, "default": default,
                     "description": (field.description or "").split(". ")[0]})
    return rows


def _origin(kind: str, name: str) -> str:
    """The distribution an entry comes from, and its target (``module:attr``)."""
    entry = registry.entries(kind)[name]
    dist = entry.dist.name if entry.dist is not None else "?"
    return f"{dist}: {entry.value}"


def bench_rows() -> list[dict[str, Any]]:
    rows = []
    for kind in registry.BENCH_KINDS:
        for name, cls in registry.load_all(kind).items():
            rows.append({"name": name, "kind": kind, "from": _origin(kind, name),
                         "models": list(cls.model_kinds),
                         "supports_correction": bool(cls.supports_correction),
                         "summary": (cls.__doc__ or "").strip().split("\n")[0],
                         "options": _fields(cls.options_model)})
    return rows


def model_rows() -> list[dict[str, Any]]:
    runs_on = {}
    for row in bench_rows():
        for kind in row["models"]:
            runs_on.setdefault(kind, []).append(row["name"])
    return [{"name": name, "from": _origin("model", name),
             "summary": (cls.config_model.__doc__ or "").strip().split("\n")[0],
             "benches": runs_on.get(name, []),
             "fields": _fields(cls.config_model, ("kind",))}
            for name, cls in registry.load_all("model").items()]


def estimator_rows() -> list[dict[str, Any]]:
    return [{"name": name, "from": _origin("estimator", name),
             "summary": (cls.__doc__ or "").strip().split("\n")[0],
             "samples": cls.samples, "deterministic": cls.deterministic,
             "fields": _fields(cls.config_model, ("name",))}
            for name, cls in registry.load_all("estimator").items()]


def dataset_rows() -> list[dict[str, Any]]:
    return [{"name": name, "from": _origin("dataset", name),
             "summary": (cls.__doc__ or "").strip().split("\n")[0],
             "fields": _fields(cls, ("name",))}
            for name, cls in registry.load_all("dataset").items()]


def _print(rows: list[dict[str, Any]], head: Any, fields_key: str) -> None:
    for row in rows:
        click.echo(head(row))
        click.echo(f"    {row['summary']}")
        click.echo(f"    from {row['from']}")
        for field in row[fields_key]:
            click.echo(f"    {field['name']:22} {field['default']:>12}  {field['description']}")
        click.echo("")


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.command()
@json_option
def benches(as_json: bool) -> None:
    """List the installed benches (simulators and drivers): the models each runs and its
    options (bench.options)."""
    rows = bench_rows()
    if as_json:
        dump(rows)
        return

    def head(row: dict[str, Any]) -> str:
        extra = ", non-conservative correction" if row["supports_correction"] else ""
        return f"{row['name']} ({row['kind']}): runs {', '.join(row['models'])}{extra}"
    _print(rows, head, "options")


@click.command()
@json_option
def models(as_json: bool) -> None:
    """List the installed models: the benches that run each and its fields (model:)."""
    rows = model_rows()
    if as_json:
        dump(rows)
        return
    _print(rows, lambda row: f"{row['name']}: on {', '.join(row['benches']) or '(no bench)'}",
           "fields")


@click.command()
@json_option
def estimators(as_json: bool) -> None:
    """List the installed EP estimators and their fields (estimator:)."""
    rows = estimator_rows()
    if as_json:
        dump(rows)
        return

    def head(row: dict[str, Any]) -> str:
        takes = "Boltzmann sample sets" if row["samples"] else "steady states"
        return f"{row['name']}: {takes}"
    _print(rows, head, "fields")


@click.command()
@json_option
def datasets(as_json: bool) -> None:
    """List the installed datasets and their fields (dataset:)."""
    rows = dataset_rows()
    if as_json:
        dump(rows)
        return
    _print(rows, lambda row: row["name"], "fields")
