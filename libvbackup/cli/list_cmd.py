"""List the backup points of a VM in a repository, oldest first.

Each point is named by the checkpoint it created; PARENT is the point it was taken from
(empty for a full backup).
CONSISTENCY is 'quiesced' when the guest's file systems were frozen at that point.

Examples:

\b
  libvbackup list vm1 --repo /backups
  libvbackup list vm1 --repo /backups --json
"""

from __future__ import annotations

import typer

from .. import api
from .common import JsonOpt, RepoOpt, complete_vm, emit_json, human, repo_path


def list_(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM.", autocompletion=complete_vm),
    repo: str = RepoOpt,
    json_out: bool = JsonOpt,
) -> None:
    result = api.list_points(vm, repo=repo_path(repo))
    if json_out:
        emit_json(result.to_dict())
        return
    if not result.points:
        typer.echo(f"no backup points of {vm} in {result.repo}")
        return
    typer.echo(f"{'CHECKPOINT':<28} {'LEVEL':<13} {'PARENT':<28} {'COMPLETED':<26} {'CONSISTENCY':<12} DISKS")
    for p in result.points:
        disks = ", ".join(f"{n} {human(d.bytes_copied)}" for n, d in p.disks.items())
        typer.echo(f"{p.checkpoint:<28} {p.level:<13} {p.parent or '-':<28} "
                   f"{p.completed:<26} {p.consistency:<12} {disks}")
