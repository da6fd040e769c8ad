"""A new domain definition from the domain XML saved with a backup point (pure).

The saved XML is the live definition at backup time, so it carries what only that running
instance had: its id, UUID, security labels, device aliases, MAC addresses, the paths of
auto-created channel sockets and ptys, backing chains of its disks. A restored VM is another
machine: those go (libvirt makes new ones), its disks become the restored images, a writable
disk that was not restored is left out and a console written to a file becomes a pty, rather
than shared with the original.
"""

from __future__ import annotations

import dataclasses
import re

from lxml import etree

from .errors import RepositoryError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")


@dataclasses.dataclass(frozen=True)
class Definition:
    xml: str
    left_out: tuple[str, ...]  # writable disks of the saved VM that were not restored


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def restored_domain(saved_xml: str, name: str, images: dict[str, tuple[str, str]]) -> Definition:
    """``images``: disk target -> (restored image path, format)."""
    try:
        root = etree.fromstring(saved_xml.encode())
    except etree.XMLSyntaxError as e:
        raise RepositoryError(f"the domain XML saved with the point is not valid XML: {e}") from e
    if root.tag != "domain":
        raise RepositoryError("the domain XML saved with the point is not a <domain>")
    root.attrib.pop("id", None)
    _set_text(root, "name", name)
    for tag in ("uuid", "seclabel", "resource"):
        for el in root.findall(tag):
            root.remove(el)
    for el in list(root.iter("alias")):
        if not (el.get("name") or "").startswith("ua-"):  # user aliases are part of the config
            el.getparent().remove(el)
    devices = root.find("devices")
    left_out = []
    if devices is not None:
        for disk in devices.findall("disk"):
            target = disk.find("target")
            dev = target.get("dev") if target is not None else None
            if dev in images:
                _point_disk_at(disk, *images[dev])
            elif disk.find("readonly") is None and disk.get("device", "disk") != "cdrom":
                devices.remove(disk)  # never two VMs writing one image
                left_out.append(dev or "?")
        for iface in devices.findall("interface"):
            for tag in ("mac", "target"):  # libvirt picks a new MAC and a new tap device
                for el in iface.findall(tag):
                    iface.remove(el)
        for chr_dev in (*devices.findall("channel"), *devices.findall("serial"), *devices.findall("console")):
            _reset_char_device(chr_dev)
        for gfx in devices.findall("graphics"):
            if gfx.get("autoport") == "yes":
                gfx.attrib.pop("port", None)
                gfx.attrib.pop("tlsPort", None)
    return Definition(etree.tostring(root, encoding="unicode"), tuple(left_out))


def _set_text(root, tag: str, text: str) -> None:
    el = root.find(tag)
    if el is None:
        el = etree.SubElement(root, tag)
    el.text = text


def _point_disk_at(disk, path: str, fmt: str) -> None:
    disk.set("type", "file")
    driver = disk.find("driver")
    if driver is None:
        driver = etree.SubElement(disk, "driver", name="qemu")
    driver.set("type", fmt)
    for tag in ("source", "backingStore"):
        for el in disk.findall(tag):
            disk.remove(el)
    source = etree.Element("source", file=path)
    disk.insert(list(disk).index(driver) + 1, source)


def _reset_char_device(dev) -> None:
    """Sockets libvirt created for the old instance and ptys it was given: created anew. Files
    (a serial console written to a file, a <log>) would be shared with the original, which
    holds them open: the copy gets a pty and no log instead."""
    target = dev.find("target")
    if target is not None:
        target.attrib.pop("state", None)
    dev.attrib.pop("tty", None)
    for log in dev.findall("log"):
        dev.remove(log)
    source = dev.find("source")
    if dev.get("type") == "file":
        dev.set("type", "pty")
        if source is not None:
            dev.remove(source)
        return
    if source is None:
        return
    if dev.get("type") == "pty" or (dev.get("type") == "unix" and source.get("mode") == "bind"
                                    and "/channel/target/" in (source.get("path") or "")):
        dev.remove(source)
