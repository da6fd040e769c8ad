"""Copy backup points off-site, to S3-compatible object storage, encrypted on this host.

Sends the completed points of each VM from the local repository (--repo DIR) to --to
s3://BUCKET/PREFIX, oldest first, each only when the bucket lacks it. A point becomes visible
in the bucket only once all its objects are there (its point object is written last); a copy
that was interrupted (killed, network down) resumes without sending again what is complete.
Images and checksums are cut into 8 MiB frames, each sealed with AES-256-GCM under --key-file
(a changed, swapped or truncated object is detected); object names carry VM, checkpoint and
disk names, never guest data. --no-encrypt stores plain qcow2 objects instead.

The bucket is then a repository of its own: list, restore, verify and prune take
--repo s3://BUCKET/PREFIX with the same --key-file, and read it alone (restore reads by
ranges, never a whole image first). Endpoint and credentials are found as boto3 finds them
($AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, $AWS_PROFILE;
$AWS_ENDPOINT_URL or --s3-endpoint for a non-AWS store); HTTPS endpoints are verified.

Examples:

\b
  (umask 077; head -c 32 /dev/urandom > /root/offsite.key)   # once; keep a copy elsewhere
  libvbackup copy vm1 --repo /backups --to s3://backups/site1 --key-file /root/offsite.key
  libvbackup copy --all --repo /backups --to s3://backups/site1 --key-file /root/offsite.key --dry-run
  libvbackup list vm1 --repo s3://backups/site1 --key-file /root/offsite.key
  libvbackup restore vm1 --repo s3://backups/site1 --key-file /root/offsite.key --output /srv/vm1
"""

from __future__ import annotations

from typing import List, Optional

import typer

from .. import api
from .common import JsonOpt, KeyFileOpt, NoEncryptOpt, ProgressOpt, RepoOpt, S3EndpointOpt, complete_vm
from .output import emit_json, human, progress_mode, repo_path


def copy(
    vms: Optional[List[str]] = typer.Argument(None, metavar="VM...", help="VMs whose points to copy.",
                                              autocompletion=complete_vm, show_default=False),
    to: str = typer.Option(..., "--to", metavar="s3://BUCKET/PREFIX", help="The bucket (and prefix) to copy to."),
    all_vms: bool = typer.Option(False, "--all", help="Every VM of the repository."),
    repo: Optional[str] = RepoOpt,
    key_file: Optional[str] = KeyFileOpt,
    s3_endpoint: Optional[str] = S3EndpointOpt,
    no_encrypt: bool = NoEncryptOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be sent; send nothing."),
    progress: str = ProgressOpt,
    json_out: bool = JsonOpt,
) -> None:
    r = api.copy(list(vms or ()), repo=repo_path(repo), to=to, all_vms=all_vms, key_file=key_file,
                 s3_endpoint=s3_endpoint, no_encrypt=no_encrypt, dry_run=dry_run,
                 progress=progress_mode(progress, json_out))
    if json_out:
        emit_json(r.to_dict())
        return
    for p in r.points:
        sent = f", {human(p.bytes_sent)} sent" if p.state == "copied" else ""
        typer.echo(f"{p.vm} {p.checkpoint}: {p.state} ({human(p.bytes)}{sent})")
    if not r.dry_run:
        typer.echo(f"{human(r.bytes_sent)} sent to {r.to}")
