"""libvbackup.domxml: which disks of a domain can take part in a backup."""

from __future__ import annotations

import pytest

from libvbackup import domxml, errors
from libvbackup.domxml import Disk

DOMAIN = """\
<domain type='kvm'>
  <name>vm1</name>
  <uuid>0f8fad5b-d9cb-469f-a165-70867728950e</uuid>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/vm1-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/srv/shared.img'/>
      <target dev='vdc' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/golden.qcow2'/>
      <target dev='vdd' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='file' device='floppy'>
      <source file='/srv/boot.img'/>
      <target dev='fda' bus='fdc'/>
    </disk>
    <disk type='file'>
      <source file='/srv/nodriver.img'/>
      <target dev='vde' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/notarget.qcow2'/>
    </disk>
    <interface type='network'><source network='default'/></interface>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def disks() -> list[Disk]:
    return domxml.parse_disks(DOMAIN)


def _by(disks, name):
    return next(d for d in disks if d.target == name)


def test_parse_disks_in_document_order_skipping_disks_without_target(disks):
    assert [d.target for d in disks] == ["vda", "vdb", "sda", "vdc", "vdd", "fda", "vde"]


def test_parse_disks_accepts_bytes():
    assert domxml.parse_disks(DOMAIN.encode()) == domxml.parse_disks(DOMAIN)


def test_parse_qcow2_file_disk(disks):
    assert _by(disks, "vda") == Disk(
        target="vda", device="disk", format="qcow2", source="/var/lib/libvirt/images/vm1.qcow2"
    )


def test_parse_raw_block_disk(disks):
    assert _by(disks, "vdb") == Disk(target="vdb", device="disk", format="raw", source="/dev/vg0/vm1-data")


def test_parse_empty_cdrom(disks):
    assert _by(disks, "sda") == Disk(target="sda", device="cdrom", format="raw", source=None, readonly=True)


def test_parse_shareable_and_readonly_disks(disks):
    vdc, vdd = _by(disks, "vdc"), _by(disks, "vdd")
    assert vdc.shareable and not vdc.readonly and vdc.format == "raw" and vdc.source == "/srv/shared.img"
    assert vdd.readonly and not vdd.shareable and vdd.format == "qcow2"


def test_parse_defaults_device_disk_and_no_format(disks):
    vde = _by(disks, "vde")
    assert vde.device == "disk" and vde.format is None and vde.source == "/srv/nodriver.img"


@pytest.mark.parametrize(
    "name, capable, bitmap, reason",
    [
        ("vda", True, True, None),
        ("vdb", True, False, None),
        ("sda", False, False, "device is a cdrom"),
        ("vdc", False, False, "shareable"),
        ("vdd", False, True, "read-only"),
        ("fda", False, False, "device is a floppy"),
        ("vde", True, False, None),
    ],
)
def test_backup_and_bitmap_capability(disks, name, capable, bitmap, reason):
    d = _by(disks, name)
    assert d.backup_capable is capable
    assert d.bitmap_capable is bitmap
    assert d.skip_reason == reason
    assert (d.skip_reason is None) == d.backup_capable


def test_disk_without_source_is_not_capable():
    d = Disk(target="vdz", device="disk", format="qcow2", source=None)
    assert not d.backup_capable
    assert d.skip_reason == "no source"


def test_domain_uuid():
    assert domxml.domain_uuid(DOMAIN) == "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert domxml.domain_uuid("<domain><name>x</name></domain>") is None


# --------------------------------------------------------------------------- select_disks


def _names(ds):
    return [d.target for d in ds]


def test_select_defaults_to_every_capable_disk(disks):
    assert _names(domxml.select_disks(disks)) == ["vda", "vdb", "vde"]


def test_select_include_keeps_the_given_order_once(disks):
    assert _names(domxml.select_disks(disks, include=["vdb", "vda", "vdb"])) == ["vdb", "vda"]


def test_select_exclude(disks):
    assert _names(domxml.select_disks(disks, exclude=["vdb"])) == ["vda", "vde"]


def test_select_include_and_exclude_different_disks(disks):
    assert _names(domxml.select_disks(disks, include=["vda", "vdb"], exclude=["vde"])) == ["vda", "vdb"]


def test_select_excluding_an_incapable_disk_is_harmless(disks):
    assert _names(domxml.select_disks(disks, exclude=["sda"])) == ["vda", "vdb", "vde"]


@pytest.mark.parametrize(
    "include, exclude", [(["vdx"], []), ([], ["vdx"]), (["vda", "hdz"], [])]
)
def test_select_unknown_disk_is_not_found(disks, include, exclude):
    with pytest.raises(errors.NotFound) as ei:
        domxml.select_disks(disks, include=include, exclude=exclude)
    assert "vdx" in str(ei.value) or "hdz" in str(ei.value)
    # The message lists the disks that can be backed up.
    assert "vda, vdb, vde" in str(ei.value)
    assert ei.value.exit_code == 3


def test_select_same_disk_included_and_excluded(disks):
    with pytest.raises(errors.UsageError, match="'vdb' is both included and excluded"):
        domxml.select_disks(disks, include=["vda", "vdb"], exclude=["vdb"])


@pytest.mark.parametrize(
    "name, reason", [("sda", "device is a cdrom"), ("vdd", "read-only"), ("vdc", "shareable")]
)
def test_select_including_an_incapable_disk_is_a_usage_error(disks, name, reason):
    with pytest.raises(errors.UsageError) as ei:
        domxml.select_disks(disks, include=["vda", name])
    assert name in str(ei.value) and reason in str(ei.value)
    assert ei.value.exit_code == 2


def test_select_nothing_left(disks):
    with pytest.raises(errors.UsageError, match="no disk left"):
        domxml.select_disks(disks, exclude=["vda", "vdb", "vde"])
    with pytest.raises(errors.UsageError, match="no disk left"):
        domxml.select_disks([])


def test_select_domain_without_capable_disks():
    only_cdrom = [Disk(target="sda", device="cdrom", format="raw", source=None, readonly=True)]
    with pytest.raises(errors.NotFound, match="none"):
        domxml.select_disks(only_cdrom, include=["vda"])
    with pytest.raises(errors.UsageError, match="no disk left"):
        domxml.select_disks(only_cdrom)
