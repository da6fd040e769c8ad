"""Reading a domain's XML: which disks can take part in a backup (pure)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from lxml import etree

from .errors import NotFound, UsageError


@dataclasses.dataclass(frozen=True)
class Disk:
    """One <disk> of a domain, reduced to what a backup needs to know."""

    target: str  # target dev, e.g. "vda": the name libvirt uses in backup XML and NBD exports
    device: str  # disk, cdrom, floppy, lun
    format: str | None  # driver type: qcow2, raw, ...
    source: str | None  # file, block device, network name or volume; None for an empty drive
    readonly: bool = False
    shareable: bool = False

    @property
    def backup_capable(self) -> bool:
        """cdroms, floppies, LUN passthrough, empty drives, read-only and shared disks are left out."""
        if self.device != "disk" or self.readonly or self.shareable:
            return False
        return self.source is not None

    @property
    def bitmap_capable(self) -> bool:
        """Only qcow2 can hold the persistent dirty bitmap a checkpoint needs."""
        return self.format == "qcow2"

    @property
    def skip_reason(self) -> str | None:
        if self.device != "disk":
            return f"device is a {self.device}"
        if self.readonly:
            return "read-only"
        if self.shareable:
            return "shareable"
        if self.source is None:
            return "no source"
        return None


def parse_disks(domain_xml: str | bytes) -> list[Disk]:
    """All <disk> elements of a domain, in document order."""
    root = etree.fromstring(domain_xml.encode() if isinstance(domain_xml, str) else domain_xml)
    disks = []
    for el in root.iterfind("./devices/disk"):
        target = el.find("target")
        if target is None or not target.get("dev"):
            continue
        driver = el.find("driver")
        src = el.find("source")
        source = None
        if src is not None:
            source = src.get("file") or src.get("dev") or src.get("name") or src.get("volume")
        disks.append(
            Disk(
                target=target.get("dev"),
                device=el.get("device", "disk"),
                format=driver.get("type") if driver is not None else None,
                source=source,
                readonly=el.find("readonly") is not None,
                shareable=el.find("shareable") is not None,
            )
        )
    return disks


def domain_uuid(domain_xml: str) -> str | None:
    root = etree.fromstring(domain_xml.encode())
    el = root.find("uuid")
    return el.text if el is not None else None


def select_disks(
    disks: Sequence[Disk], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[Disk]:
    """The disks a backup covers: ``include`` (all capable ones when empty) minus ``exclude``.

    Naming a disk the domain does not have, or one that cannot be backed up, is an error.
    """
    by_name = {d.target: d for d in disks}
    for name in [*include, *exclude]:
        if name not in by_name:
            known = ", ".join(d.target for d in disks if d.backup_capable) or "none"
            raise NotFound(f"the VM has no disk named {name!r} (disks that can be backed up: {known})")
    overlap = set(include) & set(exclude)
    if overlap:
        raise UsageError(f"disk {sorted(overlap)[0]!r} is both included and excluded")
    for name in include:
        reason = by_name[name].skip_reason
        if reason:
            raise UsageError(f"disk {name!r} cannot be backed up: {reason}")
    chosen = [by_name[n] for n in dict.fromkeys(include)] if include else [
        d for d in disks if d.backup_capable
    ]
    chosen = [d for d in chosen if d.target not in set(exclude)]
    if not chosen:
        raise UsageError("no disk left to back up")
    return chosen


AGENT_CHANNEL = "org.qemu.guest_agent.0"


def agent_state(domain_xml: str | bytes) -> str | None:
    """The guest agent channel of a running domain's XML: "connected" (an agent opened the
    port), "disconnected", or None when the domain has no ``org.qemu.guest_agent.0`` channel."""
    root = etree.fromstring(domain_xml.encode() if isinstance(domain_xml, str) else domain_xml)
    for target in root.iterfind("./devices/channel/target"):
        if target.get("name") == AGENT_CHANNEL:
            return target.get("state") or "disconnected"
    return None
