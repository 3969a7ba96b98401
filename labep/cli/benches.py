"""``labep calibrate``, ``calibrations`` and ``gradcheck``: the commands that work a bench
rather than train on it."""

from __future__ import annotations

import sys
from typing import Any

import click

from labep.cli.common import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_REFUSED,
    dump,
    listing,
    load_or_exit,
    open_store,
    set_option,
    store_option,
)
from labep.protocol.text import ProtocolError


def _registered_estimator(ctx: click.Context, param: click.Parameter,
                          value: str | None) -> str | None:
    """``--estimator``: a registered estimator's name (refused with the known ones)."""
    from labep import registry

    if value is not None and value not in registry.names("estimator"):
        raise click.BadParameter(f"{value!r} is not a registered estimator; known: "
                                 f"{', '.join(registry.names('estimator'))}")
    return value


@click.command()
@click.argument("protocol_or_bench", metavar="PROTOCOL_OR_BENCH",
                type=click.Path(dir_okay=False))
@store_option
@set_option
@click.option("--points", type=click.IntRange(min=3), default=17, show_default=True,
              help="Codes swept per parameter, evenly from 0 to the top code.")
@click.option("--repeats", type=click.IntRange(min=1), default=4, show_default=True,
              help="Measurements averaged per swept code.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the record's summary as JSON.")
def calibrate(protocol_or_bench: str, store_path: str | None, overrides: tuple[str, ...],
              points: int, repeats: int, progress: bool, as_json: bool) -> None:
    """Calibrate a bench's quantized parameters (sweep codes, measure, fit gain, offset and a
    monotone response per channel) and store the record. PROTOCOL_OR_BENCH is a protocol, or
    a file with just its `bench` and `model` sections."""
    from labep.hardware.calibration import CalibrationError
    from labep.hardware.calibration import calibrate as run_calibration
    from labep.run.assembly import build_bench_of
    from labep.run.validate import load_bench_file

    try:
        loaded = load_bench_file(protocol_or_bench, overrides)
    except ProtocolError as err:
        click.echo(str(err), err=True)
        sys.exit(EXIT_INVALID)
    store = open_store(store_path, getattr(loaded.protocol, "store", None))
    _, bench = build_bench_of(loaded.protocol)
    try:
        with bench:
            identity = bench.open()
            record = run_calibration(bench, identity, loaded.protocol.bench.name,
                                     points=points, repeats=repeats, progress=progress)
    except CalibrationError as err:
        click.echo(f"calibration refused: {err}", err=True)
        sys.exit(EXIT_FAILED)
    store.save_calibration(record)
    if as_json:
        dump(record.summary())
        return
    click.echo(f"calibration {record.id} of {identity.serial} stored in {store.path}")
    for name, cal in record.parameters.items():
        click.echo(f"  {name:6} {cal.gain.size:8d} channels  fit residual "
                   f"{cal.residual_rms_lsb:.3f} LSB rms, {cal.residual_max_lsb:.3f} max")


@click.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def calibrations(store_path: str | None, as_json: bool) -> None:
    """List the calibration records (superseded ones too)."""
    store = open_store(store_path, create=False)

    def line(cal: dict[str, Any]) -> str:
        state = "valid" if cal["superseded_by"] is None else f"superseded by {cal['superseded_by']}"
        return (f"{cal['id']:28} {cal['created']:30} {cal['identity']['serial']:32} "
                f"{cal['residual_rms_lsb']:8.3f}  {state}")

    listing(store.calibrations(), as_json, f"no calibrations in {store.path}",
             f"{'id':28} {'created':30} {'bench serial':32} {'rms LSB':>8}  state", line)


@click.command()
@click.argument("protocol", type=click.Path(dir_okay=False))
@click.option("--beta", type=click.FloatRange(min=0.0, min_open=True),
              help="Nudge strength |beta| (default: the protocol's).")
@click.option("--estimator", callback=_registered_estimator,
              help="Estimator (default: the protocol's; one of `labep estimators`: those over "
              "sample sets compare with the exact gradient by enumeration of a binary-unit "
              "bench).")
@click.option("--samples", type=click.IntRange(min=1), help="Batch size of the check.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the parameters and batch.")
@click.option("--tolerance", type=click.FloatRange(min=0.0, min_open=True), default=1e-10,
              show_default=True, help="Settle tolerance (float64) both phases must reach.")
@click.option("--repeats", type=click.IntRange(min=1), default=8, show_default=True,
              help="Stochastic (spiking) benches: estimates averaged into the cosine's mean "
              "and standard error.")
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gradcheck(protocol: str, beta: float | None, estimator: str | None, samples: int | None,
              seed: int | None, tolerance: float, repeats: int, overrides: tuple[str, ...],
              as_json: bool) -> None:
    """Compare the EP estimate with the exact gradient (implicit differentiation) on a
    simulator, at fresh parameters and one batch of training data."""
    from labep.run.gradcheck import GradcheckError
    from labep.run.gradcheck import gradcheck as check

    loaded = load_or_exit(protocol, overrides)
    try:
        report = check(loaded.protocol, beta=beta, estimator=estimator, samples=samples,
                       seed=seed, tolerance=tolerance, repeats=repeats)
    except GradcheckError as err:
        click.echo(f"gradcheck refused: {err}", err=True)
        sys.exit(EXIT_REFUSED)
    if as_json:
        dump(report)
        return
    corrected = " (non-conservative correction)" if report.get("correction") else ""
    click.echo(f"{report['estimator']} EP{corrected}, beta={report['beta']:g}, "
               f"{report['samples']} samples")
    click.echo(f"  overall   cosine {report['cosine']:.6f}  relative error "
               f"{report['relative_error']:.3e}")
    if "repeats" in report:  # a stochastic (spiking) bench: mean of the repeats
        click.echo(f"  stochastic: {report['repeats']} estimates of {report['steps_per_estimate']}"
                   f" time steps, {report['spikes_per_sample']:.0f} spikes per sample; cosine "
                   f"to the exact gradient {report['cosine']:.4f} +- "
                   f"{report['cosine_stderr']:.4f}, to deterministic EP "
                   f"{report['cosine_to_deterministic_ep']:.4f} +- "
                   f"{report['cosine_to_deterministic_ep_stderr']:.4f} (deterministic EP to "
                   f"exact: {report['deterministic_ep_cosine']:.6f}); "
                   f"{report['unsettled_phases']} unsettled phase(s)")
    for name, cmp in report["parameters"].items():
        click.echo(f"  {name:9} cosine {cmp['cosine']:.6f}  relative error "
                   f"{cmp['relative_error']:.3e}")
