"""Restore a backup point: the disks as images, as a new VM, or back into a shut-off VM.

With --output DIR, writes DIR/<disk>.<format> (e.g. DIR/vda.qcow2) for every disk of the
point, or the ones named with --disk. DIR must be new or empty. The images have no backing
file: they can be booted, attached or copied anywhere.

With --define NAME (and --output DIR), the images are the disks of a new domain NAME defined
from the domain XML saved with the point: new UUID, new MAC addresses, no checkpoints; with
--start it is started too. A writable disk the point does not hold is left out of it.

With --in-place --yes, the VM itself must be shut off: each of its disk files is replaced by
the point's data (written beside it first, then renamed over it, owner and mode kept), and its
libvirt checkpoints are dropped, so that its next backup is a full one.

With --instant --define NAME --output DIR, NAME starts within seconds whatever the disk size:
its disks are new qcow2 overlays in DIR whose backing is the point's chain, served read-only
over NBD by libvbackup's qemu-nbd (the repository stays root's). The guest's writes go to the
overlays; prune keeps the points it reads until 'libvbackup finalize NAME' pulls them into the
overlays while it runs. --no-start only defines it.

Examples:

\b
  libvbackup restore vm1 --output /srv/restore/vm1
  libvbackup restore vm1 --checkpoint CHK --output /var/lib/libvirt/images/vm1-copy --define vm1-copy --start
  libvbackup restore vm1 --checkpoint CHK --in-place --yes
  libvbackup restore vm1 --checkpoint CHK --instant --define vm1-now --output /var/lib/libvirt/images/vm1-now
"""

from __future__ import annotations

from typing import List, Optional

import typer

from .. import api
from ..outcomes import DefinedResult, InPlaceResult, InstantResult
from .common import (KeyFileOpt, NoEncryptOpt, S3EndpointOpt, JsonOpt, ProgressOpt, RepoOpt, UriOpt, complete_checkpoint,
                     complete_vm)
from .output import as_list, emit_json, progress_mode, repo_path


def restore(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM the backups belong to.",
                             autocompletion=complete_vm),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="DIR",
                                         help="Directory for the images (new or empty)."),
    repo: Optional[str] = RepoOpt,
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", metavar="NAME", autocompletion=complete_checkpoint,
        help="Backup point to restore [default: the newest].",
    ),
    fmt: str = typer.Option("qcow2", "--format", "-f", metavar="qcow2|raw", help="Image format of the output."),
    compress: bool = typer.Option(False, "--compress",
                                  help="qcow2 --output images with compressed clusters (zstd, else zlib)."),
    disk: Optional[List[str]] = typer.Option(None, "--disk", "-d", metavar="TARGET", help="Restore only this disk; repeatable."),
    define: Optional[str] = typer.Option(None, "--define", metavar="NAME",
                                         help="Define a new VM NAME on the restored images (needs --output)."),
    start: Optional[bool] = typer.Option(None, "--start/--no-start", show_default=False,
                                         help="With --define: start the new VM [default: only with --instant]."),
    instant: bool = typer.Option(False, "--instant",
                                 help="With --define: run the VM at once on overlays of the point (see above)."),
    in_place: bool = typer.Option(False, "--in-place",
                                  help="Write the point back into the disk files of the shut-off VM (needs --yes)."),
    yes: bool = typer.Option(False, "--yes", help="Confirm --in-place: the VM's current disk contents are replaced."),
    uri: Optional[str] = UriOpt,
    progress: str = ProgressOpt,
    key_file: Optional[str] = KeyFileOpt,
    s3_endpoint: Optional[str] = S3EndpointOpt,
    no_encrypt: bool = NoEncryptOpt,
    json_out: bool = JsonOpt,
) -> None:
    r = api.restore(vm, repo=repo_path(repo), key_file=key_file, s3_endpoint=s3_endpoint, no_encrypt=no_encrypt,
                    output=output, checkpoint=checkpoint, format=fmt, disks=as_list(disk),
                    define=define, start=start, in_place=in_place, confirm=yes, uri=uri,
                    progress=progress_mode(progress, json_out), instant=instant,
                    **({"compress": True} if compress else {}))
    if json_out:
        emit_json(r.to_dict())
    elif isinstance(r, InstantResult):
        _disks(f"VM {r.name} runs {vm} at {r.checkpoint} ({'started' if r.started else 'defined'} in "
               f"{r.seconds:.1f} s) on overlays of the repository:", {n: d.overlay for n, d in r.disks.items()})
        typer.echo(f"points in use until 'libvbackup finalize {r.name}': {', '.join(r.points)}")
    elif isinstance(r, InPlaceResult):
        _disks(f"restored {vm} in place at {r.checkpoint}:", r.disks)
        for name in r.left_alone:
            typer.echo(f"  {name}: left as it was (not in the point)")
        if r.checkpoints_dropped:
            typer.echo(f"checkpoints dropped: {', '.join(r.checkpoints_dropped)} (the next backup is a full one)")
    elif isinstance(r, DefinedResult):
        _disks(f"restored {vm} at {r.checkpoint} as VM {r.name} ({'started' if r.started else 'defined'}):", r.disks)
        for name in r.left_out:
            typer.echo(f"  {name}: left out (not in the point)")
    else:
        _disks(f"restored {vm} at {r.checkpoint}:", r.disks)


def _disks(title: str, disks: dict) -> None:
    typer.echo(title)
    for name, d in disks.items():
        typer.echo(f"  {name}: {getattr(d, 'path', d)}")
