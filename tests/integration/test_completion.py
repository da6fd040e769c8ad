"""Shell completion scripts are generated for bash and zsh, and bash completes commands, VM names
from libvirt and checkpoint names from the repository through the real script."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from libvbackup.backup import pull

from .helpers import MiB, cli

pytestmark = pytest.mark.integration

BIN = pathlib.Path(sys.executable).parent  # .venv/bin, where the libvbackup entry point is


def complete(words: list[str], env_repo: str | None = None) -> list[str]:
    """Run bash with the generated script, as bash itself would on <TAB> after ``words``."""
    script = cli("completion", "bash").stdout
    words_q = " ".join(f"'{w}'" for w in words)
    prog = f"""{script}
COMP_WORDS=({words_q}); COMP_CWORD={len(words) - 1}
_libvbackup_completion libvbackup
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": "/root"}
    if env_repo:
        env["LIBVBACKUP_REPO"] = env_repo
    p = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return [line for line in p.stdout.splitlines() if line]


def test_scripts_are_generated():
    bash = cli("completion", "bash")
    assert bash.returncode == 0 and "complete -o default -F _libvbackup_completion libvbackup" in bash.stdout
    assert subprocess.run(["bash", "-n"], input=bash.stdout, text=True).returncode == 0
    zsh = cli("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef libvbackup")
    bad = cli("completion", "tcsh")
    assert bad.returncode == 2 and "no completion for shell 'tcsh'" in bad.stderr


def test_bash_completes_commands_vms_and_checkpoints(make_vm, repo):
    vm = make_vm((4 * MiB, "qcow2"))
    pull(vm.name, repo=str(repo), checkpoint="daily-1", quiesce="no")
    pull(vm.name, repo=str(repo), checkpoint="daily-2", level="inc", quiesce="no")
    assert complete(["libvbackup", "pu"]) == ["pull", "push"]
    assert vm.name in complete(["libvbackup", "pull", "lvbtest-"])
    assert complete(["libvbackup", "pull", vm.name[:-2]]) == [vm.name]
    assert complete(["libvbackup", "restore", vm.name, "--repo", str(repo), "--checkpoint", "dai"]) == \
        ["daily-1", "daily-2"]
    assert complete(["libvbackup", "pull", vm.name, "--incremental", "daily-"], env_repo=str(repo)) == \
        ["daily-1", "daily-2"]
