"""What operations return: frozen dataclasses, turned into the JSON documents of ``--json``
by ``to_dict`` (the CLI reads attributes, never string keys).

Here: the base, and what a backup job returns (pull, push, prune, run, progress). What the
other operations return is in ``outcomes``; its names are reachable here too (loaded when first
asked for: a dataclass costs about 0.4 ms to create, and a backup needs only these six)."""

from __future__ import annotations

import dataclasses
from typing import Any


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


FORMAT_VERSION = 1  # of every --json document (libvbackup/schemas/); additions only within a version


class Result:
    def to_dict(self) -> dict:
        return _plain(self)


@dataclasses.dataclass(frozen=True)
class ProgressEvent(Result):
    """How far one disk of a long job is: sent about every second, and once at the end."""

    vm: str
    disk: str
    phase: str  # copy | wait (push: QEMU writes) | done | failed
    done: int  # bytes
    total: int  # bytes planned
    rate: int  # bytes per second since the start
    elapsed: float  # seconds


@dataclasses.dataclass(frozen=True)
class BackupDisk(Result):
    name: str
    mode: str  # full | incremental
    reason: str | None  # why a disk is copied in full inside an incremental backup
    bitmap: bool
    image: str | None = None  # absolute path, once written
    backing: str | None = None
    size: int | None = None
    bytes_copied: int = 0
    bytes_zeroed: int = 0
    compression: str | None = None  # zstd | zlib: compressed clusters (pull --compress)
    stored_bytes: int | None = None  # the image's file size


@dataclasses.dataclass(frozen=True)
class BackupResult(Result):
    vm: str
    checkpoint: str
    parent: str | None
    level: str  # full | incremental | differential
    mode: str  # pull | push | offline (a shut-off VM read from its images)
    requested_level: str
    fallback_reason: str | None
    redefined: tuple[str, ...]  # checkpoints given back to libvirt (dry run: that would be)
    disks: dict[str, BackupDisk]
    seconds: float | None = None
    dry_run: bool = False
    backup_xml: str | None = None
    checkpoint_xml: str | None = None
    consistency: str = "crash"  # quiesced | crash (dry run: what is planned)
    frozen_seconds: float | None = None  # how long guest writes were held by the freeze
    consistency_note: str | None = None  # why the point is only crash-consistent


@dataclasses.dataclass(frozen=True)
class PruneResult(Result):
    vm: str
    keep: tuple[str, ...]  # oldest first
    remove: tuple[str, ...]  # oldest first
    flatten: tuple[str, ...]  # "<point>/<disk>" images rebased onto nothing
    dry_run: bool
    checkpoints_deleted: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # kept point -> "daily #2"
    # "<point>/<disk>" -> the image it is rebased onto ("<point>/<disk>.qcow2"), None: flattened
    rebase: dict[str, str | None] = dataclasses.field(default_factory=dict)
    completed: dict[str, str] = dataclasses.field(default_factory=dict)  # every point, oldest first
    policy: str = ""  # the rules applied, e.g. "last 1, daily 7"


@dataclasses.dataclass(frozen=True)
class VmRun(Result):
    """One VM of ``libvbackup run``: its backup, then its policy's retention."""

    vm: str
    policy: str  # which [[policy]] covers it: "[[policy]] 2 (web-*)"
    schedule: str | None  # the policy's hint
    uri: str
    repo: str
    mode: str  # pull | push
    requested_level: str  # full | inc | diff | auto, as the policy says
    retention: str | None  # the policy's rules, "last 2, daily 7"; None: it never prunes
    ok: bool  # backed up, and pruned if the policy prunes
    exit_code: int  # 0 when ok; else the error's, as `libvbackup pull` of this VM would exit
    error: str | None  # the one-line message, with its hint
    seconds: float  # backup and prune
    checkpoint: str | None = None  # the new point (dry run: the one planned)
    parent: str | None = None
    level: str | None = None  # full | incremental | differential (dry run: planned)
    fallback_reason: str | None = None  # why --level auto takes a full backup
    bytes_copied: int = 0
    kept: tuple[str, ...] = ()  # after the prune, oldest first
    pruned: tuple[str, ...] = ()  # points the retention removed, oldest first
    warnings: tuple[str, ...] = ()
    dry_run: bool = False
    copy_to: str | None = None  # the policy's off-site bucket (s3://…), None: no copy
    copied: tuple[str, ...] = ()  # points sent there by this run, oldest first
    bytes_sent: int = 0


@dataclasses.dataclass(frozen=True)
class RunReport(Result):
    """``libvbackup run``: every VM its policies named, each backed up (or planned) once."""

    config: str | None  # the file read; None: there was none
    started: str  # ISO 8601, UTC
    seconds: float
    jobs: int  # VMs backed up at once
    dry_run: bool
    ok: bool
    exit_code: int  # 0; the one VM's code; 10: some of several VMs failed; 128+N: signal N
    vms: tuple[VmRun, ...]  # in the order they were chosen
    warnings: tuple[str, ...] = ()  # e.g. a policy that names no VM


def __getattr__(name: str):
    if name.startswith("__"):  # the import system's questions (__path__ ...): not a result
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import outcomes  # the one import of a later layer: lazily, for names only

    try:
        return getattr(outcomes, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
