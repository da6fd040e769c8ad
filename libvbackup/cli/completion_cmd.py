"""Print a shell completion script for bash or zsh.

VM names are completed from libvirt, checkpoint names from the repository (--repo, else the
default) and libvirt. Install it once, for every shell or for this one.

Examples:

\b
  libvbackup completion bash > /etc/bash_completion.d/libvbackup
  libvbackup completion zsh > "${fpath[1]}/_libvbackup"
  source <(libvbackup completion bash)      # this shell only
"""

from __future__ import annotations

import typer

from ..errors import UsageError
from .main import COMPLETE_VAR, PROG

SHELLS = ("bash", "zsh")


def enable() -> None:
    """Register typer's completion classes (they answer the shell through COMPLETE_VAR)."""
    from typer._completion_classes import completion_init

    completion_init()


def completion(shell: str = typer.Argument(..., metavar="bash|zsh", help="The shell to complete for.")) -> None:
    if shell not in SHELLS:
        raise UsageError(f"no completion for shell {shell!r}; use bash or zsh")
    from typer._completion_shared import get_completion_script

    enable()
    typer.echo(get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell))
