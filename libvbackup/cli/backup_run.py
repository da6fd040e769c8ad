"""The pull and push commands once their arguments are parsed: options to a library call, the
result to text or JSON. Free of typer: ``fastpath`` calls ``dispatch`` without it, the typer
command in ``pull`` with it; both pass the same keyword arguments."""

from __future__ import annotations

from .. import api
from ..errors import UsageError
from ..plan import parse_size
from .output import as_list, echo, emit_json, human, progress_mode, render_report, repo_path, vm_line


def dispatch(mode: str, *, vms, repo, incremental, level, checkpoint, disk, exclude, scratch_dir, scratch_limit,
             quiesce, uri, nbd_address, nbd_port, tls_dir, no_tls, dry_run, compress, progress, jobs, all_vms,
             json_out) -> None:
    """One VM, or several at once (--all, --jobs, more than one name: one report at the end)."""
    if all_vms or jobs is not None or len(vms or ()) != 1:
        return run_many(mode=mode, vms=vms or [], all_vms=all_vms, jobs=jobs, repo=repo, level=level,
                        scratch_dir=scratch_dir, uri=uri, dry_run=dry_run, json_out=json_out, quiesce=quiesce,
                        compress=compress,
                        per_vm=dict(incremental=incremental, checkpoint=checkpoint, disk=disk, exclude=exclude,
                                    scratch_limit=scratch_limit, nbd_address=nbd_address, nbd_port=nbd_port,
                                    tls_dir=tls_dir, no_tls=no_tls))
    run(mode=mode, vm=vms[0], repo=repo, incremental=incremental, level=level, checkpoint=checkpoint,
        disk=disk, exclude=exclude, scratch_dir=scratch_dir, scratch_limit=scratch_limit, uri=uri,
        dry_run=dry_run, progress=progress, json_out=json_out, quiesce=quiesce, nbd_address=nbd_address,
        nbd_port=nbd_port, tls_dir=tls_dir, no_tls=no_tls, compress=compress)


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
        echo(f"libvbackup: warning: the point is crash-consistent only: {result.consistency_note}", err=True)
    if json_out:
        emit_json(result.to_dict())
        return
    if result.fallback_reason:
        echo(f"note: {result.fallback_reason}", err=True)
    for name in result.redefined:
        what = "would be redefined" if dry_run else "redefined"
        echo(f"note: checkpoint {name} {what} in libvirt from the repository", err=True)
    if dry_run:
        echo(f"# plan: {result.level} backup of {vm}, new checkpoint {result.checkpoint}"
                   + (f", since {result.parent}" if result.parent else ""))
        echo("#   quiesce: freeze the guest's file systems while the job begins" if result.consistency == "quiesced"
                   else f"#   crash-consistent: {result.consistency_note}")
        for name in result.redefined:
            echo(f"#   first: redefine checkpoint {name} from the repository")
        for d in result.disks.values():
            echo(f"#   {d.name}: {d.mode}" + (f" ({d.reason})" if d.reason else ""))
        echo("# <domainbackup> for virDomainBackupBegin:")
        echo(result.backup_xml, nl=False)
        echo("# <domaincheckpoint>:")
        echo(result.checkpoint_xml, nl=False)
        return
    since = f" since {result.parent}" if result.parent else ""
    echo(f"{result.level} {mode} backup {result.checkpoint} of {vm}{since} done in {result.seconds:.1f} s")
    if result.consistency == "quiesced":
        echo(f"  quiesced: guest file systems frozen for {result.frozen_seconds:.3f} s")
    else:
        echo(f"  crash-consistent: {result.consistency_note}")
    for d in result.disks.values():
        note = f"  [{d.mode}: {d.reason}]" if d.reason else f"  [{d.mode}]"
        stored = (f", {human(d.stored_bytes)} stored ({d.compression})" if d.compression and d.stored_bytes is not None
                  else "")
        echo(f"  {d.name}: {human(d.bytes_copied)} copied, {human(d.bytes_zeroed)} zeroed{stored} -> "
                   f"{d.image}{note}")
