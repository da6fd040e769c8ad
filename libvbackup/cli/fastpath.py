"""The pull and push command lines, parsed without typer.

Importing typer and building a command from its signature cost a pull about 60 ms of CPU
here, a quarter of its imports (README, "Third session"). ``parse``
takes the plain forms of a pull or push command line (options as ``--name VALUE``,
``--name=VALUE`` or ``-n VALUE``, flags, VM names) and gives the keyword arguments the typer
command would pass on; anything else (help, global options, a typo, a value typer would
convert or refuse, no VM) returns None and goes to typer, which stays the one judge of a bad
command line. ``SPEC`` is the typer command's parameters written out; a unit test derives it
from the typer command again and compares, so the two cannot drift apart.
"""

from __future__ import annotations

COMMANDS = ("pull", "push")

# kind: "value" (a string), "int", "multi" (repeatable; a list), "flag"; then the default
SPEC = {
    "argument": "vms",
    "params": {
        "repo": ("value", None), "incremental": ("value", None), "level": ("value", None),
        "checkpoint": ("value", None), "disk": ("multi", None), "exclude": ("multi", None),
        "scratch_dir": ("value", None), "scratch_limit": ("value", None), "quiesce": ("value", "auto"),
        "uri": ("value", None), "nbd_address": ("value", None), "nbd_port": ("value", None),
        "tls_dir": ("value", None), "no_tls": ("flag", False), "dry_run": ("flag", False),
        "compress": ("flag", False), "progress": ("value", "auto"), "jobs": ("int", None),
        "all_vms": ("flag", False), "json_out": ("flag", False),
    },
    "options": {
        "--repo": "repo", "-r": "repo", "--incremental": "incremental", "-i": "incremental",
        "--level": "level", "-l": "level", "--checkpoint": "checkpoint", "--disk": "disk", "-d": "disk",
        "--exclude": "exclude", "-x": "exclude", "--scratch-dir": "scratch_dir",
        "--scratch-limit": "scratch_limit", "--quiesce": "quiesce", "--uri": "uri", "-c": "uri",
        "--nbd-address": "nbd_address", "--nbd-port": "nbd_port", "--tls-dir": "tls_dir",
        "--no-tls": "no_tls", "--dry-run": "dry_run", "--compress": "compress", "--progress": "progress",
        "--jobs": "jobs", "-j": "jobs", "--all": "all_vms", "--json": "json_out",
    },
}


def parse(argv: list[str]) -> tuple[str, dict] | None:
    """(mode, keyword arguments of ``backup_run.dispatch``), or None: typer decides."""
    if not argv or argv[0] not in COMMANDS:
        return None
    options, params = SPEC["options"], SPEC["params"]
    values: dict = {}
    names: list[str] = []
    args = iter(argv[1:])
    for token in args:
        if not token.startswith("-"):
            names.append(token)
            continue
        flag, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        name = options.get(flag)
        if name is None:
            return None  # --help, --, a combined short option, a typo...
        kind = params[name][0]
        if kind == "flag":
            if eq:
                return None
            values[name] = True
            continue
        if not eq:
            value = next(args, None)
            if value is None or value.startswith("-"):
                return None
        if kind == "int":
            if not value.isascii() or not value.isdigit():
                return None
            value = int(value)
        if kind == "multi":
            values.setdefault(name, []).append(value)
        else:
            values[name] = value
    if not names:
        return None
    out = {name: values.get(name, default) for name, (kind, default) in params.items()}
    out[SPEC["argument"]] = names
    return argv[0], out
