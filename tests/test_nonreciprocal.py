"""Non-conservative EP (Scurria et al. 2026): the non-reciprocal layered model, its numba
simulator, the corrected nudge (J^T - J)(s - s0), and the refusal of benches that lack it."""

from __future__ import annotations

import numpy as np
import pytest

from labep import registry
from labep.hardware.bench import BenchError, Nudge, Settle
from labep.models.nonreciprocal import NonreciprocalLayered
from labep.protocol.text import ProtocolError
from labep.run.gradcheck import compare
from labep.run.validate import load_protocol
from labep.simulators.nonreciprocal import NonreciprocalSimulator, NonreciprocalSimulatorOptions

from .conftest import PROTOCOLS, cli, cli_json, needs_mnist, tiny_xor

SIZES = (5, 7, 6, 3)
TIGHT = Settle(1e-11, 100_000)


def network(asymmetry: float, seed: int, sizes: tuple[int, ...] = SIZES, gain: float = 1.5):
    """A random small network on the float64 simulator, a batch of inputs and targets."""
    model = NonreciprocalLayered(sizes, asymmetry=asymmetry, init_gain=gain)
    rng = np.random.default_rng(seed)
    params = model.init_params(rng)
    bench = NonreciprocalSimulator(model, NonreciprocalSimulatorOptions(dtype="float64"))
    bench.write(params)
    x = rng.uniform(0.0, 1.0, (6, sizes[0]))
    target = model.encode_target(rng.integers(0, sizes[-1], 6))
    return model, params, bench, x, target


def cosine(asymmetry: float, seed: int, correction: bool, beta: float = 1e-3,
           estimator: str = "symmetric") -> tuple[float, float]:
    """(cosine, relative error) of the EP estimate against the exact gradient."""
    model, params, bench, x, target = network(asymmetry, seed)
    free = bench.relax(x, settle=TIGHT)
    assert free.all_converged
    est = registry.load("estimator", estimator)()
    strengths = est.strengths(beta, np.random.default_rng(0))
    nudged = [bench.relax(x, Nudge(s, target, correction), start=free.state, settle=TIGHT)
              for s in strengths]
    assert all(phase.all_converged for phase in nudged)
    estimate = est.estimate(model, x, free, nudged, strengths, np.ones(len(x))).gradient
    exact = model.exact_gradient(x, free.state, target, params)
    flat = [np.concatenate([g[k].ravel() for k in exact]) for g in (estimate, exact)]
    result = compare(*flat)
    return result.cosine, result.relative_error


@pytest.mark.parametrize("asymmetry", [0.0, 0.3, 0.7, 1.0])
def test_corrected_estimate_is_exact_at_small_beta(asymmetry: float) -> None:
    for seed in range(3):
        value, error = cosine(asymmetry, seed, correction=True)
        assert value >= 0.999
        assert error < 1e-2


def test_one_sided_corrected_estimate_converges_as_beta_shrinks() -> None:
    errors = [cosine(0.6, 1, True, beta, "one_sided")[1] for beta in (1e-1, 1e-2, 1e-3)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-2


def test_vector_field_estimate_degrades_as_asymmetry_grows() -> None:
    means = [np.mean([cosine(a, seed, correction=False)[0] for seed in range(4)])
             for a in (0.0, 0.25, 0.75)]
    assert means[0] >= 0.999
    assert means[0] > means[1] > means[2]
    assert means[2] < 0.97


def test_at_zero_asymmetry_both_nudges_agree() -> None:
    """a = 0: reciprocal couplings, J symmetric, the correction vanishes identically."""
    model, params, bench, x, target = network(0.0, 5)
    jac = model.jacobian(x, bench.relax(x, settle=TIGHT).state, params)
    np.testing.assert_allclose(jac, np.swapaxes(jac, 1, 2), atol=1e-12)
    free = bench.relax(x, settle=TIGHT)
    plain = bench.relax(x, Nudge(0.1, target), start=free.state, settle=TIGHT)
    corrected = bench.relax(x, Nudge(0.1, target, True), start=free.state, settle=TIGHT)
    np.testing.assert_array_equal(plain.state, corrected.state)


@pytest.mark.parametrize("asymmetry", [0.0, 0.5, 1.0])
def test_kernel_vector_field_matches_the_model(asymmetry: float) -> None:
    model, params, bench, x, target = network(asymmetry, 2)
    rng = np.random.default_rng(9)
    state = rng.normal(0.4, 0.6, (len(x), model.state_size))
    reference = state + rng.normal(0.0, 0.2, state.shape)
    np.testing.assert_allclose(bench.field(x, state), model.vector_field(x, state, params),
                               atol=1e-13)
    beta = 0.3
    lo, hi = model.output_slice
    nudged = model.vector_field(x, state, params)
    nudged[:, lo:hi] -= beta * (state[:, lo:hi] - target)
    np.testing.assert_allclose(bench.field(x, state, Nudge(beta, target)), nudged, atol=1e-13)
    corrected = nudged + model.correction(state, reference, params)
    np.testing.assert_allclose(bench.field(x, state, Nudge(beta, target, True), reference),
                               corrected, atol=1e-13)
    # the correction is (J^T - J)(s - s0) with the dense Jacobian at s0
    jac = model.jacobian(x, reference, params)
    dense = np.einsum("bij,bj->bi", np.swapaxes(jac, 1, 2) - jac, state - reference)
    np.testing.assert_allclose(model.correction(state, reference, params), dense, atol=1e-13)


def test_jacobian_matches_finite_differences() -> None:
    model, params, _, x, _ = network(0.6, 3)
    state = np.random.default_rng(4).normal(0.5, 0.5, (len(x), model.state_size))
    jac = model.jacobian(x, state, params)
    eps = 1e-6
    for unit in range(model.state_size):
        step = np.zeros_like(state)
        step[:, unit] = eps
        numeric = (model.vector_field(x, state + step, params)
                   - model.vector_field(x, state - step, params)) / (2 * eps)
        np.testing.assert_allclose(jac[:, :, unit], numeric, atol=1e-8)


@pytest.mark.parametrize("asymmetry", [0.0, 0.5, 1.0])
def test_exact_gradient_matches_finite_differences_of_the_settled_cost(asymmetry: float) -> None:
    """The reference every estimate is judged by, checked independently: central differences
    of the mean cost of simulator-settled states, parameter by parameter (a random subset)."""
    model, params, bench, x, target = network(asymmetry, 11)
    free = bench.relax(x, settle=TIGHT)
    exact = model.exact_gradient(x, free.state, target, params)
    rng = np.random.default_rng(12)
    eps = 1e-5

    def settled_cost(changed: dict[str, np.ndarray]) -> float:
        bench.write(changed)
        phase = bench.relax(x, settle=TIGHT)
        assert phase.all_converged
        return float(model.cost(phase.state, target).mean())

    checked = 0
    for name, value in params.items():
        if not np.any(exact[name]) and asymmetry in (0.0, 1.0) and name.startswith("B"):
            continue  # B has no gradient at a = 0 or 1 (it does not enter the dynamics)
        for index in rng.choice(value.size, size=min(4, value.size), replace=False):
            numeric = []
            for sign in (1.0, -1.0):
                changed = {k: v.copy() for k, v in params.items()}
                changed[name].flat[index] += sign * eps
                numeric.append(settled_cost(changed))
            estimate = (numeric[0] - numeric[1]) / (2 * eps)
            assert estimate == pytest.approx(exact[name].flat[index], rel=1e-4, abs=1e-8), (
                name, index)
            checked += 1
    assert checked >= 12
    bench.write(params)


def test_feedforward_settles_on_the_layer_below_only() -> None:
    """a = 1: no feedback, the hidden layer does not move when the output is nudged
    (vector-field EP) but does with the correction (the adjoint flows backwards)."""
    model, _, bench, x, target = network(1.0, 6)
    free = bench.relax(x, settle=TIGHT)
    hidden = slice(*model.layer_slices[1])
    plain = bench.relax(x, Nudge(0.1, target), start=free.state, settle=TIGHT)
    corrected = bench.relax(x, Nudge(0.1, target, True), start=free.state, settle=TIGHT)
    np.testing.assert_allclose(plain.state[:, hidden], free.state[:, hidden], atol=1e-10)
    assert np.abs(corrected.state[:, hidden] - free.state[:, hidden]).max() > 1e-4


def test_corrected_nudge_needs_the_free_state() -> None:
    _, _, bench, x, target = network(0.5, 0)
    with pytest.raises(BenchError, match="free state"):
        bench.relax(x, Nudge(0.1, target, True))


def test_gradcheck_cli_on_the_digits_protocol() -> None:
    protocol = str(PROTOCOLS / "nonreciprocal_digits.yaml")
    small = ["--samples", "8", "--set", "model.sizes=[64, 16, 10]"]
    corrected = cli_json("gradcheck", protocol, "--beta", "0.001", *small, "--json")
    assert corrected["correction"] is True
    assert corrected["cosine"] >= 0.999
    assert set(corrected["parameters"]) == {"W1", "W2", "B2", "b1", "b2"}
    plain = cli_json("gradcheck", protocol, "--beta", "0.001", *small,
                     "--set", "estimator.correction=false", "--json")
    assert plain["correction"] is False
    assert plain["cosine"] < corrected["cosine"]


def test_correction_on_a_bench_that_cannot_is_refused() -> None:
    doc = tiny_xor(**{"estimator.correction": True})
    with pytest.raises(ProtocolError) as err:
        load_protocol(doc)
    message = str(err.value)
    assert "estimator.correction" in message
    assert "cannot apply the non-conservative correction" in message
    assert "nonreciprocal" in message
    result = cli("gradcheck", str(PROTOCOLS / "quickstart.yaml"),
                 "--set", "estimator.correction=true")
    assert result.exit_code == 2
    assert "cannot apply the non-conservative correction" in result.stderr


def test_model_and_bench_must_match() -> None:
    doc = tiny_xor(**{"bench.simulator": "nonreciprocal"})
    with pytest.raises(ProtocolError, match="runs nonreciprocal"):
        load_protocol(doc)


def test_short_xor_training_learns(store) -> None:
    doc = tiny_xor(**{
        "bench.simulator": "nonreciprocal",
        "model": {"kind": "nonreciprocal", "sizes": [2, 8, 2], "asymmetry": 0.5,
                  "init_gain": 1.5},
        "estimator": {"name": "symmetric", "beta": 0.2, "correction": True},
        "training.epochs": 10, "training.learning_rates": [0.5, 0.25],
        "training.checkpoint_every": 1000,
    })
    from labep.run.engine import Trainer
    from labep.store.runs import RunStore

    with RunStore(store) as runs:
        result = Trainer(load_protocol(doc), runs, progress=False).run()
    assert result.test_accuracy == 1.0


@pytest.mark.slow
@needs_mnist
def test_mnist_corrected_learns_faster_than_vector_field(store) -> None:
    """The MNIST protocol (784-256-10, a = 0.75) for two epochs, both nudges, one seed: the
    corrected run is ahead after every epoch (measured: 0.908 / 0.933 against 0.838 / 0.894)."""
    from labep.run.engine import Trainer
    from labep.store.runs import RunStore

    curves: dict[bool, list[float]] = {True: [], False: []}
    with RunStore(store) as runs:
        for flag, curve in curves.items():
            loaded = load_protocol(PROTOCOLS / "nonreciprocal_mnist.yaml", [
                "training.epochs=2", f"estimator.correction={str(flag).lower()}"])
            Trainer(loaded, runs, progress=False,
                    on_epoch=lambda _, m, c=curve: c.append(m["test_accuracy"])).run()
    assert curves[True][-1] > 0.92
    for corrected, plain in zip(curves[True], curves[False], strict=True):
        assert corrected > plain + 0.02
