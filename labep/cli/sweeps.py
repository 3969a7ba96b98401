"""``labep sweep``: run a sweep file's trials on dask.distributed, resume a sweep, show its
table and draw its report. ``labep sweep SWEEP.yaml`` is ``labep sweep run SWEEP.yaml``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from labep.cli.common import EXIT_FAILED, EXIT_INVALID, dump, interrupted, open_store, store_option
from labep.store.files import StoreError


class SweepGroup(click.Group):
    """A group whose first argument, when it is not one of its commands, is a sweep file
    (``labep sweep FILE`` runs it)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=SweepGroup)
def sweep() -> None:
    """Sweeps: SWEEP.yaml (a base protocol and axes of overrides) run as one labep run per
    trial on dask.distributed. 'labep sweep SWEEP.yaml' runs one."""


scheduler_option = click.option(
    "--scheduler", metavar="tcp://HOST:PORT",
    help="An existing dask scheduler (default: the sweep file's, else a LocalCluster).")
workers_option = click.option(
    "--workers", type=click.IntRange(min=1),
    help="LocalCluster worker processes (default: the sweep file's, else one per core).")
serial_option = click.option(
    "--serial", is_flag=True, help="Run the trials one after another in this process (no dask).")
progress_option = click.option("--progress/--no-progress", default=True,
                               help="Show the sweep's progress bar.")


def _execute(store_path: Path, sweep_id: str, trials: list[int], scheduler: str | None,
             workers: int | None, serial: bool, progress: bool) -> None:
    from labep.sweep.execute import DaskMissingError, run_dask, run_serial

    try:
        if serial:
            results = run_serial(store_path, sweep_id, trials, progress=progress)
        else:
            results = run_dask(store_path, sweep_id, trials, scheduler=scheduler,
                               workers=workers, progress=progress)
    except DaskMissingError as err:
        click.echo(f"error: {err} (or use --serial)", err=True)
        sys.exit(EXIT_INVALID)
    except KeyboardInterrupt as err:
        interrupted(err)
    failed = [r for r in results if r["status"] != "completed"]
    for result in failed:
        click.echo(f"trial {result['trial']} failed (run {result['run_id']}): "
                   f"{result['error']}", err=True)
    done = len(results) - len(failed)
    click.echo(f"sweep {sweep_id}: {done} of {len(results)} trial(s) completed"
               + (f", {len(failed)} failed (labep sweep resume {sweep_id})" if failed else "")
               + f" (store: {store_path})")
    if failed:
        sys.exit(EXIT_FAILED)


@sweep.command("run")
@click.argument("sweep_file", metavar="SWEEP.yaml", type=click.Path(dir_okay=False))
@scheduler_option
@workers_option
@store_option
@serial_option
@progress_option
def run_sweep(sweep_file: str, scheduler: str | None, workers: int | None,
              store_path: str | None, serial: bool, progress: bool) -> None:
    """Validate every trial of SWEEP.yaml, then run them (one labep run each)."""
    from labep.sweep.execute import DaskMissingError, require_dask
    from labep.sweep.spec import SweepError, load_sweep

    if not serial:
        try:
            require_dask()
        except DaskMissingError as err:  # before anything is created
            click.echo(f"error: {err} (or use --serial)", err=True)
            sys.exit(EXIT_INVALID)

    try:
        loaded = load_sweep(sweep_file)
    except SweepError as err:
        click.echo(str(err), err=True)
        sys.exit(EXIT_INVALID)
    store = open_store(store_path, loaded.store)
    spec = loaded.spec
    sweep_id = store.create_sweep(spec.name, str(Path(sweep_file).resolve()),
                                  spec.model_dump(mode="json"), spec.axes(), loaded.trials)
    click.echo(f"sweep {sweep_id}: {len(loaded.trials)} trial(s) of {loaded.base}", err=True)
    _execute(store.path, sweep_id, list(range(len(loaded.trials))),
             scheduler or spec.scheduler, workers or spec.workers, serial, progress)


@sweep.command("resume")
@click.argument("sweep_id", metavar="SWEEP_ID")
@scheduler_option
@workers_option
@store_option
@serial_option
@progress_option
def resume_sweep(sweep_id: str, scheduler: str | None, workers: int | None,
                 store_path: str | None, serial: bool, progress: bool) -> None:
    """Run the trials of SWEEP_ID that did not complete (killed or failed ones resumed from
    their checkpoints, never started ones started)."""
    from labep.sweep.execute import pending_trials

    store = open_store(store_path, create=False, check_pages=True)
    try:
        sweep_id = store.resolve_sweep(sweep_id)
        record = store.sweep(sweep_id)
        trials = pending_trials(store, sweep_id)
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    if not trials:
        click.echo(f"sweep {sweep_id}: every trial completed; nothing to resume")
        return
    click.echo(f"sweep {sweep_id}: {len(trials)} of {record['trials']} trial(s) to run",
               err=True)
    _execute(store.path, sweep_id, trials, scheduler or record["spec"].get("scheduler"),
             workers or record["spec"].get("workers"), serial, progress)


@sweep.command("show")
@click.argument("sweep_id", metavar="SWEEP_ID")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_sweep(sweep_id: str, store_path: str | None, as_json: bool) -> None:
    """A table of the axes against the final metrics (test_accuracy, train_loss; mean and
    spread over seeds where seed is an axis)."""
    from labep.sweep.results import format_table, sweep_table

    store = open_store(store_path, create=False)
    try:
        table: dict[str, Any] = sweep_table(store, sweep_id)
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        table["trial_runs"] = store.sweep_trials(table["id"])
        dump(table)
        return
    for line in format_table(table):
        click.echo(line)


@sweep.command("report")
@click.argument("sweep_id", metavar="SWEEP_ID")
@store_option
@click.option("--out", type=click.Path(dir_okay=False),
              help="Figure file (default SWEEP_ID.png).")
def report_sweep(sweep_id: str, store_path: str | None, out: str | None) -> None:
    """Draw test accuracy against each axis (and a heatmap for two axes) to a figure."""
    from labep.sweep.results import draw_sweep_report

    store = open_store(store_path, create=False)
    try:
        resolved = store.resolve_sweep(sweep_id)
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    path = draw_sweep_report(store, resolved, Path(out or f"{resolved}.png"))
    click.echo(f"wrote {path}")
