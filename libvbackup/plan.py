"""What a backup will do, decided before anything is touched (pure).

``plan_backup`` takes what is known (the repository's manifest, the domain's disks, the
checkpoints libvirt has) and the user's request, and returns a ``BackupPlan``; it raises a
libvbackup error for every request that cannot be carried out, so bad input stops here,
before any job, checkpoint or file exists.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import time
from typing import Callable, Collection, Mapping, Sequence

from .domxml import Disk, parse_disks
from .errors import NotFound, RepositoryError, StateError, UsageError
from .manifest import Manifest, Point
from .retention import Policy, select

# A subset of libvirt's checkpointName ([a-zA-Z0-9_-][a-zA-Z0-9_.-]*): no leading '-' either,
# so that a name is never taken for an option. Used with fullmatch: '$' would accept a "\n".
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


@dataclasses.dataclass(frozen=True)
class PlannedDisk:
    name: str
    full: bool  # copied in full (no usable bitmap in the parent, or no parent)
    bitmap: bool  # the new checkpoint records a bitmap for it (qcow2 only)
    backing: str | None  # parent's image (relative to the VM dir) for an incremental image
    format: str | None
    reason: str | None = None  # why a disk is copied in full inside an incremental backup, or a
    # note on an incremental one (it grew since the parent)
    size: int | None = None  # virtual size now, when known
    identity: str | None = None  # "device:inode" of the source file now, when known


@dataclasses.dataclass(frozen=True)
class BackupPlan:
    vm: str
    checkpoint: str
    parent: str | None
    level: str  # full | incremental | differential
    disks: tuple[PlannedDisk, ...]
    # Checkpoints libvirt lost that the run gives back from the manifest first, oldest first.
    redefine: tuple[str, ...] = ()

    @property
    def incremental(self) -> str | None:
        return self.parent


def default_checkpoint_name(now: float | None = None, taken: Collection[str] = (), prefix: str = "lvb") -> str:
    base = f"{prefix}-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def check_name(name: str, what: str = "checkpoint name") -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_', '-' "
            "(at most 100, not starting with a dot or dash)"
        )
    return name


def plan_backup(
    manifest: Manifest,
    disks: Sequence[Disk],
    *,
    libvirt_checkpoints: Collection[str],
    checkpoint: str | None = None,
    incremental: str | None = None,
    prefix: str = "lvb",
    sizes: Mapping[str, int] | None = None,
    redefine: Sequence[str] = (),
    identities: Mapping[str, str] | None = None,
) -> BackupPlan:
    """Choose the checkpoint, parent, level, and per-disk full/incremental mode of a backup.

    ``disks`` are the disks chosen for this backup (see ``domxml.select_disks``), ``sizes``
    their virtual sizes now, ``identities`` the identity of their source files now (device and
    inode, when libvirt runs here: a file replaced at the same path is another image). ``redefine``: checkpoints libvirt lost that will be given back
    before the job starts (``libvirt_checkpoints`` already counts them); kept in the plan only
    when the chosen parent's chain needs them.
    """
    sizes = sizes or {}
    identities = identities or {}
    taken = set(libvirt_checkpoints) | {p.checkpoint for p in manifest.points}
    if checkpoint is None:
        checkpoint = default_checkpoint_name(taken=taken, prefix=prefix)
    check_name(checkpoint)
    if checkpoint in libvirt_checkpoints:
        raise UsageError(f"libvirt already has a checkpoint named {checkpoint!r}; choose another --checkpoint")
    if manifest.find(checkpoint) is not None:
        raise UsageError(f"the repository already holds a point named {checkpoint!r}; choose another --checkpoint")
    if incremental is not None and incremental == checkpoint:
        raise UsageError("--checkpoint and --incremental name the same checkpoint")

    parent = None
    if incremental is not None:
        if manifest.find(incremental) is None:
            raise NotFound(
                f"the repository holds no backup point {incremental!r} for VM {manifest.vm!r}",
                "run a full backup (without --incremental) to start a new chain",
            )
        if incremental not in libvirt_checkpoints:
            raise StateError(
                f"libvirt no longer has checkpoint {incremental!r} of VM {manifest.vm!r}, "
                "so the changes since it are unknown",
                "run a full backup (without --incremental) to start a new chain",
            )
        parent = manifest.get(incremental)

    planned = []
    before = disks_of(parent) if parent else {}
    for d in disks:
        size = sizes.get(d.target)
        full, reason = disk_mode(parent, d, size, before, identities.get(d.target)) if parent else (True, None)
        planned.append(
            PlannedDisk(
                name=d.target,
                full=full,
                bitmap=d.bitmap_capable,
                backing=None if full else parent.disks[d.target].image,
                format=d.format,
                reason=reason,
                size=size,
                identity=identities.get(d.target),
            )
        )
    if parent is not None and all(p.full for p in planned):
        parent = None
    if parent is None:
        level = "full"
    elif manifest.newest is not None and manifest.newest.checkpoint == parent.checkpoint:
        level = "incremental"
    else:
        level = "differential"
    return BackupPlan(
        vm=manifest.vm,
        checkpoint=checkpoint,
        parent=parent.checkpoint if parent else None,
        level=level,
        disks=tuple(planned),
        redefine=tuple(redefine) if parent is not None else (),
    )


def disks_of(point: Point) -> dict[str, Disk]:
    """The disks of the domain XML a point was taken from, by target ({} when it saved none)."""
    if not point.domain_xml:
        return {}
    try:
        return {d.target: d for d in parse_disks(point.domain_xml)}
    except (SyntaxError, ValueError):  # unreadable saved XML tells nothing; libvirt's bitmaps still guard
        return {}


def replaced(before: Disk | None, now: Disk) -> str | None:
    """Why ``now`` is not the image the parent point copied under the same target, or None
    (also when the parent saved no domain XML to tell)."""
    if before is None:
        return None
    if before.source != now.source:
        return f"{before.source} is now {now.source}"
    if before.format and now.format and before.format != now.format:
        return f"its format changed from {before.format} to {now.format}"
    return None


def disk_mode(parent: Point, d: Disk, size: int | None, before: dict[str, Disk],
              identity: str | None = None) -> tuple[bool, str | None]:
    """(full, reason) of disk ``d`` (now ``size`` bytes) in a backup incremental from ``parent``;
    ``before``: the parent's disks (``disks_of``). A full disk inside an incremental backup says
    why; an incremental one may carry a note (it grew)."""
    pdisk = parent.disks.get(d.target)
    if pdisk is None:
        return True, f"not in point {parent.checkpoint}"
    why = replaced(before.get(d.target), d)
    if why is None and identity and pdisk.identity and identity != pdisk.identity:
        why = f"another file at {d.source}"
    if why is not None:
        return True, f"replaced since {parent.checkpoint} ({why}): a new chain"
    if not pdisk.bitmap or not d.bitmap_capable:
        return True, f"{d.format or 'unknown'}-format disk holds no dirty bitmap"
    if size is not None and size < pdisk.size:
        return True, f"shrunk from {pdisk.size} to {size} bytes since {parent.checkpoint}: a new chain"
    if size is not None and size > pdisk.size:
        return False, f"grew from {pdisk.size} to {size} bytes since {parent.checkpoint}"
    return False, None


def needs_bitmap(parent: Point, disks: Sequence[Disk], sizes: Mapping[str, int] | None = None,
                 identities: Mapping[str, str] | None = None) -> set[str]:
    """The disks whose bitmap of ``parent``'s checkpoint a backup incremental from it would use:
    a broken bitmap of any other disk (replaced, left out, removed) does not stop the backup."""
    before = disks_of(parent)
    sizes, identities = sizes or {}, identities or {}
    return {d.target for d in disks
            if not disk_mode(parent, d, sizes.get(d.target), before, identities.get(d.target))[0]}


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '10G', '1.5T', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise UsageError(f"invalid size {text!r}: use a number with an optional K, M, G or T suffix")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


LEVELS = ("full", "inc", "diff", "auto")


@dataclasses.dataclass(frozen=True)
class ParentChoice:
    parent: str | None  # the checkpoint to be incremental from; None: a full backup
    reason: str | None = None  # why ``auto`` fell back to a full backup


def choose_parent(
    manifest: Manifest,
    *,
    level: str | None,
    incremental: str | None,
    unusable: Callable[[str], str | None],
) -> ParentChoice:
    """Which checkpoint a backup extends, from --incremental or --level.

    ``unusable(chk)`` says why a checkpoint cannot serve (gone from libvirt, bitmap missing or
    broken), or None. ``inc``: since the newest point; ``diff``: since the newest full point;
    ``auto``: ``inc`` when that is usable, else full (with the reason); ``full``: no parent.
    An explicit --incremental or inc/diff whose checkpoint is unusable is an error.
    """
    if level is not None and level not in LEVELS:
        raise UsageError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    if level is not None and incremental is not None:
        raise UsageError("--level and --incremental contradict each other; give one of them")
    if incremental is not None:
        candidate, explicit = incremental, True
    elif level in (None, "full"):
        return ParentChoice(None)
    else:
        if level == "diff":
            fulls = [p for p in manifest.points if p.parent is None]
            newest = fulls[-1] if fulls else None
        else:
            newest = manifest.newest
        if newest is None:
            if level == "auto":
                return ParentChoice(None, "the repository holds no backup of this VM yet")
            raise NotFound(f"--level {level}: the repository holds no {'full ' if level == 'diff' else ''}"
                           f"backup of VM {manifest.vm!r} to start from",
                           "run a full backup first (--level full or auto)")
        candidate, explicit = newest.checkpoint, level != "auto"
    if manifest.find(candidate) is None:
        return ParentChoice(candidate)  # plan_backup reports it, with the right error
    why = unusable(candidate)
    if why is None:
        return ParentChoice(candidate)
    if explicit:
        raise StateError(f"cannot back up incrementally from {candidate!r}: {why}",
                         "run a full backup (--level full) to start a new chain")
    return ParentChoice(None, f"checkpoint {candidate!r} cannot serve ({why}); taking a full backup")


@dataclasses.dataclass(frozen=True)
class PruneRebase:
    """A kept point's image whose backing image goes: rebased onto ``backing`` first."""

    point: str
    disk: str
    backing: str | None  # the nearest kept image of its chain (as the manifest names images); None: flattened
    old: str  # the backing image it has now


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    vm: str
    keep: tuple[str, ...]  # points that stay, oldest first
    remove: tuple[str, ...]  # points whose images and checkpoints go, oldest first
    rebase: tuple[PruneRebase, ...] = ()  # images of kept points to rebase first, oldest point first
    reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)  # kept point -> "daily #2"
    parents: Mapping[str, str | None] = dataclasses.field(default_factory=dict)  # kept point -> new parent
    policy: Policy | None = None  # the rules that chose ``keep``

    @property
    def flatten(self) -> tuple[tuple[str, str], ...]:
        """(point, disk) of the images rebased onto nothing."""
        return tuple((r.point, r.disk) for r in self.rebase if r.backing is None)

    def pruned(self, manifest: Manifest) -> Manifest:
        """The manifest once the plan is carried out: the kept points, their new parents and
        backing images."""
        kept = set(self.keep)
        backing = {(r.point, r.disk): r.backing for r in self.rebase}
        points = []
        for p in manifest.points:
            if p.checkpoint not in kept:
                continue
            if p.checkpoint in self.parents or any((p.checkpoint, n) in backing for n in p.disks):
                p = dataclasses.replace(
                    p, parent=self.parents.get(p.checkpoint, p.parent),
                    disks={n: dataclasses.replace(d, backing=backing.get((p.checkpoint, n), d.backing))
                           for n, d in p.disks.items()})
            points.append(p)
        return dataclasses.replace(manifest, points=points)


def plan_prune(manifest: Manifest, keep: int | Policy, tz: datetime.tzinfo | None = None) -> PrunePlan:
    """Which points ``keep`` keeps (``retention.select``; an int N is ``Policy(last=N)``), and
    how the kept ones stay restorable byte for byte.

    A kept point whose parent goes gets the nearest kept ancestor as its parent (None if it
    has none). Each of its images is followed down its own chain (a disk added or replaced
    later is full in a later point than its siblings): an image whose backing image goes is
    rebased onto the nearest image of that chain a kept point holds, or onto nothing when no
    kept point holds one. A safe rebase keeps the image's content, so it reads the same before,
    during and after.
    """
    policy = Policy(last=keep) if isinstance(keep, int) else keep
    selection = select(manifest.points, policy, tz)
    kept = set(selection.kept)
    owner = {d.image: (p, d) for p in manifest.points for d in p.disks.values()}
    rebase = []
    parents: dict[str, str | None] = {}
    for p in manifest.points:
        if p.checkpoint not in kept:
            continue
        parent = p.parent
        while parent is not None and parent not in kept:
            parent = manifest.get(parent).parent
        if parent != p.parent:
            parents[p.checkpoint] = parent
        for name, d in p.disks.items():
            base, seen = d.backing, {d.image}
            while base is not None:  # down this disk's own chain to the first kept image
                if base not in owner:
                    raise RepositoryError(f"image {d.image!r} of point {p.checkpoint!r} is based on "
                                          f"{base!r}, which belongs to no point of the manifest")
                below, below_disk = owner[base]
                if below.checkpoint in kept:
                    break
                if base in seen:
                    raise RepositoryError(f"the manifest has a cycle of images through {base!r}")
                seen.add(base)
                base = below_disk.backing
            if base != d.backing:
                rebase.append(PruneRebase(p.checkpoint, name, base, d.backing))
    return PrunePlan(
        manifest.vm,
        tuple(p.checkpoint for p in manifest.points if p.checkpoint in kept),
        selection.removed,
        tuple(rebase),
        dict(selection.kept),
        parents,
        policy,
    )
