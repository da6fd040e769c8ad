"""Copy files and directory trees out of a backup point's file system.

Each PATH goes to DIR/<its name> (the whole tree under a directory; / puts the file system's
contents into DIR itself), with its mode, owner and modification time; symlinks are
recreated as symlinks, never followed; device nodes, fifos and sockets are skipped (and named).
DIR is created when missing (0700). Nothing that exists is overwritten unless --force (which
replaces files and merges into directories); if extract fails, what it wrote is removed. The
disk and file system are chosen as for `libvbackup files`: --disk when the point has several,
--fs when the disk holds several file systems.

Examples:

\b
  libvbackup extract vm1 --repo /backups --disk vda /etc/fstab /home/alice --output /srv/out
  libvbackup extract vm1 --repo /backups --checkpoint CHK --disk vda / --output /srv/vm1-root
  libvbackup extract vm1 --repo /backups --disk vdb /data --output /srv/out --force --json
"""

from __future__ import annotations

from typing import List, Optional

import typer

from .. import api
from .common import JsonOpt, ProgressOpt, RepoOpt, complete_vm
from .output import emit_json, human, progress_mode, repo_path
from .files_cmd import CheckpointOpt, DiskOpt, FsOpt


def extract(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM the backups belong to.",
                             autocompletion=complete_vm),
    paths: List[str] = typer.Argument(..., metavar="PATH...", help="Files or directories in the guest's file system."),
    output: str = typer.Option(..., "--output", "-o", metavar="DIR", help="Where they go (created when missing)."),
    repo: Optional[str] = RepoOpt,
    checkpoint: Optional[str] = CheckpointOpt,
    disk: Optional[str] = DiskOpt,
    fs: Optional[str] = FsOpt,
    force: bool = typer.Option(False, "--force", help="Replace files that exist in DIR; merge into its directories."),
    progress: str = ProgressOpt,
    json_out: bool = JsonOpt,
) -> None:
    r = api.extract(vm, repo=repo_path(repo), paths=paths, output=output, checkpoint=checkpoint, disk=disk, fs=fs,
                    force=force, progress=progress_mode(progress, json_out))
    if json_out:
        emit_json(r.to_dict())
        return
    typer.echo(f"extracted from {r.filesystem} ({r.fstype}) of {vm}'s disk {r.disk} at {r.checkpoint} into "
               f"{r.output}: {r.files} files ({human(r.bytes)}), {r.directories} directories, {r.symlinks} symlinks "
               f"in {r.seconds:.1f} s")
    for p in r.written:
        typer.echo(f"  {p}")
    if r.skipped:
        typer.echo(f"skipped (device nodes, fifos, sockets): {', '.join(r.skipped)}", err=True)
