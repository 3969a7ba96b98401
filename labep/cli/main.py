"""The ``labep`` command line: the group and its commands (each defined in its own module).

Exit codes: 0 success; 1 a run or command failed; 2 a protocol, override or command line was
refused (nothing was created); 3 gradcheck refused to compare (states did not settle).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from labep.cli import benches, emulate, listing, runs, sweeps
from labep.cli.common import Commands


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="labep")
def main() -> None:
    """labep: train lab benches and their simulators with Equilibrium Propagation."""


for command in (runs.run, runs.resume, runs.runs, runs.show, runs.report, runs.export, runs.watch,
                benches.calibrate,
                benches.calibrations, benches.gradcheck, emulate.emulate, listing.benches,
                listing.models, listing.estimators, listing.datasets, sweeps.sweep):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    main(prog_name=Path(sys.argv[0]).name)
