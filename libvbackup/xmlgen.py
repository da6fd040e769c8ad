"""<domainbackup> and <domaincheckpoint> documents, filled from xml_templates/ (pure).

Every name (checkpoint, socket, scratch file) is passed in by the caller; nothing is invented
here. The result is validated against libvirt's RNG schemas by the tests.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import pathlib
from typing import Sequence

from lxml import etree

# Installed from a wheel, the templates ship inside the package (libvbackup/xml_templates/, see
# pyproject.toml); in the source tree and in an editable install they are the top-level xml_templates/.
_PACKAGE = pathlib.Path(__file__).resolve().parent
TEMPLATES = _PACKAGE / "xml_templates"
if not TEMPLATES.is_dir():
    TEMPLATES = _PACKAGE.parent / "xml_templates"


@dataclasses.dataclass(frozen=True)
class BackupDisk:
    name: str  # target dev
    backup: bool = True
    scratch: str | None = None  # pull mode: absolute path of the scratch qcow2
    full: bool = False  # in an incremental job: copy this disk in full (backupmode='full')
    target: str | None = None  # push mode: absolute path of the pre-created target image


@dataclasses.dataclass(frozen=True)
class TcpServer:
    """Pull mode over the network: QEMU's NBD server on the hypervisor at ``address:port``."""

    address: str
    port: int
    tls: bool = True  # libvirt's backup_tls_x509_cert_dir on the hypervisor; False: plain TCP


@dataclasses.dataclass(frozen=True)
class BackupSpec:
    socket: str | None  # pull mode: absolute path of the NBD unix socket (or ``tcp``)
    disks: Sequence[BackupDisk]
    incremental: str | None = None  # checkpoint the job is incremental from
    tcp: TcpServer | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointDisk:
    name: str
    bitmap: bool  # False: checkpoint="no" (raw disks, disks left out of the backup)


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    name: str
    disks: Sequence[CheckpointDisk]
    description: str = "created by libvbackup"


@functools.lru_cache(maxsize=None)
def _template(name: str) -> etree._Element:
    parser = etree.XMLParser(remove_comments=True, remove_blank_text=True)
    return etree.parse(str(TEMPLATES / name), parser).getroot()


def _load(name: str) -> etree._Element:
    return copy.deepcopy(_template(name))


def _serialise(root: etree._Element) -> str:
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def _backup_xml(mode: str, spec: BackupSpec, fill) -> etree._Element:
    """The job document of ``mode``: <incremental>, then one <disk> per disk, completed by ``fill``."""
    root = _load(f"backup-{mode}.xml")
    if spec.incremental:
        inc = etree.Element("incremental")
        inc.text = spec.incremental
        root.insert(0, inc)
    disks = root.find("disks")
    for d in spec.disks:
        if not d.backup:
            etree.SubElement(disks, "disk", name=d.name, backup="no")
            continue
        el = _load(f"backup-disk-{mode}.xml")
        el.set("name", d.name)
        if spec.incremental:
            # Per disk: a disk whose bitmap cannot serve (raw, new since the parent) is copied
            # in full inside the same incremental job.
            if d.full:
                el.set("backupmode", "full")
            else:
                el.set("backupmode", "incremental")
                el.set("incremental", spec.incremental)
        fill(el, d)
        disks.append(el)
    return root


def backup_pull_xml(spec: BackupSpec) -> str:
    def fill(el: etree._Element, d: BackupDisk) -> None:
        if d.scratch is None:
            raise ValueError(f"pull-mode disk {d.name} needs a scratch file")
        el.set("exportname", d.name)
        el.find("scratch").set("file", d.scratch)

    root = _backup_xml("pull", spec, fill)
    server = root.find("server")
    if spec.tcp is not None:
        server.attrib.clear()
        server.set("transport", "tcp")
        server.set("name", spec.tcp.address)
        server.set("port", str(spec.tcp.port))
        if spec.tcp.tls:
            server.set("tls", "yes")
    else:
        server.set("socket", spec.socket)
    return _serialise(root)


def backup_push_xml(spec: BackupSpec) -> str:
    def fill(el: etree._Element, d: BackupDisk) -> None:
        if d.target is None:
            raise ValueError(f"push-mode disk {d.name} needs a target file")
        el.find("target").set("file", d.target)

    return _serialise(_backup_xml("push", spec, fill))


def checkpoint_xml(spec: CheckpointSpec) -> str:
    root = _load("checkpoint.xml")
    root.find("name").text = spec.name
    root.find("description").text = spec.description
    disks = root.find("disks")
    for d in spec.disks:
        etree.SubElement(disks, "disk", name=d.name, checkpoint="bitmap" if d.bitmap else "no")
    return _serialise(root)


def export_bitmaps(backup_xml: str) -> dict[str, str]:
    """disk name -> exportbitmap, from the job XML libvirt returns (backupGetXMLDesc)."""
    root = etree.fromstring(backup_xml.encode())
    out = {}
    for el in root.iterfind("./disks/disk"):
        if el.get("exportbitmap"):
            out[el.get("name")] = el.get("exportbitmap")
    return out


def export_names(backup_xml: str) -> dict[str, str]:
    root = etree.fromstring(backup_xml.encode())
    return {
        el.get("name"): el.get("exportname") or el.get("name")
        for el in root.iterfind("./disks/disk")
        if el.get("backup", "yes") == "yes"
    }
