"""Quantum EP (Massar and Mognetti) through the whole stack: the quantum_ising section and the
``quantum`` simulator from a protocol, the register's size refused at validation, the
measurement shots of every update counted in the store, and ``labep gradcheck`` on sizes and
seeds the shipped protocols do not use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labep.models.qubits import MAX_QUBITS
from labep.run.engine import Trainer
from labep.run.gradcheck import gradcheck
from labep.run.validate import load_protocol
from labep.simulators.quantum import MAX_GIBBS_QUBITS
from labep.store.runs import RunStore

from .conftest import PROTOCOLS, cli

XOR = str(PROTOCOLS / "quantum_xor.yaml")
DIGITS = str(PROTOCOLS / "quantum_digits.yaml")


def test_shipped_protocols_validate() -> None:
    for path in (XOR, DIGITS):
        protocol = load_protocol(path).protocol
        assert protocol.bench.simulator == "quantum"
        assert protocol.model.kind == "quantum_ising"


def test_register_beyond_the_diagonalization_limit_is_refused(store: Path) -> None:
    result = cli("run", XOR, "--store", str(store), "--no-progress",
                 "--set", "model.sizes=[2, 19, 2]")
    assert result.exit_code == 2, result.output
    assert f"MAX_QUBITS = {MAX_QUBITS}" in result.stderr and "23 qubits" in result.stderr
    assert not store.exists() or not RunStore(store).runs()  # nothing ran


def test_gibbs_state_beyond_its_limit_is_refused(store: Path) -> None:
    result = cli("run", XOR, "--store", str(store), "--no-progress",
                 "--set", "model.sizes=[2, 8, 2]", "--set", "bench.options.temperature=0.1")
    assert result.exit_code == 2, result.output
    assert f"MAX_GIBBS_QUBITS = {MAX_GIBBS_QUBITS}" in result.stderr
    # the same register at T = 0 is accepted (Lanczos)
    load_protocol(XOR, ["model.sizes=[2, 8, 2]"])


@pytest.mark.parametrize("estimator, phases", [("symmetric", 3), ("one_sided", 2)])
def test_shots_per_update_are_counted(tmp_path: Path, estimator: str, phases: int) -> None:
    shots, batch = 37, 4
    loaded = load_protocol(XOR, [f"bench.options.shots={shots}", "dataset.repeats=2",
                                 "training.epochs=1", f"training.batch_size={batch}",
                                 f"estimator.name={estimator}"])
    store = RunStore(tmp_path / "runs.db")
    result = Trainer(loaded, store, progress=False).run()
    assert result.status == "completed" and result.steps == 2
    _, per_step = store.metric_series(result.run_id, "shots")
    settings = 2  # Z and X
    assert list(per_step) == [settings * shots * batch * phases] * 2
    # every shot of the bench: the two updates and the free phase of the 4 test points
    _, total = store.metric_series(result.run_id, "shots_total")
    assert list(total) == [sum(per_step) + settings * shots * 4]
    shown = cli("show", result.run_id, "--store", str(tmp_path / "runs.db"))
    assert "shots" in shown.stdout and "shots_total" in shown.stdout


def test_exact_expectations_count_no_shots(tmp_path: Path) -> None:
    loaded = load_protocol(XOR, ["bench.options.shots=null", "dataset.repeats=1",
                                 "training.epochs=1"])
    store = RunStore(tmp_path / "runs.db")
    result = Trainer(loaded, store, progress=False).run()
    assert list(store.metric_series(result.run_id, "shots")[1]) == [0]


def test_digits_protocol_learns_in_one_epoch(tmp_path: Path) -> None:
    """One epoch of quantum_digits (3 classes, 4 principal components, 7 qubits, 1,000 shots
    per setting); measured 97.0% on the 99 test images. A broken gradient stays near 33%."""
    loaded = load_protocol(DIGITS, ["training.epochs=1"])
    store = RunStore(tmp_path / "runs.db")
    result = Trainer(loaded, store, progress=False).run()
    assert result.status == "completed"
    assert result.test_accuracy is not None and result.test_accuracy >= 0.85
    summary = store.summary(result.run_id)
    assert summary["bench"]["name"] == "quantum"


@pytest.mark.parametrize("path, sizes, seed", [(XOR, [2, 2, 2], 5), (XOR, [2, 3, 1, 2], 7),
                                              (DIGITS, [4, 1, 3], 11)])
def test_gradcheck_on_unseen_networks(path: str, sizes: list[int], seed: int) -> None:
    """Symmetric EP at beta = 1e-3 with exact expectations (gradcheck drops the protocol's
    shots) against first-order perturbation theory, at fresh parameters of a larger gain."""
    protocol = load_protocol(path, [f"model.sizes={sizes}", "model.init_gain=1.0",
                                    "training.learning_rates=0.1"]).protocol
    report = gradcheck(protocol, beta=1e-3, seed=seed, estimator="symmetric")
    assert report["cosine"] >= 0.999, report
    assert report["relative_error"] < 1e-3
    one_sided = gradcheck(protocol, beta=1e-3, seed=seed, estimator="one_sided")
    assert one_sided["cosine"] >= 0.99


def test_gradcheck_cli_on_the_digits_protocol() -> None:
    result = cli("gradcheck", DIGITS, "--beta", "1e-3", "--seed", "3", "--samples", "5",
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cosine"] >= 0.999 and report["samples"] == 5


def test_near_degenerate_ground_states_are_unsettled_phases_never_updates(tmp_path: Path
                                                                         ) -> None:
    """A gap threshold above every gap makes each ground state near-degenerate: every phase is
    unsettled, every training sample is left out, and the parameters never move."""
    loaded = load_protocol(XOR, ["bench.options.min_gap=100.0", "dataset.repeats=1",
                                 "training.epochs=1", "faults.policy=skip"])
    store = RunStore(tmp_path / "runs.db")
    result = Trainer(loaded, store, progress=False).run()
    assert result.status == "completed"
    shown = json.loads(cli("show", result.run_id, "--store", str(tmp_path / "runs.db"),
                           "--json").stdout)
    samples = shown["samples"]
    assert samples["trained"] == 4 and samples["used"] == 0
    assert samples["left_out"] + samples["skipped"] == 4
