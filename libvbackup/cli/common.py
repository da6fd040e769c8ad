"""Options shared by several commands, and the shell completion of their values (what the
commands print is in ``output``)."""

from __future__ import annotations

import typer

from ..repo import default_repo

RepoOpt = typer.Option(
    None, "--repo", "-r", metavar="DIR",
    help="Backup repository [default: $LIBVBACKUP_REPO, else /var/lib/libvbackup].",
)
UriOpt = typer.Option(
    None, "--uri", "-c", metavar="URI",
    help="libvirt connection URI [default: $LIBVIRT_DEFAULT_URI, else qemu:///system].",
)
KeyFileOpt = typer.Option(
    None, "--key-file", metavar="FILE", envvar="LIBVBACKUP_KEY_FILE",
    help="s3:// only: the key that encrypts (and opens) what is stored in the bucket, 32+ secret "
         "bytes, mode 0600 [default: $LIBVBACKUP_KEY_FILE]. Make one: (umask 077; head -c 32 "
         "/dev/urandom > FILE). Keep a copy off the host: without it the bucket cannot be read.",
)
S3EndpointOpt = typer.Option(
    None, "--s3-endpoint", metavar="URL",
    help="s3:// only: the S3 endpoint, e.g. https://rgw.example:8443 [default: $AWS_ENDPOINT_URL, else AWS]. "
         "Credentials as boto3 finds them ($AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, "
         "$AWS_PROFILE), never on the command line.",
)
NoEncryptOpt = typer.Option(
    False, "--no-encrypt",
    help="s3:// only: store (or read) points in the clear, as plain qcow2 objects (refused by default).",
)
JsonOpt = typer.Option(False, "--json", help="Print the result as one JSON object on stdout.")
ProgressOpt = typer.Option(
    "auto", "--progress", metavar="auto|bar|plain|json|none",
    help="Progress on stderr: a bar on a terminal (auto), periodic lines (plain), one JSON object "
         "per disk and second (json: disk, done, total, rate, phase), or none.",
)


def complete_vm(incomplete: str) -> list[str]:
    """VM names from libvirt for shell completion (nothing when libvirt does not answer)."""
    try:
        from ..virt import Connection

        with Connection(None) as conn:
            return [n for n in conn.domain_names() if n.startswith(incomplete)]
    except Exception:  # noqa: BLE001 - completion must never print an error
        return []


def complete_checkpoint(ctx: typer.Context, incomplete: str) -> list[str]:
    """The VM's points in the repository (--repo, else the default), then libvirt's checkpoints."""
    # (while an option's value is completed, click leaves the VM argument unparsed in ctx.args)
    vm = ctx.params.get("vm") or next(iter(ctx.params.get("vms") or ()), None) or next(iter(ctx.args), None)
    if not vm:
        return []
    names: list[str] = []
    try:
        from ..repo import Repository

        names = [p.checkpoint for p in Repository(ctx.params.get("repo") or default_repo()).load(vm).points]
    except Exception:  # noqa: BLE001
        pass
    try:
        from ..virt import Connection

        with Connection(ctx.params.get("uri")) as conn:
            names += [n for n in conn.domain(vm).checkpoint_names() if n not in names]
    except Exception:  # noqa: BLE001
        pass
    return [n for n in names if n.startswith(incomplete)]
