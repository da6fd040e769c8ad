"""Options shared by several commands, and rendering of results."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

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
JsonOpt = typer.Option(False, "--json", help="Print the result as one JSON object on stdout.")


def repo_path(repo: Optional[str]) -> str:
    return repo or default_repo()


def emit_json(obj: dict) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def human(n: int) -> str:
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if f < 1024 or unit == "TiB":
            return f"{int(f)} B" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return str(n)


def as_list(values: Optional[List[str]]) -> list[str]:
    return list(values or [])
