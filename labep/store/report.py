"""``labep report RUN``: the curves of a run, drawn from the store with matplotlib.

One figure: the training cost per step (with the per-epoch mean), train and test accuracy per
epoch, steps to settle in the free and nudged phases, and the histograms of the newest parameter
snapshot; for a bench with quantized parameters also the write-verify mismatch per step and
the histograms of the codes the bench holds; for a model whose class offers
``draw_parameters(ax, section, params)`` (the polariton lattice: the potentials V_i on the
lattice, input sites and class regions marked) also that picture of the newest parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

from labep import registry
from labep.store.queries import RunQueries


def draw_report(store: RunQueries, run_id: str, out: Path) -> Path:
    """Write the report figure of ``run_id`` to ``out`` (PNG, PDF or SVG by suffix)."""
    fig = Figure(layout="constrained")
    render(fig, store, run_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def render(fig: Figure, store: RunQueries, run_id: str) -> None:
    """Draw the report of ``run_id`` into ``fig`` (cleared first; sized to its rows): what
    ``labep report`` saves and ``labep watch`` redraws."""
    fig.clear()
    summary = store.summary(run_id)
    run_id = summary["id"]
    codes = store.arrays(run_id, "codes")
    _, mismatch = store.metric_series(run_id, "write_mismatch_mean_lsb")
    snapshot = store.arrays(run_id, "checkpoint")
    model = (summary["protocol"] or {}).get("model", {})
    # a model that can picture its parameters (on its geometry) gets a row for the newest
    try:
        draw_parameters = getattr(registry.model_class(model.get("kind", "")),
                                  "draw_parameters", None)
    except registry.RegistryError:  # a run of a model no longer installed
        draw_parameters = None
    if not snapshot:
        draw_parameters = None
    writes_row = codes is not None or len(mismatch) > 0
    rows = 2 + writes_row + (draw_parameters is not None)
    fig.set_size_inches(11, 3.75 * rows)
    axes = fig.subplots(rows, 2)
    fig.suptitle(f"{summary['name']}  ({run_id}, {summary['status']}, bench "
                 f"{summary['bench']['name']})")

    ax = axes[0, 0]
    steps, loss = store.metric_series(run_id, "loss")
    if len(loss):
        ax.plot(steps, loss, lw=0.6, alpha=0.5, label="batch cost")
    epoch_steps, epoch_loss = store.metric_series(run_id, "train_loss")
    if len(epoch_loss):
        ax.plot(epoch_steps, epoch_loss, "o-", label="epoch mean")
    ax.set(xlabel="step", ylabel="cost C", title="training cost", yscale="log")
    ax.legend(loc="upper right")

    ax = axes[0, 1]
    for name, label in (("train_accuracy", "train"), ("test_accuracy", "test")):
        at, values = store.metric_series(run_id, name)
        if len(values):
            ax.plot(at, values, "o-", label=label)
    ax.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    ax.legend(loc="lower right")

    ax = axes[1, 0]
    for name, label in (("free_steps", "free phase"), ("nudged_steps", "nudged phases")):
        at, values = store.metric_series(run_id, name)
        if len(values):
            ax.plot(at, values, lw=0.6, label=label)
    at, unsettled = store.metric_series(run_id, "unsettled")
    if len(unsettled) and unsettled.any():
        ax2 = ax.twinx()
        ax2.plot(at, unsettled, "r.", ms=2, label="unsettled samples")
        ax2.set_ylabel("unsettled samples", color="r")
    ax.set(xlabel="step", ylabel="mean steps to settle", title="settling")
    ax.legend(loc="upper right")

    ax = axes[1, 1]
    if snapshot is not None:
        at_step, params = snapshot
        for name, values in sorted(params.items()):
            ax.hist(np.ravel(values), bins=60, histtype="step", label=name, density=True)
        ax.set(title=f"parameters at step {at_step}", xlabel="value", ylabel="density",
               yscale="log")
        ax.legend(loc="upper right", fontsize="small")
    if writes_row:
        ax = axes[2, 0]
        for name, label in (("write_mismatch_mean_lsb", "mean"),
                            ("write_mismatch_max_lsb", "max")):
            at, values = store.metric_series(run_id, name)
            if len(values):
                ax.plot(at, values, lw=0.7, label=label)
        ax.set(xlabel="step", ylabel="|realized - requested| (LSB)",
               title="write-verify mismatch" if len(mismatch) else "write-verify: off")
        if len(mismatch):
            ax.legend(loc="upper right")
        ax = axes[2, 1]
        if codes is not None:
            for name, held in sorted(codes[1].items()):
                counts = np.bincount(held.ravel())
                ax.step(np.arange(len(counts)), counts, where="mid", label=name)
            ax.set(xlabel="code", ylabel="channels", yscale="log",
                   title=f"codes held at step {codes[0]}")
            ax.legend(loc="upper right", fontsize="small")
    if draw_parameters is not None:
        grid = axes[-1, 0].get_gridspec()
        for ax in axes[-1]:
            ax.remove()
        draw_parameters(fig.add_subplot(grid[-1, :]), model, snapshot[1])
