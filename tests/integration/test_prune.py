"""prune: the kept points stay byte-exact; removed points and their checkpoints go."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess

import pytest

from libvbackup import qemuimg
from libvbackup.backup import pull, push
from libvbackup.prune import prune
from libvbackup.repo import Repository
from libvbackup.retention import Policy
from libvbackup.verify import verify

from .helpers import MiB, assert_restores, cli, random_writes, snap, tree

UTC = datetime.timezone.utc

pytestmark = pytest.mark.integration


@pytest.fixture
def vm(make_vm):
    return make_vm((8 * MiB, "qcow2"), (4 * MiB, "raw"))


def test_prune_keeps_the_newest_points_byte_exact(vm, repo, workdir):
    rng = random.Random(11)
    models = {}
    # f ← i1 ← i2, f ← d (differential), d ← i3 (push)
    for name, parent, fn in (("f", None, pull), ("i1", "f", pull), ("i2", "i1", push),
                             ("d", "f", pull), ("i3", "d", push)):
        for disk in vm.disks:
            random_writes(disk, rng, n=4)
        fn(vm.name, repo=str(repo), checkpoint=name, incremental=parent)
        models[name] = {d.target: d.snapshot() for d in vm.disks}

    before = tree(repo)
    res = cli("prune", vm.name, "--repo", str(repo), "--keep", "2", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["keep"] == ["d", "i3"] and plan["remove"] == ["f", "i1", "i2"]
    assert plan["flatten"] == ["d/vda"]  # vdb (raw source) is full in every point
    assert tree(repo) == before and sorted(vm.checkpoints()) == ["d", "f", "i1", "i2", "i3"]

    r = prune(vm.name, repo=str(repo), keep=2)
    assert r.checkpoints_deleted == ("i2", "i1", "f")
    assert sorted(vm.checkpoints()) == ["d", "i3"]
    m = Repository(repo).load(vm.name)
    assert [(p.checkpoint, p.parent) for p in m.points] == [("d", None), ("i3", "d")]
    assert sorted(x.name for x in (repo / vm.name).iterdir()) == [".lock", "d", "i3", "manifest.json"]
    for name in ("d", "i3"):
        assert_restores(repo, vm.name, name, models[name], workdir)
    assert verify(vm.name, repo=str(repo)).ok
    # The chain goes on from the kept points.
    vm["vda"].write(777, b"after the prune")
    pull(vm.name, repo=str(repo), checkpoint="i4", level="inc")
    assert_restores(repo, vm.name, "i4", {d.target: d.snapshot() for d in vm.disks}, workdir)
    r = prune(vm.name, repo=str(repo), keep=1)
    assert r.remove == ("d", "i3") and sorted(vm.checkpoints()) == ["i4"]
    assert_restores(repo, vm.name, "i4", {d.target: d.snapshot() for d in vm.disks}, workdir)


def test_prune_never_deletes_foreign_checkpoints_and_refuses_bad_keep(vm, repo):
    pull(vm.name, repo=str(repo), checkpoint="a")
    vm.dom.checkpointCreateXML("<domaincheckpoint><name>theirs</name><disks><disk name='vda'/>"
                               "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>", 0)
    pull(vm.name, repo=str(repo), checkpoint="b", level="inc")
    prune(vm.name, repo=str(repo), keep=1)
    assert sorted(vm.checkpoints()) == ["b", "theirs"]
    res = cli("prune", vm.name, "--repo", str(repo), "--keep", "0")
    assert res.returncode == 2 and "at least 1" in res.stderr


def _date(repo, vm_name: str, completed: dict[str, str]) -> None:
    """Give points other completion times: calendar time, simulated honestly in the manifest."""
    r = Repository(repo)
    m = r.load(vm_name)
    for p in m.points:
        p.completed = completed.get(p.checkpoint, p.completed)
    r.save(m)


def _check_images(repo, vm_name: str) -> dict[str, str | None]:
    """qemu-img check of every image of the manifest; their backing files, by image."""
    m = Repository(repo).load(vm_name)
    out = {}
    for p in m.points:
        for d in p.disks.values():
            path = Repository(repo).image(vm_name, d.image)
            subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)
            out[d.image] = qemuimg.info(str(path)).get("backing-filename")
    return out


# p0 full; p1..p7 incremental (pull and push); vdc hot-plugged at p4, so full there; dated so
# that daily 2, weekly 2, monthly 2 keep p7, p6 (daily), p2, p1 (weekly: W06 and W04; W07 is
# used up by p7) and p0 (monthly: February is used up by p7, January by p1, so the oldest).
DATES = {"p0": "2026-01-05T12:00:00+00:00", "p1": "2026-01-20T12:00:00+00:00",
         "p2": "2026-02-03T12:00:00+00:00", "p3": "2026-02-10T12:00:00+00:00",
         "p4": "2026-02-11T10:00:00+00:00", "p5": "2026-02-11T14:00:00+00:00",
         "p6": "2026-02-12T12:00:00+00:00", "p7": "2026-02-13T12:00:00+00:00"}
GFS = ("--keep-daily", "2", "--keep-weekly", "2", "--keep-monthly", "2")


def _chain(vm, repo, names=tuple(DATES), hotplug_at="p4"):
    rng = random.Random(29)
    models = {}
    for i, name in enumerate(names):
        if name == hotplug_at:
            vm.hotplug("vdc", 4 * MiB)
        for disk in vm.disks:
            random_writes(disk, rng, n=3)
        (push if i % 3 == 2 else pull)(vm.name, repo=str(repo), checkpoint=name, level="inc" if i else "full")
        models[name] = snap(vm)
    _date(repo, vm.name, DATES)
    return models


def test_calendar_rules_remove_middle_points_and_the_rest_stay_byte_exact(vm, repo, workdir):
    models = _chain(vm, repo)
    env = dict(os.environ, TZ="UTC")
    before = tree(repo)
    res = cli("prune", vm.name, "--repo", str(repo), *GFS, "--dry-run", env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:8]] == [
        ["would", "keep"], ["would", "keep"], ["would", "keep"], ["would", "remove"], ["would", "remove"],
        ["would", "remove"], ["would", "keep"], ["would", "keep"]]
    assert lines[0].endswith("p0  2026-01-05T12:00:00+00:00  (monthly[oldest] #1)"), lines[0]
    assert lines[1].endswith("(weekly #2)") and lines[2].endswith("(weekly #1)")
    assert lines[6].endswith("(daily #2)") and lines[7].endswith("(daily #1)")
    assert "would rebase p6/vda onto p2/vda.qcow2" in lines
    assert "would rebase p6/vdc onto nothing (self-contained)" in lines
    assert lines[-1] == "would keep 5, remove 3 point(s) [daily 2, weekly 2, monthly 2]"
    res = cli("prune", vm.name, "--repo", str(repo), *GFS, "--dry-run", "--json", env=env)
    plan = json.loads(res.stdout)
    assert plan["keep"] == ["p0", "p1", "p2", "p6", "p7"] and plan["remove"] == ["p3", "p4", "p5"]
    assert plan["reasons"] == {"p0": "monthly[oldest] #1", "p1": "weekly #2", "p2": "weekly #1",
                               "p6": "daily #2", "p7": "daily #1"}
    # vdb (raw source) is full in every point; vdc's chain starts in p4, which goes.
    assert plan["rebase"] == {"p6/vda": "p2/vda.qcow2", "p6/vdc": None}
    assert plan["flatten"] == ["p6/vdc"] and plan["completed"] == DATES
    assert tree(repo) == before and vm.checkpoints() == sorted(DATES)

    r = prune(vm.name, repo=str(repo), keep=Policy(daily=2, weekly=2, monthly=2), tz=UTC)
    assert r.checkpoints_deleted == ("p5", "p4", "p3") and r.warnings == ()
    assert vm.checkpoints() == ["p0", "p1", "p2", "p6", "p7"]
    m = Repository(repo).load(vm.name)
    assert [(p.checkpoint, p.parent) for p in m.points] == [
        ("p0", None), ("p1", "p0"), ("p2", "p1"), ("p6", "p2"), ("p7", "p6")]
    assert {n: d.backing for n, d in m.get("p6").disks.items()} == {"vda": "p2/vda.qcow2", "vdb": None, "vdc": None}
    assert sorted(x.name for x in (repo / vm.name).iterdir()) == [
        ".lock", "manifest.json", "p0", "p1", "p2", "p6", "p7"]
    backing = _check_images(repo, vm.name)
    assert (backing["p6/vda.qcow2"], backing["p6/vdc.qcow2"], backing["p7/vdc.qcow2"]) == (
        "../p2/vda.qcow2", None, "../p6/vdc.qcow2")
    for name in r.keep:
        assert_restores(repo, vm.name, name, models[name], workdir)
    assert verify(vm.name, repo=str(repo)).ok
    # The same rules again remove nothing; the chain goes on from the newest point.
    again = prune(vm.name, repo=str(repo), keep=Policy(daily=2, weekly=2, monthly=2), tz=UTC)
    assert again.remove == () and again.rebase == {} and _check_images(repo, vm.name) == backing
    vm["vda"].write(3 * MiB + 5, b"after the prune")
    pull(vm.name, repo=str(repo), checkpoint="p8", level="inc")
    # Later on 13 February: p8 is that day's newest point, so p7 goes and p8 moves onto p6.
    _date(repo, vm.name, {"p8": "2026-02-13T18:00:00+00:00"})
    r = prune(vm.name, repo=str(repo), keep=Policy(daily=2, weekly=2, monthly=2), tz=UTC)
    assert r.remove == ("p7",) and r.rebase == {"p8/vda": "p6/vda.qcow2", "p8/vdc": "p6/vdc.qcow2"}
    assert (r.reasons["p8"], r.reasons["p6"]) == ("daily #1", "daily #2")
    assert vm.checkpoints() == ["p0", "p1", "p2", "p6", "p8"]
    _check_images(repo, vm.name)
    assert_restores(repo, vm.name, "p6", models["p6"], workdir)
    assert_restores(repo, vm.name, "p8", snap(vm), workdir)
    assert verify(vm.name, repo=str(repo)).ok


def test_an_interrupted_prune_is_put_right_by_the_next_one(vm, repo, workdir):
    names = ("p0", "p1", "p2", "p3")
    models = _chain(vm, repo, names, hotplug_at=None)
    r = Repository(repo)
    # As if a prune that removes p1 and p2 died after its first step: p3's image is rebased
    # onto p0's, the manifest still says p2.
    qemuimg.rebase(str(r.image(vm.name, "p3/vda.qcow2")), r.backing_name("p0/vda.qcow2"))
    assert_restores(repo, vm.name, "p3", models["p3"], workdir)  # restore follows the headers
    # The next prune keeps everything: p3's image goes back onto p2's, said in a warning.
    res = cli("prune", vm.name, "--repo", str(repo), "--keep", "9", "--dry-run")
    assert res.returncode == 0 and "prune was interrupted" in res.stderr, res.stderr
    r9 = prune(vm.name, repo=str(repo), keep=9)
    assert r9.remove == () and len(r9.warnings) == 1 and "rebased onto p2/vda.qcow2" in r9.warnings[0]
    assert _check_images(repo, vm.name)["p3/vda.qcow2"] == "../p2/vda.qcow2"
    assert verify(vm.name, repo=str(repo)).ok
    # Died again at the same place; this time the same prune runs again and finishes.
    qemuimg.rebase(str(r.image(vm.name, "p3/vda.qcow2")), r.backing_name("p0/vda.qcow2"))
    keep = Policy(last=1, yearly=1)  # p3; 2026 is used up by p3, so the oldest: p0
    res = prune(vm.name, repo=str(repo), keep=keep, tz=UTC)
    assert res.keep == ("p0", "p3") and res.rebase == {"p3/vda": "p0/vda.qcow2"} and res.warnings == ()
    assert [(p.checkpoint, p.parent) for p in r.load(vm.name).points] == [("p0", None), ("p3", "p0")]
    assert vm.checkpoints() == ["p0", "p3"]
    for name in ("p0", "p3"):
        assert_restores(repo, vm.name, name, models[name], workdir)
    assert verify(vm.name, repo=str(repo)).ok
