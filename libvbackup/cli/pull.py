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

from .. import api
from ..errors import UsageError
from ..plan import parse_size
from .common import (JsonOpt, ProgressOpt, RepoOpt, UriOpt, as_list, complete_checkpoint, complete_vm, emit_json, human,
                     progress_mode, repo_path)
from .run_cmd import render_report, vm_line


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
        if all_vms or jobs is not None or len(vms or ()) != 1:
            return run_many(mode=mode, vms=vms or [], all_vms=all_vms, jobs=jobs, repo=repo, level=level,
                            scratch_dir=scratch_dir, uri=uri, dry_run=dry_run, json_out=json_out, quiesce=quiesce,
                            compress=compress,
                            per_vm=dict(incremental=incremental, checkpoint=checkpoint, disk=disk, exclude=exclude,
                                        scratch_limit=scratch_limit, nbd_address=nbd_address, nbd_port=nbd_port,
                                        tls_dir=tls_dir, no_tls=no_tls))
        vm = vms[0]
        run(mode=mode, vm=vm, repo=repo, incremental=incremental, level=level, checkpoint=checkpoint,
            disk=disk, exclude=exclude, scratch_dir=scratch_dir, scratch_limit=scratch_limit, uri=uri,
            dry_run=dry_run, progress=progress, json_out=json_out, quiesce=quiesce, nbd_address=nbd_address,
            nbd_port=nbd_port, tls_dir=tls_dir, no_tls=no_tls, compress=compress)

    command.__doc__ = doc
    command.__name__ = mode
    return command


pull = backup_command("pull", __doc__)

PER_VM = {"incremental": "--incremental", "checkpoint": "--checkpoint", "disk": "--disk", "exclude": "--exclude",
          "scratch_limit": "--scratch-limit", "nbd_address": "--nbd-address", "nbd_port": "--nbd-port",
          "tls_dir": "--tls-dir", "no_tls": "--no-tls"}


def run_many(*, mode: str, vms: list[str], all_vms: bool, jobs, repo, level, scratch_dir, uri, dry_run, json_out,
             quiesce, per_vm: dict, compress: bool = False) -> None:
    """Several VMs at once: the options to keyword arguments, the report to text or JSON."""
    if compress and mode != "pull":
        raise UsageError("--compress is for pull backups: in push mode QEMU writes the images")
    given = [PER_VM[k] for k, v in per_vm.items() if v]
    if given:
        raise UsageError(f"{', '.join(given)} name(s) one VM's checkpoints, disks or export: back up one VM "
                         "at a time with it")
    report = api.backup_many(vms, all_vms=all_vms, repo=repo_path(repo), mode=mode, uri=uri, level=level,
                             quiesce=quiesce, scratch_dir=scratch_dir, jobs=2 if jobs is None else jobs,
                             dry_run=dry_run, on_vm=None if json_out else vm_line, compress=compress)
    render_report(report, json_out)


def run(*, mode: str, vm: str, repo, incremental, level, checkpoint, disk, exclude, scratch_dir,
        scratch_limit, uri, dry_run, progress, json_out, quiesce="auto", nbd_address=None, nbd_port=None,
        tls_dir=None, no_tls=False, compress=False) -> None:
    """Shared by pull and push: options to keyword arguments, the result to text or JSON."""
    op = api.pull if mode == "pull" else api.push
    if compress and mode != "pull":
        raise UsageError("--compress is for pull backups: in push mode QEMU writes the images",
                         "use pull, or compress a point later with qemu-img convert -c")
    extra = {"compress": True} if compress else {}
    result = op(vm, repo=repo_path(repo), uri=uri, checkpoint=checkpoint, incremental=incremental, level=level,
                disks=as_list(disk), exclude=as_list(exclude), scratch_dir=scratch_dir, dry_run=dry_run,
                progress=progress_mode(progress, json_out),
                scratch_limit=parse_size(scratch_limit) if scratch_limit else None, quiesce=quiesce,
                nbd_address=nbd_address, nbd_port=nbd_port, tls_dir=tls_dir, tls=not no_tls, **extra)
    if quiesce == "auto" and not dry_run and result.consistency == "crash":
        typer.echo(f"libvbackup: warning: the point is crash-consistent only: {result.consistency_note}", err=True)
    if json_out:
        emit_json(result.to_dict())
        return
    if result.fallback_reason:
        typer.echo(f"note: {result.fallback_reason}", err=True)
    for name in result.redefined:
        what = "would be redefined" if dry_run else "redefined"
        typer.echo(f"note: checkpoint {name} {what} in libvirt from the repository", err=True)
    if dry_run:
        typer.echo(f"# plan: {result.level} backup of {vm}, new checkpoint {result.checkpoint}"
                   + (f", since {result.parent}" if result.parent else ""))
        typer.echo("#   quiesce: freeze the guest's file systems while the job begins" if result.consistency == "quiesced"
                   else f"#   crash-consistent: {result.consistency_note}")
        for name in result.redefined:
            typer.echo(f"#   first: redefine checkpoint {name} from the repository")
        for d in result.disks.values():
            typer.echo(f"#   {d.name}: {d.mode}" + (f" ({d.reason})" if d.reason else ""))
        typer.echo("# <domainbackup> for virDomainBackupBegin:")
        typer.echo(result.backup_xml, nl=False)
        typer.echo("# <domaincheckpoint>:")
        typer.echo(result.checkpoint_xml, nl=False)
        return
    since = f" since {result.parent}" if result.parent else ""
    typer.echo(f"{result.level} {mode} backup {result.checkpoint} of {vm}{since} done in {result.seconds:.1f} s")
    if result.consistency == "quiesced":
        typer.echo(f"  quiesced: guest file systems frozen for {result.frozen_seconds:.3f} s")
    else:
        typer.echo(f"  crash-consistent: {result.consistency_note}")
    for d in result.disks.values():
        note = f"  [{d.mode}: {d.reason}]" if d.reason else f"  [{d.mode}]"
        stored = (f", {human(d.stored_bytes)} stored ({d.compression})" if d.compression and d.stored_bytes is not None
                  else "")
        typer.echo(f"  {d.name}: {human(d.bytes_copied)} copied, {human(d.bytes_zeroed)} zeroed{stored} -> "
                   f"{d.image}{note}")
