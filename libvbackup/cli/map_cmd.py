"""Serve one disk of a backup point read-only over NBD until interrupted.

Prints the NBD URI (for nbdinfo, nbdcopy, qemu-img, nbdfuse, or `qemu-nbd -c /dev/nbd0` to mount
it); the point's backing chain is served with it and nothing can write to the repository
through it. By default on a unix socket in a private directory; with --port on TCP at
127.0.0.1 (--address another address needs --tls-dir with a server certificate: ca-cert.pem,
server-cert.pem, server-key.pem). Ctrl-C or SIGTERM stops it and removes the socket.

Examples:

\b
  libvbackup map vm1 --repo /backups --checkpoint CHK --disk vda
  libvbackup map vm1 --repo /backups --disk vdb --port 10900
  libvbackup map vm1 --repo /backups --disk vda --json
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

import typer

from .. import api
from ..errors import ToolError
from .common import JsonOpt, RepoOpt, complete_checkpoint, complete_vm
from .output import emit_json, repo_path


def map_(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM the backups belong to.",
                             autocompletion=complete_vm),
    repo: Optional[str] = RepoOpt,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", metavar="NAME", autocompletion=complete_checkpoint,
                                             help="Backup point [default: the newest]."),
    disk: Optional[str] = typer.Option(None, "--disk", "-d", metavar="TARGET",
                                       help="The disk (needed when the point has several)."),
    port: Optional[int] = typer.Option(None, "--port", metavar="PORT", help="Serve on TCP instead of a socket."),
    address: Optional[str] = typer.Option(None, "--address", metavar="ADDR",
                                          help="With --port: the address to listen on [default: 127.0.0.1]."),
    tls_dir: Optional[str] = typer.Option(None, "--tls-dir", metavar="DIR",
                                          help="With --port: serve with TLS, this server certificate."),
    json_out: bool = JsonOpt,
) -> None:
    stop = threading.Event()
    got: list[int] = []

    def on_signal(signum, _frame):
        got.append(signum)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with api.map_point(vm, repo=repo_path(repo), checkpoint=checkpoint, disk=disk, port=port,
                           address=address, tls_dir=tls_dir) as m:
            if json_out:
                emit_json(m.result.to_dict())
            else:
                typer.echo(f"serving {vm} at {m.result.checkpoint}, disk {m.result.disk} (read-only): {m.uri}")
                typer.echo("stop with Ctrl-C", err=True)
            sys.stdout.flush()
            while not stop.wait(0.5):
                if m.exited() is not None:
                    raise ToolError(f"qemu-nbd serving {m.result.image} exited (status {m.exited()})")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
