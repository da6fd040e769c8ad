"""Make an instant VM (restore --instant) independent of the repository, while it runs.

Each disk's backing chain (the point, served read-only over NBD) is pulled into the disk's
overlay in --output DIR: a block pull by QEMU while the guest runs (progress as for a restore),
or, for a shut-off VM, a safe qemu-img rebase. Then the NBD servers are stopped, their socket
directory and the VM's record in the repository removed: the domain names nothing of the
repository any more, and prune may remove the points it read.

Examples:

\b
  libvbackup finalize vm1-instant
  libvbackup finalize vm1-instant --progress plain --json
"""

from __future__ import annotations

from typing import Optional

import typer

from .. import api
from .common import JsonOpt, ProgressOpt, UriOpt, complete_vm
from .output import emit_json, progress_mode


def finalize(
    name: str = typer.Argument(..., metavar="NAME", help="The instant VM (restore --instant --define NAME).",
                               autocompletion=complete_vm),
    uri: Optional[str] = UriOpt,
    progress: str = ProgressOpt,
    json_out: bool = JsonOpt,
) -> None:
    r = api.finalize(name, uri=uri, progress=progress_mode(progress, json_out))
    if json_out:
        emit_json(r.to_dict())
        return
    how = "while it ran" if r.running else "shut off"
    typer.echo(f"finalized {r.name} ({how}, {r.seconds:.1f} s): its disks no longer need the repository")
    for n, d in r.disks.items():
        typer.echo(f"  {n}: {d.path}")
    typer.echo(f"points released: {', '.join(r.points_released)}")
