"""A VM back from a point on real libvirt/QEMU: defined anew (--define, --start) and put back in
place (--in-place) into a shut-off domain; bad input changes nothing."""

from __future__ import annotations

import json
import os
import random

import libvirt
import pytest
from lxml import etree

from libvbackup.backup import pull
from libvbackup.repo import Repository

from .helpers import MiB, assert_restores, cli, first_difference, random_writes, read_image, snap

pytestmark = pytest.mark.integration

NIC = "<interface type='user'><mac address='52:54:00:aa:bb:01'/><model type='virtio'/></interface>"


@pytest.fixture
def vm(lab):
    v = lab.LabVM([(8 * MiB, "qcow2"), (4 * MiB, "qcow2")]).start(extra_devices=NIC)
    yield v
    v.destroy()


@pytest.fixture
def cleanup_domains(lab):
    names = []
    yield names
    conn = lab.ensure_libvirtd()
    for n in names:
        lab.remove_domain(conn, n)
    conn.close()


def _disk_sources(xml: str) -> dict[str, tuple[str, str]]:
    root = etree.fromstring(xml.encode())
    return {d.find("target").get("dev"): (d.find("source").get("file"), d.find("driver").get("type"))
            for d in root.iterfind("./devices/disk")}


def test_define_and_start_a_restored_vm(vm, repo, workdir, cleanup_domains, lab):
    rng = random.Random(10)
    for d in vm.disks:
        random_writes(d, rng, 6)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    at_c1 = snap(vm)
    vm["vda"].fill(MiB, MiB, 0x5A)
    pull(vm.name, repo=str(repo), checkpoint="c2", incremental="c1")
    new = f"{vm.name}-copy"
    cleanup_domains.append(new)
    os.chmod(workdir, 0o711)  # QEMU's user must reach the images
    out = workdir / "copy"
    res = cli("restore", vm.name, "--repo", str(repo), "--checkpoint", "c1", "--output", str(out),
              "--define", new, "--start", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["name"] == new and doc["started"] is True and doc["checkpoint"] == "c1"
    dom = vm.conn.lookupByName(new)
    assert dom.isActive()
    xml = dom.XMLDesc(0)
    assert dom.UUIDString() != vm.dom.UUIDString() and dom.UUIDString() == doc["uuid"]
    assert _disk_sources(xml) == {t: (str(out / f"{t}.qcow2"), "qcow2") for t in ("vda", "vdb")}
    assert "52:54:00:aa:bb:01" not in xml  # libvirt chose a new MAC address
    assert etree.fromstring(xml.encode()).find("./devices/interface/mac") is not None
    assert dom.listAllCheckpoints(0) == []
    assert oct(os.stat(out).st_mode & 0o777) == "0o711"
    # The new VM runs on the images as they were at c1 (QEMU has them open; read them shared).
    dom.destroy()
    for t, data in at_c1.items():
        got = read_image(out / f"{t}.qcow2", "qcow2")
        assert got == data, f"{t}: {first_difference(got, data)}"
    # The original is untouched and its chain goes on.
    assert vm.dom.isActive() and sorted(c.getName() for c in vm.dom.listAllCheckpoints(0)) == ["c1", "c2"]


def test_define_refuses_a_name_that_exists_and_changes_nothing(vm, repo, workdir):
    pull(vm.name, repo=str(repo), checkpoint="c1")
    out = workdir / "nope"
    res = cli("restore", vm.name, "--repo", str(repo), "--output", str(out), "--define", vm.name)
    assert res.returncode == 4, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "already has a VM named" in res.stderr
    assert not out.exists()
    res = cli("restore", vm.name, "--repo", str(repo), "--output", str(out), "--define", "bad name/x")
    assert res.returncode == 2 and "not a usable domain name" in res.stderr
    res = cli("restore", vm.name, "--repo", str(repo), "--output", str(out), "--start")
    assert res.returncode == 2 and "--start needs --define" in res.stderr
    assert not out.exists()
    private = workdir / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    res = cli("restore", vm.name, "--repo", str(repo), "--output", str(private / "x"), "--define", "lvbtest-never")
    assert res.returncode == 2 and "QEMU cannot reach" in res.stderr, res.stderr
    assert not (private / "x").exists()
    with pytest.raises(libvirt.libvirtError):
        vm.conn.lookupByName("lvbtest-never")


def test_in_place_restore_of_a_shut_off_vm_then_a_full_backup(vm, repo, workdir):
    rng = random.Random(11)
    for d in vm.disks:
        random_writes(d, rng, 6)
    pull(vm.name, repo=str(repo), checkpoint="c1")
    at_c1 = snap(vm)
    vm["vda"].fill(0, 2 * MiB, 0x33)
    vm["vdb"].write(MiB + 7, b"later data")
    pull(vm.name, repo=str(repo), checkpoint="c2", incremental="c1")
    vm.flush()
    # Running: refused. Without --yes: refused. Nothing changes.
    res = cli("restore", vm.name, "--repo", str(repo), "--checkpoint", "c1", "--in-place", "--yes")
    assert res.returncode == 4 and "is running" in res.stderr
    vm.dom.destroy()
    vm.wait_stopped()
    before = {d.target: d.path.read_bytes() for d in vm.disks}
    modes = {d.target: os.stat(d.path) for d in vm.disks}
    res = cli("restore", vm.name, "--repo", str(repo), "--checkpoint", "c1", "--in-place")
    assert res.returncode == 2 and "--yes" in res.stderr
    assert {d.target: d.path.read_bytes() for d in vm.disks} == before
    assert sorted(c.getName() for c in vm.dom.listAllCheckpoints(0)) == ["c1", "c2"]

    res = cli("restore", vm.name, "--repo", str(repo), "--checkpoint", "c1", "--in-place", "--yes", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert sorted(doc["checkpoints_dropped"]) == ["c1", "c2"] and sorted(doc["disks"]) == ["vda", "vdb"]
    assert vm.dom.listAllCheckpoints(0) == []
    for d in vm.disks:
        st = os.stat(d.path)
        assert (st.st_uid, st.st_gid, st.st_mode) == (modes[d.target].st_uid, modes[d.target].st_gid,
                                                      modes[d.target].st_mode)
        assert st.st_ino != modes[d.target].st_ino
        got = read_image(d.path, "qcow2")
        assert got == at_c1[d.target], f"{d.target}: {first_difference(got, at_c1[d.target])}"
        assert not list(d.path.parent.glob(".*.lvb-restore"))
    # The VM runs on the restored data; its next backup is a full one, and restores.
    vm.boot()
    for d in vm.disks:
        d.model[:] = at_c1[d.target]
    vm["vda"].write(3 * MiB + 1, b"after the restore")
    r = pull(vm.name, repo=str(repo), level="auto")
    assert r.level == "full", r
    assert_restores(repo, vm.name, r.checkpoint, snap(vm), workdir)
    assert [p.checkpoint for p in Repository(repo).load(vm.name).points][:2] == ["c1", "c2"]
