"""Take a pull-mode backup of a VM, running or shut off.

Without --incremental, a full backup: every allocated byte of each disk is copied. With
--incremental CHK, only what changed since checkpoint CHK: the previous point gives an
incremental, an older one a differential. Either way a new libvirt checkpoint is created
(named by --checkpoint, or lvb-<repository tag>-<UTC time>); it names the new backup point.

Raw-format disks cannot hold dirty bitmaps: they are copied in full every time.

A shut-off VM is backed up from its disk images, in the same chain (an incremental reads the
persistent bitmap of its parent checkpoint); starting it meanwhile is refused by QEMU's image
lock. Push mode needs the VM running.

Examples:

\b
  libvbackup pull vm1 --repo /backups                     # a full backup
  libvbackup pull vm1 --repo /backups --level auto        # incremental when it can be
  libvbackup pull vm1 --repo /backups --incremental CHK --quiesce yes --json
  libvbackup pull vm1 vm2 vm3 --repo /backups --level auto --jobs 2
"""

from __future__ import annotations

from typing import List, Optional

import typer

from .backup_run import dispatch
from .common import JsonOpt, ProgressOpt, RepoOpt, UriOpt, complete_checkpoint, complete_vm


SCRATCH_HELP = {
    "pull": "Where QEMU keeps the old data of guest writes during the backup [default: /var/tmp].",
    "push": "Where QEMU writes the images before they are moved into the repository "
            "[default: /var/tmp]; best on the repository's file system.",
}


def backup_command(mode: str, doc: str):
    """The pull and push commands: one signature, the mode bound here."""

    def command(
        vms: Optional[List[str]] = typer.Argument(
            None, metavar="VM...", autocompletion=complete_vm,
            help="Name of the libvirt domain (pull: running or shut off; push: running); several are "
                 "backed up at once (--jobs), one report at the end."),
        repo: Optional[str] = RepoOpt,
        incremental: Optional[str] = typer.Option(
            None, "--incremental", "-i", metavar="CHECKPOINT", autocompletion=complete_checkpoint,
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
            help=SCRATCH_HELP[mode],
        ),
        scratch_limit: Optional[str] = typer.Option(
            None, "--scratch-limit", metavar="SIZE",
            help="Abort the backup (never the guest) when guest writes put more than SIZE (e.g. 10G) "
                 "into the scratch images. The backup is also aborted when less than 256 MiB is left "
                 "on the scratch file system.",
        ),
        quiesce: str = typer.Option(
            "auto", "--quiesce", metavar="auto|yes|no",
            help="Freeze the guest's file systems through its agent while the backup job begins "
                 "(held for well under a second): auto = when an agent is connected, else warn and "
                 "take a crash-consistent point; yes = refuse without an agent; no = never.",
        ),
        uri: Optional[str] = UriOpt,
        nbd_address: Optional[str] = typer.Option(
            None, "--nbd-address", metavar="ADDR",
            help="Pull from a remote libvirt: the address the NBD export listens on, reachable from "
                 "here [default: the host of --uri].",
        ),
        nbd_port: Optional[str] = typer.Option(
            None, "--nbd-port", metavar="PORT|LOW-HIGH",
            help="TCP port(s) for a remote export: the first free one is used [default: 10809-10909].",
        ),
        tls_dir: Optional[str] = typer.Option(
            None, "--tls-dir", metavar="DIR",
            help="Client certificate for a remote export over TLS: ca-cert.pem, client-cert.pem, "
                 "client-key.pem [default: /etc/pki/qemu].",
        ),
        no_tls: bool = typer.Option(
            False, "--no-tls", help="A remote export in plain TCP (guest data unencrypted: trusted networks only).",
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="Print the plan and the XML that would be passed to libvirt; start nothing.",
        ),
        compress: bool = typer.Option(
            False, "--compress",
            help="Pull: compress the image's clusters (zstd, else zlib), each on its own; what does not "
                 "compress is stored as it is. Costs CPU (about 190 MiB/s per core here), saves room.",
        ),
        progress: str = ProgressOpt,
        jobs: Optional[int] = typer.Option(
            None, "--jobs", "-j", metavar="N", help="With several VMs (or --all): how many at once [default: 2].",
        ),
        all_vms: bool = typer.Option(False, "--all", help="Every VM of the libvirt at --uri."),
        json_out: bool = JsonOpt,
    ) -> None:
        dispatch(mode, vms=vms, repo=repo, incremental=incremental, level=level, checkpoint=checkpoint, disk=disk,
                 exclude=exclude, scratch_dir=scratch_dir, scratch_limit=scratch_limit, quiesce=quiesce, uri=uri,
                 nbd_address=nbd_address, nbd_port=nbd_port, tls_dir=tls_dir, no_tls=no_tls, dry_run=dry_run,
                 compress=compress, progress=progress, jobs=jobs, all_vms=all_vms, json_out=json_out)

    command.__doc__ = doc
    command.__name__ = mode
    return command


pull = backup_command("pull", __doc__)
