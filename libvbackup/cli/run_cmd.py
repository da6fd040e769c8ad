"""Back up every VM that a policy of the configuration file names, a few at once.

The file is --config FILE, else $LIBVBACKUP_CONFIG, else /etc/libvbackup.toml (TOML). A VM (a
libvirt domain) takes the first [[policy]] whose match names it; VMs named on the command line
must be named by a policy. Each VM is backed up with its policy's settings over [defaults], then
pruned by the policy's keep_* rules, if it has any (as libvbackup prune --keep-*), then, with
copy_to, its new points are copied off-site (as libvbackup copy). One VM's failure never stops
the others.

\b
  [defaults]                # every key optional
  repo = "/var/lib/libvbackup"
  scratch_dir = "/var/tmp"
  uri = "qemu:///system"
  mode = "pull"             # pull | push
  level = "auto"            # full | inc | diff | auto
  quiesce = "auto"          # auto | yes | no
  jobs = 2                  # VMs backed up at once
  compress = false          # pull --compress
  copy_to = "s3://bucket/site1"    # copy off-site after each backup, with
  key_file = "/root/offsite.key"   #   this key (required with copy_to)
  s3_endpoint = "https://rgw.example:8443"
  [[policy]]
  match = "web-*"           # fnmatch pattern or exact name, or a list of them
  schedule = "daily"        # a hint shown in the report (the timer decides when)
  keep_last = 7             # also keep_daily, keep_weekly, keep_monthly, keep_yearly
  level = "full"            # any key of [defaults] but jobs; also disks, exclude = ["vdb"]

One line per VM as it finishes, then the total. Exit 0 when every VM succeeded; when only one VM
ran, its own exit code; else 10: some VMs failed (the report names them and their errors).
SIGINT/SIGTERM abort the running backups, which clean up, and start no other: exit 130/143.
--dry-run plans each backup (VM, policy, level, retention) and changes nothing. --json prints
the report as one JSON object, failed VMs included (format_version 1; vms: one object per VM
with ok, exit_code, error, checkpoint, level, bytes_copied, pruned).

\b
Examples:
  libvbackup run
  libvbackup run --dry-run
  libvbackup run web1 db1 --config /etc/libvbackup-weekly.toml --jobs 1 --json
"""

from __future__ import annotations

import signal
import sys
from typing import List, Optional

import typer

from .. import api
from ..results import RunReport, VmRun
from .common import JsonOpt, emit_json, human


def run(
    vms: Optional[List[str]] = typer.Argument(None, metavar="[VM]...",
                                              help="Only these VMs [default: every VM a policy names]."),
    config: Optional[str] = typer.Option(
        None, "--config", metavar="FILE",
        help="Configuration file [default: $LIBVBACKUP_CONFIG, else /etc/libvbackup.toml].",
    ),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", metavar="N",
                                       help="VMs backed up at once [default: jobs of [defaults], else 2]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan every backup, show it; change nothing."),
    json_out: bool = JsonOpt,
) -> None:
    report = api.run(config=config, vms=vms or (), jobs=jobs, dry_run=dry_run, on_vm=None if json_out else vm_line)
    render_report(report, json_out)


def render_report(report: RunReport, json_out: bool) -> None:
    """The report as JSON or as a total (the lines came with ``on_vm``), and the exit code."""
    if json_out:
        emit_json(report.to_dict())
    else:
        _total(report)
    if report.exit_code:
        # The report is the document on stdout (an error document would be a second one): the
        # one-line error goes to stderr, as for every command.
        sys.stderr.write(f"libvbackup: error: {_failure(report)}\n")
        sys.stdout.flush()
        raise SystemExit(report.exit_code)


def vm_line(r: VmRun) -> None:
    """One VM, as soon as it is done (``run`` and ``pull VM VM…``)."""
    if not r.ok:
        what = "cannot back up" if r.dry_run else "FAILED"
        typer.echo(f"{what} {r.vm} ({r.policy}): exit {r.exit_code}: {r.error}")
        return
    since = f" since {r.parent}" if r.parent else ""
    keep = f"retention {r.retention}" if r.retention else "no retention"
    if r.dry_run:
        auto = f" ({r.fallback_reason})" if r.fallback_reason else ""
        typer.echo(f"would back up {r.vm} with {r.policy}: {r.mode}, level {r.requested_level} -> {r.level}"
                   f"{since}{auto}, new checkpoint {r.checkpoint}; {keep}; repo {r.repo}"
                   + (f"; schedule {r.schedule}" if r.schedule else ""))
        return
    pruned = f", pruned {len(r.pruned)} ({keep})" if r.retention else ""
    offsite = (f", {len(r.copied)} point(s) copied to {r.copy_to} ({human(r.bytes_sent)} sent)"
               if r.copy_to else "")
    typer.echo(f"ok {r.vm}: {r.level} {r.mode} backup {r.checkpoint}{since}, {human(r.bytes_copied)} copied "
               f"in {r.seconds:.1f} s{pruned}{offsite}")
    if r.fallback_reason:
        typer.echo(f"  note: {r.fallback_reason}")
    for w in r.warnings:
        typer.echo(f"  warning: {w}")


def _total(report: RunReport) -> None:
    failed = sum(1 for r in report.vms if not r.ok)
    what = "planned" if report.dry_run else "backed up"
    typer.echo(f"total: {len(report.vms)} VM(s), {len(report.vms) - failed} {what}, {failed} failed "
               f"in {report.seconds:.1f} s ({report.jobs} at once, config {report.config})")


def _failure(report: RunReport) -> str:
    failed = [r for r in report.vms if not r.ok]
    if report.exit_code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        name = signal.Signals(report.exit_code - 128).name
        return f"interrupted by {name}: {len(failed)} of {len(report.vms)} VM(s) not backed up"
    if len(report.vms) == 1:
        return f"{failed[0].vm}: {failed[0].error}"
    return f"{len(failed)} of {len(report.vms)} VMs failed: " + ", ".join(
        f"{r.vm} (exit {r.exit_code})" for r in failed)
