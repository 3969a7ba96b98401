"""MNIST digits on the simulated polariton grid, against linear readouts of the same inputs.

Trains ``protocols/polariton_digits.yaml`` (first 8,000 images of the MNIST test set for
training, last 2,000 for testing) with near-equilibrium EP on the polariton simulator, once
per seed, and prints the test accuracy after every epoch. The peers, measured in the same run
on exactly the features the lattice displays (the protocol's pca encoding, fitted on the same
training split): a least-squares linear readout of one-hot targets, and a multinomial logistic
regression (L-BFGS, L2 1e-4), both with a bias. The curves go to
``benchmarks/out/polariton_digits.png``.

    nice -n 10 python benchmarks/polariton_digits.py [--seeds 0 1] [--epochs N]
        [--data ../shared/data/mnist] [--set key=value ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from labep.run.assembly import build_model
from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "protocols" / "polariton_digits.yaml"


def linear_peers(features: np.ndarray, labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray) -> dict[str, float]:
    """Test accuracy of a least-squares one-hot readout and a logistic regression."""
    design = np.hstack([features, np.ones((len(features), 1))])
    test_design = np.hstack([test_features, np.ones((len(test_features), 1))])
    classes = int(labels.max()) + 1
    onehot = np.eye(classes)[labels]
    weights = np.linalg.lstsq(design, onehot, rcond=None)[0]
    lstsq = float(np.mean(np.argmax(test_design @ weights, axis=1) == test_labels))

    def loss(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(design.shape[1], classes)
        logits = design @ w
        value = -np.mean(log_softmax(logits, axis=1)[np.arange(len(labels)), labels])
        grad = design.T @ (softmax(logits, axis=1) - onehot) / len(labels)
        return value + 0.5e-4 * float(np.sum(w * w)), (grad + 1e-4 * w).ravel()

    fit = minimize(loss, np.zeros(design.shape[1] * classes), jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000})
    w = fit.x.reshape(design.shape[1], classes)
    logistic = float(np.mean(np.argmax(test_design @ w, axis=1) == test_labels))
    return {"least_squares": lstsq, "logistic": logistic}


def train(overrides: list[str]) -> dict[str, object]:
    """One EP run of the protocol; the test accuracy after every epoch."""
    loaded = load_protocol(PROTOCOL, overrides)
    accuracy: list[float] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        accuracy.append(metrics["test_accuracy"])
        print(f"    epoch {epoch + 1}: test accuracy {metrics['test_accuracy']:.4f} "
              f"({metrics['test_unsettled']:.0f} test states unsettled), train accuracy "
              f"{metrics['train_accuracy']:.4f}", flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, RunStore(Path(tmp) / "runs.db") as store:
        result = Trainer(loaded, store, progress=False, on_epoch=on_epoch).run()
        _, unsettled = store.metric_series(result.run_id, "unsettled")
    return {"test_accuracy": accuracy, "seconds": time.perf_counter() - started,
            "unsettled_training_samples": int(unsettled.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="Epochs (default: the protocol's).")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "out" /
                        "polariton_digits.png")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = [f"dataset.path={args.data}", *args.overrides]
    if args.epochs is not None:
        base.append(f"training.epochs={args.epochs}")

    protocol = load_protocol(PROTOCOL, base).protocol
    data = protocol.dataset.load()
    model = build_model(protocol.model, data)
    model_cfg = protocol.model
    print(f"polariton grid {model_cfg.lattice}, {len(model_cfg.input_sites)} {model_cfg.encoding} "
          f"features, {protocol.training.epochs} epochs, {len(data.train_labels)} training and "
          f"{len(data.test_labels)} test images", flush=True)
    peers = linear_peers(model.encode(data.train_inputs), data.train_labels,
                         model.encode(data.test_inputs), data.test_labels)
    print(f"  peers on the same features: least squares {peers['least_squares']:.4f}, "
          f"logistic regression {peers['logistic']:.4f}", flush=True)
    runs = {}
    for seed in args.seeds:
        print(f"  EP on the simulator, seed {seed}:", flush=True)
        runs[seed] = train([*base, f"seed={seed}"])
        print(f"    {runs[seed]['seconds']:.0f} s", flush=True)
    finals = [run["test_accuracy"][-1] for run in runs.values()]
    print(f"  final test accuracy: {', '.join(f'{a:.4f}' for a in finals)} "
          f"(mean {np.mean(finals):.4f}, min {np.min(finals):.4f})")

    args.plot.parent.mkdir(parents=True, exist_ok=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for seed, run in runs.items():
        epochs = np.arange(1, len(run["test_accuracy"]) + 1)
        ax.plot(epochs, run["test_accuracy"], "o-", label=f"EP, seed {seed}")
    for (name, value), style in zip(peers.items(), ("--", ":"), strict=True):
        ax.axhline(value, ls=style, color="k", label=name.replace("_", " "))
    ax.set(xlabel="epoch", ylabel="test accuracy", title="polariton grid, MNIST digits")
    ax.legend(fontsize="small")
    fig.savefig(args.plot)
    print(f"  curves: {args.plot}")
    if args.json:
        print(json.dumps({"peers": peers, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
