"""Lagrangian EP (Massar) through the whole stack: the lagrangian_oscillators section and the
``lagrangian`` simulator from a protocol, both boundary conditions trained and checked with
``labep gradcheck`` on sizes and seeds the shipped protocol does not use, oversized
trajectories refused at validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labep.models.lagrangian import MAX_UNKNOWNS
from labep.run.engine import Trainer
from labep.run.gradcheck import gradcheck
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

from .conftest import PROTOCOLS, cli

DIGITS = str(PROTOCOLS / "lagrangian_digits.yaml")


def test_shipped_protocol_validates() -> None:
    protocol = load_protocol(DIGITS).protocol
    assert protocol.bench.simulator == "lagrangian"
    assert protocol.model.kind == "lagrangian_oscillators"


def test_oversized_trajectories_are_refused(store: Path) -> None:
    result = cli("run", DIGITS, "--store", str(store), "--no-progress",
                 "--set", "model.sizes=[4, 5000, 3]", "--set", "model.time_points=64")
    assert result.exit_code == 2, result.output
    assert f"MAX_UNKNOWNS = {MAX_UNKNOWNS:,}" in result.stderr


@pytest.mark.parametrize("boundary, period, minimum", [("periodic", 8.0, 0.85),
                                                        ("fixed", 8.0, 0.5)])
def test_a_short_run_learns_and_is_recorded(tmp_path: Path, boundary: str, period: float,
                                            minimum: float) -> None:
    """One epoch of lagrangian_digits (3 digit classes, 4 principal components); measured
    93.9% (periodic) and 61.6% (fixed ends) on the 99 test images; a broken gradient stays
    near chance (33%)."""
    loaded = load_protocol(DIGITS, ["training.epochs=1", f"model.boundary={boundary}",
                                    f"model.period={period}"])
    store = RunStore(tmp_path / "runs.db")
    result = Trainer(loaded, store, progress=False).run()
    assert result.status == "completed" and result.steps > 0
    assert result.test_accuracy is not None and result.test_accuracy >= minimum
    summary = store.summary(result.run_id)
    assert summary["bench"]["identity"]["serial"].endswith(boundary)
    trained = len(loaded.protocol.dataset.load().train_labels)
    samples = summary["samples"]
    assert samples["trained"] == trained == samples["used"] + samples["left_out"]
    assert samples["left_out"] <= 0.02 * trained  # a Newton solve rarely fails to settle


@pytest.mark.parametrize("boundary, period, sizes, seed", [
    ("periodic", 8.0, [4, 2, 3], 5), ("periodic", 6.0, [4, 3, 2, 3], 9),
    ("fixed", 1.5, [4, 2, 3], 3), ("fixed", 2.5, [4, 3], 13)])
def test_gradcheck_on_unseen_networks(boundary: str, period: float, sizes: list[int],
                                      seed: int) -> None:
    """Symmetric EP at beta = 1e-3 against implicit differentiation through dS/dq = 0, for
    each boundary condition (a wrong boundary term in the gradient or the Hessian of the
    action breaks the Newton solve or the agreement)."""
    protocol = load_protocol(DIGITS, [f"model.sizes={sizes}", f"model.boundary={boundary}",
                                      f"model.period={period}", "model.time_points=12",
                                      "training.learning_rates=0.1"]).protocol
    report = gradcheck(protocol, beta=1e-3, seed=seed, samples=6)
    assert report["cosine"] >= 0.999, report
    assert report["relative_error"] < 1e-3


def test_gradcheck_cli_on_the_protocol() -> None:
    result = cli("gradcheck", DIGITS, "--beta", "1e-3", "--seed", "4", "--samples", "5",
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cosine"] >= 0.999 and report["samples"] == 5
