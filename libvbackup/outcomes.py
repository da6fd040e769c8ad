"""What the operations other than a backup job return (list, checkpoints, status, abort,
restore, define, instant, finalize, map, files, extract, verify, copy): frozen dataclasses
like those of ``results``, with ``to_dict`` for ``--json``."""

from __future__ import annotations

import dataclasses

from .results import Result


@dataclasses.dataclass(frozen=True)
class CheckpointInfo(Result):
    name: str
    owner: str  # point | orphan | other-repository | foreign
    description: str


@dataclasses.dataclass(frozen=True)
class CheckpointsResult(Result):
    vm: str
    repo: str
    checkpoints: tuple[CheckpointInfo, ...]
    lost: tuple[str, ...]  # points whose checkpoint libvirt no longer has


@dataclasses.dataclass(frozen=True)
class StatusResult(Result):
    vm: str
    running: bool  # a run holds the VM's lock (proven by the kernel, not by a pid file)
    stale: bool = False  # a journal is left by a run that died: the next run cleans up
    pid: int | None = None  # the lock's holder (running), or the dead run's (stale)
    mode: str | None = None
    checkpoint: str | None = None
    started: str | None = None
    bytes_done: int | None = None
    bytes_total: int | None = None
    disks: dict | None = None
    scratch_used: int | None = None
    job: bool | None = None
    libvirt_error: str | None = None


@dataclasses.dataclass(frozen=True)
class AbortResult(Result):
    vm: str
    aborted: str | None  # the checkpoint of the run
    pid: int | None
    cleaned_up: bool  # True: the run was dead and this call cleaned up after it


@dataclasses.dataclass(frozen=True)
class PointDiskInfo(Result):
    image: str  # absolute path
    size: int
    bytes_copied: int
    bytes_zeroed: int
    compression: str | None = None  # zstd | zlib: compressed clusters (pull --compress)
    stored_bytes: int | None = None  # the image's file size when written (older points: None)


@dataclasses.dataclass(frozen=True)
class PointInfo(Result):
    checkpoint: str
    parent: str | None
    level: str
    mode: str
    completed: str
    seconds: float
    disks: dict[str, PointDiskInfo]
    consistency: str = "crash"
    frozen_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class ListResult(Result):
    vm: str
    repo: str
    points: tuple[PointInfo, ...]


@dataclasses.dataclass(frozen=True)
class RestoredDisk(Result):
    path: str
    size: int
    format: str


@dataclasses.dataclass(frozen=True)
class RestoreResult(Result):
    vm: str
    checkpoint: str
    disks: dict[str, RestoredDisk]


@dataclasses.dataclass(frozen=True)
class DefinedResult(Result):
    """``restore --define``: a new domain whose disks are the restored images."""

    vm: str
    checkpoint: str
    name: str
    uuid: str
    started: bool
    disks: dict[str, RestoredDisk]
    left_out: tuple[str, ...] = ()  # writable disks of the saved VM not in the point


@dataclasses.dataclass(frozen=True)
class InPlaceResult(Result):
    """``restore --in-place``: the point's data written back into the domain's disk files."""

    vm: str
    checkpoint: str
    disks: dict[str, RestoredDisk]
    left_alone: tuple[str, ...]  # disks of the domain the point does not hold
    checkpoints_dropped: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class InstantDisk(Result):
    overlay: str  # the domain's disk: a new qcow2 image, its backing the NBD export below
    backing: str  # nbd+unix:///vda?socket=… (qemu-nbd, read-only, the point's chain)
    image: str  # the point's image in the repository (its backing chain is served with it)
    size: int
    server_pid: int  # the qemu-nbd serving it (it holds its lock file: the kernel proves it)


@dataclasses.dataclass(frozen=True)
class InstantResult(Result):
    """``restore --instant``: a new domain running on overlays of the repository's chain."""

    vm: str
    checkpoint: str
    name: str
    uuid: str
    started: bool
    disks: dict[str, InstantDisk]
    points: tuple[str, ...]  # the points it reads (the chain, oldest first): prune keeps them
    record: str  # the record of the instant domain in the repository
    seconds: float  # from the call to the domain started (or defined)
    left_out: tuple[str, ...] = ()  # writable disks of the saved VM not in the point


@dataclasses.dataclass(frozen=True)
class FinalizedDisk(Result):
    path: str  # the disk's image, now standalone (no backing file)
    size: int
    method: str  # block-pull (a running domain) | rebase (a shut-off one: qemu-img, offline)


@dataclasses.dataclass(frozen=True)
class FinalizeResult(Result):
    """``finalize``: the disks of an instant domain made standalone, the NBD servers stopped."""

    name: str
    vm: str
    checkpoint: str
    running: bool  # the domain ran during it (block pull while the guest runs)
    disks: dict[str, FinalizedDisk]
    points_released: tuple[str, ...]  # points no longer held by this domain
    seconds: float


@dataclasses.dataclass(frozen=True)
class InstantUse(Result):
    name: str  # the instant domain
    checkpoint: str
    points: tuple[str, ...]  # the points it reads, oldest first


@dataclasses.dataclass(frozen=True)
class MapResult(Result):
    """``map``: where one disk of a point is served, read-only, while the command runs."""

    vm: str
    checkpoint: str
    disk: str
    image: str  # the point's image (its backing chain is served with it)
    uri: str  # nbd+unix:///vda?socket=… , nbd://127.0.0.1:PORT/vda or nbds://… (TLS)
    size: int


@dataclasses.dataclass(frozen=True)
class FileEntry(Result):
    """One entry of a point's file system, as lstat sees it (a symlink is not followed)."""

    name: str
    path: str  # absolute in the guest's file system
    type: str  # file | dir | symlink | char | block | fifo | socket
    mode: int  # permission bits with set-id and sticky (0o7777), e.g. 416 = 0o640
    size: int  # bytes
    mtime: int  # modification time, seconds since the epoch
    mtime_nsec: int  # and its nanoseconds
    uid: int
    gid: int
    target: str | None  # what a symlink points to, else null

    def mode_text(self) -> str:
        """``-rw-r-----`` as ``ls -l`` shows it."""
        import stat

        kind = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "char": stat.S_IFCHR,
                "block": stat.S_IFBLK, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}.get(self.type, 0)
        text = stat.filemode(kind | self.mode)
        return text if kind else "?" + text[1:]


@dataclasses.dataclass(frozen=True)
class FilesResult(Result):
    """``files``: a directory of one file system of a point (or one entry, if not a directory)."""

    vm: str
    checkpoint: str
    disk: str
    filesystem: str  # the device as libguestfs names it: /dev/sda (a whole disk), /dev/sda1
    fstype: str  # ext4, xfs, vfat, …
    path: str  # the path listed, absolute in the guest's file system
    type: str  # what path is: dir (entries are its contents) or another type (entries is itself)
    entries: tuple[FileEntry, ...]  # by name


@dataclasses.dataclass(frozen=True)
class ExtractResult(Result):
    """``extract``: files and trees of a point's file system copied out."""

    vm: str
    checkpoint: str
    disk: str
    filesystem: str  # the device as libguestfs names it: /dev/sda (a whole disk), /dev/sda1
    fstype: str
    output: str
    written: tuple[str, ...]  # where each path named went: output/<name> (output itself for /)
    files: int  # regular files copied
    directories: int
    symlinks: int  # recreated as symlinks, never followed
    bytes: int  # of the regular files
    skipped: tuple[str, ...]  # device nodes, fifos and sockets: not copied (guest paths)
    seconds: float  # the whole extract, the appliance's start included


@dataclasses.dataclass(frozen=True)
class VerifiedDisk(Result):
    ok: bool
    problems: tuple[str, ...]
    bad_blocks: int
    blkhash: str | None


@dataclasses.dataclass(frozen=True)
class VerifiedPoint(Result):
    checkpoint: str
    ok: bool
    disks: dict[str, VerifiedDisk]


@dataclasses.dataclass(frozen=True)
class VerifyResult(Result):
    vm: str
    repo: str
    ok: bool
    points: tuple[VerifiedPoint, ...]
    in_use: tuple[InstantUse, ...] = ()  # instant domains reading the points (restore --instant)


@dataclasses.dataclass(frozen=True)
class CopiedPoint(Result):
    vm: str
    checkpoint: str
    state: str  # copied | present (the bucket had it) | would copy (dry run)
    bytes: int  # the point's files, as stored locally
    bytes_sent: int  # what went up (resumed parts and objects already there are not sent)


@dataclasses.dataclass(frozen=True)
class CopyResult(Result):
    """``copy``: points sent to a bucket, oldest first."""

    repo: str
    to: str  # s3://BUCKET/PREFIX
    dry_run: bool
    points: tuple[CopiedPoint, ...]
    bytes_sent: int
