"""Protocol files and overrides are validated whole before anything runs (exit 2, paths named)."""

from __future__ import annotations

from pathlib import Path

import pytest

from labep.protocol.text import ProtocolError
from labep.run.validate import load_protocol

from .conftest import PROTOCOLS, cli, protocol_doc, refused, tiny_xor, write_protocol


@pytest.mark.parametrize("name", sorted(p.name for p in PROTOCOLS.glob("*.yaml")))
def test_shipped_protocols_parse(name: str) -> None:
    doc = protocol_doc(name)
    if doc["dataset"]["name"] == "idx" and not Path(doc["dataset"]["path"]).is_dir():
        pytest.skip("shared MNIST not beside this clone")
    load_protocol(PROTOCOLS / name)


def test_wrong_type_names_field_and_line(tmp_path: Path) -> None:
    doc = tiny_xor(**{"training.epochs": "many"})
    err = refused(tmp_path, doc)
    assert "training.epochs" in err and "line" in err and "integer" in err


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    doc = tiny_xor(**{"phases.free.max_stepz": 10})
    err = refused(tmp_path, doc)
    assert "phases.free.max_stepz" in err and "unknown field" in err


def test_negative_beta_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, tiny_xor(**{"estimator.beta": -0.5}))
    assert "estimator.beta" in err and "greater than 0" in err


def test_missing_dataset_path_is_refused(tmp_path: Path) -> None:
    doc = tiny_xor()
    doc["model"]["sizes"] = [784, 10, 10]
    doc["dataset"] = {"name": "idx"}
    err = refused(tmp_path, doc)
    assert "dataset.path" in err and "missing" in err
    doc["dataset"] = {"name": "idx", "path": str(tmp_path / "nowhere")}
    err = refused(tmp_path, doc)
    assert "dataset.path" in err and "not point to a directory" in err


def test_dataset_dir_without_idx_files(tmp_path: Path) -> None:
    doc = tiny_xor()
    doc["model"]["sizes"] = [784, 10, 10]
    doc["dataset"] = {"name": "idx", "path": str(tmp_path)}
    err = refused(tmp_path, doc)
    assert "dataset.path" in err and "no such IDX file" in err


def test_override_to_nonexistent_key(tmp_path: Path) -> None:
    err = refused(tmp_path, tiny_xor(), "training.epochz=3")
    assert "training.epochz" in err and "--set training.epochz=3" in err
    err = refused(tmp_path, tiny_xor(), "seed.deeper=1")
    assert "seed" in err and "--set seed.deeper=1" in err


def test_override_validated_like_the_file(tmp_path: Path) -> None:
    err = refused(tmp_path, tiny_xor(), "estimator.beta=-1")
    assert "estimator.beta" in err and "--set estimator.beta=-1" in err
    err = refused(tmp_path, tiny_xor(), "model.sizes[0]=3")
    assert "model.sizes[0]" in err and "2 features" in err


def test_override_applies(tmp_path: Path) -> None:
    path = write_protocol(tmp_path / "p.yaml", tiny_xor())
    loaded = load_protocol(path, ["training.epochs=7", "training.learning_rates=[0.3, 0.2]"])
    assert loaded.protocol.training.epochs == 7
    assert loaded.protocol.training.learning_rates == [0.3, 0.2]
    assert loaded.document["training"]["epochs"] == 7, "the store keeps the protocol as run"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    doc = tiny_xor(**{"estimator.beta": 0, "training.batch_size": -3, "colour": "blue"})
    with pytest.raises(ProtocolError) as info:
        load_protocol(write_protocol(tmp_path / "p.yaml", doc))
    paths = {p.path for p in info.value.problems}
    assert {"estimator.beta", "training.batch_size", "colour"} <= paths


def test_cross_checks(tmp_path: Path) -> None:
    doc = tiny_xor(**{"training.learning_rates": [0.1, 0.1, 0.1]})
    doc["bench"]["options"]["damping"] = 2.0
    doc["bench"]["options"]["colour"] = 1
    with pytest.raises(ProtocolError) as info:
        load_protocol(doc)
    paths = {p.path for p in info.value.problems}
    assert {"training.learning_rates", "bench.options.damping", "bench.options.colour"} <= paths


def test_unknown_bench_and_both_kinds(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="unknown simulator 'warp'"):
        load_protocol(tiny_xor(**{"bench.simulator": "warp"}))
    with pytest.raises(ProtocolError, match="exactly one of"):
        load_protocol(tiny_xor(**{"bench.driver": "hopfield"}))


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("bench: [unclosed\n")
    assert cli("run", str(path), "--store", str(tmp_path / "x.db")).exit_code == 2
    path.write_text("- just\n- a list\n")
    assert cli("run", str(path), "--store", str(tmp_path / "x.db")).exit_code == 2
    path.write_bytes(b"name: \xff\xfe\n")
    result = cli("run", str(path), "--store", str(tmp_path / "x.db"))
    assert result.exit_code == 2 and "UTF-8" in result.stderr
    assert not (tmp_path / "x.db").exists()
