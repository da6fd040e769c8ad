"""Entry point: the typer app, logging set-up, and the one place errors become exit codes."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from typing import Callable

import typer

from .. import __version__
from ..errors import EXIT_CODES, Error
from ..results import FORMAT_VERSION
from . import completion_cmd, lifecycle_cmds, list_cmd, map_cmd, prune, pull, push, restore, run_cmd, verify
from . import finalize_cmd
from . import extract_cmd, files_cmd
from . import copy_cmd

EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES) + (
    "\n\nWith --json, an error is also one JSON object on stdout: "
    '{"format_version": 1, "error": MESSAGE, "code": EXIT_CODE, "hint": HINT or null, "type": CLASS}.')

app = typer.Typer(
    epilog=EPILOG,
    name="libvbackup",
    help=(
        "Back up libvirt/QEMU VMs (running or shut off, on this host or a remote one) into a repository "
        "of ordinary qcow2 chains.\n\n"
        "A pull backup asks libvirt for a point-in-time NBD export of each disk and a new "
        "checkpoint; later backups copy only what changed since an earlier checkpoint. "
        "Every point can be restored with ordinary QEMU tools.\n\n"
        "Typical use: 'libvbackup pull vm1 --repo /backups', then "
        "'libvbackup pull vm1 --repo /backups --incremental CHECKPOINT', "
        "'libvbackup list vm1 --repo /backups', "
        "'libvbackup restore vm1 --repo /backups --checkpoint CHECKPOINT --output DIR'."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"libvbackup {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Log details and show tracebacks of errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what is being done."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 is_eager=True, callback=_version),
) -> None:
    global _debug
    _debug = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="libvbackup: %(levelname)s: %(message)s")


def _fail(message: str, code: int, json_out: bool, hint: str | None = None, kind: str = "Error") -> None:
    if _debug:
        traceback.print_exc()
    if json_out:  # the caller parses stdout: the error is a document there too
        json.dump({"format_version": FORMAT_VERSION, "error": message, "code": code, "hint": hint, "type": kind},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    text = f"{message} ({hint})" if hint else message
    sys.stderr.write(f"libvbackup: error: {text}\n")
    sys.stdout.flush()
    sys.exit(code)


def errors_to_exit_codes(fn: Callable) -> Callable:
    """The one place where exceptions become a one-line message (a JSON document too, under
    --json) and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_out = bool(kwargs.get("json_out"))
        try:
            return fn(*args, **kwargs)
        except Error as e:
            _fail(e.message, e.exit_code, json_out, e.hint, type(e).__name__)
        except KeyboardInterrupt:
            _fail("interrupted", 130, json_out, kind="Interrupted")
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            _fail(f"{e.strerror or e}{where}", 1, json_out, kind="OSError")
        except Exception as e:  # a bug: one line; --debug shows where
            _fail(f"internal error: {type(e).__name__}: {e}", 70, json_out, "run with --debug for details",
                  "InternalError")

    return wrapper


for _name, _mod, _fn in (("pull", pull, pull.pull), ("push", push, push.push), ("list", list_cmd, list_cmd.list_),
                         ("restore", restore, restore.restore), ("verify", verify, verify.verify),
                         ("prune", prune, prune.prune), ("run", run_cmd, run_cmd.run)):
    app.command(_name, help=_mod.__doc__, epilog=EPILOG)(errors_to_exit_codes(_fn))
for _fn in (lifecycle_cmds.checkpoints, lifecycle_cmds.status, lifecycle_cmds.abort):
    app.command(_fn.__name__, help=_fn.__doc__, epilog=EPILOG)(errors_to_exit_codes(_fn))


app.command("completion", help=completion_cmd.__doc__, epilog=EPILOG)(errors_to_exit_codes(completion_cmd.completion))
app.command("map", help=map_cmd.__doc__, epilog=EPILOG)(errors_to_exit_codes(map_cmd.map_))
app.command("copy", help=copy_cmd.__doc__, epilog=EPILOG)(errors_to_exit_codes(copy_cmd.copy))
app.command("finalize", help=finalize_cmd.__doc__, epilog=EPILOG)(errors_to_exit_codes(finalize_cmd.finalize))
app.command("files", help=files_cmd.__doc__, epilog=EPILOG)(errors_to_exit_codes(files_cmd.files))
app.command("extract", help=extract_cmd.__doc__, epilog=EPILOG)(errors_to_exit_codes(extract_cmd.extract))


def main() -> None:
    if os.environ.get(completion_cmd.COMPLETE_VAR):  # the shell asks for completions
        completion_cmd.enable()
    app(prog_name="libvbackup")


if __name__ == "__main__":
    main()
