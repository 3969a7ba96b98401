"""All-to-all OIM: the model's physics, the simulator's dense kernel, EP against the exact
gradient, and learning XOR on a small dense machine."""

from __future__ import annotations

import numpy as np
import pytest

from labep.hardware.bench import Nudge, Settle
from labep.models.dense_oim import DenseOIM
from labep.protocol.text import ProtocolError
from labep.run.engine import Trainer, final_params
from labep.run.validate import load_protocol
from labep.simulators.device import DeviceOptions
from labep.simulators.oim import OIMSimulator, OIMSimulatorOptions
from labep.store.runs import RunStore

from .conftest import PROTOCOLS, assert_force_is_minus_energy_gradient, cli_json

TIGHT = Settle(1e-12, 400_000)


def make(sizes=(3, 4, 2), shil=0.15, seed=0, **options):
    model = DenseOIM(sizes, shil=shil)
    sim = OIMSimulator(model, OIMSimulatorOptions(dtype="float64", dt=0.1, **options))
    params = model.init_params(np.random.default_rng(seed))
    sim.write(params)
    return model, sim, params


def test_couplings_are_symmetric_without_self_coupling() -> None:
    model, _, params = make(seed=5)
    np.testing.assert_array_equal(params["J"], params["J"].T)
    assert np.all(np.diag(params["J"]) == 0.0)
    rng = np.random.default_rng(1)
    x = rng.random((4, 3))
    a, b = (rng.uniform(0, 2 * np.pi, (4, model.state_size)) for _ in range(2))
    grads = model.contrast(x, a, b)
    np.testing.assert_allclose(grads["J"], grads["J"].T, atol=1e-15)
    assert np.all(np.diag(grads["J"]) == 0.0)


def test_force_is_minus_the_energy_gradient() -> None:
    model, _, params = make()
    rng = np.random.default_rng(2)
    x = rng.random((3, 3))
    phases = rng.uniform(0, 2 * np.pi, (3, model.state_size))
    assert_force_is_minus_energy_gradient(model, params, x, phases)


def test_the_kernel_settles_where_the_model_has_no_force() -> None:
    model, sim, params = make(seed=3)
    x = np.random.default_rng(4).random((5, 3))
    free = sim.relax(x, settle=TIGHT)
    assert free.all_converged
    np.testing.assert_allclose(model.residual(x, free.state, params), free.residual,
                               rtol=1e-3, atol=1e-13)
    assert np.max(model.residual(x, free.state, params)) < 1e-11


def test_exact_gradient_matches_finite_differences() -> None:
    model, sim, params = make(seed=6)
    x = np.random.default_rng(7).random((3, 3))
    target = model.encode_target(np.array([0, 1, 1]))
    start = sim.relax(x, settle=TIGHT).state
    exact = model.exact_gradient(x, start, target, params)

    def cost(changed):
        sim.write(changed)
        return model.cost(sim.relax(x, start=start, settle=TIGHT).state, target).mean()

    for name, index in (("K", (1, 2)), ("J", (0, 3)), ("h", (4,)), ("g", (1,))):
        plus = {k: v.copy() for k, v in params.items()}
        minus = {k: v.copy() for k, v in params.items()}
        pair = {index, index[::-1]} if name == "J" else {index}
        for entry in pair:  # a coupling pair is one parameter, held twice
            plus[name][entry] += 1e-6
            minus[name][entry] -= 1e-6
        numeric = (cost(plus) - cost(minus)) / 2e-6
        assert numeric == pytest.approx(exact[name][index], rel=1e-4, abs=1e-9), name


def test_symmetric_ep_matches_the_exact_gradient() -> None:
    model, sim, params = make(sizes=(2, 5, 2), seed=8)
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    target = model.encode_target(np.array([0, 1, 1, 0]))
    free = sim.relax(x, settle=TIGHT)
    beta = 1e-4
    plus = sim.relax(x, Nudge(beta, target), start=free.state, settle=TIGHT)
    minus = sim.relax(x, Nudge(-beta, target), start=free.state, settle=TIGHT)
    estimate = model.contrast(x, plus.state, minus.state, None, 1.0 / (2 * beta))
    exact = model.exact_gradient(x, free.state, target, params)
    flat_e = np.concatenate([estimate[k].ravel() for k in exact])
    flat_x = np.concatenate([exact[k].ravel() for k in exact])
    assert flat_e @ flat_x / np.linalg.norm(flat_e) / np.linalg.norm(flat_x) > 0.9999


def test_dense_xor_gradcheck_cli() -> None:
    report = cli_json("gradcheck", str(PROTOCOLS / "oim_dense_xor.yaml"), "--estimator",
                      "symmetric", "--beta", "0.001", "--json")
    assert report["cosine"] >= 0.999
    assert set(report["parameters"]) == {"K", "J", "h", "g"}


def test_dense_xor_is_learned_and_couplings_stay_symmetric(tmp_path) -> None:
    loaded = load_protocol(PROTOCOLS / "oim_dense_xor.yaml")
    with RunStore(tmp_path / "runs.db") as store:
        result = Trainer(loaded, store, progress=False).run()
        assert result.test_accuracy == 1.0
        coupling = final_params(store, result.run_id)["J"]
    np.testing.assert_array_equal(coupling, coupling.T)
    assert np.all(np.diag(coupling) == 0.0)


def test_quantized_dense_couplings_are_written_as_codes() -> None:
    model = DenseOIM((2, 3, 2), shil=0.1)
    sim = OIMSimulator(model, OIMSimulatorOptions(
        weight_range=1.0, bias_range=1.0, device=DeviceOptions(bits=6)))
    assert {p.name: p.levels for p in sim.spec.parameters} == dict.fromkeys("KJhg", 64)
    codes = {p.name: np.full(p.shape, 40) for p in sim.spec.parameters}
    sim.write(codes)
    np.testing.assert_array_equal(sim.read_params()["J"], codes["J"])


def test_dense_sizes_are_validated() -> None:
    doc = load_protocol(PROTOCOLS / "oim_dense_xor.yaml").document
    doc["model"]["sizes"] = [2, 2]
    with pytest.raises(ProtocolError, match="sizes"):
        load_protocol(doc)
