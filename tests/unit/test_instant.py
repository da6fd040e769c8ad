"""Instant recovery's pure parts: the record of an instant VM, and its domain definition."""

from __future__ import annotations

import pytest
from lxml import etree

from libvbackup import instant, instantrec
from libvbackup.errors import RepositoryError

SAVED = ("<domain type='kvm' id='7'><name>vm1</name><uuid>11111111-2222-3333-4444-555555555555</uuid>"
         "<metadata><other:x xmlns:other='urn:other'/></metadata><memory>1024</memory><devices>"
         "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/vm1.qcow2'/>"
         "<backingStore/><target dev='vda' bus='virtio'/></disk></devices></domain>")


def record() -> instantrec.Record:
    disk = instantrec.ServedDisk("vda", "/r/vm1/c1/vda.qcow2", 1 << 30, "/out/vda.qcow2",
                                 "/run/libvbackup/instant/n/vda.sock", "/run/libvbackup/instant/n/vda.lock", 4242)
    return instantrec.Record("n", "u-1", "vm1", "/r", "c2", ("c1", "c2"), "/run/libvbackup/instant/n",
                             "qemu:///system", "2026-01-01T00:00:00+00:00", {"vda": disk})


def test_a_record_reads_back_as_written_and_a_bad_one_is_one_error():
    rec = record()
    assert instantrec.loads(instantrec.dumps(rec), "x") == rec
    assert rec.disks["vda"].uri == "nbd+unix:///vda?socket=/run/libvbackup/instant/n/vda.sock"
    for bad in ("{", '{"format": 1}', '{"format": 99}'):
        with pytest.raises(RepositoryError):
            instantrec.loads(bad, "x")


def test_a_pid_nobody_holds_a_lock_for_is_never_alive(tmp_path):
    import dataclasses
    import os

    d = dataclasses.replace(record().disks["vda"], lock=str(tmp_path / "vda.lock"), pid=os.getpid())
    (tmp_path / "vda.lock").touch()
    assert not instantrec.alive(d)  # this very process, alive, but not holding the lock
    instantrec.stop(d)  # so it is never signalled (this test would die)


def test_the_definition_runs_on_the_overlays_with_its_uuid_and_our_metadata():
    d = instant.definition(SAVED, "vm1-now", "aaaaaaaa-0000-0000-0000-000000000001", {"vda": "/out/vda.qcow2"},
                           "/r", "vm1", "c2")
    root = etree.fromstring(d.xml.encode())
    assert root.findtext("name") == "vm1-now" and root.get("id") is None
    assert [u.text for u in root.findall("uuid")] == ["aaaaaaaa-0000-0000-0000-000000000001"]
    disk = root.find("devices/disk")
    assert disk.find("source").get("file") == "/out/vda.qcow2" and disk.find("backingStore") is None
    meta = root.find("metadata")
    ours = meta.find(f"{{{instant.NS}}}instant")
    assert (ours.get("repo"), ours.get("vm"), ours.get("checkpoint")) == ("/r", "vm1", "c2")
    assert meta.find("{urn:other}x") is not None  # other tools' metadata is kept
