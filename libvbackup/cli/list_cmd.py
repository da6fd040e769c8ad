"""List the backup points of a VM in a repository, oldest first.

Each point is named by the checkpoint it created; PARENT is the point it was taken from
(empty for a full backup).
CONSISTENCY is 'quiesced' when the guest's file systems were frozen at that point.
DISKS gives each disk's bytes copied, and for a compressed image (pull --compress) its
compression and the bytes it takes in the repository.

Examples:

\b
  libvbackup list vm1 --repo /backups
  libvbackup list vm1 --repo /backups --json
"""

from __future__ import annotations

from typing import Optional

import typer

from .. import api
from .common import KeyFileOpt, NoEncryptOpt, S3EndpointOpt, JsonOpt, RepoOpt, complete_vm
from .output import emit_json, human, repo_path


def list_(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM.", autocompletion=complete_vm),
    repo: str = RepoOpt,
    key_file: Optional[str] = KeyFileOpt,
    s3_endpoint: Optional[str] = S3EndpointOpt,
    no_encrypt: bool = NoEncryptOpt,
    json_out: bool = JsonOpt,
) -> None:
    result = api.list_points(vm, repo=repo_path(repo), key_file=key_file, s3_endpoint=s3_endpoint,
                             no_encrypt=no_encrypt)
    if json_out:
        emit_json(result.to_dict())
        return
    if not result.points:
        typer.echo(f"no backup points of {vm} in {result.repo}")
        return
    typer.echo(f"{'CHECKPOINT':<28} {'LEVEL':<13} {'PARENT':<28} {'COMPLETED':<26} {'CONSISTENCY':<12} DISKS")
    for p in result.points:
        disks = ", ".join(f"{n} {human(d.bytes_copied)}" + (
            f" ({d.compression}, {human(d.stored_bytes)} stored)" if d.compression and d.stored_bytes is not None
            else "") for n, d in p.disks.items())
        typer.echo(f"{p.checkpoint:<28} {p.level:<13} {p.parent or '-':<28} "
                   f"{p.completed:<26} {p.consistency:<12} {disks}")
