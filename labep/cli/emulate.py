"""``labep emulate``: emulated instruments served on a pseudo-terminal or loopback sockets."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from labep.cli.common import (
    EXIT_FAILED,
    EXIT_INVALID,
    load_or_exit,
)


@click.group()
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
@click.option("--protocol", "protocol_version", type=click.IntRange(1, 3), default=3,
              show_default=True, help="Protocol version: 3 (RELAX_STEP), 2 (RELAX_BATCH, "
                                      "READ_BATCH), or 1 (a board of the first firmware).")
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
            loaded = load_or_exit(protocol_path, ())
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
