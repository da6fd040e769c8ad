"""Check that backup points are complete and unchanged since they were taken.

Re-reads every image of each point's chain and compares it, block by block, with the
checksums recorded at backup time; checks that every image exists and points at the right
backing file. Exits 9 when anything is missing or damaged, naming the points affected.

Examples:

\b
  libvbackup verify vm1 --repo /backups
  libvbackup verify vm1 --repo /backups --checkpoint CHK --json
"""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import VerifyError
from .. import api
from .common import KeyFileOpt, NoEncryptOpt, S3EndpointOpt, JsonOpt, RepoOpt, complete_checkpoint, complete_vm
from .output import emit_json, repo_path


def verify(
    vm: str = typer.Argument(..., metavar="VM", help="Name of the VM the backups belong to.",
                             autocompletion=complete_vm),
    repo: Optional[str] = RepoOpt,
    checkpoint: Optional[str] = typer.Option(
        None, "--checkpoint", metavar="NAME", autocompletion=complete_checkpoint,
        help="Verify only this point [default: every point].",
    ),
    key_file: Optional[str] = KeyFileOpt,
    s3_endpoint: Optional[str] = S3EndpointOpt,
    no_encrypt: bool = NoEncryptOpt,
    json_out: bool = JsonOpt,
) -> None:
    result = api.verify(vm, repo=repo_path(repo), checkpoint=checkpoint, key_file=key_file,
                        s3_endpoint=s3_endpoint, no_encrypt=no_encrypt)
    if json_out:
        emit_json(result.to_dict())
    else:
        for p in result.points:
            typer.echo(f"{p.checkpoint}: {'ok' if p.ok else 'DAMAGED'}")
            for name, d in p.disks.items():
                for problem in d.problems:
                    typer.echo(f"  {name}: {problem}")
        for u in result.in_use:
            typer.echo(f"in use by instant VM {u.name} (restore --instant of {u.checkpoint}): {', '.join(u.points)}; "
                       f"prune keeps them until 'libvbackup finalize {u.name}'")
    bad = [p.checkpoint for p in result.points if not p.ok]
    if bad:
        raise VerifyError(f"{len(bad)} point(s) failed verification: {', '.join(bad)}")
