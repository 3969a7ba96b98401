"""The protocol as text: reading YAML, ``--set`` overrides, line numbers, and the errors.

Every problem found in a protocol is a :class:`Problem` (its dotted path, where it came from:
a line of the file or the ``--set`` override, and a plain message); :class:`ProtocolError`
carries them all. The line numbers come from the composed YAML nodes (:class:`LineMap`), so
any section, a plugin's too, gets them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Problem:
    """One offending field: its dotted path, where it came from, and a plain message."""

    path: str
    message: str
    where: str = ""

    def __str__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"{self.path or '(document)'}{where}: {self.message}"


class ProtocolError(ValueError):
    """A protocol was refused; ``problems`` lists every offending field."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: invalid protocol ({len(problems)} problem(s)); nothing was run"]
        lines += [f"  {problem}" for problem in problems]
        super().__init__("\n".join(lines))


def dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class LineMap:
    """Line numbers of the nodes of a YAML document, looked up by key path."""

    def __init__(self, text: str | None) -> None:
        self.root = None
        if text is not None:
            try:
                self.root = yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.YAMLError:
                self.root = None

    def line(self, loc: tuple[Any, ...]) -> int | None:
        node = self.root
        if node is None:
            return None
        line = node.start_mark.line + 1
        for part in loc:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if getattr(key, "value", None) == str(part):
                        child = value
                        line = key.start_mark.line + 1
                        break
            elif (isinstance(node, yaml.SequenceNode) and isinstance(part, int)
                  and 0 <= part < len(node.value)):
                child = node.value[part]
                line = child.start_mark.line + 1
            if child is None:
                return line
            node = child
        return line


def document_loc(doc: Any, loc: tuple[Any, ...],
                 tags: frozenset[str] = frozenset()) -> tuple[Any, ...]:
    """Drop the discriminator tags pydantic inserts into locations of tagged unions: the
    node's own ``kind`` or ``name``, or one of ``tags`` where the node has neither (a
    section whose tag came from a default)."""
    out: list[Any] = []
    node = doc
    for part in loc:
        if isinstance(node, dict):
            if part in node:
                out.append(part)
                node = node[part]
                continue
            if part in (node.get("kind"), node.get("name")) or (
                    part in tags and "kind" not in node and "name" not in node):
                continue
            out.append(part)
            node = None
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        else:
            out.append(part)
            node = None
    return tuple(out)


def describe(error: dict[str, Any]) -> str:
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        return "unknown field (not part of the protocol schema)"
    if error["type"] == "missing":
        return "required field is missing"
    given = error.get("input")
    if error["type"] in ("int_type", "float_type") and isinstance(given, bool):
        message += " (true and false are not numbers)"
    elif error["type"] == "bool_type" and isinstance(given, int | float):
        message += " (a number is not a boolean: write true or false)"
    if "input" in error and error["type"] not in ("model_type", "dict_type"):
        shown = repr(error["input"])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        message += f", got {shown}"
    return message


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (data only), reading an exponent without a dot (``1e-6``, YAML
    1.2's float) as the number it is rather than as a string: with strict types a string is
    never a number, so a number must be read as one. A quoted ``"1e-6"`` stays a string."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """A YAML document as data, with :class:`YamlLoader`."""
    return yaml.load(text, Loader=YamlLoader)  # a SafeLoader: data only


def parse_override(item: str) -> tuple[tuple[Any, ...], Any]:
    """``a.b[2].c=value`` -> (("a", "b", 2, "c"), value parsed as a YAML scalar or flow list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not of the form dotted.key=value")
    path: list[Any] = []
    for part in key.strip().replace("]", "").replace("[", ".").split("."):
        if part == "":
            raise ValueError(f"override {item!r}: empty key component")
        path.append(int(part) if part.isdigit() else part)
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: value is not valid YAML ({err})") from err
    return tuple(path), value


def apply_override(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = doc
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            raise KeyError(dotted(path[: depth + 1]))
    last = path[-1]
    in_list = isinstance(node, list) and isinstance(last, int) and last < len(node)
    if isinstance(node, dict) or in_list:
        node[last] = value
    else:
        raise KeyError(dotted(path))


#: a protocol is a short text: larger files, deeper nesting or more nodes (e.g. YAML aliases
#: expanding exponentially) are refused before validation
MAX_PROTOCOL_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 100_000


def too_big(doc: Any) -> str | None:
    """Why ``doc`` is too deep or too large to be a protocol, or None. Shared (aliased) nodes
    count every time they are reached, so an alias bomb is caught early."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return f"more than {MAX_NODES:,} values (YAML aliases expand every time they appear)"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node)
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)
    return None
