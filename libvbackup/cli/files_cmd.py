"""List a directory of a backup point's file system, as `ls -l` would.

The point's disk is opened read-only with its backing chain by libguestfs (an appliance that
boots once per command, some seconds) and one file system mounted: the disk's only one, or the
one --fs names when it holds several (libguestfs names the disk /dev/sda: a whole-disk file
system is /dev/sda, partitions /dev/sda1, ...). PATH defaults to /; a PATH that is not a
directory is listed alone. Columns: mode, owner uid:gid, size, modification time (UTC), name
(-> target for a symlink). --json gives typed entries (type, mode, size, mtime, uid, gid, target).

Examples:

\b
  libvbackup files vm1 --repo /backups --disk vda /etc
  libvbackup files vm1 --repo /backups --checkpoint CHK --disk vdb --fs /dev/sda1 /
  libvbackup files vm1 --repo /backups --disk vda /var/log --json
"""

from __future__ import annotations

import time
from typing import Optional

import typer

from .. import api
from .common import JsonOpt, RepoOpt, complete_checkpoint, complete_vm
from .output import emit_json, repo_path

CheckpointOpt = typer.Option(None, "--checkpoint", metavar="NAME", autocompletion=complete_checkpoint,
                             help="Backup point [default: the newest].")
DiskOpt = typer.Option(None, "--disk", "-d", metavar="TARGET", help="The disk (needed when the point has several).")
FsOpt = typer.Option(None, "--fs", metavar="DEVICE",
                     help="The file system, when the disk holds several (e.g. /dev/sda1).")


def files(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM the backups belong to.",
                             autocompletion=complete_vm),
    path: str = typer.Argument("/", metavar="[PATH]", help="Directory (or file) in the guest's file system."),
    repo: Optional[str] = RepoOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    disk: Optional[str] = DiskOpt,
    fs: Optional[str] = FsOpt,
    json_out: bool = JsonOpt,
) -> None:
    r = api.files(vm, repo=repo_path(repo), checkpoint=checkpoint, disk=disk, path=path, fs=fs)
    if json_out:
        emit_json(r.to_dict())
        return
    typer.echo(f"{r.path} in {r.filesystem} ({r.fstype}) of {vm}'s disk {r.disk} at {r.checkpoint}: "
               f"{len(r.entries)} entr{'y' if len(r.entries) == 1 else 'ies'}")
    owners = [f"{e.uid}:{e.gid}" for e in r.entries]
    ow = max((len(o) for o in owners), default=0)
    sw = max((len(str(e.size)) for e in r.entries), default=0)
    for e, owner in zip(r.entries, owners):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.mtime))
        name = e.name + (f" -> {e.target}" if e.type == "symlink" else "/" if e.type == "dir" else "")
        typer.echo(f"{e.mode_text()} {owner:<{ow}} {e.size:>{sw}} {when} {name}")
