"""Protocol files and overrides are data, never code: whatever a document holds (wrong types,
unknown keys, huge numbers, NaN, negative sizes, deep nesting, huge files, non-UTF-8 bytes),
it is either a valid protocol or refused with a message naming the field, exit code 2, nothing
created. Fuzzed with hypothesis (>= 1,000 generated documents)."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labep.protocol.text import MAX_PROTOCOL_BYTES, ProtocolError
from labep.run.validate import load_protocol

from .conftest import cli, tiny_xor

BASE = tiny_xor()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.just(math.nan), st.just(-1),
    st.just(0), st.just(10**30), st.text(max_size=20),
    st.sampled_from(["hopfield", "oim", "xor", "digits", "idx", "symmetric", "!!python/none",
                     "__import__('os')", "${HOME}", "../../etc/passwd"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out += _paths(value, (*prefix, index))
    return out


PATHS = [p for p in _paths(BASE) if p]


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """A valid protocol with a few of its fields replaced, removed or added, or anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        node: Any = doc
        try:
            for part in path[:-1]:
                node = node[part]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                node[path[-1]] = draw(values)
            elif action == "delete" and isinstance(node, dict):
                node.pop(path[-1], None)
            elif isinstance(node, dict):
                node[draw(st.text(min_size=1, max_size=8))] = draw(values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced the way there
    return doc


def check(source: Any) -> None:
    try:
        load_protocol(source)
    except ProtocolError as err:
        text = str(err)
        assert text.strip() and "Traceback" not in text


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_generated_documents_are_valid_or_refused(doc: Any) -> None:
    if isinstance(doc, dict):
        check(doc)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        check(path)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_bytes(raw)
        with pytest.raises(ProtocolError):
            load_protocol(path)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_cli_refuses_with_exit_2_and_creates_nothing(doc: Any) -> None:
    try:
        load_protocol(doc if isinstance(doc, dict) else {"x": doc})
        return  # a valid protocol (rare): running it is another test's business
    except ProtocolError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        store = Path(tmp) / "never.db"
        result = cli("run", str(path), "--store", str(store), "--no-progress")
        assert result.exit_code == 2, result.output
        assert not store.exists()
        assert "Traceback" not in result.stderr and result.stderr.strip()


@pytest.mark.parametrize("text", [
    "a: " + "[" * 5000 + "]" * 5000,                        # deep nesting
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(     # an alias bomb
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n"
        for i in range(8)),
    "!!python/object/apply:os.system ['echo pwned']",     # code in YAML: never run
])
def test_nesting_alias_bombs_and_python_tags_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ProtocolError) as err:
        load_protocol(path)
    assert "not" in str(err.value)


def test_huge_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("# " + "x" * (MAX_PROTOCOL_BYTES + 10) + "\n")
    with pytest.raises(ProtocolError, match="at most"):
        load_protocol(path)


def test_unwritable_store_is_refused_before_any_bench_opens(tmp_path: Path) -> None:
    protocol = tmp_path / "p.yaml"
    protocol.write_text(yaml.safe_dump(tiny_xor()))
    result = cli("run", str(protocol), "--store", str(tmp_path / "missing" / "runs.db"),
                 "--no-progress")
    assert result.exit_code == 2 and "not a folder" in result.stderr


def test_emulate_on_a_taken_port_says_so_without_a_traceback() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("emulate", "oim-board", "--tcp", str(port), "--sizes", "2-4-2")
    assert result.exit_code == 1
    assert "cannot serve the emulated board" in result.stderr
    assert "Traceback" not in result.output + result.stderr
