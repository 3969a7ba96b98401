"""Shared fixtures: the repository's protocols, a throwaway store, the CLI, the shared data."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from labep.cli.main import main
from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = REPO / "protocols"
MNIST = REPO.parent / "shared" / "data" / "mnist"

needs_mnist = pytest.mark.skipif(
    not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="../shared/data/mnist is not beside this clone",
)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


def cli(*args: str) -> Result:
    """Invoke ``labep`` in-process; stdout and stderr kept apart."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def cli_json(*args: str) -> Any:
    result = cli(*args)
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def protocol_doc(name: str) -> dict[str, Any]:
    return yaml.safe_load((PROTOCOLS / name).read_text())


def write_protocol(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tiny_xor(**changes: Any) -> dict[str, Any]:
    """A seconds-long XOR protocol on the Hopfield simulator; ``changes`` are dotted overrides."""
    doc: dict[str, Any] = {
        "name": "tiny-xor",
        "seed": 3,
        "bench": {"simulator": "hopfield", "options": {"dtype": "float64"}},
        "model": {"kind": "layered_hopfield", "sizes": [2, 8, 2], "init_gain": 1.0},
        "dataset": {"name": "xor", "repeats": 8},
        "phases": {"free": {"tolerance": 1e-6, "max_steps": 500},
                   "nudged": {"tolerance": 1e-6, "max_steps": 500}},
        "estimator": {"name": "symmetric", "beta": 0.5},
        "training": {"epochs": 2, "batch_size": 4, "learning_rates": [0.2, 0.1],
                     "checkpoint_every": 4},
    }
    for key, value in changes.items():
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return doc


def assert_force_is_minus_energy_gradient(model: Any, params: Any, x: Any, phases: Any) -> None:
    """model.force(x, phases) against central differences of model.energy, unit by unit."""
    import numpy as np

    eps = 1e-6
    for unit in range(model.state_size):
        step = np.zeros_like(phases)
        step[:, unit] = eps
        numeric = (model.energy(x, phases + step, params)
                   - model.energy(x, phases - step, params)) / (2 * eps)
        np.testing.assert_allclose(-numeric, model.force(x, phases, params)[:, unit],
                                   atol=1e-7)


def crash_and_resume(doc: dict[str, Any], path: Path, monkeypatch: pytest.MonkeyPatch,
                     crash_at: int = 5) -> tuple[RunStore, dict[str, Any], Any]:
    """Run ``doc`` into a store at ``path``, crash it (a power cut while step ``crash_at`` is
    committed), then resume it: (the open store, the run as listed before the resume, the
    resumed :class:`RunResult`). The caller closes the store."""
    store = RunStore(path)
    commit = RunStore.commit_step

    def crashing(self: RunStore, run_id: str, step: int, *args: Any, **kwargs: Any) -> None:
        if step == crash_at:
            raise RuntimeError("power cut")
        commit(self, run_id, step, *args, **kwargs)

    monkeypatch.setattr(RunStore, "commit_step", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        Trainer(load_protocol(doc), store, progress=False).run()
    monkeypatch.setattr(RunStore, "commit_step", commit)
    (run,) = store.runs()
    return store, run, Trainer.resume(store, run["id"], progress=False)


@pytest.fixture
def emulator_factory() -> Iterator[Callable[..., Any]]:
    """In-process OIM board emulators (a thread each), closed after the test:
    ``start(sizes=(2, 4, 2), faults="", seed=3, protocol=3, **BoardEmulator options)``."""
    from labep.simulators.oim_board_emulator import BoardConfig, BoardEmulator, FaultSpec

    started: list[BoardEmulator] = []

    def start(sizes: tuple[int, ...] = (2, 4, 2), faults: str = "", seed: int = 3,
              protocol: int = 3, **options: Any) -> BoardEmulator:
        emulator = BoardEmulator(BoardConfig(sizes=sizes, seed=seed, protocol=protocol),
                                 faults=FaultSpec.parse(faults), **options)
        emulator.start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.close()


def refused(tmp_path: Path, doc: dict[str, Any], *overrides: str) -> str:
    """``labep run`` refuses the protocol: exit 2, no store created, no traceback; returns
    stderr."""
    path = write_protocol(tmp_path / "p.yaml", doc)
    store = tmp_path / "never.db"
    args = ["run", str(path), "--store", str(store), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert not store.exists(), "a refused protocol must create nothing"
    assert "Traceback" not in result.stderr
    return result.stderr
