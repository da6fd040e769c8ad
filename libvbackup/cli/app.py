"""The typer app: every command, its help and its options (``main`` runs it when ``fastpath`` does
not take the command line)."""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import EXIT_CODES
from . import main

EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES) + (
    "\n\nWith --json, an error is also one JSON object on stdout: "
    '{"format_version": 1, "error": MESSAGE, "code": EXIT_CODE, "hint": HINT or null, "type": CLASS}.')

# Each command's module (and the library modules it needs) is imported only when that command runs
# or a help lists it: importing all of them took 0.1 s of CPU before every command (README,
# "Where the time goes"). The table keeps the order of the top-level help.
# name: (module of libvbackup.cli, function; help from the module's docstring, or the function's)
COMMANDS = {
    "pull": ("pull", "pull"), "push": ("push", "push"), "list": ("list_cmd", "list_"),
    "restore": ("restore", "restore"), "verify": ("verify", "verify"), "prune": ("prune", "prune"),
    "run": ("run_cmd", "run"), "checkpoints": ("lifecycle_cmds", "checkpoints"),
    "status": ("lifecycle_cmds", "status"), "abort": ("lifecycle_cmds", "abort"),
    "completion": ("completion_cmd", "completion"), "map": ("map_cmd", "map_"), "copy": ("copy_cmd", "copy"),
    "finalize": ("finalize_cmd", "finalize"), "files": ("files_cmd", "files"), "extract": ("extract_cmd", "extract"),
    "serve": ("serve_cmd", "serve"),
}
_FUNCTION_HELP = {"checkpoints", "status", "abort"}  # their module holds three commands


class _LazyGroup(TyperGroup):
    """The top-level group: a command is built from its module the first time it is asked for."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in self.commands:
            if name not in COMMANDS:  # a typo: every command loaded, for typer's suggestions
                for other in COMMANDS:
                    self.get_command(ctx, other)
                return None
            self.add_command(_command(name), name)
        return self.commands.get(name)


def _command(name: str):
    module, attr = COMMANDS[name]
    mod = importlib.import_module(f"{__package__}.{module}")
    fn = getattr(mod, attr)
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    one.command(name, help=fn.__doc__ if name in _FUNCTION_HELP else mod.__doc__, epilog=EPILOG)(
        main.errors_to_exit_codes(fn))
    return typer.main.get_command(one)


app = typer.Typer(
    cls=_LazyGroup,
    epilog=EPILOG,
    name="libvbackup",
    help=(
        "Back up libvirt/QEMU VMs (running or shut off, on this host or a remote one) into a repository "
        "of ordinary qcow2 chains.\n\n"
        "A pull backup asks libvirt for a point-in-time NBD export of each disk and a new "
        "checkpoint; later backups copy only what changed since an earlier checkpoint. "
        "Every point can be restored with ordinary QEMU tools, run at once from the repository "
        "(restore --instant), searched for single files (files, extract), and copied off-site to "
        "S3-compatible storage, encrypted, to be restored from the bucket alone (copy).\n\n"
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
    main.set_up(debug=debug, verbose=verbose)
