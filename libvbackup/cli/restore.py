"""Restore a backup point: one standalone image per disk, as the disk was at that point.

Writes OUTPUT/<disk>.<format> (e.g. OUTPUT/vda.qcow2) for every disk of the point, or the
ones named with --disk. OUTPUT must be new or empty. The images have no backing file: they
can be booted, attached or copied anywhere.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from ..restore import restore as restore_op
from .common import JsonOpt, ProgressOpt, RepoOpt, as_list, emit_json, progress_mode, repo_path


def restore(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM the backups belong to."),
    output: str = typer.Option(..., "--output", "-o", metavar="DIR", help="Directory for the images (new or empty)."),
    repo: Optional[str] = RepoOpt,
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", metavar="NAME", help="Backup point to restore [default: the newest]."
    ),
    fmt: str = typer.Option("qcow2", "--format", "-f", metavar="qcow2|raw", help="Image format of the output."),
    disk: Optional[List[str]] = typer.Option(None, "--disk", "-d", metavar="TARGET", help="Restore only this disk; repeatable."),
    progress: str = ProgressOpt,
    json_out: bool = JsonOpt,
) -> None:
    result = restore_op(vm, repo=repo_path(repo), output=output, checkpoint=checkpoint, fmt=fmt, disks=as_list(disk),
                        progress=progress_mode(progress, json_out))
    if json_out:
        emit_json(result.to_dict())
        return
    typer.echo(f"restored {vm} at {result.checkpoint}:")
    for name, d in result.disks.items():
        typer.echo(f"  {name}: {d.path}")
