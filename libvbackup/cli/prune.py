"""Keep the newest N backup points of a VM and remove the older ones.

The kept points stay restorable byte for byte: a kept point whose parent is removed is made
self-contained first (its images rebased onto nothing). The removed points' images and their
libvirt checkpoints are deleted; checkpoints made by other tools are never touched.
"""

from __future__ import annotations

from typing import Optional

import typer

from ..prune import prune as prune_op
from .common import JsonOpt, RepoOpt, UriOpt, emit_json, repo_path


def prune(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM."),
    keep: int = typer.Option(..., "--keep", "-k", metavar="N", help="How many of the newest points to keep."),
    repo: Optional[str] = RepoOpt,
    uri: Optional[str] = UriOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be kept, flattened and removed."),
    json_out: bool = JsonOpt,
) -> None:
    r = prune_op(vm, repo=repo_path(repo), keep=keep, uri=uri, dry_run=dry_run)
    if json_out:
        emit_json(r.to_dict())
        return
    prefix = "would " if dry_run else ""
    typer.echo(f"{prefix}keep: {', '.join(r.keep) or '-'}")
    typer.echo(f"{prefix}flatten: {', '.join(r.flatten) or '-'}")
    typer.echo(f"{prefix}remove: {', '.join(r.remove) or '-'}")
    if r.checkpoints_deleted:
        typer.echo(f"deleted checkpoints: {', '.join(r.checkpoints_deleted)}")
    for w in r.warnings:
        typer.echo(f"warning: {w}", err=True)
