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

from typing import List, Optional

import typer

from .. import api
from .common import JsonOpt
from .output import render_report, vm_line


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
