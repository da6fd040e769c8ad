"""Shut-off domains in the same chain as running ones (the offline transport), on real libvirt and
QEMU: online full -> writes -> shut off -> offline incremental -> start -> writes -> online
incremental, every point byte-exact; a start during an offline backup is refused and the run
cleans up; push of a shut-off VM is refused."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import libvirt
import pytest

from libvbackup import api, qemuimg
from libvbackup.repo import Repository

from .helpers import (MiB, assert_restores, cli, leftovers, random_writes, snap, stalling_child, tree,
                      wait_copying)

pytestmark = pytest.mark.integration


@pytest.fixture
def vm(make_vm):
    return make_vm((16 * MiB, "qcow2"), (8 * MiB, "qcow2"), (4 * MiB, "raw"))


def shut_off(vm) -> None:
    vm.flush()  # what the guest wrote is on the images (as a guest's shutdown would leave it)
    vm.dom.destroy()
    vm.wait_stopped()


def test_online_and_offline_points_are_one_chain(vm, repo, workdir):
    rng = random.Random(41)
    for d in vm.disks:
        random_writes(d, rng, 8)
    r = str(repo)
    api.pull(vm.name, repo=r, checkpoint="on1", quiesce="no")
    at = {"on1": snap(vm)}
    for d in vm.disks:
        random_writes(d, rng, 6)
    vm["vda"].zero(4 * MiB, MiB, unmap=True)
    shut_off(vm)
    off = api.pull(vm.name, repo=r, level="inc", checkpoint="off2")
    at["off2"] = snap(vm)
    assert (off.mode, off.level, off.parent, off.consistency) == ("offline", "incremental", "on1", "offline")
    assert off.disks["vdc"].mode == "full"  # raw: no bitmap, as online
    assert sorted(c.getName() for c in vm.dom.listAllCheckpoints(0)) == ["off2", "on1"]
    assert set(qemuimg.bitmaps(str(vm["vda"].path))) == {"on1", "off2"}
    assert not vm.dom.isActive()  # never started
    vm.boot()
    vm["vda"].write(9 * MiB + 3, b"after the offline point")
    vm["vdb"].fill(MiB, 3 * MiB, 0x5c)
    on3 = api.pull(vm.name, repo=r, level="inc", checkpoint="on3", quiesce="no")
    at["on3"] = snap(vm)
    assert (on3.mode, on3.parent) == ("pull", "off2")
    # Exactly what was written since the offline point: the bitmap made offline worked.
    assert on3.disks["vda"].bytes_copied + on3.disks["vda"].bytes_zeroed <= 2 * 64 * 1024
    assert on3.disks["vdb"].bytes_copied == 3 * MiB
    # Off again: a differential since the first point, and a full, offline.
    vm["vda"].fill(12 * MiB, MiB + 1, 0x61)
    shut_off(vm)
    diff = api.pull(vm.name, repo=r, level="diff", checkpoint="off4")
    at["off4"] = snap(vm)
    assert (diff.mode, diff.level, diff.parent) == ("offline", "differential", "on1")
    full = api.pull(vm.name, repo=r, level="full", checkpoint="off5")
    at["off5"] = snap(vm)
    assert full.level == "full" and full.disks["vda"].bytes_copied > 0
    for chk, want in at.items():
        assert_restores(repo, vm.name, chk, want, workdir)
    assert api.verify(vm.name, repo=r).ok
    listing = cli("list", vm.name, "--repo", r)
    assert [line.split()[4] for line in listing.stdout.splitlines()[1:]] == \
        ["crash", "offline", "crash", "offline", "offline"]
    vm.boot()  # and online again after all of that
    vm["vdb"].write(7 * MiB, b"z" * 5000)
    last = api.pull(vm.name, repo=r, level="inc", checkpoint="on6", quiesce="no")
    assert last.parent == "off5"
    assert_restores(repo, vm.name, "on6", snap(vm), workdir)


# An offline run whose copy stalls after its first request, with qemu-nbd holding the images.
CHILD = stalling_child("""
    from libvbackup import api
    api.pull(sys.argv[1], repo=sys.argv[2], checkpoint="stalled", level="inc")
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_start_during_an_offline_backup_is_refused_and_the_run_cleans_up(vm, repo, workdir, sig):
    vm["vda"].fill(0, 2 * MiB, 0x41)
    api.pull(vm.name, repo=str(repo), checkpoint="c1", quiesce="no")
    vm["vda"].fill(3 * MiB, 2 * MiB, 0x42)
    shut_off(vm)
    at_off = snap(vm)
    p = subprocess.Popen([sys.executable, "-c", CHILD, vm.name, str(repo)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_copying(p)
        assert "stalled" in vm.checkpoints()
        with pytest.raises(libvirt.libvirtError, match="lock"):
            vm.dom.create()  # QEMU cannot take the image's write lock while it is read
        assert not vm.dom.isActive()
        p.send_signal(sig)
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
    if sig == signal.SIGKILL:  # the next run cleans up after the dead one
        assert (repo / vm.name / ".run.json").exists()
        res = cli("abort", vm.name, "--repo", str(repo))
        assert res.returncode == 0, res.stderr
    assert vm.checkpoints() == ["c1"] and not (repo / vm.name / ".run.json").exists()
    assert set(qemuimg.bitmaps(str(vm["vda"].path))) == {"c1"}
    assert [q.checkpoint for q in Repository(repo).load(vm.name).points] == ["c1"] and leftovers() == []
    r = api.pull(vm.name, repo=str(repo), checkpoint="c2", level="inc")
    assert r.mode == "offline" and r.parent == "c1"
    assert_restores(repo, vm.name, "c2", at_off, workdir)


def test_push_of_a_shut_off_vm_is_refused_and_changes_nothing(vm, repo):
    api.pull(vm.name, repo=str(repo), checkpoint="c1", quiesce="no")
    shut_off(vm)
    before = tree(repo)
    res = cli("push", vm.name, "--repo", str(repo), "--level", "inc", "--json")
    assert res.returncode == 4, res.stderr
    doc = json.loads(res.stdout)
    assert "push backup needs QEMU running" in doc["error"] and "use pull" in doc["hint"]
    assert tree(repo) == before and vm.checkpoints() == ["c1"]
    dry = api.pull(vm.name, repo=str(repo), level="inc", dry_run=True)
    assert dry.mode == "offline" and dry.consistency == "offline" and tree(repo) == before
