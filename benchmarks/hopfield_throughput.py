"""Training throughput of labep's Hopfield simulator against two PyTorch EP reference loops.

What is measured
----------------
A 784-500-10 layered Hopfield network is trained with symmetric Equilibrium Propagation for one
epoch (``--epochs N``) on the MNIST split of ``protocols/hopfield_mnist.yaml`` (first 8,000
images of the t10k file for training, last 2,000 for testing), three ways:

``labep``
    ``Trainer(load_protocol(...), RunStore(tmp)).run()``: the numba simulator bench, exactly as
    ``labep run`` trains. Throughput (``train_seconds``, ``samples_per_second``) is read from the
    run store, where the engine records it at each epoch end; it covers the training steps only
    (relaxations, updates, per-step store commits), not the test evaluation. The numba JIT is
    warmed on a 40-sample run first, so compile time is excluded. The wall time of the whole
    ``run()`` (data loading, training, evaluation) is reported too. labep stops each sample's
    relaxation as soon as its residual is within the protocol's tolerance.

``torch-autograd``
    The field's usual way (the reference code of Laborieux et al. 2021, "Scaling Equilibrium
    Propagation to Deep ConvNets"): the primitive function
    ``Phi = sum_l s_{l-1}^T W_l s_l + sum_l b_l^T s_l - beta C(s_L, y)`` summed over the batch,
    each step ``s <- rho(dPhi/ds)`` for all layers at once (synchronous) via
    ``torch.autograd.grad``; exactly T1 free steps, then T2 steps at +beta and T2 at -beta, both
    from the free state. Update ``theta += lr * (dPhi/dtheta(s+) - dPhi/dtheta(s-)) / (2 beta)``
    averaged over the batch, computed explicitly from the states (the same step as labep's
    ``theta -= lr * (dE/dtheta(s+) - dE/dtheta(s-)) / (2 beta)``, since dE/dtheta = -dPhi/dtheta).

``torch-explicit``
    The same loop with the local fields written out as matmuls
    (``h_l = s_{l-1} W_l + b_l + s_{l+1} W_{l+1}^T``, ``h_L += beta (y - s_L)``; the input drive
    ``x W_1`` recomputed every step, as such reference loops do).

All three start from labep's own initial parameters (``model.init_params(stream(seed, 0))``),
see the same mini-batches in the same order (``stream(seed, 1, epoch).permutation(n)``), and
use the protocol's beta, batch size, per-layer learning rates and step caps (T1 = free
``max_steps``, T2 = nudged ``max_steps``). The torch side runs in float32 (as the protocol's
simulator does); its timing covers the training loop only (time.perf_counter), after a two-batch
warm-up; its test accuracy is a T1-step free phase on the test set, argmax of the output layer.
numba, torch and numpy's BLAS all get 2 threads (``--threads``). On a 2-core machine anything
else running (even briefly) can slow a 2-thread OpenMP loop many times over: compare runs on an
idle machine, or use ``--repeats N`` (fastest of N interleaved runs); the load average is
printed with the results.

How to run
----------
From the repository root (the protocol's default data path is relative to it)::

    python benchmarks/hopfield_throughput.py                      # 1 epoch, 8,000 samples
    python benchmarks/hopfield_throughput.py --train-samples 400  # quick smoke run
    python benchmarks/hopfield_throughput.py --data /data/mnist --epochs 2 --json
    python benchmarks/hopfield_throughput.py --repeats 3 --threads 1
    python benchmarks/hopfield_throughput.py --seeds 0 1 2        # mean accuracy over seeds
    python benchmarks/hopfield_throughput.py --set estimator.beta=0.2 --set phases.free.max_steps=20

Without torch installed (``pip install torch``), only labep's side runs.
"""

from __future__ import annotations

import os

# numba sizes its thread pool from NUMBA_NUM_THREADS when it is first imported (labep imports
# it): set it first. ``--threads`` then picks how many of the pool (and of torch's) are used.
THREADS = 2
os.environ.setdefault("NUMBA_NUM_THREADS", str(THREADS))

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
from machine import (  # noqa: E402
    best_of,
    blas_thread_counts,
    blas_threads,
    load_average,
    log,
    print_machine,
)

from labep import __version__ as labep_version  # noqa: E402
from labep.data.builtin import IdxConfig  # noqa: E402
from labep.data.loaders import Split  # noqa: E402
from labep.models import Params  # noqa: E402
from labep.protocol.sections import Protocol  # noqa: E402
from labep.protocol.text import ProtocolError  # noqa: E402
from labep.run.assembly import build_model, learning_rates, stream  # noqa: E402
from labep.run.engine import Trainer  # noqa: E402
from labep.run.validate import LoadedProtocol, load_protocol  # noqa: E402
from labep.store.runs import RunStore  # noqa: E402

try:
    import torch
except ImportError:  # the torch side is optional
    torch = None  # type: ignore[assignment]


DEFAULT_PROTOCOL = Path(__file__).resolve().parents[1] / "protocols" / "hopfield_mnist.yaml"
WARMUP_SAMPLES = 40
Mode = Literal["autograd", "explicit"]


@dataclass
class MethodResult:
    """The figures of one way of training."""

    method: str
    samples_per_second: float
    train_seconds: float
    test_accuracy: float | None
    wall_seconds: float
    samples: int
    details: dict[str, Any] = field(default_factory=dict)


# -- labep ----------------------------------------------------------------------------------


def warm_up_labep(protocol: str | Path, overrides: list[str], start: int, test_start: int,
                  folder: Path) -> None:
    """Run the trainer once on a few samples so the numba kernels are compiled (or loaded)."""
    tiny = [*overrides, "training.epochs=1", f"dataset.train.stop={start + WARMUP_SAMPLES}",
            f"dataset.test.stop={test_start + WARMUP_SAMPLES}"]
    store = RunStore(folder / "warmup.db")
    try:
        Trainer(load_protocol(protocol, tiny), store, progress=False).run()
    finally:
        store.close()


def run_labep(loaded: LoadedProtocol, path: Path) -> MethodResult:
    """One timed labep run; throughput and accuracy as the engine recorded them."""
    store = RunStore(path)
    try:
        began = time.perf_counter()
        result = Trainer(loaded, store, progress=False).run()
        wall = time.perf_counter() - began
        run_id = result.run_id
        _, seconds = store.metric_series(run_id, "train_seconds")
        _, rates = store.metric_series(run_id, "samples_per_second")
        _, free_steps = store.metric_series(run_id, "free_steps")
        _, nudged_steps = store.metric_series(run_id, "nudged_steps")
        _, unsettled = store.metric_series(run_id, "unsettled")
        final = store.final_metrics(run_id)
    finally:
        store.close()
    samples = round(float(np.sum(rates * seconds)))
    total = float(np.sum(seconds))
    accuracy = final["test_accuracy"]
    return MethodResult(
        method="labep",
        samples_per_second=samples / max(total, 1e-12),
        train_seconds=total,
        test_accuracy=None if accuracy is None else float(accuracy),
        wall_seconds=wall,
        samples=samples,
        details={
            "epoch_samples_per_second": [float(v) for v in rates],
            "epoch_train_seconds": [float(v) for v in seconds],
            "mean_free_steps": float(np.mean(free_steps)) if free_steps.size else None,
            "mean_nudged_steps": float(np.mean(nudged_steps)) if nudged_steps.size else None,
            "unsettled_samples": int(np.sum(unsettled)),
            "train_loss": final["train_loss"],
        },
    )


# -- the torch reference loops ---------------------------------------------------------------


class TorchEP:
    """Symmetric EP on a layered Hopfield network in PyTorch, fixed step counts, synchronous.

    ``weights[l]`` is W_{l+1} of shape (n_l, n_{l+1}), ``biases[l]`` is b_{l+1}; states are a
    list of (batch, n_l) tensors for the layers 1..L (the input is clamped, not a state).
    """

    def __init__(self, params: Params, rates: dict[str, float], n_layers: int, beta: float,
                 free_steps: int, nudged_steps: int, mode: Mode) -> None:
        assert torch is not None
        self.weights = [torch.tensor(params[f"W{i}"], dtype=torch.float32)
                        for i in range(1, n_layers + 1)]
        self.biases = [torch.tensor(params[f"b{i}"], dtype=torch.float32)
                       for i in range(1, n_layers + 1)]
        self.weight_rates = [rates[f"W{i}"] for i in range(1, n_layers + 1)]
        self.bias_rates = [rates[f"b{i}"] for i in range(1, n_layers + 1)]
        self.beta = beta
        self.free_steps = free_steps
        self.nudged_steps = nudged_steps
        self.relax = self._relax_autograd if mode == "autograd" else self._relax_explicit

    def zeros(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, w.shape[1]) for w in self.weights]

    def _phi(self, x: torch.Tensor, y: torch.Tensor | None, states: list[torch.Tensor],
             beta: float) -> torch.Tensor:
        """Phi summed over the batch: couplings and biases, minus beta times the cost."""
        phi = torch.zeros(())
        below = x
        for weight, bias, here in zip(self.weights, self.biases, states, strict=True):
            phi = phi + torch.sum((below @ weight) * here) + torch.sum(here @ bias)
            below = here
        if beta != 0.0 and y is not None:
            phi = phi - beta * 0.5 * torch.sum((states[-1] - y) ** 2)
        return phi

    def _relax_autograd(self, x: torch.Tensor, y: torch.Tensor | None,
                        states: list[torch.Tensor], beta: float,
                        steps: int) -> list[torch.Tensor]:
        """s <- rho(dPhi/ds) for every layer at once, the gradient taken by autograd."""
        states = [s.detach().requires_grad_(True) for s in states]
        for _ in range(steps):
            grads = torch.autograd.grad(self._phi(x, y, states, beta), states)
            states = [g.clamp(0.0, 1.0).requires_grad_(True) for g in grads]
        return [s.detach() for s in states]

    def _relax_explicit(self, x: torch.Tensor, y: torch.Tensor | None,
                        states: list[torch.Tensor], beta: float,
                        steps: int) -> list[torch.Tensor]:
        """s <- rho(h) for every layer at once, h written out as matmuls."""
        last = len(self.weights) - 1
        for _ in range(steps):
            fresh = []
            for index, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
                below = x if index == 0 else states[index - 1]
                h = below @ weight + bias
                if index < last:
                    h = h + states[index + 1] @ self.weights[index + 1].T
                elif beta != 0.0 and y is not None:
                    h = h + beta * (y - states[index])
                fresh.append(h.clamp(0.0, 1.0))
            states = fresh
        return states

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Free phase, +beta and -beta phases from the free state, symmetric EP update."""
        free = self.relax(x, y, self.zeros(x.shape[0]), 0.0, self.free_steps)
        plus = self.relax(x, y, free, self.beta, self.nudged_steps)
        minus = self.relax(x, y, free, -self.beta, self.nudged_steps)
        scale = 1.0 / (2.0 * self.beta * x.shape[0])
        with torch.no_grad():
            for index in range(len(self.weights)):
                below_plus = x if index == 0 else plus[index - 1]
                below_minus = x if index == 0 else minus[index - 1]
                # dPhi/dW_l = s_{l-1}^T s_l (summed over the batch), dPhi/db_l = sum of s_l
                d_weight = below_plus.T @ plus[index] - below_minus.T @ minus[index]
                d_bias = torch.sum(plus[index] - minus[index], dim=0)
                self.weights[index].add_(d_weight, alpha=self.weight_rates[index] * scale)
                self.biases[index].add_(d_bias, alpha=self.bias_rates[index] * scale)

    def accuracy(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
        """Free phase of T1 steps on a labelled set; argmax of the output layer."""
        correct = 0
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start:start + batch_size]
            free = self.relax(x, None, self.zeros(x.shape[0]), 0.0, self.free_steps)
            correct += int(torch.sum(free[-1].argmax(dim=1) == labels[start:start + batch_size]))
        return correct / max(inputs.shape[0], 1)

    def params(self) -> dict[str, np.ndarray]:
        out = {f"W{i + 1}": w.numpy().copy() for i, w in enumerate(self.weights)}
        out.update({f"b{i + 1}": b.numpy().copy() for i, b in enumerate(self.biases)})
        return out


def batch_rows(protocol: Protocol, n_train: int, epoch: int) -> list[np.ndarray]:
    """The engine's mini-batches of an epoch, in its order."""
    size = protocol.training.batch_size
    order = stream(protocol.seed, 1, epoch).permutation(n_train)
    return [order[i * size:(i + 1) * size] for i in range(-(-n_train // size))]


def run_torch(protocol: Protocol, data: Split, mode: Mode) -> tuple[MethodResult, Params]:
    """Warm up, then time the training loop of one torch variant; evaluate afterwards."""
    assert torch is not None
    model = build_model(protocol.model)
    init = model.init_params(stream(protocol.seed, 0))
    rates = learning_rates(protocol, model)
    n_layers = len(protocol.model.sizes) - 1

    def make() -> TorchEP:
        return TorchEP(init, rates, n_layers, protocol.estimator.beta,
                       protocol.phases.free.max_steps, protocol.phases.nudged.max_steps, mode)

    train_x = torch.from_numpy(data.train_inputs.astype(np.float32))
    train_y = torch.from_numpy(model.encode_target(data.train_labels).astype(np.float32))
    test_x = torch.from_numpy(data.test_inputs.astype(np.float32))
    test_labels = torch.from_numpy(data.test_labels)
    n_train = train_x.shape[0]

    scratch = make()  # warm-up: thread pool, allocator, autograd machinery
    for rows in batch_rows(protocol, n_train, 0)[:2]:
        index = torch.from_numpy(rows)
        scratch.train_step(train_x[index], train_y[index])

    net = make()
    began = time.perf_counter()
    seen = 0
    for epoch in range(protocol.training.epochs):
        for rows in batch_rows(protocol, n_train, epoch):
            index = torch.from_numpy(rows)
            net.train_step(train_x[index], train_y[index])
            seen += len(rows)
    train_seconds = time.perf_counter() - began
    accuracy = net.accuracy(test_x, test_labels, protocol.evaluation.batch_size)
    wall = time.perf_counter() - began
    result = MethodResult(f"torch-{mode}", seen / max(train_seconds, 1e-12), train_seconds,
                          accuracy, wall, seen)
    return result, net.params()


# -- report ---------------------------------------------------------------------------------


def ratio(a: MethodResult, b: MethodResult | None) -> float | None:
    if b is None or b.samples_per_second <= 0.0:
        return None
    return a.samples_per_second / b.samples_per_second


def setup(protocol: Protocol) -> dict[str, Any]:
    return {
        "sizes": list(protocol.model.sizes),
        "epochs": protocol.training.epochs,
        "batch_size": protocol.training.batch_size,
        "learning_rates": list(protocol.training.learning_rates),
        "estimator": protocol.estimator.name,
        "beta": protocol.estimator.beta,
        "free_max_steps": protocol.phases.free.max_steps,
        "nudged_max_steps": protocol.phases.nudged.max_steps,
        "free_tolerance": protocol.phases.free.tolerance,
        "nudged_tolerance": protocol.phases.nudged.tolerance,
        "labep_bench": {"simulator": protocol.bench.name, **protocol.bench.options},
        "seed": protocol.seed,
    }


def print_table(report: dict[str, Any]) -> None:
    cfg = report["setup"]
    print(f"labep Hopfield EP throughput: {'-'.join(map(str, cfg['sizes']))}, "
          f"{report['train_samples']} train / {report['test_samples']} test samples, "
          f"{cfg['epochs']} epoch(s), batch {cfg['batch_size']}, {cfg['estimator']} EP "
          f"beta {cfg['beta']}, T1 {cfg['free_max_steps']}, T2 {cfg['nudged_max_steps']}, "
          f"learning rates {cfg['learning_rates']}")
    print()
    seeds = report["seeds"]
    rounds = report["repeats"] * len(seeds)
    median = f"{'median samples/s':>18}" if rounds > 1 else ""
    acc_title = "mean test acc" if len(seeds) > 1 else "test acc"
    header = (f"{'method':<16}{'train samples/s':>17}{'train s':>10}{acc_title:>15}"
              f"{'run wall s':>12}{median}")
    if rounds > 1:
        print(f"fastest of {rounds} interleaved runs per method; seeds {seeds}")
    print(header)
    print("-" * len(header))
    for name, r in report["methods"].items():
        value = r["details"].get("mean_test_accuracy", r["test_accuracy"])
        acc = "-" if value is None else f"{value:.4f}"
        median = (f"{r['details']['median_samples_per_second']:>18.1f}" if rounds > 1 else "")
        print(f"{name:<16}{r['samples_per_second']:>17.1f}{r['train_seconds']:>10.2f}{acc:>15}"
              f"{r['wall_seconds']:>12.2f}{median}")
    print()
    skipped = report.get("torch_skipped")
    if not skipped:
        for name, value in report["ratios"].items():
            shown = "-" if value is None else f"{value:.2f}x"
            print(f"{name + ' (samples/s):':<40}{shown}")
        print()
    labep = report["methods"]["labep"]["details"]
    free, nudged = labep["mean_free_steps"], labep["mean_nudged_steps"]
    print(f"labep settles each sample to tolerance {cfg['free_tolerance']:g} / "
          f"{cfg['nudged_tolerance']:g} (bench {cfg['labep_bench']}): mean "
          f"{free if free is None else round(free, 1)} free / "
          f"{nudged if nudged is None else round(nudged, 1)} nudged steps; "
          f"{labep['unsettled_samples']} unsettled sample(s) left out of updates.")
    if skipped:
        print(f"torch side skipped: {skipped}")
    else:
        print("torch runs exactly T1 free and T2 nudged synchronous steps per phase.")
    if report.get("torch_variants_max_param_diff") is not None:
        print(f"max |theta_autograd - theta_explicit| after training: "
              f"{report['torch_variants_max_param_diff']:.2e}")
    print_machine(report)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training throughput of labep's Hopfield simulator vs PyTorch EP loops.")
    parser.add_argument("--protocol", default=str(DEFAULT_PROTOCOL),
                        help="protocol file (default: protocols/hopfield_mnist.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="protocol override (repeatable); wins over "
                        "--epochs, --data and --train-samples")
    parser.add_argument("--data", help="folder of the IDX files (override dataset.path)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--train-samples", type=int, metavar="N",
                        help="train on rows [start, N) only (override dataset.train.stop=N)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"threads for numba, torch and numpy's BLAS (default {THREADS}; "
                        "at most NUMBA_NUM_THREADS)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="train N times each (interleaved) and report the fastest run "
                        "(default 1)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S",
                        help="train every method once per seed (each round a seed; default: the "
                        "protocol's seed): throughput is the fastest run, test accuracy the mean "
                        "over the seeds, as one epoch's accuracy varies by about a point")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args(argv)


def run_all(args: argparse.Namespace, loaded: LoadedProtocol, overrides: list[str],
            data: Split, load_before: float | None) -> dict[str, Any]:
    """labep, then the two torch variants; the report as a JSON-ready dict."""
    protocol = loaded.protocol
    assert isinstance(protocol.dataset, IdxConfig)

    skipped = None if torch is not None else "torch is not importable (pip install torch)"
    if skipped:
        log(f"{skipped}; the torch side is skipped")
    rounds: dict[str, list[MethodResult]] = {}
    trained: dict[str, Params] = {}
    with tempfile.TemporaryDirectory(prefix="labep-bench-") as tmp:
        folder = Path(tmp)
        log("labep: warming up the numba JIT ...")
        warm_up_labep(args.protocol, overrides, protocol.dataset.train.start,
                      protocol.dataset.test.start, folder)
        seeds = [seed for _ in range(args.repeats) for seed in args.seeds or [protocol.seed]]
        for round_, seed in enumerate(seeds):
            tag = f" (round {round_ + 1}/{len(seeds)}, seed {seed})" if len(seeds) > 1 else ""
            seeded = load_protocol(args.protocol, [*overrides, f"seed={seed}"])
            log(f"labep: training ...{tag}")
            rounds.setdefault("labep", []).append(run_labep(seeded, folder / f"{round_}.db"))
            for mode in () if skipped else ("autograd", "explicit"):
                log(f"torch-{mode}: training ...{tag}")
                result, trained[mode] = run_torch(seeded.protocol, data, mode)
                rounds.setdefault(result.method, []).append(result)
    results = []
    for runs in rounds.values():
        accuracies = [r.test_accuracy for r in runs]
        best = best_of(runs)
        if None not in accuracies:
            best.details["mean_test_accuracy"] = float(np.mean(accuracies))
            best.details["runs_test_accuracy"] = accuracies
        results.append(best)

    by_name = {r.method: r for r in results}
    labep = by_name["labep"]
    diff = None
    if len(trained) == 2:
        diff = max(float(np.max(np.abs(trained["autograd"][k] - trained["explicit"][k])))
                   for k in trained["autograd"])
    report: dict[str, Any] = {
        "setup": setup(protocol),
        "train_samples": len(data.train_labels),
        "test_samples": len(data.test_labels),
        "repeats": args.repeats,
        "seeds": args.seeds or [protocol.seed],
        "methods": {r.method: asdict(r) for r in results},
        "ratios": {
            "labep / torch-autograd": ratio(labep, by_name.get("torch-autograd")),
            "labep / torch-explicit": ratio(labep, by_name.get("torch-explicit")),
        },
        "torch_variants_max_param_diff": diff,
        "load_average_1min": {"start": load_before, "end": load_average()},
        "torch_skipped": skipped,
        "threads": {
            "numba": numba.get_num_threads(),
            "numba_env": os.environ.get("NUMBA_NUM_THREADS"),
            "numba_layer": numba.threading_layer(),
            "torch": None if torch is None else torch.get_num_threads(),
            "numpy_blas": blas_thread_counts(),
            "cpus": os.cpu_count(),
        },
        "versions": {
            "labep": labep_version,
            "numba": numba.__version__,
            "numpy": np.__version__,
            "torch": None if torch is None else torch.__version__,
        },
        "command": shlex.join(["python", *sys.argv]),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = load_average()
    overrides = [f"training.epochs={args.epochs}"]
    if args.data is not None:
        overrides.append(f"dataset.path={args.data}")
    if args.train_samples is not None:
        overrides.append(f"dataset.train.stop={args.train_samples}")
    overrides += args.overrides

    try:
        loaded = load_protocol(args.protocol, overrides)
    except ProtocolError as err:
        raise SystemExit(str(err)) from None
    protocol = loaded.protocol
    if protocol.model.kind != "layered_hopfield" or not isinstance(protocol.dataset, IdxConfig):
        raise SystemExit("this benchmark needs a layered_hopfield model on an IDX dataset")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise SystemExit(f"--threads must be in 1..{numba.config.NUMBA_NUM_THREADS} "
                         "(NUMBA_NUM_THREADS, read when numba is imported)")
    numba.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    data = protocol.dataset.load()
    with blas_threads(args.threads):
        report = run_all(args, loaded, overrides, data, load_before)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
