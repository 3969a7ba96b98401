"""``labep run``, ``resume``, ``runs``, ``show`` and ``report``: running protocols and reading
the runs back from the store."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from labep.cli.common import (
    EXIT_FAILED,
    dump,
    interrupted,
    listing,
    load_or_exit,
    open_store,
    set_option,
    store_option,
)
from labep.store.files import SAMPLE_COUNTS, StoreError, default_store_path


@click.command()
@click.argument("protocol", type=click.Path(dir_okay=False))
@store_option
@set_option
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def run(protocol: str, store_path: str | None, overrides: tuple[str, ...],
        progress: bool) -> None:
    """Run PROTOCOL (a YAML file) and record it in the run store."""
    from labep.run.engine import Trainer

    loaded = load_or_exit(protocol, overrides)
    store = open_store(store_path, loaded.protocol.store)
    trainer = Trainer(loaded, store, progress=progress)
    try:
        result = trainer.run()
    except KeyboardInterrupt as err:
        interrupted(err)
    except Exception as err:
        click.echo(f"run failed: {type(err).__name__}: {err}", err=True)
        click.echo(f"(recorded in {store.path}; see 'labep show latest')", err=True)
        sys.exit(EXIT_FAILED)
    accuracy = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    click.echo(f"run {result.run_id} completed: {result.steps} steps, "
               f"test accuracy {accuracy} (store: {store.path})")


@click.command()
@click.argument("run_id", metavar="RUN")
@store_option
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def resume(run_id: str, store_path: str | None, progress: bool) -> None:
    """Continue RUN (interrupted, failed, or killed) from its last checkpoint, with the
    protocol as it was run. Refused while another live process writes it."""
    from labep.run.engine import Trainer

    store = open_store(store_path, create=False, check_pages=True)  # it will write
    try:
        result = Trainer.resume(store, run_id, progress=progress)
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt as err:
        interrupted(err)
    except Exception as err:
        click.echo(f"run failed: {type(err).__name__}: {err}", err=True)
        sys.exit(EXIT_FAILED)
    accuracy = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    click.echo(f"run {result.run_id} completed: {result.steps} steps, "
               f"test accuracy {accuracy} (store: {store.path})")


@click.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def runs(store_path: str | None, as_json: bool) -> None:
    """List the runs in the store."""
    store = open_store(store_path, create=False)

    def line(run: dict[str, Any]) -> str:
        acc = run["metrics"].get("test_accuracy")
        acc_text = "-" if acc is None else f"{acc:.4f}"
        status = run["status"] + ("*" if run["resumable"] else "")
        return (f"{run['id']:24} {status:12} {run['bench']['name']:12} "
                f"{run['steps']:>6} {acc_text:>8}  {run['name']}")

    listing(store.runs(), as_json, f"no runs in {store.path}",
             f"{'id':24} {'status':12} {'bench':12} {'steps':>6} {'test acc':>8}  name", line)
    if not as_json and any(run["resumable"] for run in store.runs()):
        click.echo("* resumable: labep resume RUN")


@click.command()
@click.argument("run_id", metavar="RUN")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(run_id: str, store_path: str | None, as_json: bool) -> None:
    """Show one run (an id, a unique prefix of one, or 'latest')."""
    store = open_store(store_path, create=False)
    try:
        summary = store.summary(run_id)
        summary["events"] = store.events(summary["id"])
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        dump(summary)
        return
    click.echo(f"run       {summary['id']}  ({summary['name']})")
    click.echo(f"status    {summary['status']}")
    click.echo(f"bench     {summary['bench']['name']}  {summary['bench']['identity'] or ''}")
    click.echo(f"created   {summary['created']}   finished {summary['finished'] or '-'}")
    click.echo(f"progress  {summary['steps']} steps, {summary['epochs']} epoch(s)")
    for name, value in sorted(summary["metrics"].items()):
        if name not in SAMPLE_COUNTS and not name.startswith("link_"):  # own lines below
            click.echo(f"  {name:18} {'-' if value is None else f'{value:.6g}'}")
    for line in _sample_lines(summary["samples"]):
        click.echo(line)
    if summary["link"]:
        link = summary["link"]
        shown = ("frames", "retries", "bytes_resent", "reconnects")
        click.echo("link      " + ", ".join(
            f"{name.replace('_', ' ')} {link[name]:.6g}" for name in shown if name in link))
        rest = [f"{name.replace('_', ' ')} {value:.6g}" for name, value in sorted(link.items())
                if name not in shown]
        if rest:
            click.echo("          " + ", ".join(rest))
    if summary["events"]:
        kinds: dict[str, int] = {}
        for event in summary["events"]:
            kinds[event["kind"]] = kinds.get(event["kind"], 0) + 1
        click.echo(f"events    {len(summary['events'])}: " + ", ".join(
            f"{kind} {count}" for kind, count in sorted(kinds.items())) + " (see --json)")
    if summary["error"]:
        click.echo(f"error     {summary['error']}")


def _sample_lines(samples: dict[str, Any]) -> list[str]:
    """Where every sample went (``RunStore.sample_accounting``), as the lines of ``show``."""
    if not samples["trained"] and not samples["evaluated"]["samples"]:
        return []
    free, nudged, test = samples["free"], samples["nudged"], samples["evaluated"]
    lines = [f"samples   trained {samples['trained']} = used {samples['used']} + left out "
             f"{samples['left_out']} + in skipped batches {samples['skipped']}",
             f"          left out: free phase {free['nonfinite'] + free['unsettled']} "
             f"(non-finite {free['nonfinite']}, unsettled {free['unsettled']}), nudged "
             f"phases {nudged['nonfinite'] + nudged['unsettled']} (non-finite "
             f"{nudged['nonfinite']}, unsettled {nudged['unsettled']})"]
    if test["samples"]:
        lines.append(f"          evaluated only: {test['samples']} test samples, unsettled "
                     f"{test['unsettled']}, non-finite {test['nonfinite']}, in skipped "
                     f"batches {test['skipped']}")
    reports = samples["bench_reports"]
    if reports["training"] or reports["evaluation"]:
        parts = [f"{where} " + ", ".join(f"{kind} {count}" for kind, count in
                                          sorted(found.items()))
                 for where, found in reports.items() if found]
        lines.append("          bench reports (one per sample and phase): " + "; ".join(parts))
    return lines


@click.command()
@click.argument("run_id", metavar="RUN")
@store_option
@click.option("--out", type=click.Path(dir_okay=False), help="Figure file (default RUN.png).")
def report(run_id: str, store_path: str | None, out: str | None) -> None:
    """Draw a run's curves (cost, accuracy, settling, parameter histograms) to a figure; a
    sweep id (sw-...) draws the sweep's report (labep sweep report)."""
    from labep.store.report import draw_report

    store = open_store(store_path, create=False)
    if run_id.startswith("sw-"):
        from labep.sweep.results import draw_sweep_report

        try:
            resolved = store.resolve_sweep(run_id)
        except StoreError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_FAILED)
        click.echo(f"wrote {draw_sweep_report(store, resolved, Path(out or f'{resolved}.png'))}")
        return
    try:
        resolved = store.resolve(run_id)
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    path = draw_report(store, resolved, Path(out or f"{resolved}.png"))
    click.echo(f"wrote {path}")


@click.command("export")
@click.argument("run_id", metavar="RUN")
@store_option
@click.option("--format", "fmt", type=click.Choice(["netcdf", "parquet", "csv"]),
              default="netcdf", show_default=True)
@click.option("--out", type=click.Path(), help="Output: a .nc file (netcdf) or a folder "
              "(parquet, csv); default RUN.nc or RUN/.")
def export(run_id: str, store_path: str | None, fmt: str, out: str | None) -> None:
    """Write a run's metrics per step and epoch, events, newest parameters and protocol to
    files that xarray and pandas open without labep (needs the export extra)."""
    from labep.store.export import ExportError, export_run

    store = open_store(store_path, create=False)
    try:
        resolved = store.resolve(run_id)
        path = export_run(store, resolved, fmt,  # type: ignore[arg-type]
                          Path(out or (f"{resolved}.nc" if fmt == "netcdf" else resolved)))
    except (StoreError, ExportError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"wrote {path}")


@click.command()
@click.argument("run_id", metavar="RUN")
@store_option
@click.option("--out", type=click.Path(dir_okay=False),
              help="Refresh this image file (PNG/SVG/PDF) instead of opening a window.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True,
              help="Seconds between two reads of the store.")
@click.option("--timeout", type=click.FloatRange(min=0.0), default=None,
              help="Stop following after this many seconds.")
def watch(run_id: str, store_path: str | None, out: str | None, interval: float,
          timeout: float | None) -> None:
    """Follow a run as it is written (by this or any other process): a live figure of its
    cost, accuracy, settle steps and write errors. Reads the store read-only: never blocks
    the run. Ends when the run does."""
    from labep.store.watch import (
        StoreView,
        file_drawer,
        follow,
        interactive_backend,
        window_drawer,
    )

    try:
        view = StoreView(default_store_path(store_path, None))
        resolved = view.resolve(run_id)
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    if out is None and not interactive_backend():
        click.echo("error: no display to open a window on; give --out FILE to follow the run "
                   "in an image file", err=True)
        sys.exit(EXIT_FAILED)
    draw = (file_drawer(view, resolved, Path(out)) if out is not None
            else window_drawer(view, resolved, interval))
    try:
        ended = follow(view, resolved, draw, interval=interval, timeout=timeout)
    except KeyboardInterrupt:
        ended = "stopped (Ctrl-C)"
    finally:
        view.close()
    click.echo(f"run {resolved}: {ended}" + (f"; figure {out}" if out else ""))
