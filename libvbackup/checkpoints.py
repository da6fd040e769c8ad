"""libvirt's checkpoints as the repository sees them: usable or not, lost and redefinable, whose.

Planning asks questions only (``Probe``): is a checkpoint there, are its bitmaps valid
(REDEFINE_VALIDATE with the checkpoint's own XML changes nothing), can a checkpoint libvirt
lost be given back from the XML the repository saved. Giving it back is a step of the plan
(``BackupPlan.redefine``), carried out by ``redefine`` under the lock once every check passed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Collection

from lxml import etree

from .errors import Error
from .manifest import Manifest

log = logging.getLogger(__name__)

DESCRIPTION_PREFIX = "libvbackup "


def description(level: str, vm: str, repository_root: str) -> str:
    """The description of the checkpoints a repository creates: names the repository."""
    return f"{DESCRIPTION_PREFIX}{level} backup of {vm} in repository {repository_root}"


def description_of(xml: str) -> str:
    el = etree.fromstring(xml.encode()).find("description")
    return (el.text or "") if el is not None else ""


def repository_of(desc: str) -> str | None:
    """The repository a libvbackup checkpoint description names, or None."""
    if not desc.startswith(DESCRIPTION_PREFIX):
        return None
    m = re.search(r" in repository (/.*)$", desc)
    return m.group(1) if m else None


class Probe:
    """Answers the planner's question "why can this checkpoint not serve?" without changing
    anything. A checkpoint libvirt lost is usable when every lost checkpoint of its chain can
    be redefined from the manifest (``needs_redefine`` then lists them, oldest first), unless
    ``failed`` (redefinitions tried and refused in this run) says otherwise.

    ``needed(chk)``: the disks whose bitmap of ``chk`` the backup would use (``plan.needs_bitmap``).
    libvirt's validation stops at the first disk whose bitmap is missing or broken; when that
    disk is one the backup takes in full anyway (its image was replaced, it was left out), the
    checkpoint still serves the others: libvirt checks their bitmaps again when the job begins
    and refuses an incremental from a broken one.

    ``trust``: a checkpoint libvirt has is taken as usable without asking it (validation is a
    QEMU round trip, 25-60 ms here); libvirt 9.0's backupBegin refuses a missing or broken
    bitmap with the same error (VIR_ERR_CHECKPOINT_INCONSISTENT) and creates nothing, and the
    caller then plans again without trust (``backup``)."""

    def __init__(self, dom, manifest: Manifest, failed: dict[str, str] | None = None,
                 needed: Callable[[str], Collection[str]] | None = None,
                 validate: Callable[[str], str | None] | None = None, names: Collection[str] | None = None, trust: bool = False):
        self.dom = dom
        self.trust = trust
        # A shut-off domain (offline.validator) has its images checked by us, even for a checkpoint
        # libvirt lost: libvirt 9.0 validates a running domain's bitmaps only.
        self.offline = validate is not None
        self.validate = validate or dom.validate_checkpoint
        self.manifest = manifest
        self.failed = dict(failed or {})
        self.needed = needed
        self.names = set(dom.checkpoint_names() if names is None else names)  # (the caller's own listing)
        self.needs_redefine: list[str] = []
        self._valid: dict[str, str | None] = {}

    def unusable(self, chk: str) -> str | None:
        if chk in self.failed:
            return f"libvirt lost it and it cannot be redefined: {self.failed[chk]}"
        if chk not in self.names:
            lost = [p for p in self.manifest.chain(chk) if p.checkpoint not in self.names]
            missing = [p.checkpoint for p in lost if not p.checkpoint_xml]
            if missing:
                return f"libvirt no longer has checkpoint {missing[-1]!r} and the repository saved no XML for it"
            if self.offline and (why := self.validate(chk)) is not None:
                return why
            self.needs_redefine = [p.checkpoint for p in lost]
            return None
        if self.trust:
            return None
        if chk not in self._valid:
            self._valid[chk] = self.validate(chk)
        why = self._valid[chk]
        disk = broken_disk(why) if why is not None else None
        if disk is not None and self.needed is not None and disk not in self.needed(chk):
            log.info("checkpoint %s: %s; the backup takes disk %s in full", chk, why, disk)
            return None
        return why

    @property
    def checkpoint_names(self) -> set[str]:
        """What libvirt has, plus what the plan will give back to it."""
        return self.names | set(self.needs_redefine)


_BROKEN_BITMAP = re.compile(r"missing or broken bitmap '[^']*' for disk '(?P<disk>[^']+)'")


def broken_disk(reason: str) -> str | None:
    """The disk libvirt names when it finds a checkpoint's bitmap missing or broken, or None."""
    m = _BROKEN_BITMAP.search(reason)
    return m.group("disk") if m else None


def bitmap_lost(reason: str) -> bool:
    """Whether libvirt's reason says the bitmap is gone or unusable (QEMU never stored it or lost it)."""
    return "bitmap" in reason and any(w in reason for w in ("not found", "missing", "broken", "inconsistent"))


@dataclasses.dataclass(frozen=True)
class RedefineFailure:
    checkpoint: str
    reason: str


def redefine(dom, manifest: Manifest, names: tuple[str, ...]) -> RedefineFailure | None:
    """Give libvirt back the checkpoints it lost, oldest first, from the manifest's saved XML
    (libvirt validates the bitmaps). On a refusal the ones redefined by this call are removed
    again (metadata only), so libvirt is left as it was; returns what failed, or None."""
    done: list[str] = []
    running = dom.is_running()  # (a shut-off domain's bitmaps were checked by offline.validator)
    for name in names:
        why = dom.redefine_checkpoint(manifest.get(name).checkpoint_xml, validate=running)
        if why is not None:
            for back in reversed(done):
                try:
                    dom.delete_checkpoint(back, metadata_only=True)
                except Error as e:
                    log.warning("could not undo the redefinition of %s: %s", back, e)
            return RedefineFailure(name, why)
        log.info("redefined checkpoint %s from the repository", name)
        done.append(name)
    return None


def owner(name: str, desc: str, points: set[str], repository_root: str, prefix: str) -> str:
    """``point``, ``orphan`` (made for this repository, in no point), ``other-repository``
    (libvbackup's, for another repository) or ``foreign`` (another tool's: never touched)."""
    if name in points:
        return "point"
    repo = repository_of(desc)
    if repo is not None:
        return "orphan" if repo == repository_root else "other-repository"
    if desc.startswith(DESCRIPTION_PREFIX) or name.startswith("lvb-"):
        return "orphan" if name.startswith(prefix + "-") else "other-repository"
    return "foreign"


def running_backup(dom) -> tuple[str, str | None] | None:
    """Whose is the backup job running on ``dom``: (checkpoint, repository) when it is a
    libvbackup run (its files live in ``libvbackup-<vm>-<checkpoint>/`` and the checkpoint's
    description names the repository), None when it is another tool's or unknown."""
    try:
        xml = dom.backup_xml()
    except Error:
        return None
    run_dir = re.compile(f"/libvbackup-{re.escape(dom.name)}-" + r"(?P<chk>[A-Za-z0-9_][A-Za-z0-9_.-]*)/")
    for m in run_dir.finditer(xml):
        chk = m.group("chk")
        try:
            return chk, repository_of(description_of(dom.checkpoint_xml(chk)))
        except Error:
            return chk, None
    return None
