"""The layered Hopfield simulator: settles by measured residual, damping, range refusal."""

from __future__ import annotations

import numpy as np
import pytest

from labep.hardware.bench import Bench, Nudge, OutOfRangeError, Settle
from labep.models.hopfield import LayeredHopfield
from labep.simulators.hopfield import HopfieldSimulator, HopfieldSimulatorOptions


def make(sizes, dtype="float64", seed=0, **options):
    model = LayeredHopfield(sizes)
    sim = HopfieldSimulator(model, HopfieldSimulatorOptions(dtype=dtype, **options))
    params = model.init_params(np.random.default_rng(seed))
    sim.open()
    sim.write(params)
    return model, sim, params


def test_is_a_bench() -> None:
    _, sim, _ = make([4, 3, 2])
    assert isinstance(sim, Bench)
    assert sim.spec.state_size == 5 and sim.spec.output_slice == (3, 5)


@pytest.mark.parametrize("asynchronous", [True, False])
def test_free_state_is_a_fixed_point(asynchronous: bool) -> None:
    model, sim, params = make([6, 7, 5, 3], asynchronous=asynchronous, damping=0.7)
    x = np.random.default_rng(1).random((9, 6))
    relax = sim.relax(x, settle=Settle(1e-12, 5000))
    assert relax.all_converged
    # the host's own measure of the read-back state agrees that it is a fixed point
    assert np.max(model.residual(x, relax.state, params)) < 1e-10
    assert np.all((relax.state >= 0) & (relax.state <= 1))


def test_nudged_state_is_a_fixed_point_of_the_nudged_energy() -> None:
    model, sim, params = make([6, 7, 3])
    rng = np.random.default_rng(2)
    x, y = rng.random((5, 6)), model.encode_target(rng.integers(0, 3, 5))
    for beta in (0.5, -0.5, 2.0):
        relax = sim.relax(x, Nudge(beta, y), settle=Settle(1e-12, 5000))
        assert relax.all_converged
        h = model.local_fields(x, relax.state, params)
        lo, hi = model.output_slice
        h[:, lo:hi] += beta * (y - relax.state[:, lo:hi])  # rho(h + beta (y - s_L)) = s_L
        assert np.max(np.abs(np.clip(h, 0, 1) - relax.state)) < 1e-9


def test_two_cycle_is_reported_and_damping_cures_it() -> None:
    """s1 = rho(1 - 2 s2), s2 = rho(1 - 2 s1): the undamped synchronous update 2-cycles
    between (1, 1) and (0, 0); damping (a = 0.5) converges; even/odd order converges too."""
    params = {"W1": np.array([[1.0]]), "b1": np.array([0.0]),
              "W2": np.array([[-2.0]]), "b2": np.array([1.0])}
    x = np.ones((1, 1))
    results = {}
    for label, opts in {"undamped": dict(asynchronous=False, damping=1.0),
                        "damped": dict(asynchronous=False, damping=0.5),
                        "async": dict(asynchronous=True)}.items():
        sim = HopfieldSimulator(LayeredHopfield([1, 1, 1]),
                                HopfieldSimulatorOptions(dtype="float64", **opts))
        sim.write(params)
        results[label] = sim.relax(x, settle=Settle(1e-9, 200))
    assert not results["undamped"].converged[0]
    assert results["undamped"].residual[0] == pytest.approx(1.0)
    assert results["undamped"].steps[0] == 200
    assert results["damped"].converged[0] and results["async"].converged[0]


def test_max_steps_caps_and_reports() -> None:
    _, sim, _ = make([20, 30, 4], seed=3)
    x = np.random.default_rng(0).random((4, 20))
    relax = sim.relax(x, settle=Settle(1e-14, 1))
    assert np.all(relax.steps == 1) and not relax.all_converged
    assert np.all(relax.residual > 1e-14)


def test_float32_and_float64_agree() -> None:
    rng = np.random.default_rng(4)
    x = rng.random((8, 10))
    states = {}
    for dtype in ("float32", "float64"):
        _, sim, _ = make([10, 12, 3], dtype=dtype)
        relax = sim.relax(x, settle=Settle(1e-6, 1000))
        assert relax.state.dtype == np.dtype(dtype)
        states[dtype] = relax.state
    np.testing.assert_allclose(states["float32"], states["float64"], atol=1e-4)


def test_clamped_drive_follows_inputs_and_writes() -> None:
    model, sim, params = make([5, 4, 2])
    rng = np.random.default_rng(5)
    x1, x2 = rng.random((3, 5)), rng.random((3, 5))
    settle = Settle(1e-12, 2000)
    a = sim.relax(x1, settle=settle).state
    b = sim.relax(x2, settle=settle).state
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(sim.relax(x1, settle=settle).state, a)
    sim.write({"W1": params["W1"] * 2})
    c = sim.relax(x1, settle=settle).state
    assert np.max(model.residual(x1, c, {**params, "W1": params["W1"] * 2})) < 1e-10


def test_out_of_range_write_is_refused_whole() -> None:
    _, sim, _ = make([3, 4, 2], weight_range=1.0)
    before = sim.read_params()
    bad = {"W1": np.full((3, 4), 0.1), "W2": np.full((4, 2), 1.5)}
    with pytest.raises(OutOfRangeError, match=r"W2.*outside the physical range"):
        sim.write(bad)
    after = sim.read_params()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])  # nothing half-written
    with pytest.raises(OutOfRangeError, match="non-finite"):
        sim.write({"b1": np.array([0.0, np.nan, 0.0, 0.0])})
    with pytest.raises(OutOfRangeError, match="non-finite"):  # +inf in an open range too
        sim.write({"b1": np.array([0.0, np.inf, 0.0, 0.0])})


@pytest.mark.parametrize("weight_range", [None, 1.0])
def test_a_large_coupling_is_checked_whole_before_anything_is_stored(weight_range) -> None:
    """784 x 500 couplings go through the parallel check and store: one bad value anywhere
    (non-finite, or outside a finite range) refuses the whole write, and a good write stores
    exactly what numpy's cast would."""
    _, sim, params = make([784, 500, 10], dtype="float32", weight_range=weight_range)
    before = sim.read_params()
    for bad_value, message in [(np.nan, "non-finite"), (np.inf, "non-finite"),
                               (-np.inf, "non-finite")] + (
            [(1.5, "outside the physical range")] if weight_range else []):
        bad = params["W1"].copy()
        bad[783, 499] = bad_value
        with pytest.raises(OutOfRangeError, match=message):
            sim.write({"b1": params["b1"] + 0.01, "W1": bad})
        after = sim.read_params()
        for name in before:
            np.testing.assert_array_equal(before[name], after[name])  # nothing half-written
    bad_bias = params["b1"].copy()
    bad_bias[0] = np.nan  # checked after W1 was staged: still nothing stored
    with pytest.raises(OutOfRangeError, match="non-finite"):
        sim.write({"W1": params["W1"] * 0.5, "b1": bad_bias})
    for name, held in sim.read_params().items():
        np.testing.assert_array_equal(before[name], held)
    fresh = params["W1"] * 0.5
    sim.write({"W1": fresh})
    held = sim.read_params()
    np.testing.assert_array_equal(held["W1"], fresh.astype(np.float32))
    np.testing.assert_array_equal(held["W2"], before["W2"])  # the couplings not written stay
    # and the phases run on what was written (a bench written once with the same values)
    _, other, _ = make([784, 500, 10], dtype="float32", weight_range=weight_range)
    other.write({**params, "W1": fresh})
    x = np.random.default_rng(1).random((3, 784))
    settle = Settle(1e-6, 50)
    np.testing.assert_array_equal(sim.relax(x, settle=settle).state,
                                  other.relax(x, settle=settle).state)


def test_read_params_round_trip() -> None:
    _, sim, params = make([7, 5, 3])  # W1 stored transposed (7 > 5), W2 too (5 > 3)
    back = sim.read_params()
    for name, value in params.items():
        np.testing.assert_array_equal(back[name], value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("sizes", "skips"), [([9, 12, 4], None),
                                              ([7, 11, 3, 13, 5], [[1, 3], [2, 4]])])
def test_contrast_is_the_difference_of_the_energys_parameter_gradients(dtype, sizes,
                                                                       skips) -> None:
    """contrast(x, s_a, s_b, w, c) = c sum_s w_s (dE/dtheta(s_a) - dE/dtheta(s_b)) / sum w,
    dE/dW_l = -s_{l-1} s_l^T, dE/db_l = -s_l, dE/dS_{l,m} = -s_l s_m^T: against the outer
    products written out in float64, for both loop orders of the small-layer kernel (the
    larger layer above or below), with skips, and with zero-weight and zero-input samples."""
    model = LayeredHopfield(sizes, skips=skips)
    rng = np.random.default_rng(5)
    x = (rng.random((8, sizes[0])) * (rng.random((8, sizes[0])) < 0.4)).astype(dtype)
    a, b = (rng.random((8, model.state_size)).astype(dtype) for _ in range(2))
    w = rng.random(8)
    w[3] = 0.0
    got = model.contrast(x, a, b, w, 0.7)
    c = 0.7 * w / w.sum()
    layers_a = [x.astype(float)] + [model.layer(a, i).astype(float)
                                    for i in range(1, len(sizes))]
    layers_b = [x.astype(float)] + [model.layer(b, i).astype(float)
                                    for i in range(1, len(sizes))]

    def outer(low: int, high: int) -> np.ndarray:
        return -((layers_a[low] * c[:, None]).T @ layers_a[high]
                 - (layers_b[low] * c[:, None]).T @ layers_b[high])

    expected = {f"W{i}": outer(i - 1, i) for i in range(1, len(sizes))}
    expected.update({f"b{i}": -(c[:, None] * (layers_a[i] - layers_b[i])).sum(axis=0)
                     for i in range(1, len(sizes))})
    expected.update({model.skip_name(low, high): outer(low, high)
                     for low, high in (skips or [])})
    assert sorted(got) == sorted(expected)
    tolerance = 1e-6 if dtype == np.float32 else 1e-13
    for name, value in expected.items():
        assert got[name].dtype == dtype and got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=0, atol=tolerance, err_msg=name)
