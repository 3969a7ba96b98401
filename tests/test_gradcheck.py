"""EP estimates against the exact gradient (implicit differentiation at the free state)."""

from __future__ import annotations

import numpy as np
import pytest

from labep.run.gradcheck import GradcheckError, gradcheck
from labep.run.validate import load_protocol

from .conftest import PROTOCOLS, cli, cli_json, tiny_xor


def test_quickstart_symmetric_small_beta_cli() -> None:
    report = cli_json("gradcheck", str(PROTOCOLS / "quickstart.yaml"), "--estimator",
                      "symmetric", "--beta", "0.001", "--json")
    assert report["cosine"] >= 0.999
    assert report["relative_error"] < 0.01
    assert set(report["parameters"]) == {"W1", "b1", "W2", "b2"}
    for per_parameter in report["parameters"].values():
        assert per_parameter["cosine"] >= 0.999


@pytest.mark.parametrize("estimator", ["one_sided", "symmetric"])
def test_estimates_converge_as_beta_shrinks(estimator: str) -> None:
    protocol = load_protocol(PROTOCOLS / "quickstart.yaml",
                             ["model.sizes=[64, 16, 12, 10]", "training.learning_rates=0.1"]
                             ).protocol
    errors = [gradcheck(protocol, beta=beta, estimator=estimator, seed=4)["relative_error"]
              for beta in (0.1, 0.01, 0.001)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-2


def test_symmetric_beats_one_sided_on_average() -> None:
    """Over 20 random networks and batches (converged free states) whose units span the linear
    range of the hard sigmoid (init gain 2), the symmetric estimate at beta = 0.5 is closer to
    the exact gradient than the one-sided one, on average. (With tiny couplings, gain 1, the
    outputs hug the lower kink, the -beta phase saturates them and one-sided wins: the
    piecewise-linear activation makes the comparison depend on where the units sit.)"""
    protocol = load_protocol(
        PROTOCOLS / "quickstart.yaml",
        ["model.sizes=[64, 128, 10]", "model.init_gain=2.0"],
    ).protocol
    cosines: dict[str, list[float]] = {"one_sided": [], "symmetric": []}
    for seed in range(20):
        for name in cosines:
            report = gradcheck(protocol, beta=0.5, estimator=name, seed=seed, samples=20)
            assert report["free_residual"] <= 1e-10
            cosines[name].append(report["cosine"])
    assert np.mean(cosines["symmetric"]) > np.mean(cosines["one_sided"]) + 0.01


def test_refuses_unsettled_free_state() -> None:
    """The undamped synchronous update 2-cycles on this symmetric network: no comparison."""
    doc = tiny_xor(**{"model.sizes": [2, 1, 2],
                      "bench.options": {"asynchronous": False, "damping": 1.0}})
    protocol = load_protocol(doc).protocol
    params = {"W1": np.ones((2, 1)), "b1": np.zeros(1),
              "W2": np.full((1, 2), -4.0), "b2": np.ones(2)}
    with pytest.raises(GradcheckError, match="did not settle"):
        gradcheck(protocol, params=params, samples=4)
    protocol = load_protocol(doc, ["bench.options.damping=0.3"]).protocol
    assert gradcheck(protocol, params=params, samples=4, beta=1e-3)["cosine"] > 0.999


def test_cli_refusal_exit_code(tmp_path) -> None:
    from .conftest import write_protocol

    doc = tiny_xor(**{"model.init_gain": 40.0,
                      "bench.options": {"asynchronous": False, "damping": 1.0}})
    path = write_protocol(tmp_path / "p.yaml", doc)
    result = cli("gradcheck", str(path), "--json", "--samples", "4")
    assert result.exit_code == 3, result.output
    assert "refused" in result.stderr
