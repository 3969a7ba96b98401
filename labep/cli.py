"""The ``labep`` command line.

Exit codes: 0 success; 1 a run or command failed; 2 a protocol, override or command line was
refused (nothing was created); 3 gradcheck refused to compare (states did not settle).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from labep.protocol import LoadedProtocol, ProtocolError, load_protocol
from labep.store import (
    SAMPLE_COUNTS,
    RunStore,
    StoreError,
    default_store_path,
    find_damage,
    store_error,
)

EXIT_FAILED, EXIT_INVALID, EXIT_REFUSED = 1, 2, 3
#: the commands that only read the store (resume reads it before it writes)
READ_COMMANDS = frozenset({"runs", "show", "report", "resume", "calibrations"})
#: where :func:`_open_store` leaves the open store's path in ``click.Context.meta``
_STORE_KEY = "labep.store"


def _load(protocol: str, overrides: tuple[str, ...]) -> LoadedProtocol:
    try:
        return load_protocol(protocol, overrides)
    except ProtocolError as err:
        click.echo(str(err), err=True)
        sys.exit(EXIT_INVALID)


def _open_store(path: str | None, protocol_store: str | None = None, *,
                create: bool = True, check_pages: bool | None = None) -> RunStore:
    """The run store, or exit (2 for a writer, 1 for a reader) with one line saying why it
    was refused (missing, not a labep store, damaged, newer schema); the file is unchanged.
    The store is closed when the command ends."""
    try:
        store = RunStore(default_store_path(path, protocol_store), create=create,
                         check_pages=check_pages)
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_INVALID if create else EXIT_FAILED)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_STORE_KEY] = store.path
        ctx.call_on_close(store.close)
    return store


class _Commands(click.Group):
    """The ``labep`` group. A read command (:data:`READ_COMMANDS`) whose store turns out
    damaged only in a later query (a malformed page, text that does not decode, rows that
    contradict each other) ends with one line naming the file and exit 1, never a
    traceback; so does a StoreError it left uncaught. Any other error of a read is checked
    against the file (``PRAGMA integrity_check``): re-raised if the file is sound (a bug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            path = ctx.meta.get(_STORE_KEY)
            if path is None or ctx.invoked_subcommand not in READ_COMMANDS:
                raise
            if isinstance(err, StoreError | sqlite3.DatabaseError | UnicodeDecodeError
                          | json.JSONDecodeError):
                problem = store_error(path, err)
            else:
                damage = find_damage(path)
                if damage is None:
                    raise
                problem = StoreError(f"{path}: damaged: {damage}")
            click.echo(f"error: {problem}", err=True)
            sys.exit(EXIT_FAILED)


def _interrupted(err: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM ended a run: say so and exit 130 (SIGINT) or 143 (SIGTERM)."""
    from labep.interrupts import Terminated, reason

    click.echo(f"{reason(err)}; the run is recorded as 'interrupted' (labep resume RUN "
               "continues it)", err=True)
    sys.exit(143 if isinstance(err, Terminated) else 130)


def _dump(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


def _listing(rows: list[dict[str, Any]], as_json: bool, empty: str, header: str,
             line: Any) -> None:
    """Print a listing as JSON, or as a header and one ``line(row)`` per row."""
    if as_json:
        _dump(rows)
    elif not rows:
        click.echo(empty)
    else:
        click.echo(header)
        for row in rows:
            click.echo(line(row))


store_option = click.option(
    "--store", "store_path", type=click.Path(dir_okay=False),
    help="Run store (SQLite). Default: $LABEP_STORE, the protocol's 'store', or ./labep.db.")
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a protocol field (dotted path, e.g. training.epochs=3); validated like the "
         "file. Repeatable.")


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="labep")
def main() -> None:
    """labep: train lab benches and their simulators with Equilibrium Propagation."""


@main.command()
@click.argument("protocol", type=click.Path(dir_okay=False))
@store_option
@set_option
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def run(protocol: str, store_path: str | None, overrides: tuple[str, ...],
        progress: bool) -> None:
    """Run PROTOCOL (a YAML file) and record it in the run store."""
    from labep.engine import Trainer

    loaded = _load(protocol, overrides)
    store = _open_store(store_path, loaded.protocol.store)
    trainer = Trainer(loaded, store, progress=progress)
    try:
        result = trainer.run()
    except KeyboardInterrupt as err:
        _interrupted(err)
    except Exception as err:
        click.echo(f"run failed: {type(err).__name__}: {err}", err=True)
        click.echo(f"(recorded in {store.path}; see 'labep show latest')", err=True)
        sys.exit(EXIT_FAILED)
    accuracy = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    click.echo(f"run {result.run_id} completed: {result.steps} steps, "
               f"test accuracy {accuracy} (store: {store.path})")


@main.command()
@click.argument("run_id", metavar="RUN")
@store_option
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def resume(run_id: str, store_path: str | None, progress: bool) -> None:
    """Continue RUN (interrupted, failed, or killed) from its last checkpoint, with the
    protocol as it was run. Refused while another live process writes it."""
    from labep.engine import Trainer

    store = _open_store(store_path, create=False, check_pages=True)  # it will write
    try:
        result = Trainer.resume(store, run_id, progress=progress)
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt as err:
        _interrupted(err)
    except Exception as err:
        click.echo(f"run failed: {type(err).__name__}: {err}", err=True)
        sys.exit(EXIT_FAILED)
    accuracy = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    click.echo(f"run {result.run_id} completed: {result.steps} steps, "
               f"test accuracy {accuracy} (store: {store.path})")


@main.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def runs(store_path: str | None, as_json: bool) -> None:
    """List the runs in the store."""
    store = _open_store(store_path, create=False)

    def line(run: dict[str, Any]) -> str:
        acc = run["metrics"].get("test_accuracy")
        acc_text = "-" if acc is None else f"{acc:.4f}"
        status = run["status"] + ("*" if run["resumable"] else "")
        return (f"{run['id']:24} {status:12} {run['bench']['name']:12} "
                f"{run['steps']:>6} {acc_text:>8}  {run['name']}")

    _listing(store.runs(), as_json, f"no runs in {store.path}",
             f"{'id':24} {'status':12} {'bench':12} {'steps':>6} {'test acc':>8}  name", line)
    if not as_json and any(run["resumable"] for run in store.runs()):
        click.echo("* resumable: labep resume RUN")


@main.command()
@click.argument("run_id", metavar="RUN")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(run_id: str, store_path: str | None, as_json: bool) -> None:
    """Show one run (an id, a unique prefix of one, or 'latest')."""
    store = _open_store(store_path, create=False)
    try:
        summary = store.summary(run_id)
        summary["events"] = store.events(summary["id"])
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        _dump(summary)
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


@main.command()
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
    from labep.calibration import CalibrationError
    from labep.calibration import calibrate as run_calibration
    from labep.engine import build_bench, build_model
    from labep.protocol import load_bench_file

    try:
        loaded = load_bench_file(protocol_or_bench, overrides)
    except ProtocolError as err:
        click.echo(str(err), err=True)
        sys.exit(EXIT_INVALID)
    store = _open_store(store_path, getattr(loaded.protocol, "store", None))
    bench = build_bench(loaded.protocol, build_model(loaded.protocol))
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
        _dump(record.summary())
        return
    click.echo(f"calibration {record.id} of {identity.serial} stored in {store.path}")
    for name, cal in record.parameters.items():
        click.echo(f"  {name:6} {cal.gain.size:8d} channels  fit residual "
                   f"{cal.residual_rms_lsb:.3f} LSB rms, {cal.residual_max_lsb:.3f} max")


@main.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def calibrations(store_path: str | None, as_json: bool) -> None:
    """List the calibration records (superseded ones too)."""
    store = _open_store(store_path, create=False)

    def line(cal: dict[str, Any]) -> str:
        state = "valid" if cal["superseded_by"] is None else f"superseded by {cal['superseded_by']}"
        return (f"{cal['id']:28} {cal['created']:30} {cal['identity']['serial']:32} "
                f"{cal['residual_rms_lsb']:8.3f}  {state}")

    _listing(store.calibrations(), as_json, f"no calibrations in {store.path}",
             f"{'id':28} {'created':30} {'bench serial':32} {'rms LSB':>8}  state", line)


@main.command()
@click.argument("run_id", metavar="RUN")
@store_option
@click.option("--out", type=click.Path(dir_okay=False), help="Figure file (default RUN.png).")
def report(run_id: str, store_path: str | None, out: str | None) -> None:
    """Draw a run's curves (cost, accuracy, settling, parameter histograms) to a figure."""
    from labep.report import draw_report

    store = _open_store(store_path, create=False)
    try:
        resolved = store.resolve(run_id)
    except StoreError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_FAILED)
    path = draw_report(store, resolved, Path(out or f"{resolved}.png"))
    click.echo(f"wrote {path}")


@main.command()
@click.argument("protocol", type=click.Path(dir_okay=False))
@click.option("--beta", type=click.FloatRange(min=0.0, min_open=True),
              help="Nudge strength |beta| (default: the protocol's).")
@click.option("--estimator", type=click.Choice(["one_sided", "symmetric", "finite_nudge",
                                                "thermal_covariance"]),
              help="Estimator (default: the protocol's; the thermal ones compare with the "
              "exact gradient by enumeration of a binary-unit bench).")
@click.option("--samples", type=click.IntRange(min=1), help="Batch size of the check.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed of the parameters and batch.")
@click.option("--tolerance", type=click.FloatRange(min=0.0, min_open=True), default=1e-10,
              show_default=True, help="Settle tolerance (float64) both phases must reach.")
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gradcheck(protocol: str, beta: float | None, estimator: str | None, samples: int | None,
              seed: int | None, tolerance: float, overrides: tuple[str, ...],
              as_json: bool) -> None:
    """Compare the EP estimate with the exact gradient (implicit differentiation) on a
    simulator, at fresh parameters and one batch of training data."""
    from labep.gradcheck import GradcheckError
    from labep.gradcheck import gradcheck as check

    loaded = _load(protocol, overrides)
    try:
        report = check(loaded.protocol, beta=beta, estimator=estimator, samples=samples,
                       seed=seed, tolerance=tolerance)
    except GradcheckError as err:
        click.echo(f"gradcheck refused: {err}", err=True)
        sys.exit(EXIT_REFUSED)
    if as_json:
        _dump(report)
        return
    corrected = " (non-conservative correction)" if report.get("correction") else ""
    click.echo(f"{report['estimator']} EP{corrected}, beta={report['beta']:g}, "
               f"{report['samples']} samples")
    click.echo(f"  overall   cosine {report['cosine']:.6f}  relative error "
               f"{report['relative_error']:.3e}")
    for name, cmp in report["parameters"].items():
        click.echo(f"  {name:9} cosine {cmp['cosine']:.6f}  relative error "
                   f"{cmp['relative_error']:.3e}")


@main.group()
def emulate() -> None:
    """Serve an emulated instrument on a pseudo-terminal or a loopback TCP port."""


@emulate.command("oim-board")
@click.option("--pty", "transport", flag_value="pty", default=True,
              help="Serve on a pseudo-terminal (default); the first line printed is a path "
                   "that stays valid across link drops.")
@click.option("--tcp", "tcp_port", type=click.IntRange(0, 65535), default=None,
              help="Serve on 127.0.0.1:PORT instead (0: any free port); the first line printed "
                   "is socket://127.0.0.1:PORT.")
@click.option("--link", "link_path", type=click.Path(dir_okay=False),
              help="Path of the pty symlink (default: a fresh temporary directory).")
@click.option("--sizes", default="2-8-2", show_default=True,
              help="Layer sizes n_0-n_1-...-n_L the board is built for.")
@click.option("--bits", type=click.IntRange(1, 16), default=8, show_default=True,
              help="Coupling and bias resolution (codes 0 .. 2^bits - 1).")
@click.option("--coupling-range", type=click.FloatRange(min=0.0, min_open=True), default=2.0,
              show_default=True, help="J_max: coupling codes span [-J_max, J_max].")
@click.option("--bias-range", type=click.FloatRange(min=0.0, min_open=True), default=2.0,
              show_default=True, help="Bias codes span [-range, range].")
@click.option("--dt", type=click.FloatRange(min=0.0, min_open=True, max=10.0), default=0.2,
              show_default=True, help="Integration step of the simulator.")
@click.option("--integrator", type=click.Choice(["euler", "heun", "adaptive"]),
              default="euler", show_default=True, help="The simulator's integrator.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="The simulator's precision.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Device seed and every injected fault.")
@click.option("--latency-baud", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Wire time model: 10 bits a byte at this rate, each request and reply.")
@click.option("--protocol", "protocol_version", type=click.IntRange(1, 2), default=2,
              show_default=True, help="Protocol version: 2 (RELAX_BATCH, READ_BATCH), or 1 "
                                      "(a board of the first firmware).")
@click.option("--faults", "fault_spec", default="", metavar="SPEC",
              help="Injected faults, e.g. garble=0.01,drop=0.01,delay=0.01:0.5,"
                   "close_every=200,never_settle=0.0,nan=0.0 (see docs/oim-board-protocol.md).")
def emulate_oim_board(transport: str, tcp_port: int | None, link_path: str | None, sizes: str,
                      bits: int, coupling_range: float, bias_range: float, dt: float,
                      integrator: str, dtype: str, seed: int, latency_baud: float | None,
                      protocol_version: int, fault_spec: str) -> None:
    """Serve an emulated FPGA oscillator Ising board (the OIM simulator behind the board's wire
    protocol) until SIGINT or SIGTERM. Prints the port's URL or path on the first line."""
    from pydantic import ValidationError

    from labep.simulators.oim_board_emulator import BoardConfig, BoardEmulator, FaultSpec

    try:
        config = BoardConfig(sizes=BoardConfig.parse_sizes(sizes), bits=bits,
                             coupling_range=coupling_range, bias_range=bias_range, dt=dt,
                             integrator=integrator, dtype=dtype, seed=seed,
                             protocol=protocol_version)
        faults = FaultSpec.parse(fault_spec)
    except (ValueError, ValidationError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_INVALID)
    emulator = BoardEmulator(config, transport="tcp" if tcp_port is not None else "pty",
                             port=tcp_port or 0, link_path=link_path, latency_baud=latency_baud,
                             faults=faults)
    try:
        url = emulator.open()
    except OSError as err:  # e.g. the TCP port is taken
        click.echo(f"error: cannot serve the emulated board: {err}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(url)
    sys.stdout.flush()
    click.echo(f"oim board emulator: sizes {'-'.join(map(str, config.sizes))}, {bits} bits, "
               f"ranges +-{coupling_range:g} / +-{bias_range:g}, faults "
               f"{fault_spec or 'none'}; serving until SIGINT/SIGTERM", err=True)
    _serve_until_signalled(emulator)


def _serve_until_signalled(emulator: Any) -> None:
    """Serve an emulator until SIGINT or SIGTERM, then close it."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: emulator.request_stop())
    try:
        emulator.serve_forever()
    finally:
        emulator.close()


@emulate.command("polariton-bench")
@click.option("--tcp", "tcp_port", type=click.IntRange(0, 65533), default=5025,
              show_default=True,
              help="Serve the light modulator on 127.0.0.1:PORT, the camera on PORT + 1 and the "
                   "laser on PORT + 2 (0: any free trio). The first line printed is the bench "
                   "resource TCPIP::127.0.0.1::PORT::SOCKET.")
@click.option("--protocol", "protocol_path", type=click.Path(dir_okay=False),
              help="Build the emulated lattice and physics from this polariton protocol's model "
                   "(and its bench options' energy_unit_mev and pump_per_mw).")
@click.option("--lattice", default=None, help="Lattice without --protocol: 9 or 3x4.")
@click.option("--slm-bits", type=click.IntRange(1, 16), default=10, show_default=True,
              help="Light-modulator grey levels 2^bits.")
@click.option("--potential-range", nargs=2, type=float, default=(-4.0, 4.0),
              show_default=True, help="Potential (meV) at grey level 0 and at the top level.")
@click.option("--camera-bits", type=click.IntRange(1, 24), default=None,
              help="Camera intensity resolution (default: exact floats).")
@click.option("--camera-noise", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Std of an intensity readout (|psi|^2).")
@click.option("--pump-noise", type=click.FloatRange(0.0, 0.5), default=0.0, show_default=True,
              help="Relative std of the pump, per frame.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Noise draws and the serial numbers.")
@click.option("--interlock-open", is_flag=True, help="Start with the safety interlock open.")
def emulate_polariton_bench(tcp_port: int, protocol_path: str | None, lattice: str | None,
                            slm_bits: int, potential_range: tuple[float, float],
                            camera_bits: int | None, camera_noise: float, pump_noise: float,
                            seed: int, interlock_open: bool) -> None:
    """Serve an emulated polariton bench (the polariton simulator behind the SCPI commands of
    a light modulator, a camera and a pump laser) until SIGINT or SIGTERM."""
    from pydantic import ValidationError

    from labep.simulators.polariton_emulator import EmulatorConfig, PolaritonBenchEmulator

    hardware = {"slm_bits": slm_bits, "potential_mev": potential_range,
                "camera_bits": camera_bits, "camera_noise": camera_noise,
                "pump_noise": pump_noise, "seed": seed, "interlock_closed": not interlock_open}
    try:
        if protocol_path is not None:
            loaded = _load(protocol_path, ())
            config = EmulatorConfig.from_protocol(loaded.protocol, **hardware)
        else:
            sizes = [int(n) for n in (lattice or "9").lower().split("x")]
            config = EmulatorConfig(lattice=sizes, **hardware)
    except (ValueError, ValidationError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(EXIT_INVALID)
    try:
        emulator = PolaritonBenchEmulator(config, port=tcp_port)
    except OSError as err:
        click.echo(f"error: cannot listen on 127.0.0.1:{tcp_port}..{tcp_port + 2}: {err}",
                   err=True)
        sys.exit(EXIT_FAILED)
    click.echo(emulator.url)
    sys.stdout.flush()
    click.echo(f"polariton bench emulator: lattice {config.lattice}, {slm_bits}-bit modulator, "
               f"camera on port {emulator.port + 1}, laser on port {emulator.port + 2}; serving "
               "until SIGINT/SIGTERM", err=True)
    _serve_until_signalled(emulator)

if __name__ == "__main__":  # pragma: no cover
    main(prog_name=Path(sys.argv[0]).name)
