"""Strict types in protocols and bench options (a boolean is not a number, a number is not a
boolean); a damaged or foreign run store is refused in one line, never modified."""

from __future__ import annotations

import json
import random
import sqlite3
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from labep import registry
from labep.data.builtin import IdxConfig
from labep.models.polariton_config import InitRegion
from labep.protocol.strict import STRICT_CONFIG
from labep.protocol.text import ProtocolError
from labep.run.validate import load_protocol
from labep.simulators.polariton import PolaritonSimulatorOptions
from labep.store.files import SCHEMA_VERSION, StoreError
from labep.store.runs import RunStore

from .conftest import (
    PROTOCOLS,
    cli,
    cli_json,
    protocol_doc,
    refused,
    tiny_xor,
    write_protocol,
)

# --------------------------------------------------------------------------------------------
# Job 1: strict types


@pytest.mark.parametrize("name", sorted(p.name for p in PROTOCOLS.glob("*.yaml")))
def test_shipped_protocols_validate_strictly(name: str) -> None:
    """Every shipped protocol loads, and so does what labep keeps of it: the document as run
    (JSON in the store, read back by resume) and the validated model dumped to JSON (tuples
    become lists, paths strings)."""
    doc = protocol_doc(name)
    if doc["dataset"]["name"] == "idx" and not Path(doc["dataset"]["path"]).is_dir():
        pytest.skip("shared MNIST not beside this clone")
    loaded = load_protocol(PROTOCOLS / name)
    assert load_protocol(json.loads(json.dumps(loaded.document))).protocol == loaded.protocol
    dumped = json.loads(loaded.protocol.model_dump_json())
    assert load_protocol(dumped).protocol == loaded.protocol
    bench = loaded.protocol.bench
    options = registry.bench_class(bench.kind, bench.name).options_model
    options.model_validate(json.loads(json.dumps(loaded.protocol.bench.options)))


@pytest.mark.parametrize("field", [
    "estimator.beta", "phases.free.tolerance", "phases.nudged.max_steps",
    "phases.readout_average", "evaluation.every_epochs", "training.epochs",
    "training.batch_size", "seed", "dataset.repeats", "model.init_gain",
    "bench.options.damping", "bench.options.tolerance", "bench.options.device.seed",
])
def test_a_boolean_is_not_a_number(tmp_path: Path, field: str) -> None:
    err = refused(tmp_path, tiny_xor(**{field: True}))
    assert f"{field} (line " in err, err
    assert "not numbers" in err and "got True" in err


def test_a_boolean_in_a_list_of_numbers_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, tiny_xor(**{"training.learning_rates": [0.2, False]}))
    assert "training.learning_rates[1] (line " in err and "not numbers" in err
    err = refused(tmp_path, tiny_xor(**{"model.sizes": [2, True, 2]}))
    assert "model.sizes[1]" in err


@pytest.mark.parametrize("field", [
    "estimator.correction", "estimator.random_sign", "writes.verify", "writes.shadow",
    "bench.options.asynchronous", "bench.options.common_noise",
])
@pytest.mark.parametrize("number", [1, 0, 1.0])
def test_a_number_is_not_a_boolean(tmp_path: Path, field: str, number: float) -> None:
    err = refused(tmp_path, tiny_xor(**{field: number}))
    assert f"{field} (line " in err, err
    assert "a number is not a boolean" in err


def test_a_string_is_not_a_number_nor_a_boolean(tmp_path: Path) -> None:
    err = refused(tmp_path, tiny_xor(**{"estimator.beta": "0.5", "writes.verify": "yes"}))
    assert "estimator.beta" in err and "writes.verify" in err and "2 problem(s)" in err


def test_overrides_are_strict_too(tmp_path: Path) -> None:
    err = refused(tmp_path, tiny_xor(), "estimator.beta=true")
    assert "estimator.beta (--set estimator.beta=true)" in err and "not numbers" in err
    err = refused(tmp_path, tiny_xor(), "estimator.correction=1")
    assert "estimator.correction (--set estimator.correction=1)" in err
    err = refused(tmp_path, tiny_xor(), "bench.options.tolerance=yes")  # YAML 1.1: a boolean
    assert "bench.options.tolerance (--set bench.options.tolerance=yes)" in err
    loaded = load_protocol(tiny_xor(), ["training.epochs=3", "estimator.beta=1",
                                        "estimator.correction=false"])
    assert loaded.protocol.training.epochs == 3
    assert loaded.protocol.estimator.beta == 1.0 and isinstance(loaded.protocol.estimator.beta,
                                                               float)


def test_an_integer_where_a_float_is_expected_is_accepted() -> None:
    loaded = load_protocol(tiny_xor(**{"estimator.beta": 1, "phases.free.tolerance": 1,
                                       "training.learning_rates": 1,
                                       "bench.options.damping": 1}))
    protocol = loaded.protocol
    assert protocol.estimator.beta == 1.0 and type(protocol.estimator.beta) is float
    assert protocol.phases.free.tolerance == 1.0
    assert protocol.training.learning_rates == [1.0]


def test_an_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    """PyYAML reads ``1e-6`` as a string (YAML 1.1); labep reads it as the number it is, in
    the file and in ``--set``, while a quoted "1e-6" stays a string, refused."""
    path = write_protocol(tmp_path / "p.yaml", tiny_xor())
    text = path.read_text().replace("tolerance: 1.0e-06", "tolerance: 1e-6")
    assert text.count("tolerance: 1e-6") == 2
    path.write_text(text)
    loaded = load_protocol(path, ["estimator.beta=5E-1", "bench.options.tolerance=1e-8"])
    assert loaded.protocol.phases.free.tolerance == 1e-6
    assert loaded.protocol.estimator.beta == 0.5
    assert loaded.protocol.bench.options["tolerance"] == 1e-8
    quoted = text.replace("tolerance: 1e-6", 'tolerance: "1e-6"', 1)
    path.write_text(quoted)
    line = quoted.splitlines().index('    tolerance: "1e-6"') + 1
    with pytest.raises(ProtocolError) as caught:
        load_protocol(path)
    assert [str(p) for p in caught.value.problems] == [
        f"phases.free.tolerance (line {line}): Input should be a valid number, got '1e-6'"]


def test_a_float_where_an_integer_is_expected_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, tiny_xor(**{"training.epochs": 2.0}))
    assert "training.epochs (line " in err and "integer" in err


def test_legitimate_lax_conversions_stay(tmp_path: Path) -> None:
    """A YAML list becomes a tuple and a path string a path; the items stay strict."""
    assert IdxConfig.model_validate({"name": "idx", "path": str(tmp_path)}).path == tmp_path
    with pytest.raises(ValidationError):
        IdxConfig.model_validate({"name": "idx", "path": 7})
    assert InitRegion.model_validate({"sites": [0], "potential": [-1, 1]}).potential == (-1, 1)
    with pytest.raises(ValidationError, match="valid number"):
        InitRegion.model_validate({"sites": [0], "potential": [True, 1.0]})
    options = PolaritonSimulatorOptions.model_validate({"potential_range": [-8, 8]})
    assert options.potential_range == (-8.0, 8.0)
    with pytest.raises(ValidationError, match="valid number"):
        PolaritonSimulatorOptions.model_validate({"potential_range": [-8.0, False]})
    doc = protocol_doc("polariton_xor.yaml")
    doc["model"]["init_potential"] = [-1, True]
    with pytest.raises(ProtocolError) as caught:
        load_protocol(doc)
    assert [p.path for p in caught.value.problems] == ["model.init_potential[1]"]


@pytest.mark.parametrize("kind, bench", [(kind, name) for kind in registry.BENCH_KINDS
                                          for name in registry.names(kind)])
def test_every_bench_options_model_is_strict(kind: str, bench: str) -> None:
    """The options of every bench, drivers included, refuse a boolean for a number and a
    number for a boolean, and accept an integer for a float."""
    options = registry.bench_class(kind, bench).options_model
    assert {k: options.model_config.get(k) for k in STRICT_CONFIG} == STRICT_CONFIG
    # a float and an integer option of the bench (tolerance and max_steps where it has them)
    floats = [name for name, field in options.model_fields.items()
              if field.annotation in (float, "float")]
    ints = [name for name, field in options.model_fields.items()
            if field.annotation in (int, "int")]
    number = "tolerance" if "tolerance" in floats else floats[0]
    integer = "max_steps" if "max_steps" in ints else ints[0]
    with pytest.raises(ValidationError, match="valid number"):
        options.model_validate({number: True})
    with pytest.raises(ValidationError, match="valid integer"):
        options.model_validate({integer: False})
    assert getattr(options.model_validate({number: 1}), number) == 1.0
    booleans = [name for name, field in options.model_fields.items()
                if field.annotation in (bool, "bool")]
    for name in booleans:
        with pytest.raises(ValidationError, match="valid boolean"):
            options.model_validate({name: 1})


def test_a_driver_option_boolean_is_refused_with_its_path(tmp_path: Path) -> None:
    doc = protocol_doc("oim_board_xor.yaml")
    doc["bench"]["options"]["retries"] = True
    with pytest.raises(ProtocolError) as caught:
        load_protocol(doc)
    assert [p.path for p in caught.value.problems] == ["bench.options.retries"]
    assert "not numbers" in str(caught.value)


# --------------------------------------------------------------------------------------------
# Job 2: damaged and foreign stores

READS = (("runs",), ("show", "latest"), ("show", "latest", "--json"), ("calibrations",),
         ("report", "latest"), ("resume", "latest", "--no-progress"))


def valid_store(path: Path, runs: int = 2) -> Path:
    """A labep store with ``runs`` runs of a few steps each (metrics, arrays, an event),
    written through the RunStore API."""
    import numpy as np

    with RunStore(path) as store:
        for number in range(runs):
            run_id = store.create_run(f"run-{number}", tiny_xor(), "hopfield", number, "0.1.0")
            for step in range(1, 41):
                store.commit_step(
                    run_id, step, step // 10,
                    {"loss": 1.0 / step, "train_accuracy": 0.5, "steps_free": 20.0,
                     "test_accuracy": 0.75},
                    arrays={"checkpoint": {"W1": np.full((2, 8), step / 10.0)}}
                    if step % 10 == 0 else None,
                    events=[("unsettled", "a sample did not settle", {"samples": 1})]
                    if step == 7 else None)
            store.finish(run_id, "completed")
    return path


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def _page_of(path: Path, table: str) -> int:
    """The root page (1-based) of a table of the store at ``path``."""
    db = sqlite3.connect(path)
    try:
        (page,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                             (table,)).fetchone()
        return int(page)
    finally:
        db.close()


def _overwrite_page(path: Path, page: int, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    size = struct.unpack(">H", data[16:18])[0]
    size = 65536 if size == 1 else size  # SQLite's header writes 65536 as 1
    start = (page - 1) * size
    data[start:start + size] = random.Random(seed).randbytes(size)
    path.write_bytes(bytes(data))


def random_bytes(path: Path) -> None:
    valid_store(path)
    path.write_bytes(random.Random(1).randbytes(path.stat().st_size))


def runs_pages_corrupted(path: Path) -> None:
    """Header and schema kept; the runs table's pages are noise (found by a later query)."""
    valid_store(path)
    _overwrite_page(path, _page_of(path, "runs"))


def metrics_pages_corrupted(path: Path) -> None:
    valid_store(path)
    _overwrite_page(path, _page_of(path, "metrics"), seed=2)


def truncated(path: Path) -> None:
    valid_store(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def header_cut_short(path: Path) -> None:
    valid_store(path)
    path.write_bytes(path.read_bytes()[:60])


def png(path: Path) -> None:
    path.write_bytes(_png())


def text(path: Path) -> None:
    path.write_text("name: not a store\nseed: 3\n")


def empty_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 1")  # writes the header: a database without tables
    db.commit()
    db.close()


def other_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    db.execute("INSERT INTO users (name) VALUES ('ada')")
    db.commit()
    db.close()


def newer_schema(path: Path) -> None:
    valid_store(path, runs=1)
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
               (str(SCHEMA_VERSION + 3),))
    db.commit()
    db.close()


def older_schema_damaged(path: Path) -> None:
    """A version-3 store (it would be migrated) with a damaged page: never migrated."""
    valid_store(path)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE resume_points")
    db.execute("ALTER TABLE runs DROP COLUMN owner")
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    _overwrite_page(path, _page_of(path, "metrics"), seed=3)


#: how a store is damaged -> what the one line says. Damage confined to one table's pages
#: is met by the commands that read that table; ``calibrations`` reads only its own.
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "random_bytes": (random_bytes, "not a labep run store"),
    "runs_pages_corrupted": (runs_pages_corrupted, "damaged: "),
    "metrics_pages_corrupted": (metrics_pages_corrupted, "damaged: "),
    "truncated": (truncated, "damaged: "),
    "header_cut_short": (header_cut_short, "damaged: the SQLite header is cut short"),
    "png": (png, "not a labep run store (not an SQLite database"),
    "text": (text, "not a labep run store (not an SQLite database"),
    "empty_sqlite": (empty_sqlite, "not a labep run store (an SQLite database without tables)"),
    "other_sqlite": (other_sqlite, "not a labep run store (an SQLite database with other "
                                   "tables: meta, users)"),
    "newer_schema": (newer_schema, f"schema version {SCHEMA_VERSION + 3} is newer than this "
                                   f"labep's {SCHEMA_VERSION}"),
    "older_schema_damaged": (older_schema_damaged, "damaged: "),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _one_clear_line(stderr: str, store: Path, expected: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith(f"error: {store}") or f"run store {store}" in lines[0], lines[0]
    assert expected in lines[0], lines[0]


#: damage confined to the pages of tables ``calibrations`` does not read
LOCAL_DAMAGE = ("runs_pages_corrupted", "metrics_pages_corrupted")


def damaged(tmp_path: Path, kind: str) -> tuple[Path, Path, dict[str, bytes], str]:
    """A store damaged as ``kind`` says, alone in its folder: (store, folder, the folder's
    snapshot, the message expected)."""
    make, expected = DAMAGE[kind]
    folder = tmp_path / "stores"
    folder.mkdir()
    store = folder / "runs.db"
    make(store)
    return store, folder, _snapshot(folder), expected


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_read_commands_refuse_a_bad_store_in_one_line(tmp_path: Path, kind: str) -> None:
    store, folder, before, expected = damaged(tmp_path, kind)
    for command in READS:
        args = [*command, "--store", str(store)]
        if command[0] == "report":
            args += ["--out", str(tmp_path / "figure.png")]
        result = cli(*args)
        if kind in LOCAL_DAMAGE and command == ("calibrations",):
            assert result.exit_code == 0 and "no calibrations" in result.stdout
            assert _snapshot(folder) == before
            continue
        assert result.exit_code == 1, (command, result.output)
        assert result.stdout == "", (command, result.stdout)
        _one_clear_line(result.stderr, store, expected)
        assert _snapshot(folder) == before, f"{command} changed the folder of the store"
    assert not (tmp_path / "figure.png").exists()


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_run_refuses_a_bad_store_before_it_starts(tmp_path: Path, kind: str) -> None:
    store, folder, before, expected = damaged(tmp_path, kind)
    protocol = write_protocol(tmp_path / "xor.yaml", tiny_xor())
    result = cli("run", str(protocol), "--store", str(store), "--no-progress")
    assert result.exit_code == 2, result.output
    _one_clear_line(result.stderr, store, expected)
    assert _snapshot(folder) == before


def test_damage_in_the_calibrations_is_met_by_calibrations(tmp_path: Path) -> None:
    folder = tmp_path / "stores"
    folder.mkdir()
    store = valid_store(folder / "runs.db")
    _overwrite_page(store, _page_of(store, "calibrations"), seed=4)
    before = _snapshot(folder)
    result = cli("calibrations", "--store", str(store))
    assert result.exit_code == 1
    _one_clear_line(result.stderr, store, "damaged: ")
    result = cli("resume", "latest", "--store", str(store))  # a writer checks every page
    assert result.exit_code == 1
    _one_clear_line(result.stderr, store, "damaged: ")
    assert _snapshot(folder) == before


def test_rows_that_contradict_each_other_are_damage_not_a_traceback(tmp_path: Path) -> None:
    """An index that no longer matches its table raises no SQLite error, only rows that are
    missing: a read that fails on them is told apart from a bug by SQLite's full check."""
    folder = tmp_path / "stores"
    folder.mkdir()
    store = valid_store(folder / "runs.db")
    with RunStore(store, create=False) as runs:
        run_id = runs.resolve("latest")
    data = bytearray(store.read_bytes())
    size = struct.unpack(">H", data[16:18])[0]
    size = 65536 if size == 1 else size  # SQLite's header writes 65536 as 1
    start = (_page_of(store, "sqlite_autoindex_runs_1") - 1) * size
    at = data.index(run_id.encode(), start, start + size)
    data[at + len(run_id) - 1] ^= 0x01  # the index's copy of the id, one bit off
    store.write_bytes(bytes(data))
    before = _snapshot(folder)
    result = cli("show", "latest", "--store", str(store))
    assert result.exit_code == 1
    _one_clear_line(result.stderr, store, "damaged: ")
    assert "sqlite_autoindex_runs_1" in result.stderr
    assert _snapshot(folder) == before


def test_the_api_refuses_too_and_names_the_problem(tmp_path: Path) -> None:
    store = tmp_path / "other.db"
    other_sqlite(store)
    before = store.read_bytes()
    for create in (True, False):
        with pytest.raises(StoreError, match="not a labep run store"):
            RunStore(store, create=create)
    assert store.read_bytes() == before
    broken = tmp_path / "broken.db"
    runs_pages_corrupted(broken)
    with pytest.raises(StoreError, match="damaged: "):
        RunStore(broken)  # a writer checks every page
    RunStore(broken, create=False).close()  # a reader finds it out only when it reads


@pytest.mark.parametrize("seed", range(12))
def test_random_damage_never_gives_a_traceback(tmp_path: Path, seed: int) -> None:
    """Random bytes over a random part of a valid store (its header kept or not): a read
    command prints what it can or one line, exit 0 or 1, and the folder stays as it was."""
    rng = random.Random(seed)
    folder = tmp_path / "stores"
    folder.mkdir()
    store = valid_store(folder / "runs.db")
    data = bytearray(store.read_bytes())
    start = rng.randrange(0 if seed % 2 else 100, len(data))
    data[start:start + rng.randrange(1, 6000)] = rng.randbytes(6000)[: len(data) - start]
    store.write_bytes(bytes(data))
    before = _snapshot(folder)
    for command in (("runs",), ("show", "latest", "--json"), ("calibrations",)):
        result = cli(*command, "--store", str(store))
        assert result.exit_code in (0, 1), (command, result.output)
        if result.exit_code == 1:
            _one_clear_line(result.stderr, store, "")
        assert _snapshot(folder) == before


def test_a_valid_store_works_as_before(tmp_path: Path) -> None:
    folder = tmp_path / "stores"
    folder.mkdir()
    store = valid_store(folder / "runs.db")
    listing = cli_json("runs", "--store", str(store), "--json")
    assert [run["name"] for run in listing] == ["run-0", "run-1"]
    shown = cli_json("show", "latest", "--store", str(store), "--json")
    assert shown["status"] == "completed" and shown["steps"] == 40
    assert shown["metrics"]["test_accuracy"] == 0.75
    assert sorted(p.name for p in folder.iterdir()) == ["runs.db"]  # no -wal/-shm left
    db = sqlite3.connect(store)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    assert cli("run", str(write_protocol(tmp_path / "xor.yaml", tiny_xor(**{
        "training.epochs": 1}))), "--store", str(store), "--no-progress").exit_code == 0
    assert len(cli_json("runs", "--store", str(store), "--json")) == 3


def test_an_empty_file_becomes_a_new_store_for_a_writer_only(tmp_path: Path) -> None:
    store = tmp_path / "runs.db"
    store.touch()
    result = cli("runs", "--store", str(store))
    assert result.exit_code == 1 and "not a labep run store (an empty file)" in result.stderr
    assert store.read_bytes() == b""
    with RunStore(store) as created:
        assert created.schema_version == SCHEMA_VERSION and created.runs() == []


def test_a_store_whose_rows_are_still_in_the_wal_is_read(tmp_path: Path) -> None:
    """A writer killed before a checkpoint leaves its rows in NAME-wal: still a labep store."""
    import shutil

    live = RunStore(tmp_path / "live.db")
    live.create_run("in-the-wal", tiny_xor(), "hopfield", 0, "0.1.0")
    copy = tmp_path / "copy.db"
    shutil.copy(live.path, copy)
    shutil.copy(live.path.with_name("live.db-wal"), tmp_path / "copy.db-wal")
    live.close()
    assert [run["name"] for run in cli_json("runs", "--store", str(copy), "--json")] == [
        "in-the-wal"]
