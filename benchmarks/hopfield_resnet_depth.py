"""Depth with and without skip couplings (Hopfield-ResNet, Elayedam and Srinivasan 2025).

Trains three layered Hopfield networks with symmetric EP on the MNIST split of
``protocols/hopfield_resnet_mnist.yaml`` (first 8,000 images of the t10k file for training,
last 2,000 for testing), same seed, same data order, same settle caps and beta:

``1 hidden``
    784-n-10 (n the deep net's first hidden width), no skips, ``--baseline-rates``;
``deep, no skips``
    the protocol's deep network with its skips removed (same sizes, init, learning rates);
``deep + skips``
    the protocol as it is.

Prints the per-epoch test accuracy of all three and saves the curves as a PNG
(``benchmarks/out/hopfield_resnet_depth.png``).

    python benchmarks/hopfield_resnet_depth.py                     # the protocol's epochs
    python benchmarks/hopfield_resnet_depth.py --epochs 2 --train-samples 2000
    python benchmarks/hopfield_resnet_depth.py --set estimator.beta=0.2 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from labep.protocol.text import ProtocolError
from labep.run.engine import Trainer
from labep.run.validate import load_protocol
from labep.store.runs import RunStore

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROTOCOL = REPO / "protocols" / "hopfield_resnet_mnist.yaml"
DEFAULT_PLOT = REPO / "benchmarks" / "out" / "hopfield_resnet_depth.png"


def variants(sizes: list[int], baseline_rates: list[float]) -> dict[str, list[str]]:
    """Overrides of the protocol for each of the three networks."""
    shallow = [sizes[0], sizes[1], sizes[-1]]
    no_skips = ["model.skips=[]", "model.skip_every=null"]
    return {
        "1 hidden": [f"model.sizes={json.dumps(shallow)}", *no_skips,
                     f"training.learning_rates={json.dumps(baseline_rates)}"],
        "deep, no skips": no_skips,
        "deep + skips": [],
    }


def train(protocol: Path, overrides: list[str], folder: Path, label: str) -> dict[str, Any]:
    """One run; its per-epoch test accuracy, settle figures and wall time."""
    loaded = load_protocol(protocol, overrides)
    store = RunStore(folder / f"{label.replace(' ', '_').replace(',', '')}.db")
    try:
        began = time.perf_counter()
        result = Trainer(loaded, store, progress=False).run()
        wall = time.perf_counter() - began
        _, accuracy = store.metric_series(result.run_id, "test_accuracy")
        _, free_steps = store.metric_series(result.run_id, "free_steps")
        _, unsettled = store.metric_series(result.run_id, "unsettled")
    finally:
        store.close()
    model = loaded.protocol.model
    return {
        "sizes": list(model.sizes),
        "skips": [list(pair) for pair in _skips(loaded)],
        "learning_rates": list(loaded.protocol.training.learning_rates),
        "test_accuracy": [float(a) for a in accuracy],
        "mean_free_steps": float(np.mean(free_steps)) if free_steps.size else None,
        "unsettled_samples": int(np.sum(unsettled)),
        "wall_seconds": wall,
    }


def _skips(loaded: Any) -> tuple[tuple[int, int], ...]:
    from labep.run.assembly import build_model

    return getattr(build_model(loaded.protocol.model), "skips", ())


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for label, result in results.items():
        curve = result["test_accuracy"]
        ax.plot(range(1, len(curve) + 1), [100 * a for a in curve], marker="o",
                label=f"{label} ({'-'.join(str(n) for n in _short(result['sizes']))})")
    epochs = max(len(result["test_accuracy"]) for result in results.values())
    ax.set_xticks(range(1, epochs + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _short(sizes: list[int]) -> list[Any]:
    """784-128x6-10 rather than eight numbers."""
    hidden = sizes[1:-1]
    if len(hidden) > 1 and len(set(hidden)) == 1:
        return [sizes[0], f"{hidden[0]}x{len(hidden)}", sizes[-1]]
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", type=Path, default=DEFAULT_PROTOCOL)
    parser.add_argument("--epochs", type=int, help="training epochs (default: the protocol's)")
    parser.add_argument("--train-samples", type=int, metavar="N",
                        help="train on the first N images of the split only")
    parser.add_argument("--baseline-rates", type=float, nargs=2, default=[0.4, 0.1],
                        metavar=("W1", "W2"), help="learning rates of the 1-hidden network")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="protocol override for all three runs")
    parser.add_argument("--only", action="append", choices=["1 hidden", "deep, no skips",
                                                            "deep + skips"],
                        help="run only these networks (repeatable)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = list(args.overrides)
    if args.epochs is not None:
        common.append(f"training.epochs={args.epochs}")
    if args.train_samples is not None:
        common.append(f"dataset.train.stop={args.train_samples}")
    try:
        protocol = load_protocol(args.protocol, common).protocol
    except ProtocolError as err:
        raise SystemExit(str(err)) from None
    runs = variants(list(protocol.model.sizes), args.baseline_rates)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, overrides in runs.items():
            if args.only and label not in args.only:
                continue
            print(f"training {label} ...", file=sys.stderr, flush=True)
            results[label] = train(args.protocol, [*common, *overrides], Path(folder), label)
    part = getattr(protocol.dataset, "train", None)
    span = f", train images {part.start}:{part.stop}" if part is not None else ""
    title = (f"{args.protocol.name}, seed {protocol.seed}, {protocol.estimator.name} "
             f"beta {protocol.estimator.beta}{span}")
    if args.plot:
        plot(results, args.plot, title)
    if args.json:
        print(json.dumps({"protocol": str(args.protocol), "overrides": common,
                          "results": results, "plot": str(args.plot)}, indent=2))
        return 0
    width = max(len(label) for label in results)
    epochs = max(len(r["test_accuracy"]) for r in results.values())
    print(f"{'test accuracy (%)':<{width}}  " + "  ".join(f"ep{e + 1:>3}" for e in range(epochs))
          + "   free steps  unsettled  wall s")
    for label, result in results.items():
        curve = "  ".join(f"{100 * a:5.1f}" for a in result["test_accuracy"])
        print(f"{label:<{width}}  {curve}   {result['mean_free_steps']:10.1f}  "
              f"{result['unsettled_samples']:9d}  {result['wall_seconds']:6.0f}")
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
