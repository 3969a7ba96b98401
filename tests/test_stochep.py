"""StochEP (Lin, Jiang and Sengupta): stochastic spiking neurons on the Hopfield simulator.

Spikes are Bernoulli with probability rho(h) per time step; a seed reproduces a phase and a run
bit for bit (whatever the thread count) and another seed does not; with a growing window the
stochastic EP estimate tends to deterministic EP (the mean-field limit); a killed run resumes
bit-identical (the spike keys come from the bench's saved generator)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytest
from pydantic import ValidationError

from labep.hardware.bench import Nudge, Settle
from labep.models.hopfield import LayeredHopfield
from labep.run.engine import Trainer
from labep.run.gradcheck import gradcheck
from labep.run.validate import load_protocol
from labep.simulators.hopfield import HopfieldSimulator, HopfieldSimulatorOptions
from labep.store.runs import RunStore

from .conftest import cli_json, crash_and_resume, tiny_xor, write_protocol
from .test_resume import same_params


def spiking(**options: Any) -> HopfieldSimulatorOptions:
    return HopfieldSimulatorOptions.model_validate(
        {"dtype": "float64", "neurons": "spiking", **options})


def single_layer(fields: list[float], **options: Any) -> HopfieldSimulator:
    """A network of one layer (the output) whose fields are the biases b = ``fields``: no
    recurrence, so each unit's h is known and constant."""
    model = LayeredHopfield([1, len(fields)])
    bench = HopfieldSimulator(model, spiking(spike_trace=1.0, spike_discard=0.0, **options))
    bench.write({"W1": np.zeros((1, len(fields))), "b1": np.array(fields)})
    return bench


def test_spikes_are_bernoulli_with_probability_rho_of_h() -> None:
    """With tau = 1 the trace is the spike train and its average the firing frequency: each
    sample's count over T steps is Binomial(T, rho(h)), its mean and variance across samples
    within 5 standard errors, and clipped fields fire always or never."""
    fields = [-0.2, 0.1, 0.5, 0.85, 1.3]
    rho = np.clip(fields, 0.0, 1.0)
    bench = single_layer(fields)
    batch, steps = 400, 100
    phase = bench.relax(np.zeros((batch, 1)), settle=Settle(1.0, steps))
    counts = phase.state * steps  # per sample and unit
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    assert int(phase.info["spikes"]) == round(counts.sum())
    np.testing.assert_array_equal(phase.info["spike_counts"], np.round(counts.sum(axis=1)))
    mean, var = counts.mean(axis=0), counts.var(axis=0, ddof=1)
    expected_mean, expected_var = steps * rho, steps * rho * (1 - rho)
    for unit, p in enumerate(rho):
        if p in (0.0, 1.0):
            assert np.all(counts[:, unit] == steps * p)
            continue
        assert abs(mean[unit] - expected_mean[unit]) < 5 * np.sqrt(expected_var[unit] / batch)
        # a correlated spike train (or a rate off p) would move the variance
        assert abs(var[unit] / expected_var[unit] - 1.0) < 5 * np.sqrt(2.0 / (batch - 1))


def test_a_nudged_output_fires_with_the_nudged_block_update() -> None:
    """An output unit in a nudged phase fires with p = clip((h + beta y) / (1 + beta))."""
    bench = single_layer([0.2])
    batch, steps, beta = 200, 200, 1.0
    phase = bench.relax(np.zeros((batch, 1)), Nudge(beta, np.ones((batch, 1))),
                        settle=Settle(1.0, steps))
    p = (0.2 + beta) / (1 + beta)
    frequency = float(phase.state.mean())
    assert abs(frequency - p) < 5 * np.sqrt(p * (1 - p) / (batch * steps))


def small_bench(seed: int = 0, **options: Any) -> tuple[HopfieldSimulator, np.ndarray]:
    model = LayeredHopfield([6, 10, 8, 3], skips=[(1, 3)])
    bench = HopfieldSimulator(model, spiking(device={"seed": seed}, **options))
    bench.write(model.init_params(np.random.default_rng(4)))
    return bench, np.random.default_rng(5).random((5, 6))


def test_a_seed_reproduces_a_phase_bit_for_bit_whatever_the_threads() -> None:
    first, x = small_bench()
    second, _ = small_bench()
    other, _ = small_bench(seed=1)
    threads = numba.get_num_threads()
    a = first.relax(x, settle=Settle(1.0, 300))
    numba.set_num_threads(1)
    try:
        b = second.relax(x, settle=Settle(1.0, 300))
    finally:
        numba.set_num_threads(threads)
    c = other.relax(x, settle=Settle(1.0, 300))
    np.testing.assert_array_equal(a.state, b.state)
    np.testing.assert_array_equal(a.info["spike_counts"], b.info["spike_counts"])
    assert not np.array_equal(a.state, c.state)
    # the next phase draws a fresh key: a different noise realisation
    again = first.relax(x, settle=Settle(1.0, 300))
    assert not np.array_equal(a.state, again.state)


def test_spiking_rates_tend_to_the_deterministic_fixed_point() -> None:
    """Mean field: the time-averaged rates approach s* = rho(h(s*)) as tau and T grow."""
    bench, x = small_bench()
    twin = HopfieldSimulator(bench.model, HopfieldSimulatorOptions(dtype="float64"))
    twin.write(bench.read_params())
    fixed = twin.relax(x, settle=Settle(1e-12, 10_000)).state
    errors = []
    for tau, steps in ((2.0, 200), (8.0, 2000), (32.0, 20_000)):
        noisy, _ = small_bench(spike_trace=tau)
        errors.append(float(np.abs(noisy.relax(x, settle=Settle(1.0, steps)).state
                                   - fixed).mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_common_noise_takes_the_spike_noise_out_of_the_nudged_contrast() -> None:
    """protocols/stochep_mnist.yaml learns because of this: with common noise the nudged
    phases replay the free phase's draws, so two at the same strength from the same start are
    identical, and the hidden units' contrast s(+beta) - s(-beta), what the first layer's
    estimate is made of, is within a third of the error of independent draws from the
    deterministic twin's (which on MNIST is mostly noise: the hidden layer saturates)."""
    x = np.random.default_rng(6).random((100, 6))
    y = np.eye(3)[np.random.default_rng(7).integers(3, size=100)]
    hidden = slice(0, 18)  # the 10 + 8 hidden units of small_bench
    bench, _ = small_bench()
    twin = HopfieldSimulator(bench.model, HopfieldSimulatorOptions(dtype="float64"))
    twin.write(bench.read_params())
    exact = Settle(1e-12, 10_000)
    free = twin.relax(x, settle=exact).state
    reference = (twin.relax(x, Nudge(0.5, y), start=free, settle=exact).state
                 - twin.relax(x, Nudge(-0.5, y), start=free, settle=exact).state)[:, hidden]
    errors = {}
    for common in (False, True):
        bench, _ = small_bench(common_noise=common)
        start = bench.relax(x, settle=Settle(1.0, 400)).state
        plus, minus, again = (bench.relax(x, Nudge(strength, y), start=start,
                                          settle=Settle(1.0, 200))
                              for strength in (0.5, -0.5, 0.5))
        assert np.array_equal(plus.state, again.state) == common
        contrast = (plus.state - minus.state)[:, hidden]
        errors[common] = float(np.sqrt(np.mean((contrast - reference) ** 2)))
    assert errors[True] < 0.5 * errors[False]
    assert errors[False] > float(np.sqrt(np.mean(reference ** 2)))  # noise above the signal


def spiking_digits(steps: int) -> dict[str, Any]:
    return {
        "name": "stochep-small", "seed": 2,
        "bench": {"simulator": "hopfield",
                  "options": {"dtype": "float64", "neurons": "spiking", "spike_trace": 16.0}},
        "model": {"kind": "layered_hopfield", "sizes": [64, 16, 10]},
        "dataset": {"name": "digits"},
        "phases": {"free": {"tolerance": 1.0, "max_steps": steps},
                   "nudged": {"tolerance": 1.0, "max_steps": steps // 2}},
        "estimator": {"name": "symmetric", "beta": 0.5},
        "training": {"epochs": 1, "batch_size": 8, "learning_rates": [0.1, 0.05]},
    }


def test_the_stochastic_estimate_tends_to_deterministic_ep_with_the_window() -> None:
    """The mean-field limit of the estimate: its cosine to deterministic EP (mean over 4
    noise realisations) rises with the window T, towards 1."""
    reports = [gradcheck(load_protocol(spiking_digits(steps)).protocol, repeats=4)
               for steps in (40, 400, 4000)]
    cosines = [r["cosine_to_deterministic_ep"] for r in reports]
    errors = [r["cosine_to_deterministic_ep_stderr"] for r in reports]
    assert cosines[0] + 2 * errors[0] < cosines[1] and cosines[1] + 2 * errors[1] < cosines[2]
    assert cosines[2] > 0.95
    # the reference is the same on every report, and the cost is counted
    assert len({r["deterministic_ep_cosine"] for r in reports}) == 1
    assert reports[0]["spikes_per_sample"] < reports[2]["spikes_per_sample"]


def test_gradcheck_command_on_a_spiking_protocol(tmp_path: Path) -> None:
    path = write_protocol(tmp_path / "p.yaml", spiking_digits(200))
    report = cli_json("gradcheck", str(path), "--repeats", "3", "--json")
    assert report["repeats"] == 3 and report["steps_per_estimate"] == 400
    assert -1.0 <= report["cosine"] <= 1.0 and report["cosine_stderr"] >= 0.0


def spiking_xor(**changes: Any) -> dict[str, Any]:
    return tiny_xor(**{"bench.options": {"dtype": "float64", "neurons": "spiking"},
                       "phases.free": {"tolerance": 0.5, "max_steps": 60},
                       "phases.nudged": {"tolerance": 0.5, "max_steps": 30},
                       "training.checkpoint_every": 3, **changes})


def test_same_seed_same_spiking_run_and_the_spikes_are_recorded(tmp_path: Path) -> None:
    loaded = load_protocol(spiking_xor())
    other = load_protocol(spiking_xor(**{"bench.options.device": {"seed": 5}}))
    with RunStore(tmp_path / "runs.db") as runs:
        first, second, third = (Trainer(p, runs, progress=False).run()
                                for p in (loaded, loaded, other))
        losses = [list(runs.metric_series(r.run_id, "loss")[1]) for r in (first, second, third)]
        spikes = runs.metric_series(first.run_id, "spikes_per_sample")[1]
        inference = runs.metric_series(first.run_id, "test_spikes_per_sample")[1]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    assert len(spikes) == first.steps and np.all(np.asarray(spikes) > 0)
    # at most every unit (8 + 2) at every step (60) of the free phase
    assert len(inference) >= 1 and 0 < inference[-1] <= 10 * 60


def test_a_crashed_spiking_run_resumes_to_identical_parameters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spike keys come from the bench's saved generator: a resumed run draws the same
    spikes as one never interrupted (common noise too)."""
    for index, doc in enumerate((spiking_xor(),
                                 spiking_xor(**{"bench.options.common_noise": True}))):
        with RunStore(tmp_path / "clean.db") as clean:
            expected = Trainer(load_protocol(doc), clean, progress=False).run()
            store, run, resumed = crash_and_resume(doc, tmp_path / f"crash{index}.db",
                                                   monkeypatch)
            assert resumed.status == "completed" and resumed.steps == expected.steps
            same_params(clean, expected.run_id, store, run["id"])
            store.close()
        (tmp_path / "clean.db").unlink()


def test_spiking_neurons_at_a_temperature_are_refused() -> None:
    with pytest.raises(ValidationError, match="its own noise"):
        spiking(temperature=0.1)
