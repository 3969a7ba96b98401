"""Corrected against vector-field EP on the MNIST split, a non-reciprocal network (issue 8).

Trains ``protocols/nonreciprocal_mnist.yaml`` (784-256-10, asymmetry a = 0.75, symmetric beta,
first 8,000 images of the MNIST test set for training, last 2,000 for testing) twice from the
same seed, hence the same initial parameters and data order: once with the non-conservative
correction (J^T - J)(s - s0) in the nudged phases (Scurria et al. 2026), once with plain
vector-field EP (``estimator.correction: false``). Prints the per-epoch test accuracy of both,
the training samples each left out of its updates (a phase that did not settle within the
protocol's caps), and saves the curves to ``benchmarks/out/nonconservative_mnist.png``.

    nice -n 10 python benchmarks/nonconservative_mnist.py [--epochs 5] [--asymmetry 0.75]
        [--hidden 256] [--seed 0] [--data ../shared/data/mnist] [--set key=value ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

REPO = Path(__file__).resolve().parents[1]
METHODS = {"corrected": "true", "vector-field": "false"}


def curve(store: RunStore, overrides: list[str]) -> dict[str, object]:
    """Train once; the test accuracy and train loss after every epoch."""
    loaded = load_protocol(REPO / "protocols" / "nonreciprocal_mnist.yaml", overrides)
    accuracy: list[float] = []
    loss: list[float] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        accuracy.append(metrics["test_accuracy"])
        loss.append(metrics["train_loss"])
        print(f"    epoch {epoch + 1}: test accuracy {metrics['test_accuracy']:.4f}, "
              f"train loss {metrics['train_loss']:.4f}", flush=True)

    started = time.perf_counter()
    result = Trainer(loaded, store, progress=False, on_epoch=on_epoch).run()
    seconds = time.perf_counter() - started
    _, unsettled = store.metric_series(result.run_id, "unsettled")
    return {"test_accuracy": accuracy, "train_loss": loss, "seconds": seconds,
            "unsettled_samples": int(unsettled.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--asymmetry", type=float, default=0.75)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "out" /
                        "nonconservative_mnist.png")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    common = [f"training.epochs={args.epochs}", f"model.asymmetry={args.asymmetry}",
              f"model.sizes[1]={args.hidden}", f"seed={args.seed}",
              f"dataset.path={args.data}", *args.overrides]
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp, RunStore(Path(tmp) / "runs.db") as store:
        for method, flag in METHODS.items():
            print(f"{method} EP, a = {args.asymmetry}, hidden {args.hidden}, seed {args.seed}",
                  flush=True)
            results[method] = curve(store, [*common, f"estimator.correction={flag}"])
    if args.json:
        print(json.dumps({"settings": vars(args) | {"plot": str(args.plot)},
                          "results": results}, indent=2))
    print(f"\ntest accuracy per epoch (MNIST split, 784-{args.hidden}-10, a = {args.asymmetry})")
    print(f"{'epoch':>6}" + "".join(f"{m:>15}" for m in METHODS))
    for epoch in range(args.epochs):
        print(f"{epoch + 1:>6}" + "".join(
            f"{results[m]['test_accuracy'][epoch]:>15.4f}" for m in METHODS))  # type: ignore[index]
    print(f"{'time':>6}" + "".join(f"{results[m]['seconds']:>14.0f}s" for m in METHODS))
    print("samples left out of updates (a phase did not settle): " + ", ".join(
        f"{m} {results[m]['unsettled_samples']}" for m in METHODS))

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for method in METHODS:
        acc = results[method]["test_accuracy"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{method} EP")  # type: ignore[arg-type]
    ax.set(xlabel="epoch", ylabel="test accuracy (last 2,000 images)",
           xticks=range(1, args.epochs + 1),
           title=f"MNIST split, 784-{args.hidden}-10, asymmetry {args.asymmetry}")
    ax.legend(loc="lower right")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
