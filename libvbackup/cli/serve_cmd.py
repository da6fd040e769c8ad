"""Keep libvbackup loaded, so that every command starts at once: a resident server.

Starting Python and importing libvirt-python, lxml and libnbd cost each command some 150 ms of
CPU here, as much as the work of an empty incremental (README, "Fourth session"). `serve` imports
everything once and listens on a UNIX socket (mode 0600, in a directory of mode 0700); from then
on every `libvbackup` command of the same user finds it there, and runs in a process forked from
it, with the command's own arguments, environment, working directory, umask and standard
streams. The command waits, passes SIGINT/SIGTERM/SIGHUP/SIGQUIT on, and exits with the
worker's status; a command that goes away takes its worker with it (SIGKILL), and a worker dies
with its server. Without a server, or with LIBVBACKUP_SERVER=off, commands run in their own
process, as always. A server whose files change on disk (an upgrade) sends new commands back to
run in their own process and ends once its running commands are done.

SIGTERM or SIGINT stops the server: no new commands, SIGTERM to the running ones (they clean up
as they do when interrupted), and it ends when they have.

Examples:

\b
  libvbackup serve &                      # root: /run/libvbackup/server.sock
  libvbackup pull vm1 -r /backups -l inc  # runs in the server
  LIBVBACKUP_SERVER=off libvbackup list   # runs in its own process
  libvbackup serve --socket /run/lvb/test.sock   # commands: LIBVBACKUP_SERVER=/run/lvb/test.sock
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from . import resident


def serve(
    socket: Optional[str] = typer.Option(
        None, "--socket", metavar="PATH",
        help=f"Where to listen [default: {resident.ROOT_SOCKET} for root, "
             "$XDG_RUNTIME_DIR/libvbackup/server.sock for other users].",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not log each command on stderr."),
) -> None:
    path = socket or resident.default_socket()
    if not path:
        from ..errors import UsageError

        raise UsageError("no socket to listen on: $XDG_RUNTIME_DIR is not set",
                         hint="give one with --socket PATH")

    def log(text: str) -> None:
        if not quiet or text.startswith("listening"):
            sys.stderr.write(f"libvbackup serve: {text}\n")
            sys.stderr.flush()

    from . import resident_server

    resident_server.serve(path, log)
