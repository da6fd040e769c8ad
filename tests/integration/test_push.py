"""Push mode: QEMU writes the images; they join the same qcow2 chains as pull points."""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from libvbackup.backup import pull, push
from libvbackup.errors import Error
from libvbackup.repo import Repository
from libvbackup.verify import verify

from .helpers import MiB, assert_restores, cli, leftovers, random_writes, snap

pytestmark = pytest.mark.integration


@pytest.fixture
def vm(make_vm):
    return make_vm((16 * MiB, "qcow2"), (8 * MiB, "qcow2"), (4 * MiB, "raw"))



def backing_of(path) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    return info.get("backing-filename")


def test_push_full_and_incremental_restore_byte_exact(vm, repo, workdir):
    rng = random.Random(5)
    for d in vm.disks:
        random_writes(d, rng)
    r = push(vm.name, repo=str(repo), checkpoint="p1")
    assert (r.mode, r.level) == ("push", "full")
    m1 = snap(vm)
    for d in vm.disks:
        random_writes(d, rng, n=6)
    res = cli("push", vm.name, "--repo", str(repo), "--checkpoint", "p2", "--incremental", "p1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["mode"], out["level"], out["parent"]) == ("push", "incremental", "p1")
    assert out["disks"]["vdc"]["mode"] == "full"
    m2 = snap(vm)
    vmdir = repo / vm.name
    assert backing_of(vmdir / "p2" / "vda.qcow2") == "../p1/vda.qcow2"
    assert backing_of(vmdir / "p2" / "vdc.qcow2") is None
    for p in vmdir.rglob("*"):
        assert p.stat().st_uid == 0 and p.stat().st_mode & 0o077 == 0, p
    assert_restores(repo, vm.name, "p1", m1, workdir)
    assert_restores(repo, vm.name, "p2", m2, workdir)
    assert verify(vm.name, repo=str(repo)).ok
    assert not vm.has_job() and leftovers() == []


def test_pull_and_push_points_mix_in_one_chain(vm, repo, workdir):
    rng = random.Random(6)
    models = {}
    steps = [("pull", "a", None), ("push", "b", "a"), ("pull", "c", "b"), ("push", "d", "a"),
             ("push", "e", "d"), ("pull", "f", "e")]
    for mode, name, parent in steps:
        for d in vm.disks:
            random_writes(d, rng, n=4)
        fn = pull if mode == "pull" else push
        r = fn(vm.name, repo=str(repo), checkpoint=name, incremental=parent)
        assert r.mode == mode and r.parent == parent
        models[name] = snap(vm)
    m = Repository(repo).load(vm.name)
    assert [p.mode for p in m.points] == [s[0] for s in steps]
    assert [p.checkpoint for p in m.chain("f")] == ["a", "d", "e", "f"]
    for name, model in models.items():
        assert_restores(repo, vm.name, name, model, workdir)
    assert verify(vm.name, repo=str(repo)).ok


def test_cancelled_push_leaves_no_point(lab, repo, workdir):
    vm = lab.LabVM([(64 * MiB, "qcow2")]).start()
    try:
        _cancelled_push(vm, repo, workdir)
    finally:
        vm.destroy()


def _cancelled_push(vm, repo, workdir):
    import libvirt

    vm["vda"].fill(0, 4 * MiB, 0x31)
    push(vm.name, repo=str(repo), checkpoint="p1")

    def cancel():
        try:
            vm.dom.abortJob()
        except libvirt.libvirtError:
            pass  # QEMU was faster: the job is complete

    # The abort races with QEMU's copy: enough dirty data makes it land mid-copy; should the
    # copy win anyway, that attempt is a complete point and the next one tries again.
    rng = random.Random(8)
    points = ["p1"]
    for attempt in range(4):
        vm["vda"].write(MiB, rng.randbytes(40 * MiB))
        name = f"try{attempt}"
        try:
            push(vm.name, repo=str(repo), checkpoint=name, incremental=points[-1], on_job_started=cancel)
        except Error as e:
            assert "cancel" in str(e).lower(), e
            break
        points.append(name)
    else:
        pytest.fail("the push was never cancelled")
    assert [p.checkpoint for p in Repository(repo).load(vm.name).points] == points
    assert sorted(x.name for x in (repo / vm.name).iterdir()) == sorted([".lock", "manifest.json", *points])
    assert vm.checkpoints() == points and not vm.has_job() and leftovers() == []
    r = push(vm.name, repo=str(repo), checkpoint="p3", incremental=points[-1])
    assert r.level == "incremental"
    assert_restores(repo, vm.name, "p3", snap(vm), workdir)


def test_push_dry_run_xml_validates(vm, repo):
    from lxml import etree

    push(vm.name, repo=str(repo), checkpoint="p1")
    rng = etree.RelaxNG(etree.parse("/usr/share/libvirt/schemas/domainbackup.rng"))
    res = cli("push", vm.name, "--repo", str(repo), "--level", "inc", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    doc = etree.fromstring(json.loads(res.stdout)["backup_xml"].encode())
    assert rng.validate(doc), rng.error_log
    assert doc.get("mode") == "push" and doc.findtext("incremental") == "p1"
    assert vm.checkpoints() == ["p1"]
