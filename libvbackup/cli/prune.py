"""Remove the backup points of a VM that no retention rule keeps.

\b
Rules, as in borg prune, applied in this order; each walks the points newest first
by completion time, with days, weeks, months and years in local time:
  --keep-last N      the newest N points (--keep N is the same)
  --keep-daily N     the newest point of each of the N newest days that hold one
  --keep-weekly N    the same per ISO week (Monday to Sunday)
  --keep-monthly N   the same per month
  --keep-yearly N    the same per year

A period whose newest point an earlier rule already keeps is used up without counting. A rule
that runs out of points before keeping N also keeps the oldest point. The newest point is
always kept; give at least one rule. Every point no rule keeps is removed.

The kept points stay restorable byte for byte: a kept point whose parent goes is rebased onto
its nearest kept ancestor (qemu-img's safe rebase: its content does not change), or made
self-contained when none is kept. The removed points' images and their libvirt checkpoints
are deleted; checkpoints made by other tools are never touched. --dry-run shows each point,
kept (and why) or removed, and the rebases.

\b
Examples:
  libvbackup prune vm1 --repo /backups --keep 7
  libvbackup prune vm1 --repo /backups --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run
  libvbackup prune vm1 --repo /backups --keep-last 3 --keep-monthly 12 --keep-yearly 5 --json
"""

from __future__ import annotations

from typing import Optional

import typer

from .. import api
from .common import KeyFileOpt, NoEncryptOpt, S3EndpointOpt, JsonOpt, RepoOpt, UriOpt, complete_vm
from .output import emit_json, repo_path


def _keep(name: str, what: str, *aliases: str) -> typer.models.OptionInfo:
    return typer.Option(0, f"--keep-{name}", *aliases, metavar="N", show_default=False, help=what)


def prune(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM.", autocompletion=complete_vm),
    last: int = _keep("last", "Keep the newest N points.", "--keep", "-k"),
    daily: int = _keep("daily", "Keep the newest point of each of the N newest days."),
    weekly: int = _keep("weekly", "Keep the newest point of each of the N newest ISO weeks."),
    monthly: int = _keep("monthly", "Keep the newest point of each of the N newest months."),
    yearly: int = _keep("yearly", "Keep the newest point of each of the N newest years."),
    repo: Optional[str] = RepoOpt,
    uri: Optional[str] = UriOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be kept (and why), rebased and removed."),
    key_file: Optional[str] = KeyFileOpt,
    s3_endpoint: Optional[str] = S3EndpointOpt,
    no_encrypt: bool = NoEncryptOpt,
    json_out: bool = JsonOpt,
) -> None:
    r = api.prune(vm, repo=repo_path(repo), keep_last=last, keep_daily=daily, keep_weekly=weekly,
                  keep_monthly=monthly, keep_yearly=yearly, uri=uri, dry_run=dry_run,
                  key_file=key_file, s3_endpoint=s3_endpoint, no_encrypt=no_encrypt)
    if json_out:
        emit_json(r.to_dict())
        return
    prefix = "would " if dry_run else ""
    width = max((len(name) for name in r.completed), default=0)
    for name, completed in r.completed.items():
        state = f"{prefix}keep" if name in r.reasons else f"{prefix}remove"
        why = f"  ({r.reasons[name]})" if name in r.reasons else ""
        typer.echo(f"{state:<12} {name:<{width}}  {completed or '-'}{why}")
    for image, backing in r.rebase.items():
        onto = f"onto {backing}" if backing else "onto nothing (self-contained)"
        typer.echo(f"{prefix}rebase {image} {onto}")
    typer.echo(f"{prefix}keep {len(r.keep)}, remove {len(r.remove)} point(s) [{r.policy}]")
    if r.checkpoints_deleted:
        typer.echo(f"deleted checkpoints: {', '.join(r.checkpoints_deleted)}")
    for w in r.warnings:
        typer.echo(f"warning: {w}", err=True)
