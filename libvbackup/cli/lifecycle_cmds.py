"""checkpoints, status and abort: thin commands over libvbackup.api."""

from __future__ import annotations

from typing import Optional

import typer

from .. import api
from .common import JsonOpt, RepoOpt, UriOpt, complete_vm
from .output import emit_json, human, repo_path

VmArg = typer.Argument(..., metavar="VM", help="Name of the VM.", autocompletion=complete_vm)


def checkpoints(vm: str = VmArg, repo: Optional[str] = RepoOpt, uri: Optional[str] = UriOpt,
                json_out: bool = JsonOpt) -> None:
    """libvirt's checkpoints of a VM beside the repository's backup points.

    OWNER is 'point' (a backup point of this repository), 'orphan' (made for this repository
    but belonging to no point), 'other-repository' or 'foreign' (another tool's: never touched).
    Points whose checkpoint libvirt lost are listed at the end; the next incremental that needs
    them redefines them from the repository.

    Examples:

    \b
      libvbackup checkpoints vm1 --repo /backups
      libvbackup checkpoints vm1 --repo /backups --json
    """
    r = api.checkpoints(vm, repo=repo_path(repo), uri=uri)
    if json_out:
        emit_json(r.to_dict())
        return
    typer.echo(f"{'CHECKPOINT':<36} OWNER")
    for c in r.checkpoints:
        typer.echo(f"{c.name:<36} {c.owner}")
    for name in r.lost:
        typer.echo(f"{name:<36} lost by libvirt (point of this repository)")


def status(vm: str = VmArg, repo: Optional[str] = RepoOpt, uri: Optional[str] = UriOpt,
           json_out: bool = JsonOpt) -> None:
    """Show the backup running for a VM in this repository: process, bytes done, scratch in use.

    A run that died is shown as such; the next backup of the VM, or abort, cleans up after it.

    Examples:

    \b
      libvbackup status vm1 --repo /backups
      watch -n 5 libvbackup status vm1 --repo /backups
      libvbackup status vm1 --repo /backups --json
    """
    r = api.status(vm, repo=repo_path(repo), uri=uri)
    if json_out:
        emit_json(r.to_dict())
        return
    if not r.running and not r.stale:
        typer.echo(f"no backup of {vm} is running")
        return
    if r.running:
        typer.echo(f"{r.mode} backup {r.checkpoint} of {vm}: running (pid {r.pid or 'unknown'})")
    else:
        typer.echo(f"{r.mode} backup {r.checkpoint} of {vm}: died (the next run for this VM, or "
                   f"'libvbackup abort {vm}', cleans up after it)")
    if r.bytes_total:
        typer.echo(f"  {human(r.bytes_done or 0)} of {human(r.bytes_total)} copied")
    if r.scratch_used is not None:
        typer.echo(f"  scratch in use: {human(r.scratch_used)}")


def abort(vm: str = VmArg, repo: Optional[str] = RepoOpt, uri: Optional[str] = UriOpt,
          json_out: bool = JsonOpt) -> None:
    """Stop the running backup of a VM: its job is aborted and everything it made is removed.

    If the process that ran it is dead, finishes its clean-up instead (a guest it left frozen
    is thawed first). Only the process proven to hold the VM's lock is signalled.

    Examples:

    \b
      libvbackup abort vm1 --repo /backups
      libvbackup abort vm1 --repo /backups --json
    """
    r = api.abort(vm, repo=repo_path(repo), uri=uri)
    if json_out:
        emit_json(r.to_dict())
    elif r.cleaned_up:
        typer.echo(f"backup {r.aborted} of {vm} had died; cleaned up after it")
    else:
        typer.echo(f"backup {r.aborted} of {vm} aborted")
