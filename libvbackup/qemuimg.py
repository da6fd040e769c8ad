"""Wrappers around qemu-img: the repository's images are made and read by QEMU's own tools."""

from __future__ import annotations

import json
import logging
import subprocess

from .errors import ToolError

log = logging.getLogger(__name__)


def _run(argv: list[str]) -> str:
    log.debug("running %s", " ".join(argv))
    try:
        p = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ToolError(f"{argv[0]} is not installed", "run scripts/setup") from e
    if p.returncode != 0:
        detail = (p.stderr or p.stdout).strip().splitlines()
        raise ToolError(f"{argv[0]} {argv[1]} failed: {detail[-1] if detail else f'exit {p.returncode}'}")
    return p.stdout


def create(path: str, size: int, backing: str | None = None, unsafe: bool = False,
           backing_format: str = "qcow2") -> None:
    """A new qcow2 image; ``backing`` is a path relative to the new image's directory (or a
    URI such as ``nbd+unix:///vda?socket=…``, of ``backing_format``).

    ``unsafe``: the backing file need not be reachable yet (the image is moved later).
    """
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1"]
    if backing:
        argv += ["-b", backing, "-F", backing_format] + (["-u"] if unsafe else [])
    argv += [path, str(size)]
    _run(argv)


def info(path: str, chain: bool = False) -> dict | list:
    argv = ["qemu-img", "info", "--output=json"]
    if chain:
        argv.append("--backing-chain")
    return json.loads(_run(argv + [path]))


def own_extents(path: str) -> list[tuple[int, int, bool]]:
    """(start, length, zero) of the ranges the image's own layer holds (not its backing chain)."""
    out = []
    for e in json.loads(_run(["qemu-img", "map", "--output=json", path])):
        if e.get("depth", 0) == 0 and e.get("present", True) and (e.get("data") or e.get("zero")):
            out.append((e["start"], e["length"], not e.get("data")))
    return out


def flatten(path: str) -> None:
    """Make an image self-contained: copy in what its backing chain provides, drop the backing.

    Safe-mode rebase: interrupted, the image is still correct with its old backing file.
    """
    _run(["qemu-img", "rebase", "-q", "-t", "writeback", "-f", "qcow2", "-b", "", path])


def rebase(path: str, backing_name: str | None, fmt: str = "qcow2") -> None:
    """Give an image another backing file (None: none, the image then holds everything),
    keeping what the image reads: safe mode copies into the image whatever its old and new
    chains read differently. ``backing_name`` is relative to the image's directory, as
    ``create`` takes it; ``fmt`` is the backing file's format.

    Interrupted at any point, the image is still correct with its old backing file: the header
    changes last, and writethrough flushes the data and qcow2's metadata after every write. With
    writeback (``flatten``), QEMU 7.2 writes the new header before the L2 and refcount tables
    that map the copied clusters (seen with strace): a crash between them loses data.
    """
    target = ["-b", backing_name, "-F", fmt] if backing_name is not None else ["-b", ""]
    _run(["qemu-img", "rebase", "-q", "-t", "writethrough", "-f", "qcow2", *target, path])


def bitmaps(path: str) -> dict[str, tuple[str, ...]]:
    """The persistent dirty bitmaps of a qcow2 image: name -> flags ("auto": enabled, recording
    writes; "in-use": QEMU had it open and did not store it, so it cannot be trusted). Read
    without taking the image's lock (-U): a look, nothing more."""
    doc = json.loads(_run(["qemu-img", "info", "-U", "--output=json", path]))
    data = (doc.get("format-specific") or {}).get("data") or {}
    return {b["name"]: tuple(b.get("flags", ())) for b in data.get("bitmaps", ())}


def add_bitmap(path: str, name: str, granularity: int = 65536) -> None:
    """A new, enabled persistent bitmap (what QEMU makes for a checkpoint of a running domain).
    Takes the image's write lock: fails while a QEMU has the image open."""
    _run(["qemu-img", "bitmap", "--add", "--enable", "-g", str(granularity), path, name])
