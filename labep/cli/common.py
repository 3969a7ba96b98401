"""What every ``labep`` command shares: exit codes, loading a protocol, opening the store,
the group that turns a damaged store into one line, and the common options.

Exit codes: 0 success; 1 a run or command failed; 2 a protocol, override or command line was
refused (nothing was created); 3 gradcheck refused to compare (states did not settle).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from typing import Any

import click

from labep.protocol.text import ProtocolError
from labep.run.validate import LoadedProtocol, load_protocol
from labep.store.files import StoreError, default_store_path, find_damage, store_error
from labep.store.runs import RunStore

EXIT_FAILED, EXIT_INVALID, EXIT_REFUSED = 1, 2, 3
#: the commands that only read the store (resume reads it before it writes)
READ_COMMANDS = frozenset({"runs", "show", "report", "resume", "calibrations", "export",
                           "watch"})
#: where :func:`open_store` leaves the open store's path in ``click.Context.meta``
_STORE_KEY = "labep.store"


def load_or_exit(protocol: str, overrides: tuple[str, ...]) -> LoadedProtocol:
    try:
        return load_protocol(protocol, overrides)
    except ProtocolError as err:
        click.echo(str(err), err=True)
        sys.exit(EXIT_INVALID)


def open_store(path: str | None, protocol_store: str | None = None, *,
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


class Commands(click.Group):
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


def interrupted(err: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM ended a run: say so and exit 130 (SIGINT) or 143 (SIGTERM)."""
    from labep.hardware.interrupts import Terminated, reason

    click.echo(f"{reason(err)}; the run is recorded as 'interrupted' (labep resume RUN "
               "continues it)", err=True)
    sys.exit(143 if isinstance(err, Terminated) else 130)


def dump(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


def listing(rows: list[dict[str, Any]], as_json: bool, empty: str, header: str,
             line: Any) -> None:
    """Print a listing as JSON, or as a header and one ``line(row)`` per row."""
    if as_json:
        dump(rows)
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
