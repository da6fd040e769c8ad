"""Keep libvbackup loaded, so that commands start at once: a resident server.

Starting Python and importing libvirt-python, lxml and libnbd cost each command some 150 ms of
CPU here, more than the work of an empty incremental (README, "Fourth session"). `serve`
imports everything once and listens on a UNIX socket (mode 0600, in a directory of mode 0700,
made if missing). A `libvbackup` command whose environment has LIBVBACKUP_SERVER=on (the default
socket) or LIBVBACKUP_SERVER=PATH hands itself to the server of the same user and runs in a
process forked from it, with its own arguments, environment, working directory, umask, nice
value and standard streams; it waits, passes SIGINT/SIGTERM/SIGHUP/SIGQUIT on, and exits with
the worker's status. A command that goes away takes its worker with it (SIGKILL); a worker dies
with its server. With no server there, or when it declines, the command runs in its own
process, as it does without LIBVBACKUP_SERVER; so do `map` and `restore --instant` (its NBD
servers outlive the command: in the server's cgroup, systemd would stop them with the server).

A worker runs in the server's cgroup, with the server's I/O priority and resource limits, and
without a controlling terminal (ssh cannot ask for a password there: use keys); hence asking a
server is opt-in, never what a systemd unit or a script that set those gets by surprise.
A server whose files change on disk (an upgrade) sends new commands back to run in their own
process and ends once its running commands are done. SIGTERM, SIGINT or SIGHUP stops it: no new
commands, SIGTERM to the running ones (they clean up as when interrupted), then it ends.

Examples:

\b
  libvbackup serve &                       # root: /run/libvbackup/server.sock
  export LIBVBACKUP_SERVER=on              # this shell's commands use it
  libvbackup pull vm1 -r /backups -l inc   # runs in the server
  libvbackup serve --socket /run/lvb/s.sock --quiet &   # LIBVBACKUP_SERVER=/run/lvb/s.sock
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
            try:
                sys.stderr.write(f"libvbackup serve: {text}\n")
                sys.stderr.flush()
            except (OSError, ValueError):  # nobody reads the log any more: serving goes on
                pass

    from . import resident_server

    resident_server.serve(path, log)
