"""Optimizers: SGD and Adam turn an EP estimate into the step the write path applies; a
protocol chooses one, and Adam's moments survive a resume (tests/test_resume.py)."""

from __future__ import annotations

import numpy as np
import pytest

from labep.ep.optimizers import Adam, Sgd, schedule_scale
from labep.protocol.sections import ScheduleConfig
from labep.protocol.text import ProtocolError
from labep.run.engine import Trainer, final_params
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

from .conftest import tiny_xor


def test_sgd_steps_against_the_gradient_at_each_parameters_rate() -> None:
    sgd = Sgd({"W1": 0.5, "b1": 0.1})
    step = sgd.step({"W1": np.array([1.0, -2.0]), "b1": np.array([4.0])})
    np.testing.assert_allclose(step["W1"], [-0.5, 1.0])
    np.testing.assert_allclose(step["b1"], [-0.4])


def test_adam_matches_kingma_and_ba() -> None:
    """Three steps against the algorithm written out: moments, bias correction, epsilon."""
    rng = np.random.default_rng(0)
    gradients = [rng.standard_normal(5) * scale for scale in (1.0, 10.0, 0.01)]
    adam = Adam({"V": 0.05}, beta1=0.8, beta2=0.99, epsilon=1e-6)
    m = np.zeros(5)
    v = np.zeros(5)
    for t, g in enumerate(gradients, start=1):
        m = 0.8 * m + 0.2 * g
        v = 0.99 * v + 0.01 * g * g
        expected = -0.05 * (m / (1 - 0.8 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-6)
        np.testing.assert_allclose(adam.step({"V": g.copy()})["V"], expected, rtol=1e-12)
    # the first step has the size of the learning rate whatever the gradient's scale
    first = Adam({"V": 0.05}).step({"V": np.array([1e-4, -300.0])})["V"]
    np.testing.assert_allclose(np.abs(first), 0.05, rtol=1e-3)


def test_adam_state_round_trips_and_refuses_another_optimizers_state() -> None:
    adam = Adam({"V": 0.1})
    adam.step({"V": np.array([1.0, 2.0])})
    meta, arrays = adam.state()
    again = Adam({"V": 0.1})
    again.restore(meta, arrays)
    g = np.array([0.3, -0.7])
    np.testing.assert_array_equal(adam.step({"V": g.copy()})["V"], again.step({"V": g.copy()})["V"])
    with pytest.raises(ValueError, match="'adam' optimizer state"):
        Sgd({"V": 0.1}).restore(meta, arrays)
    with pytest.raises(ValueError, match="'sgd' optimizer state"):
        Adam({"V": 0.1}).restore(*Sgd({"V": 0.1}).state())


def test_a_protocol_chooses_the_optimizer(tmp_path) -> None:
    with pytest.raises(ProtocolError, match="optimizer"):
        load_protocol(tiny_xor(**{"training.optimizer": {"name": "rmsprop"}}))
    with pytest.raises(ProtocolError, match="beta2"):
        load_protocol(tiny_xor(**{"training.optimizer": {"name": "adam", "beta2": 1.0}}))
    finals = {}
    with RunStore(tmp_path / "runs.db") as store:
        for name in ("sgd", "adam"):
            doc = tiny_xor(**{"training.optimizer": {"name": name}})
            result = Trainer(load_protocol(doc), store, progress=False).run()
            assert result.status == "completed"
            finals[name] = final_params(store, result.run_id)
    assert not np.allclose(finals["sgd"]["W1"], finals["adam"]["W1"])


def test_schedules_scale_the_rate_by_the_step() -> None:
    cosine = ScheduleConfig(name="cosine", final_fraction=0.1)
    scales = [schedule_scale(cosine, t, 10, 2) for t in range(20)]
    assert scales[0] == 1.0
    assert scales[10] == pytest.approx(0.55)  # half way: f + (1 - f) / 2
    assert np.all(np.diff(scales) < 0) and scales[-1] > 0.1
    step = ScheduleConfig(name="step", factor=0.5, every_epochs=2)
    assert [schedule_scale(step, t, 10, 6) for t in (0, 19, 20, 39, 40)] == [
        1.0, 1.0, 0.5, 0.5, 0.25]
    assert schedule_scale(ScheduleConfig(), 17, 10, 2) == 1.0
    # the scale multiplies the optimizer's step
    np.testing.assert_allclose(Sgd({"V": 0.5}).step({"V": np.array([2.0])}, 0.1)["V"], [-0.1])
    np.testing.assert_allclose(Adam({"V": 0.5}).step({"V": np.array([2.0])}, 0.1)["V"], [-0.05],
                               rtol=1e-6)


def test_a_protocols_schedule_shrinks_the_steps_it_takes(tmp_path) -> None:
    with pytest.raises(ProtocolError, match="schedule"):
        load_protocol(tiny_xor(**{"training.schedule": {"name": "linear"}}))
    with RunStore(tmp_path / "runs.db") as store:
        runs = {}
        for name in ("constant", "cosine"):
            doc = tiny_xor(**{"training.schedule": {"name": name}})
            runs[name] = Trainer(load_protocol(doc), store, progress=False).run().run_id
        _, scale = store.metric_series(runs["cosine"], "lr_scale")
        # tiny_xor: 2 epochs of 8 batches; the scale the run used at every step is recorded
        np.testing.assert_allclose(scale, 0.5 * (1 + np.cos(np.pi * np.arange(16) / 16)))
        assert np.all(store.metric_series(runs["constant"], "lr_scale")[1] == 1.0)
        for name, run_id in runs.items():
            runs[name] = final_params(store, run_id)
    assert not np.allclose(runs["constant"]["W1"], runs["cosine"]["W1"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [7, 1 << 16])
def test_the_write_path_takes_sgds_step_bit_for_bit(dtype: type, size: int) -> None:
    """SGD's step is its factors -eta s(t) times the gradient; the write path takes it in its
    own pass over the parameters (a parallel kernel from 65,536 values, numpy below) and
    lands on the same shadow, bit for bit, as the step computed apart and then added; so does
    a deferred update."""
    from labep.hardware.bench import BenchSpec, ParameterSpec
    from labep.hardware.write_path import WritePath

    class Held:
        spec = BenchSpec(parameters=(ParameterSpec("W", (size,), -np.inf, np.inf),),
                         input_size=1, state_size=1, output_slice=(0, 1))

        def write(self, params: dict) -> None:
            self.held = {name: np.array(values) for name, values in params.items()}

    rng = np.random.default_rng(size)
    start = {"W": rng.standard_normal(size)}
    gradient = rng.standard_normal(size).astype(dtype)
    sgd = Sgd({"W": 0.37})
    fused, apart, deferred = (WritePath(Held(), dict(start)) for _ in range(3))
    factors = sgd.factors({"W": gradient}, 0.61)
    assert factors == {"W": -0.37 * 0.61}
    fused.apply({"W": gradient}, factors)
    deferred.defer({"W": gradient}, factors)
    apart.apply(sgd.step({"W": gradient.copy()}, 0.61))
    assert fused.shadow["W"].tobytes() == apart.shadow["W"].tobytes()
    assert deferred.shadow["W"].tobytes() == apart.shadow["W"].tobytes()
    assert fused.bench.held["W"].tobytes() == apart.bench.held["W"].tobytes()
    # the rounding is the gradient dtype's: a float32 step is not the float64 product
    assert not np.array_equal(fused.shadow["W"], start["W"] + gradient.astype(np.float64)
                              * factors["W"]) or dtype == np.float64
    assert Adam({"W": 0.1}).factors({"W": gradient}) is None
