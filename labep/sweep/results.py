"""A sweep's results: axes against final metrics (mean and spread over seeds where ``seed`` is
an axis), as a table (``labep sweep show``) and a figure (``labep sweep report``: accuracy
against each axis, a heatmap for two axes; matplotlib Figure, no pyplot)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from labep.store.runs import RunStore

#: the final metrics a sweep is summarized by
METRICS = ("test_accuracy", "train_loss")


def _stats(values: list[float | None]) -> dict[str, Any]:
    found = [v for v in values if v is not None and math.isfinite(v)]
    if not found:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(found)),
            "std": float(np.std(found, ddof=1)) if len(found) > 1 else 0.0, "n": len(found)}


def sweep_table(store: RunStore, sweep_id: str) -> dict[str, Any]:
    """The sweep's record with ``axes`` (seed left out when it is an axis: it is averaged
    over), ``seeds`` (whether it was) and ``rows``: one per combination of the other axes,
    with its trials, statuses, and each metric's mean, std (sample) and count."""
    sweep = store.sweep(sweep_id)
    trials = store.sweep_trials(sweep["id"])
    seeds = "seed" in sweep["axes"]
    axes = [axis for axis in sweep["axes"] if axis != "seed"]
    groups: dict[str, dict[str, Any]] = {}
    for trial in trials:
        values = {axis: trial["axes"].get(axis) for axis in axes}
        key = json.dumps(values, sort_keys=True, default=str) if (seeds or not axes) \
            else str(trial["trial"])
        row = groups.setdefault(key, {"axes": values, "trials": [], "status": {},
                                      "_metrics": {name: [] for name in METRICS}})
        row["trials"].append(trial["trial"])
        status = trial["status"] or "pending"
        row["status"][status] = row["status"].get(status, 0) + 1
        if trial["status"] == "completed":
            for name in METRICS:
                row["_metrics"][name].append(trial["metrics"].get(name))
    rows = []
    for row in groups.values():
        collected = row.pop("_metrics")
        row.update({name: _stats(collected[name]) for name in METRICS})
        rows.append(row)
    return {**sweep, "axes": axes, "seeds": seeds, "rows": rows}


def format_table(table: dict[str, Any]) -> list[str]:
    """The table's lines as ``labep sweep show`` prints them."""
    axes = table["axes"]
    spread = " (mean ± std over seeds)" if table["seeds"] else ""
    header = [*axes, "trials", "test_accuracy", "train_loss", "status"]

    def cell(stats: dict[str, Any], digits: int) -> str:
        if stats["mean"] is None:
            return "-"
        text = f"{stats['mean']:.{digits}f}"
        return text + (f" ± {stats['std']:.{digits}f}" if stats["n"] > 1 else "")

    body = []
    for row in table["rows"]:
        shown = [_show(row["axes"][axis]) for axis in axes]
        status = ", ".join(f"{k} {v}" for k, v in sorted(row["status"].items()))
        body.append([*shown, str(len(row["trials"])), cell(row["test_accuracy"], 4),
                     cell(row["train_loss"], 4), status])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [f"sweep {table['id']}  ({table['name']}, {table['trials']} trials){spread}",
             "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return lines


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def draw_sweep_report(store: RunStore, sweep_id: str, out: Path) -> Path:
    """Test accuracy against each axis (mean and std over the other axes' trials and seeds;
    one point per trial shown), and a heatmap of the mean accuracy over two axes when there
    are exactly two (besides seed). PNG, PDF or SVG by suffix."""
    sweep = store.sweep(sweep_id)
    trials = [t for t in store.sweep_trials(sweep["id"]) if t["status"] == "completed"]
    axes = [axis for axis in sweep["axes"] if axis != "seed"] or list(sweep["axes"])
    heat = len(axes) == 2
    panels = max(1, len(axes)) + heat
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(4.5 * cols, 3.6 * rows), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False).ravel()
    fig.suptitle(f"sweep {sweep['name']}\n{sweep['id']}: {len(trials)} of {sweep['trials']} "
                 "trials completed", fontsize="medium")
    for ax in grid[panels:]:
        ax.remove()
    if not axes:
        grid[0].text(0.5, 0.5, "no axes", ha="center", va="center")
    for ax, axis in zip(grid, axes, strict=False):
        values = sorted({json.dumps(t["axes"].get(axis)) for t in trials})
        loaded = [json.loads(v) for v in values]
        numeric = _numeric(loaded)
        if numeric:
            loaded.sort()
        xs = loaded if numeric else list(range(len(loaded)))
        means, stds = [], []
        for value in loaded:
            acc = [t["metrics"].get("test_accuracy") for t in trials
                   if t["axes"].get(axis) == value]
            acc = [a for a in acc if a is not None]
            means.append(np.mean(acc) if acc else np.nan)
            stds.append(np.std(acc) if acc else np.nan)
            ax.plot([xs[loaded.index(value)]] * len(acc), acc, ".", color="0.6", ms=4)
        ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=3)
        if numeric and len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) > 50:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xs, [_show(v) for v in loaded])
        ax.set(xlabel=axis, ylabel="test accuracy", title=f"accuracy vs {axis}")
    if heat:
        ax = grid[len(axes)]
        first, second = axes
        xv = sorted({json.dumps(t["axes"].get(first)) for t in trials})
        yv = sorted({json.dumps(t["axes"].get(second)) for t in trials})
        xl, yl = [json.loads(v) for v in xv], [json.loads(v) for v in yv]
        if _numeric(xl):
            xl.sort()
        if _numeric(yl):
            yl.sort()
        mean = np.full((len(yl), len(xl)), np.nan)
        for i, y in enumerate(yl):
            for j, x in enumerate(xl):
                acc = [t["metrics"].get("test_accuracy") for t in trials
                       if t["axes"].get(first) == x and t["axes"].get(second) == y]
                acc = [a for a in acc if a is not None]
                if acc:
                    mean[i, j] = np.mean(acc)
        image = ax.imshow(mean, origin="lower", aspect="auto", cmap="viridis")
        for i in range(len(yl)):
            for j in range(len(xl)):
                if np.isfinite(mean[i, j]):
                    ax.text(j, i, f"{mean[i, j]:.3f}", ha="center", va="center",
                            color="w", fontsize="small")
        ax.set_xticks(range(len(xl)), [_show(v) for v in xl])
        ax.set_yticks(range(len(yl)), [_show(v) for v in yl])
        ax.set(xlabel=first, ylabel=second, title="mean test accuracy")
        fig.colorbar(image, ax=ax)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
