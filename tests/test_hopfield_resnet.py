"""Hopfield-ResNet: skip couplings S_{l,m} between non-adjacent layers of the layered Hopfield
network (model, numba kernel, exact gradient, EP estimate, protocol validation)."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from labep.hardware.bench import Nudge, Settle
from labep.models.hopfield import LayeredHopfield
from labep.protocol.text import ProtocolError
from labep.run.assembly import build_model, learning_rates
from labep.run.engine import Trainer, final_params
from labep.run.gradcheck import gradcheck
from labep.run.validate import load_protocol
from labep.simulators.hopfield import HopfieldSimulator, HopfieldSimulatorOptions
from labep.simulators.hopfield_fields import _layer_field, _skip_field
from labep.store.runs import RunStore

from .conftest import PROTOCOLS, crash_and_resume, needs_mnist, tiny_xor

SIZES = [5, 4, 6, 3, 5, 3]
SKIPS = [[1, 3], [2, 5], [1, 4], [3, 5]]


def make(sizes=SIZES, skips=SKIPS, seed=0, gain=1.5, **options):
    model = LayeredHopfield(sizes, init_gain=gain, skips=skips)
    sim = HopfieldSimulator(model, HopfieldSimulatorOptions(dtype="float64", **options))
    params = model.init_params(np.random.default_rng(seed))
    sim.write(params)
    return model, sim, params


def kernel_fields(model, sim, x, state):
    """h(s) from the simulator's own numba field kernels (W, b, drive, then the skips)."""
    drive = x @ sim._views["W1"] + sim._views["b1"]
    offsets = np.concatenate(([0], np.cumsum(model.sizes[1:-1]))).astype(np.int64)
    fields = np.empty_like(state)
    for sample in range(state.shape[0]):
        row = state[sample].copy()
        for layer in range(1, model.n_layers + 1):
            out = np.empty(max(model.sizes[1:]))
            _layer_field(layer, sim._sizes, offsets, sim._weights, sim._weight_offsets,
                         sim._transposed, sim._biases, sim._bias_offsets, drive[sample], row, out)
            _skip_field(layer, sim._sizes, offsets, sim._weights, sim._skip_offsets,
                        sim._skip_lower, sim._skip_upper, row, out)
            lo, hi = model.layer_slices[layer]
            fields[sample, lo:hi] = out[:hi - lo]
    return fields


def test_kernel_field_is_minus_energy_gradient() -> None:
    """E = |s|^2/2 - Phi: the kernel's h = dPhi/ds = s - dE/ds, by central differences."""
    model, sim, params = make()
    rng = np.random.default_rng(1)
    x, state = rng.random((4, SIZES[0])), rng.random((4, model.state_size))
    eps = 1e-6
    grad = np.empty_like(state)
    for unit in range(model.state_size):
        step = np.zeros_like(state)
        step[:, unit] = eps
        grad[:, unit] = (model.energy(x, state + step, params)
                         - model.energy(x, state - step, params)) / (2 * eps)
    np.testing.assert_allclose(kernel_fields(model, sim, x, state), state - grad, atol=1e-8)
    np.testing.assert_allclose(model.local_fields(x, state, params), state - grad, atol=1e-8)


def test_skip_parameters_names_shapes_and_rate_groups() -> None:
    model = LayeredHopfield(SIZES, skips=SKIPS)
    shapes = model.parameter_shapes()
    assert list(shapes)[-4:] == ["S1_3", "S1_4", "S2_5", "S3_5"]  # sorted, after W and b
    assert shapes["S2_5"] == (6, 3) and model.layer_of("S2_5") == 5
    protocol = load_protocol(tiny_xor(**{"model.sizes": [2, 4, 4, 4, 2],
                                         "model.skip_every": 2,
                                         "training.learning_rates": [0.4, 0.3, 0.2, 0.1]})
                             ).protocol
    built = build_model(protocol.model)
    assert built.skips == ((1, 3),)
    assert learning_rates(protocol, built)["S1_3"] == 0.2  # the rate of its upper layer
    # the skip's init bound is g_s / sqrt(n_l)
    gain = LayeredHopfield([3, 400, 5, 2], skips=[[1, 3]], skip_init_gain=0.5)
    bound = np.abs(gain.init_params(np.random.default_rng(0))["S1_3"]).max()
    assert 0.9 * 0.5 / 20 < bound <= 0.5 / 20


@pytest.mark.parametrize("asynchronous", [True, False])
def test_settled_states_are_fixed_points_with_skips(asynchronous: bool) -> None:
    model, sim, params = make(asynchronous=asynchronous, damping=1.0 if asynchronous else 0.5)
    rng = np.random.default_rng(2)
    x, y = rng.random((6, SIZES[0])), model.encode_target(rng.integers(0, 3, 6))
    free = sim.relax(x, settle=Settle(1e-12, 5000))
    assert free.all_converged
    assert np.max(model.residual(x, free.state, params)) < 1e-10
    nudged = sim.relax(x, Nudge(0.5, y), start=free.state, settle=Settle(1e-12, 5000))
    h = model.local_fields(x, nudged.state, params)
    lo, hi = model.output_slice
    h[:, lo:hi] += 0.5 * (y - nudged.state[:, lo:hi])
    assert np.max(np.abs(np.clip(h, 0, 1) - nudged.state)) < 1e-9


def test_exact_gradient_matches_finite_differences_of_settled_cost() -> None:
    model, sim, params = make(gain=1.2)
    rng = np.random.default_rng(3)
    x, y = rng.random((5, SIZES[0])), model.encode_target(rng.integers(0, 3, 5))
    settle = Settle(1e-14, 20000)

    def cost(p):
        sim.write(p)
        relax = sim.relax(x, settle=settle)
        assert relax.all_converged
        return float(np.mean(model.cost(relax.state, y)))

    state = sim.relax(x, settle=settle).state
    exact = model.exact_gradient(x, state, y, params)
    eps = 1e-6
    checked = 0
    for name in ("S1_3", "S2_5", "S3_5", "W3", "b2"):
        for index in list(np.ndindex(params[name].shape))[:3]:
            up = {k: v.copy() for k, v in params.items()}
            down = {k: v.copy() for k, v in params.items()}
            up[name][index] += eps
            down[name][index] -= eps
            numeric = (cost(up) - cost(down)) / (2 * eps)
            assert numeric == pytest.approx(exact[name][index], rel=1e-4, abs=1e-9), name
            checked += abs(numeric) > 1e-6
    assert checked >= 5  # the check is not vacuous


def test_symmetric_ep_matches_exact_gradient_on_deep_skip_network() -> None:
    """Six hidden layers (digits, 64-10x6-10) with skips [1,3], [3,5], [5,7]: the symmetric EP
    estimate at small beta agrees with implicit differentiation, skips included."""
    doc = tiny_xor(**{
        "dataset": {"name": "digits"},
        "model.sizes": [64, 10, 10, 10, 10, 10, 10, 10], "model.skip_every": 2,
        "model.init_gain": 1.5, "training.learning_rates": 0.1})
    report = gradcheck(load_protocol(doc).protocol, beta=1e-3, estimator="symmetric",
                       samples=10, seed=1)
    assert {"S1_3", "S3_5", "S5_7"} <= set(report["parameters"])
    assert report["cosine"] >= 0.999, report
    for name in ("S1_3", "S3_5", "S5_7", "W1"):
        assert report["parameters"][name]["cosine"] >= 0.999, (name, report)


@pytest.mark.parametrize(("changes", "message"), [
    ({"model.skips": [[1, 2]]}, r"model\.skips.*\[1, 2\].*m - l >= 2"),
    ({"model.skips": [[0, 2]]}, r"model\.skips.*\[0, 2\].*free layers 1\.\.4"),
    ({"model.skips": [[2, 5]]}, r"model\.skips.*\[2, 5\].*free layers 1\.\.4"),
    ({"model.skips": [[3, 1]]}, r"model\.skips.*\[3, 1\].*l < m"),
    ({"model.skips": [[1, 3], [2, 4], [1, 3]]}, r"model\.skips.*\[1, 3\] is listed twice"),
    ({"model.skips": [[1, 3, 4]]}, r"model\.skips.*must be a pair"),
    ({"model.skip_every": 1}, r"model\.skip_every.*greater than or equal to 2"),
    ({"model.skip_every": 4}, r"model\.skip_every.*more than 4 free layers"),
])
def test_invalid_skips_are_refused_naming_the_field(changes, message) -> None:
    doc = tiny_xor(**{"model.sizes": [2, 4, 4, 4, 2], **changes})
    with pytest.raises(ProtocolError, match=message):
        load_protocol(doc)


def test_zero_skips_leave_the_kernel_unchanged() -> None:
    """A skip coupling of zero changes no state bit: the skip terms add exactly 0."""
    _, plain, params = make(skips=[])
    skip_model, skipped, _ = make(skips=SKIPS)
    zeros = {k: np.zeros(s) for k, s in skip_model.parameter_shapes().items() if k[0] == "S"}
    skipped.write({**params, **zeros})
    x = np.random.default_rng(4).random((5, SIZES[0]))
    for asynchronous in (True, False):
        plain.options.asynchronous = skipped.options.asynchronous = asynchronous
        a = plain.relax(x, settle=Settle(1e-12, 3000))
        b = skipped.relax(x, settle=Settle(1e-12, 3000))
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.steps, b.steps)


#: final parameter sums of this XOR run on the code before skips existed (commit 4fc4fbf)
BEFORE_SKIPS = {
    "W1": -0.8501862235508262, "W2": 1.0938833798619902, "W3": 0.34225592967980656,
    "W4": 0.9920012735417858, "b1": 0.42902229154399757, "b2": -0.3255240849653432,
    "b3": -0.08484080394779753, "b4": -0.16446568957059185,
}


def test_no_skip_training_is_unchanged() -> None:
    doc = tiny_xor(**{"model.sizes": [2, 8, 6, 3, 2],
                      "training.learning_rates": [0.2, 0.1, 0.1, 0.05]})
    with tempfile.TemporaryDirectory() as folder:
        store = RunStore(f"{folder}/runs.db")
        run = Trainer(load_protocol(doc), store, progress=False).run()
        params = final_params(store, run.run_id)
        store.close()
    assert set(params) == set(BEFORE_SKIPS)
    for name, value in BEFORE_SKIPS.items():
        assert float(np.sum(params[name])) == pytest.approx(value, rel=1e-12, abs=1e-14), name


def test_skip_run_resumes_to_the_uninterrupted_parameters(tmp_path, monkeypatch) -> None:
    """Skips are ordinary parameters of the run store: a run that crashed mid-run resumes and
    ends with the parameters of an uninterrupted run."""
    doc = tiny_xor(**{"model.sizes": [2, 6, 6, 6, 2], "model.skips": [[1, 3], [2, 4]],
                      "training.checkpoint_every": 3,
                      "training.learning_rates": [0.2, 0.1, 0.1, 0.05]})
    with RunStore(tmp_path / "clean.db") as clean:
        whole = Trainer(load_protocol(doc), clean, progress=False).run()
        expected = final_params(clean, whole.run_id)
    assert {"S1_3", "S2_4"} <= set(expected)
    store, run, resumed = crash_and_resume(doc, tmp_path / "crash.db", monkeypatch)
    assert resumed.status == "completed"
    got = final_params(store, run["id"])
    store.close()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.slow
@needs_mnist
def test_skips_train_a_deep_network_that_stalls_without_them() -> None:
    """Reduced depth claim: 784-32x6-10 on 2,000 MNIST images, 2 epochs."""
    reduced = ["model.sizes=[784,32,32,32,32,32,32,10]", "dataset.train.stop=2000",
               "dataset.test.start=9000", "training.epochs=2"]
    accuracy = {}
    for label, extra in {"skips": [], "plain": ["model.skip_every=null", "model.skips=[]"]
                         }.items():
        with tempfile.TemporaryDirectory() as folder:
            store = RunStore(f"{folder}/runs.db")
            loaded = load_protocol(PROTOCOLS / "hopfield_resnet_mnist.yaml", [*reduced, *extra])
            accuracy[label] = Trainer(loaded, store, progress=False).run().test_accuracy
            store.close()
    assert accuracy["skips"] > 0.7
    assert accuracy["plain"] < accuracy["skips"] - 0.2


@pytest.mark.slow
@needs_mnist
def test_the_deep_skip_protocol_ends_within_a_point_of_one_hidden_layer(tmp_path) -> None:
    """The issue's claim as shipped: hopfield_resnet_mnist.yaml (six hidden layers, skips)
    ends within 1 point of the 784-128-10 network trained the same way (about 30 s)."""
    shallow = ["model.sizes=[784,128,10]", "model.skip_every=null", "model.skips=[]",
               "training.learning_rates=[0.4,0.1]"]
    accuracy = {}
    for label, extra in {"deep": [], "shallow": shallow}.items():
        with RunStore(tmp_path / f"{label}.db") as store:
            loaded = load_protocol(PROTOCOLS / "hopfield_resnet_mnist.yaml", extra)
            accuracy[label] = Trainer(loaded, store, progress=False).run().test_accuracy
    assert accuracy["deep"] >= accuracy["shallow"] - 0.01, accuracy
