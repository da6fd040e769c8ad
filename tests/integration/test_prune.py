"""prune: the kept points stay byte-exact; removed points and their checkpoints go."""

from __future__ import annotations

import json
import random

import pytest

from libvbackup.backup import pull, push
from libvbackup.prune import prune
from libvbackup.repo import Repository
from libvbackup.verify import verify

from .helpers import MiB, assert_restores, cli, random_writes, tree

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
