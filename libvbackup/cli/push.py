"""Take a push-mode backup of a running VM: QEMU writes the backup images itself.

Same points, chains and options as pull: the images land in the same repository (an
incremental image's backing file is its parent's image, pull or push alike). libvbackup
creates each target image beforehand so that it keeps that backing file, waits for the job
with progress, then moves the images into the repository. A failed or cancelled push leaves
no point and no partial image.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from .common import JsonOpt, RepoOpt, UriOpt
from .pull import run


def push(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the libvirt domain (must be running)."),
    repo: Optional[str] = RepoOpt,
    incremental: Optional[str] = typer.Option(
        None, "--incremental", "-i", metavar="CHECKPOINT",
        help="Copy only what changed since this earlier checkpoint of the VM.",
    ),
    level: Optional[str] = typer.Option(
        None, "--level", "-l", metavar="full|inc|diff|auto",
        help="Instead of --incremental: inc = since the newest point, diff = since the newest full "
             "point, auto = inc when the chain is usable, else full (says why), full.",
    ),
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", metavar="NAME", help="Name of the new checkpoint [default: lvb-<repository tag>-<UTC time>].",
    ),
    disk: Optional[List[str]] = typer.Option(
        None, "--disk", "-d", metavar="TARGET", help="Back up only this disk (e.g. vda); repeatable.",
    ),
    exclude: Optional[List[str]] = typer.Option(
        None, "--exclude", "-x", metavar="TARGET", help="Leave this disk out; repeatable.",
    ),
    scratch_dir: Optional[str] = typer.Option(
        None, "--scratch-dir", metavar="DIR",
        help="Where QEMU writes the images before they are moved into the repository "
             "[default: /var/tmp]; best on the repository's file system.",
    ),
    scratch_limit: Optional[str] = typer.Option(
        None, "--scratch-limit", metavar="SIZE",
        help="Abort the backup (never the guest) when guest writes put more than SIZE (e.g. 10G) "
             "into the scratch images. The backup is also aborted when less than 256 MiB is left "
             "on the scratch file system.",
    ),
    uri: Optional[str] = UriOpt,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and the XML that would be passed to libvirt; start nothing.",
    ),
    progress: str = typer.Option(
        "auto", "--progress", metavar="auto|bar|plain|none",
        help="Progress on stderr: a bar on a terminal (auto), periodic lines (plain), or none.",
    ),
    json_out: bool = JsonOpt,
) -> None:
    run(mode="push", **locals())
